"""`masklet serve` with direct ingress (serve.ingress: direct, the default; deploy/serve_ingress.py),
run as a user runs it: the CLI in its own process, so Ray's switches reach a Ray session of its own.

The API port is served by the API replica itself, not by Serve's proxy; a flood past the app's cap
gets 503 + Retry-After; a replica killed mid-run comes back on the same port (Ray would otherwise
quarantine the freed port and the new replica would have none); Ctrl-C stops it all."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import requests

from tests.serve.conftest import (TOKEN, free_port, is_loopback, listening_sockets_of_descendants, stop_cli,
                                 wait_for)

FLOOD = Path(__file__).with_name("flood_client.py")


def _sockets(port: int, state: str) -> list[list[str]]:
    """/proc/net/tcp{,6} rows of TCP sockets with local port `port` in `state` (0A LISTEN, 06 TIME_WAIT)."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        rows += [f for f in (line.split() for line in lines) if f[1].rsplit(":", 1)[1] == f"{port:04X}" and f[3] == state]
    return rows


def listening_pid(port: int) -> int | None:
    """The pid of the process with a listening TCP socket on `port` (from /proc), or None."""
    inodes = {f"socket:[{fields[9]}]" for fields in _sockets(port, "0A")}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:
            continue
    return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _live(url: str) -> int | str:
    try:
        return requests.get(url + "/health/live", timeout=10).status_code
    except requests.RequestException as exc:
        return type(exc).__name__


def test_masklet_serve_answers_from_the_replica_sheds_load_and_survives_a_replica_kill(tmp_path):
    port, health_port = free_port(), free_port()
    config = tmp_path / "masklet.yaml"
    config.write_text("limits:\n  max_in_flight_requests: 1\n")  # a flood of ordinary requests must hit the cap
    log = (tmp_path / "serve.log").open("w+")
    env = {**os.environ, "MASKLET_API_TOKEN": TOKEN, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    cli = subprocess.Popen([sys.executable, "-m", "masklet.deploy.cli", "serve", "--port", str(port),
                            "--health-port", str(health_port), "--checkpoint", "random", "--image-size", "256",
                            "--device", "cpu", "--config", str(config)],
                           stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}

    def output() -> str:
        if not log.closed:
            log.flush()
        return (tmp_path / "serve.log").read_text(errors="replace")[-4000:]

    try:
        wait_for(lambda: cli.poll() is not None or _live(f"http://127.0.0.1:{health_port}") == 200, timeout=240,
                 interval=0.5, message="masklet serve to start its health listener")
        assert cli.poll() is None, output()
        wait_for(lambda: _live(url) == 200, timeout=120, interval=0.5, message="the API port to answer")
        wait_for(lambda: "masklet serve: console and API" in output(), timeout=120, interval=0.5,
                 message="masklet serve's ready line")
        assert "served by the API replica" in output(), output()
        # Ray called the front gate hook (deploy/serve_ingress.py) in the replica: the app's guard answers
        # ahead of Serve's request handling there
        full_log = (tmp_path / "serve.log").read_text(errors="replace")
        assert any("ServeReplica" in line and "masklet.deploy.serve_ingress:front_gate" in line
                   for line in full_log.splitlines()), full_log[-4000:]
        assert requests.get(url + "/-/healthz", timeout=30).status_code == 200  # Serve's own route: token-free
        replica = listening_pid(port)
        assert replica is not None and "ServeReplica" in cmdline(replica), (replica, cmdline(replica or 0))
        assert requests.get(url + "/streams", timeout=30).status_code == 401  # the app itself, token and all
        # the replica's HTTP server binds the API's host (loopback), like every other server of the session,
        # but for Ray Serve 2.60's inter-deployment gRPC server (see test_serve_loopback.py)
        exposed = [s for s in listening_sockets_of_descendants(cli.pid) if not is_loopback(s[0])
                   and not (s[0] == "::" and s[2].startswith("ray::ServeRepli"))]
        assert not exposed, f"listening beyond loopback: {exposed}"
        assert requests.get(url + "/streams", headers=headers, timeout=30).status_code == 200

        flood = subprocess.run([sys.executable, str(FLOOD), str(port), "/streams", TOKEN, "400", "100"],
                               capture_output=True, text=True, timeout=300)
        result = json.loads(flood.stdout)
        print("flood:", result)
        assert set(result["codes"]) <= {"200", "503"}, result
        assert result["codes"].get("503", 0) > 0 and result["busy_503_without_retry_after"] == 0, result

        # The flood's connections were closed by the server (Connection: close): TIME_WAIT for 60 s. Ray
        # binds without SO_REUSEADDR, so a new replica used to wait them out; ours binds with it.
        assert _sockets(port, "06"), "expected the flood to leave server-side TIME_WAIT connections"
        os.kill(replica, signal.SIGKILL)  # Serve restarts the replica; it must get the same port back
        wait_for(lambda: listening_pid(port) not in (None, replica), timeout=240, interval=0.2,
                 message="a new replica listening on the API port")
        lingering = len(_sockets(port, "06"))
        print(f"new replica listening; {lingering} TIME_WAIT connections of the old one still there")
        assert lingering, "the new replica bound only after TIME_WAIT ended (~60 s): SO_REUSEADDR not in effect?"
        wait_for(lambda: _live(url) == 200, timeout=120, interval=0.5, message="the new replica answering")
        assert "ServeReplica" in cmdline(listening_pid(port) or 0)
        wait_for(lambda: requests.get(url + "/health/ready", timeout=30).status_code == 200, timeout=240,
                 interval=1.0, message="the new replica's model loaded")
    finally:
        stop_cli(cli)
        log.close()
    assert cli.returncode == 0, output()
    wait_for(lambda: listening_pid(port) is None, timeout=120, interval=0.5, message="the API port freed")
