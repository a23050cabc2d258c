"""Fixtures for the control API: a generated clip, a server on a free loopback port, a client."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from masklet.monitoring.processes import descendant_pids

TOKEN = "test-token-0123456789"


def make_clip(path: Path, frames: int = 20, size: tuple[int, int] = (96, 64), fps: int = 10) -> Path:
    """A small lossless H.264 clip: a bright square moving over a dark gradient."""
    import av

    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264rgb", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        stream.options = {"qp": "0"}
        for i in range(frames):
            rgb = np.zeros((height, width, 3), np.uint8)
            rgb[..., 2] = np.linspace(0, 80, width, dtype=np.uint8)[None, :]
            x = 10 + 2 * i
            rgb[20:40, x:x + 20] = (220, 220, 220)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clips") / "square.mp4")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    """uvicorn in a thread on 127.0.0.1 (a real HTTP server: streaming, disconnects, limits)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class Client:
    def __init__(self, url: str, token: str | None = TOKEN) -> None:
        self.url = url
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def __getattr__(self, method):
        def call(path, **kwargs):
            kwargs.setdefault("timeout", 10)
            return self.session.request(method.upper(), self.url + path, **kwargs)
        return call


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {message}")


def _decode_address(hex_address: str) -> str:
    import ipaddress

    host = bytes.fromhex(hex_address.split(":")[0])
    # /proc/net/tcp* print each 32-bit word in host (little-endian) order
    words = b"".join(host[i:i + 4][::-1] for i in range(0, len(host), 4))
    return str(ipaddress.ip_address(words))


def listening_sockets_of_descendants(root: int) -> list[tuple[str, int, str]]:
    """(address, pid, process name) for every TCP socket in LISTEN state owned by `root` or its descendants."""
    owners: dict[str, int] = {}
    for pid in descendant_pids(root):
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = fd.readlink().name
                except OSError:
                    continue
                if target.startswith("socket:["):
                    owners[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owners:  # 0A: LISTEN
                pid = owners[fields[9]]
                try:
                    name = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    name = "?"
                found.append((_decode_address(fields[1]), pid, name))
    return found


def is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def start_local_ray(monkeypatch, **kwargs) -> None:
    """A new Ray session on loopback for this test: address="local" never joins a cluster another
    process started with `ray start` on this machine (plain ray.init() would, then refuse num_cpus).
    init_ray applies its loopback switch only without an address, so it is applied here too."""
    from masklet.actors.backend import init_ray

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:  # read when ray is imported, and ray may be imported already
        from ray._private import ray_constants

        monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    except (ImportError, AttributeError):
        pass
    init_ray(address="local", **kwargs)


def stop_cli(process, timeout: float = 180.0) -> None:
    """Stop a `masklet` command started with start_new_session=True as a user would (Ctrl-C), and if it
    has not exited within `timeout` (generous: Ray's shutdown under load is slow), kill its group."""
    import os
    import signal
    import subprocess

    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{process.args[:4]} still running {timeout:.0f} s after Ctrl-C; its threads:\n{python_stacks(process.pid)}")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)


def python_stacks(pid: int) -> str:
    """Every thread's Python stack in process `pid` (py-spy, where installed), for a
    failure message: what a command that does not stop is waiting on."""
    import subprocess
    import sys
    from pathlib import Path

    spy = Path(sys.executable).with_name("py-spy")
    try:
        done = subprocess.run([str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
        return (done.stdout + done.stderr)[-8000:]
    except (OSError, subprocess.SubprocessError) as exc:
        return f"(no stacks: {type(exc).__name__}: {exc})"


@contextlib.contextmanager
def local_serve(monkeypatch, proxy_port: int | None = None):
    """A new local Ray session on loopback (start_local_ray) with Serve's proxy on `proxy_port`, or on
    a port picked once Ray is up (and picked again if something binds it first: Ray's own workers
    take ephemeral ports, and one took a port chosen before ray.init in a full-suite run). Yields
    the proxy's port. Serve and Ray are shut down afterwards, also when Serve fails to start, so
    one failure does not leave a session behind for every later test."""
    import ray
    from ray import serve

    start_local_ray(monkeypatch, include_dashboard=False, num_cpus=2, configure_logging=False, log_to_driver=False)
    try:
        for attempt in range(3):
            port = proxy_port or free_port()
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                break
            except Exception as exc:  # noqa: BLE001 - Ray wraps the proxy's bind error in its task error
                if proxy_port is not None or attempt == 2 or "bind" not in str(exc).lower():
                    raise
                serve.shutdown()
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()
