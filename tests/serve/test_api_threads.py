"""The API's routes run their blocking work in the app's own thread pool (deploy/api_threads.py).

Served as a Ray Serve replica serves it: uvicorn started as a task of a loop that runs forever
(ray.serve._private.http_util.start_asgi_http_server), where FastAPI's sync routes (anyio's
to_thread) started and stopped a thread for every request.
"""
from __future__ import annotations

import asyncio
import threading

import pytest

from masklet.deploy.api_threads import ApiThreads
from masklet.deploy.serve_app import create_app
from masklet.pipeline.config import ServeSettings
from tests.serve.conftest import TOKEN, Client, free_port, wait_for
from tests.serve.fake_session import FakeLiveSession


class ServeLikeServer:
    """uvicorn as a task on a loop that runs forever, in a thread: the loop has no root task."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        serving = self.loop.create_task(self.server.serve())
        serving.add_done_callback(lambda _: self.loop.stop())  # once the server has shut down (lifespan too)
        self.loop.run_forever()
        self.loop.close()

    def __enter__(self) -> "ServeLikeServer":
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=20, message="uvicorn started")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture()
def thread_starts(monkeypatch):
    started: list[str] = []
    real = threading.Thread.start

    def counting(self, *args, **kwargs):
        started.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(threading.Thread, "start", counting)
    return started


def test_routes_reuse_the_apps_threads_on_a_loop_without_a_root_task(thread_starts, clip):
    with ServeLikeServer(create_app(FakeLiveSession(), ServeSettings(), token=TOKEN)) as server:
        client = Client(server.url)
        assert client.post("/streams", json={"stream_id": "cam1", "source": str(clip), "realtime": False}).status_code == 201
        wait_for(lambda: client.get("/streams/cam1").json()["state"] == "finished", message="clip fed")
        before = list(thread_starts)
        answers = [client.get(path) for _ in range(10) for path in ("/streams", "/streams/cam1", "/streams/cam1/masklet",
                                                                     "/metrics", "/streams/cam1/frame.jpg")]
        assert {a.status_code for a in answers} == {200}, [a.status_code for a in answers]
        new = thread_starts[len(before):]
        # 50 requests, one after another: the pool's one thread does their blocking work (a thread per
        # request before: 50 here, one per sync route call); frame.jpg's one encoding may add one
        assert len(new) <= 2, f"{len(new)} threads started for 50 requests: {new[:10]}"
        assert all(name.startswith("masklet-api") for name in new), new


def test_offloaded_calls_run_in_the_pool_and_raise_where_awaited():
    threads = ApiThreads(max_workers=2)

    def where(x: int) -> tuple[str, int]:
        if x < 0:
            raise ValueError("negative")
        return threading.current_thread().name, x * 2

    async def main():
        offloaded = threads.offload(where)
        name, doubled = await offloaded(21)
        assert name.startswith("masklet-api") and doubled == 42
        with pytest.raises(ValueError, match="negative"):
            await offloaded(-1)
        names = {n for n, _ in await asyncio.gather(*(threads.run(where, i) for i in range(20)))}
        assert len(names) <= 2, names

    try:
        asyncio.run(main())
    finally:
        threads.shutdown()
    with pytest.raises(ValueError, match="max_workers"):
        ApiThreads(0)
