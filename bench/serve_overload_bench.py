"""Overload through Ray Serve (issue 12): 400 requests, 200 at a time, against the app `masklet serve`
builds (random weights, 256 px, one looping stream), with /health/live probed meanwhile.

Two floods alternate in one Serve session, twice each: GET /streams/cam1/frame.png (real work: an
overlay PNG; the app works on limits.max_in_flight_requests of them and answers the rest 503) and
GET /health/live (no work: what Serve's proxy alone costs on this machine). Their latency ratio
says how much of a flood's latency is the app's and how much the proxy's.

    .venv/bin/python bench/serve_overload_bench.py      # writes bench/results/serve_overload_bench.json
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

TOKEN = "bench-token-0123456789"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
REQUESTS, CONCURRENCY = 400, 200


def _get(url: str, path: str, headers: dict) -> tuple[object, float, object]:
    started = time.monotonic()
    try:
        response = requests.get(url + path, headers=headers, timeout=120)
        return response.status_code, time.monotonic() - started, response.headers.get("Retry-After")
    except requests.RequestException as exc:
        return type(exc).__name__, time.monotonic() - started, None


def _ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


def flood(url: str, path: str) -> dict:
    probes, stop = [], threading.Event()

    def probe() -> None:
        while not stop.is_set():
            probes.append(_get(url, "/health/live", {}))
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    started = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(lambda _: _get(url, path, HEADERS), range(REQUESTS)))
    wall = time.monotonic() - started
    stop.set()
    prober.join()
    codes: dict[str, int] = {}
    for code, _, _ in results:
        codes[str(code)] = codes.get(str(code), 0) + 1
    times = lambda wanted: [t for code, t, _ in results if code == wanted]  # noqa: E731
    return {"path": path, "wall_s": round(wall, 2), "codes": codes,
            "p50_ms": _ms([t for _, t, _ in results], 0.5), "max_ms": _ms([t for _, t, _ in results], 1.0),
            "ok_p50_ms": _ms(times(200), 0.5), "busy_503_p50_ms": _ms(times(503), 0.5),
            "busy_503_without_retry_after": sum(1 for code, _, r in results if code == 503 and r is None),
            "health_probe_p50_ms": _ms([t for _, t, _ in probes], 0.5),
            "health_probe_codes": sorted({str(code) for code, _, _ in probes})}


def main() -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
    import ray
    from ray import serve

    from bench_common import machine
    from masklet.deploy.api_limits import deployment_limits
    from masklet.deploy.serve_app import app
    from masklet.pipeline.config import LimitsSettings
    from tests.serve.conftest import free_port, make_clip

    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        serve.run(app({"checkpoint": "random", "image_size": 256, "device": "cpu", "token": TOKEN,
                       "max_batch_size": 2}), name="masklet", route_prefix="/")
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
        runs = [flood(url, path) for _ in range(2) for path in ("/streams/cam1/frame.png", "/health/live")]
    finally:
        serve.shutdown()
        ray.shutdown()
    work = [r["p50_ms"] for r in runs if r["path"].endswith("frame.png")]
    floor = [r["p50_ms"] for r in runs if r["path"] == "/health/live"]
    report = {"benchmark": "serve_overload", "requests": REQUESTS, "concurrency": CONCURRENCY,
              "serve_limits": deployment_limits(),
              "max_in_flight_requests": LimitsSettings().max_in_flight_requests,
              "runs": runs, "p50_ratio_frame_png_over_health_flood": round(statistics.mean(work) / statistics.mean(floor), 2),
              "machine": {**machine(), "load_note": f"loadavg at end {os.getloadavg()}; other agents share the cores"}}
    print(json.dumps(report, indent=1))
    out = ROOT / "bench" / "results" / "serve_overload_bench.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
