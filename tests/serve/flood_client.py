"""A cheap HTTP/1.1 flood for overload tests and bench/serve_overload_bench.py, run as its own process
so that its work never shares a GIL with the probes being measured.

    python tests/serve/flood_client.py PORT PATH TOKEN REQUESTS CONCURRENCY   # prints one JSON line

asyncio and raw sockets, one new connection per request (as independent clients would), so the
client costs far less CPU per request than the server it floods: on a 2-core machine a thread-pool
client with `requests` took a core of its own and its GIL queue showed up in every latency.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time


async def get(port: int, path: str, token: str = "") -> tuple[object, float, bool]:
    """(status code or exception name, seconds, has Retry-After) of one GET on 127.0.0.1:port."""
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
        writer.close()
        head = data.split(b"\r\n\r\n", 1)[0].lower()
        code: object = int(head.split(b" ", 2)[1]) if head else "EmptyReply"
        return code, time.monotonic() - started, b"\r\nretry-after:" in head
    except (OSError, ValueError, IndexError) as exc:
        return type(exc).__name__, time.monotonic() - started, False


def ms(values: list[float], q: float):
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


async def flood(port: int, path: str, token: str, requests: int, concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)

    async def one():
        async with gate:
            return await get(port, path, token)

    started = time.monotonic()
    results = await asyncio.gather(*(one() for _ in range(requests)))
    codes: dict[str, int] = {}
    for code, _, _ in results:
        codes[str(code)] = codes.get(str(code), 0) + 1
    busy = [t for code, t, _ in results if code == 503]
    return {"path": path, "requests": requests, "concurrency": concurrency,
            "wall_s": round(time.monotonic() - started, 2), "codes": codes,
            "p50_ms": ms([t for _, t, _ in results], 0.5), "max_ms": ms([t for _, t, _ in results], 1.0),
            "ok_p50_ms": ms([t for code, t, _ in results if code == 200], 0.5),
            "busy_503_p50_ms": ms(busy, 0.5), "busy_503_max_ms": ms(busy, 1.0),
            "busy_503_without_retry_after": sum(1 for code, _, ra in results if code == 503 and not ra)}


if __name__ == "__main__":
    port_arg, path_arg, token_arg, count, width = sys.argv[1:6]
    print(json.dumps(asyncio.run(flood(int(port_arg), path_arg, token_arg, int(count), int(width)))), flush=True)
