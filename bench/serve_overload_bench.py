"""Overload through Ray Serve (issue 12): 2,000 requests, 200 at a time, against the app `masklet serve`
builds (random weights, 256 px, one looping stream), with /health/live probed meanwhile on the
replica's health listener (serve.health_port) and through Serve's proxy, alternately.

Two floods alternate in one Serve session, twice each: GET /streams/cam1/frame.png (real work: an
overlay PNG; the app works on limits.max_in_flight_requests of them and answers the rest 503) and
GET /health/live (no work: what Serve's proxy alone costs on this machine). Their latency ratio
says how much of a flood's latency is the app's and how much the proxy's. The flood runs in its own
process (tests/serve/flood_client.py: asyncio, raw sockets), so its client work does not share a
GIL with the probes. Each run also gives concurrency / throughput (Little's law): the latency any
first-come-first-served server must show with that many requests always outstanding.

    .venv/bin/python bench/serve_overload_bench.py      # writes bench/results/serve_overload_bench.json
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import subprocess
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

TOKEN = "bench-token-0123456789"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
REQUESTS, CONCURRENCY = 2000, 200


def _probe(url: str) -> tuple[object, float]:
    started = time.monotonic()
    try:
        code: object = requests.get(url + "/health/live", timeout=120).status_code
    except requests.RequestException as exc:
        code = type(exc).__name__
    return code, time.monotonic() - started


def _ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


def flood(port: int, health_port: int, path: str) -> dict:
    """One flood from its own process (tests/serve/flood_client.py), while this process probes
    /health/live on the health listener and through the proxy, alternately."""
    flooder = subprocess.Popen([sys.executable, str(ROOT / "tests" / "serve" / "flood_client.py"), str(port), path,
                                TOKEN, str(REQUESTS), str(CONCURRENCY)], stdout=subprocess.PIPE, text=True)
    listener, proxy = [], []
    while flooder.poll() is None:
        listener.append(_probe(f"http://127.0.0.1:{health_port}"))
        proxy.append(_probe(f"http://127.0.0.1:{port}"))
        time.sleep(0.02)
    result = json.loads(flooder.communicate()[0])
    ok = lambda probes: [t for code, t in probes if code == 200]  # noqa: E731
    # Little's law: with CONCURRENCY requests always outstanding, a first-come-first-served server's
    # latency is concurrency / throughput, whatever each request costs the app
    result.update({"throughput_rps": round(REQUESTS / result["wall_s"], 1),
                   "littles_law_latency_ms": round(CONCURRENCY / (REQUESTS / result["wall_s"]) * 1000, 1),
                   "health_listener_p50_ms": _ms(ok(listener), 0.5), "health_listener_max_ms": _ms(ok(listener), 1.0),
                   "health_listener_codes": sorted({str(code) for code, _ in listener}),
                   "health_via_proxy_p50_ms": _ms(ok(proxy), 0.5), "health_via_proxy_max_ms": _ms(ok(proxy), 1.0),
                   "health_via_proxy_codes": sorted({str(code) for code, _ in proxy}), "probes": len(listener)})
    return result


def main() -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
    import ray
    from ray import serve

    from bench_common import machine
    from masklet.deploy.api_limits import deployment_limits
    from masklet.deploy.serve_deployment import app
    from masklet.pipeline.config import LimitsSettings
    from tests.serve.conftest import free_port, make_clip

    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False, configure_logging=False)
    port, health_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        serve.run(app({"checkpoint": "random", "image_size": 256, "device": "cpu", "token": TOKEN,
                       "max_batch_size": 2, "health_port": health_port}), name="masklet", route_prefix="/")
        deadline = time.monotonic() + 300
        while requests.get(url + "/health/ready", timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise SystemExit("the model did not load in 300 s")
            time.sleep(0.5)
        clip = make_clip(Path(tempfile.mkdtemp()) / "square.mp4")
        created = requests.post(url + "/streams", json={"stream_id": "cam1", "source": str(clip), "loop": True},
                                headers=HEADERS, timeout=30)
        assert created.status_code == 201, created.text
        while requests.get(url + "/streams/cam1/masklet", headers=HEADERS, timeout=30).status_code != 200:
            time.sleep(0.2)
        runs = [flood(port, health_port, path) for _ in range(2) for path in ("/streams/cam1/frame.png", "/health/live")]
    finally:
        serve.shutdown()
        ray.shutdown()
    work = [r["p50_ms"] for r in runs if r["path"].endswith("frame.png")]
    floor = [r["p50_ms"] for r in runs if r["path"] == "/health/live"]
    report = {"benchmark": "serve_overload", "requests": REQUESTS, "concurrency": CONCURRENCY,
              "serve_limits": deployment_limits(),
              "max_in_flight_requests": LimitsSettings().max_in_flight_requests,
              "runs": runs, "p50_ratio_frame_png_over_health_flood": round(statistics.mean(work) / statistics.mean(floor), 2),
              "health_listener_max_ms_over_all_floods": max(r["health_listener_max_ms"] for r in runs),
              "busy_503_p50_ms_over_frame_floods": [r["busy_503_p50_ms"] for r in runs if r["path"].endswith("frame.png")],
              "machine": {**machine(), "load_note": f"loadavg at end {os.getloadavg()}; other agents share the cores"}}
    print(json.dumps(report, indent=1))
    out = ROOT / "bench" / "results" / "serve_overload_bench.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
