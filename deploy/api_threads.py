"""The API's worker threads: one bounded pool per app for the routes' blocking work.

Why not FastAPI's own: a sync `def` route runs through anyio's `to_thread`, which keeps its idle
worker threads in a ContextVar and stops each worker when the "root task" it was started under
ends. A Ray Serve replica's event loop has no root task of the kind anyio looks for (the loop runs
forever and each request is a task of its own), so under Serve every such call started a new thread,
waited on the event loop for it to start, and stopped it when the request ended; before that it
scanned all the loop's tasks for a root. Measured in a direct-ingress replica during a 720p
frame.jpg flood (bench/serve_overload_bench.py, py-spy for 4 s), with only each output's first
request still handed to anyio: 195-225 distinct anyio worker threads, whose starts took 15% of the
event loop's samples. A loop run the same way without Ray started 50 threads for 50 requests
(tests/serve/test_api_threads.py). With this pool, floods of a formerly sync route were answered at
784-1,026 requests/s instead of 635-813, side by side (README "Benchmarks").

So the routes are `async def`, and their blocking parts (locks held by the session's driver, Ray
calls, file reads, encoding) run in this pool, whose threads live as long as the app. Calls beyond
its size wait in the pool's queue; the API's guard bounds them (limits.max_in_flight_requests).
"""
from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")


class ApiThreads:
    def __init__(self, max_workers: int) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="masklet-api")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in one of the pool's threads; its exception is raised here."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def offload(self, fn: Callable[..., T]) -> Callable[..., Awaitable[T]]:
        """`fn` as a coroutine function that runs it in the pool. FastAPI sees `fn`'s signature and
        annotations (functools.wraps), so a sync route keeps its parameters, body and responses."""
        @functools.wraps(fn)
        async def offloaded(*args: Any, **kwargs: Any) -> T:
            return await self.run(fn, *args, **kwargs)
        return offloaded

    def shutdown(self) -> None:
        """Queued calls are dropped and running ones finish in their threads; nothing waits here."""
        self._pool.shutdown(wait=False, cancel_futures=True)
