"""The Masklet control API: a plain FastAPI app over a LiveSession (its Serve wrapper: serve_deployment.py).

    create_app(session_or_slot, settings=ServeSettings(...), token=...)   # tests, any ASGI server
    deploy.serve_deployment:app       # its Ray Serve deployment: `serve deploy`, `masklet serve`

Status codes: 401 without the bearer token (everything but /health/* and the console's static
files); 422 for an invalid body, with one readable line per problem in "detail"; 413 for a body
over `max_body_bytes`; 409 for a duplicate stream id or a prompt the session refuses
(PromptRejected: unknown object, frame gone from the ring buffer); 503 with Retry-After while the
model loads, at the stream cap (ServeSettings.max_streams, refused at POST /streams) and when too
many requests are in flight. A stream that the LiveSession itself refuses once its first frame
arrives (its own max_streams) shows state "failed" with the reason in GET /streams/{id}.
"""
from __future__ import annotations

import asyncio
import contextlib
import secrets
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Header, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from masklet.deploy.api_models import AddObject, CreateStream, Health, ObjectAccepted, RefineObject, StreamDetail, StreamSummary
from masklet.deploy.api_runtime import KafkaProbe, OutputHub, SessionSlot, StreamRegistry
from masklet.deploy.api_limits import deployment_limits, in_flight_cap
from masklet.deploy.api_security import ApiLimits, GuardMiddleware
from masklet.deploy.api_threads import ApiThreads
from masklet.deploy.health_listener import Heartbeat, readiness
from masklet.deploy.overlays import OverlayCache
from masklet.actors.messages import MessageError
from masklet.actors.prompt_limits import PromptLimitError, check_object_count, prompt_to_model
from masklet.actors.rle import RleError
from masklet.actors.sources import SourceError
from masklet.pipeline.config import KafkaSettings, LimitsSettings, ServeSettings
from masklet.pipeline.live import PromptRejected


CONSOLE_DIR = Path(__file__).resolve().parent / "console"

SSE_HEARTBEAT_S = 15.0


def create_app(session: Any, settings: Optional[ServeSettings] = None, *, token: Optional[str] = None,
               kafka: Optional[KafkaSettings] = None, limits: Optional[LimitsSettings] = None,
               max_in_flight: Optional[int] = None, heartbeat: Optional[Heartbeat] = None,
               kafka_probe: Optional[KafkaProbe] = None) -> FastAPI:
    """The API over `session` (a LiveSession, or a SessionSlot whose session is still loading).

    The app owns `session.poll()` (it fans records out to /events); `token` defaults to the
    settings' api_token. Kafka-sourced streams and the Kafka readiness check need `kafka`.
    `limits` (settings.limits) bound prompts, objects, SSE feeds and requests in flight;
    `max_in_flight` caps ordinary requests (default: limits.max_in_flight_requests, checked against
    deploy/serve_config.yaml's max_ongoing_requests, see `in_flight_cap`). `heartbeat` is stamped
    every second by the app's event loop while it runs (the health listener reads it);
    `kafka_probe` is the readiness check of `kafka` (default: a new one), shared with the listener.
    """
    settings = settings or ServeSettings()
    limits_settings = limits or LimitsSettings()
    input_limits = limits_settings.input_limits()
    token = token or (settings.api_token.get_secret_value() if settings.api_token else None)
    if not token:
        raise ValueError("create_app needs a bearer token (settings.api_token or token=)")
    slot = session if isinstance(session, SessionSlot) else SessionSlot(session)
    if max_in_flight is None:
        max_in_flight = in_flight_cap(deployment_limits()["max_ongoing_requests"], limits_settings)
    limits = ApiLimits(max_body_bytes=settings.max_body_bytes, max_streams=settings.max_streams,
                       max_in_flight=max_in_flight,
                       max_event_streams=limits_settings.max_event_streams)
    registry = StreamRegistry(slot, limits=limits, kafka=kafka)
    hub = OutputHub(max_subscribers=limits_settings.max_event_streams)
    jpegs, pngs = OverlayCache("jpeg"), OverlayCache("png")  # one picture per stream, output and format
    etag_prefix = secrets.token_hex(4)  # per app: a restarted replica's stream of the same id is another one
    if kafka_probe is None and kafka is not None:
        kafka_probe = KafkaProbe(kafka)
    heartbeat = heartbeat or Heartbeat()
    # Routes are coroutines; their blocking work runs in the app's own threads (api_threads: FastAPI's
    # sync routes would start a thread per request in a Serve replica). Sized to the in-flight cap.
    threads = ApiThreads(max_workers=max(4, max_in_flight))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        beating = asyncio.create_task(heartbeat.run())
        try:
            yield
        finally:
            beating.cancel()
            registry.shutdown()  # stop the feeders; the session's owner shuts the session down
            threads.shutdown()

    app = FastAPI(lifespan=lifespan, title="Masklet control API", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  description="Live SAM 2 video segmentation: streams, objects, masklets. "
                              "Send `Authorization: Bearer <token>` with every request but /health/*.")
    app.add_middleware(GuardMiddleware, token=token, limits=limits)
    app.state.slot, app.state.registry, app.state.hub, app.state.limits = slot, registry, hub, limits
    app.state.heartbeat = heartbeat

    slot.when_ready(hub.attach)

    @app.exception_handler(RequestValidationError)
    async def _readable_422(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {str(error.get('msg', '')).removeprefix('Value error, ')}")
        return JSONResponse({"detail": "; ".join(problems[:5])}, status_code=422)

    # Input errors found past the body model (RLE, prompt limits, unreadable sources, a body nested
    # so deep that the JSON parser recursed out) are the caller's: 422 with one line, never a 500.
    @app.exception_handler(PromptLimitError)
    @app.exception_handler(MessageError)
    @app.exception_handler(RleError)
    @app.exception_handler(SourceError)
    async def _input_error_422(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc).splitlines()[0][:500]}, status_code=422)

    @app.exception_handler(RecursionError)
    async def _too_deep_422(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": "body is nested too deeply"}, status_code=422)

    # -- console, schema, health, metrics ------------------------------------------------------

    @app.get("/", include_in_schema=False)
    @threads.offload
    def console() -> FileResponse:
        return FileResponse(CONSOLE_DIR / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/console/{name}", include_in_schema=False)
    @threads.offload
    def console_asset(name: str) -> FileResponse:
        if name not in ("index.html", "app.js", "style.css"):
            raise HTTPException(404, "not found")
        return FileResponse(CONSOLE_DIR / name, headers={"Cache-Control": "no-store"})

    @app.get("/openapi.json", include_in_schema=False)
    @threads.offload
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/health/live", response_model=Health)
    async def health_live() -> Health:  # on the event loop: no worker thread to wait for under load
        return Health(status="ok", ready=slot.state == "ready")

    @app.get("/health/ready", response_model=Health, responses={503: {"model": Health}})
    @threads.offload
    def health_ready(response: Response) -> Health:
        code, body = readiness(slot.state, slot.error, kafka_probe)
        if code != 200:
            response.status_code = code
            response.headers["Retry-After"] = "5"
        return Health(**body)

    @app.get("/metrics", response_class=Response)
    @threads.offload
    def metrics() -> Response:
        from masklet.monitoring.exporter import CONTENT_TYPE_LATEST, render_latest
        from masklet.monitoring.stats import merge

        snapshots = [registry.stats.snapshot()]
        if slot.session is not None:
            snapshots.append(slot.session.stats_snapshot())
        return Response(render_latest(merge(snapshots)), media_type=CONTENT_TYPE_LATEST)

    # -- streams -------------------------------------------------------------------------------

    def summary(feeder: Any) -> StreamSummary:
        return StreamSummary(stream_id=feeder.stream_id, source=feeder.describe, state=_state(feeder),
                             error=feeder.status.error)

    @app.post("/streams", status_code=201, response_model=StreamSummary)
    @threads.offload
    def create_stream(request: CreateStream) -> StreamSummary:
        return summary(registry.create(request))

    @app.get("/streams", response_model=list[StreamSummary])
    @threads.offload
    def list_streams() -> list[StreamSummary]:
        return [summary(feeder) for feeder in registry.all()]

    @app.get("/streams/{stream_id}", response_model=StreamDetail)
    @threads.offload
    def get_stream(stream_id: str) -> StreamDetail:
        feeder = registry.get(stream_id)
        base = summary(feeder).model_dump()
        status = _session_status(slot, feeder)
        if status is None:
            width, height = feeder.status.size or (0, 0)
            return StreamDetail(**base, width=width, height=height, fps=0.0, frames_in=0, frames_published=0,
                                frames_dropped=0, lag_frames=0, objects={})
        return StreamDetail(**base, width=status.width, height=status.height, fps=float(status.fps or 0.0),
                            frames_in=status.frames_in, frames_published=status.frames_published,
                            frames_dropped=status.frames_dropped, lag_frames=status.lag_frames,
                            objects={int(k): float(v) for k, v in status.objects.items()})

    @app.delete("/streams/{stream_id}", status_code=204, response_class=Response)
    @threads.offload
    def delete_stream(stream_id: str) -> Response:
        registry.delete(stream_id)
        return Response(status_code=204)

    # -- objects -------------------------------------------------------------------------------

    def submit(stream_id: str, object_id: int, body: Any, action: str) -> ObjectAccepted:
        feeder = registry.get(stream_id)
        session = slot.require()
        if feeder.status.size is None:
            raise HTTPException(409, f"stream {stream_id!r} has no frames yet; retry once it is running")
        if feeder.status.state in ("finished", "failed"):
            raise HTTPException(409, f"stream {stream_id!r} has {feeder.status.state}")
        frame_idx = body.frame_idx if body is not None and body.frame_idx is not None else _latest_idx(session, stream_id)
        if body is None:
            from masklet.actors.messages import PromptMessage
            message = PromptMessage(stream_id=stream_id, object_id=object_id, frame_idx=frame_idx, action=action)
        else:
            message = body.to_prompt(stream_id, object_id, frame_idx, action)
        if action != "remove":
            width, height = feeder.status.size
            prompt_to_model(message, height, width, input_limits)  # every check, before the session sees it
        if action == "add":
            try:
                check_object_count(object_id, _objects_of(slot, feeder), _objects_of_all(slot, registry), input_limits)
            except PromptLimitError as exc:
                raise HTTPException(409, str(exc)) from None
        try:
            session.submit_prompt(message)
        except PromptRejected as exc:
            raise HTTPException(409, str(exc)) from None
        return ObjectAccepted(stream_id=stream_id, object_id=object_id, frame_idx=frame_idx, action=action)

    @app.post("/streams/{stream_id}/objects", status_code=202, response_model=ObjectAccepted)
    @threads.offload
    def add_object(stream_id: str, body: AddObject) -> ObjectAccepted:
        feeder = registry.get(stream_id)
        if feeder.status.size is not None:  # a refused prompt must not use up an object id
            width, height = feeder.status.size
            prompt_to_model(body.to_prompt(stream_id, body.object_id or 0, 0, "add"), height, width, input_limits)
        status = _session_status(slot, feeder)
        known = set(status.objects) if status is not None else set()
        object_id = registry.allocate_object_id(stream_id, body.object_id, known)
        return submit(stream_id, object_id, body, "add")

    @app.post("/streams/{stream_id}/objects/{object_id}/refine", status_code=202, response_model=ObjectAccepted)
    @threads.offload
    def refine_object(stream_id: str, object_id: int, body: RefineObject) -> ObjectAccepted:
        return submit(stream_id, object_id, body, "refine")

    @app.delete("/streams/{stream_id}/objects/{object_id}", status_code=202, response_model=ObjectAccepted)
    @threads.offload
    def remove_object(stream_id: str, object_id: int) -> ObjectAccepted:
        return submit(stream_id, object_id, None, "remove")

    # -- outputs -------------------------------------------------------------------------------

    # The frame routes answer on the event loop: all but one request per published output get a 304
    # or an already encoded picture, and a thread hand-off would cost more than that answer (GIL
    # switches per request, queued with everything else under a flood). Only the encoding is offloaded.
    async def frame_picture(stream_id: str, cache: OverlayCache, if_none_match: Optional[str]) -> Response:
        feeder = registry.get(stream_id)
        output = _latest(slot, feeder)
        if output is None or output.record is None:  # none yet
            return Response(status_code=204, headers={"Retry-After": "1"})
        record = output.record
        # The picture of one record never changes: a poller that has it gets 304 and no body (the
        # console polls, and a browser revalidates by itself with `no-cache`). The app's prefix and the
        # feeder's serial tell a stream created again under the same id from the old one.
        etag = f'"{etag_prefix}-{feeder.serial}-{record.frame_idx}-{record.revision}"'
        headers = {"Cache-Control": "private, no-cache", "ETag": etag,
                   "X-Frame-Index": str(record.frame_idx), "X-Revision": str(record.revision)}
        if if_none_match is not None and etag in (tag.strip().removeprefix("W/") for tag in if_none_match.split(",")):
            return Response(status_code=304, headers=headers)  # before the pixels: a 304 never fetches them
        picture = cache.cached(feeder, output)
        if picture is None:  # the first request for this output: its pixels are fetched and encoded off the loop
            picture = await threads.run(_encoded, cache, feeder, output)
        if picture is None:  # its pixels not kept (a 200 of this record never went out, so no tag matched)
            return Response(status_code=204, headers={"Retry-After": "1"})
        return Response(picture, media_type=cache.media_type, headers=headers)

    @app.get("/streams/{stream_id}/frame.jpg", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, 204: {"description": "no frame published yet"},
                        304: {"description": "the picture named by If-None-Match is still the latest"}})
    async def frame_jpeg(stream_id: str, if_none_match: Optional[str] = Header(None)) -> Response:
        """The latest published frame with its masks drawn (what the console shows); X-Frame-Index and
        X-Revision name the record it shows, and If-None-Match with its ETag gets 304."""
        return await frame_picture(stream_id, jpegs, if_none_match)

    @app.get("/streams/{stream_id}/frame.png", response_class=Response,
             responses={200: {"content": {"image/png": {}}}, 204: {"description": "no frame published yet"},
                        304: {"description": "the picture named by If-None-Match is still the latest"}})
    async def frame_png(stream_id: str, if_none_match: Optional[str] = Header(None)) -> Response:
        """As frame.jpg, lossless: about 6 times the bytes and 5 times the encoding time at 720p."""
        return await frame_picture(stream_id, pngs, if_none_match)

    @app.get("/streams/{stream_id}/masklet", responses={204: {"description": "no record published yet"}})
    @threads.offload
    def masklet(stream_id: str) -> Response:
        output = _latest(slot, registry.get(stream_id))
        if output is None or output.record is None:
            return Response(status_code=204, headers={"Retry-After": "1"})
        return Response(output.record.to_json_bytes(), media_type="application/json",
                        headers={"Cache-Control": "no-store"})

    @app.get("/streams/{stream_id}/events", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
    async def events(stream_id: str, request: Request) -> StreamingResponse:
        registry.get(stream_id)
        key, queue = hub.subscribe(stream_id)

        async def feed():
            try:
                yield ": masklet records of stream %s\n\n" % stream_id
                while not await request.is_disconnected():
                    try:
                        # id: "<frame_idx>.<revision>": a revision of a frame comes again with a higher one
                        event_id, text = await asyncio.wait_for(queue.get(), timeout=SSE_HEARTBEAT_S)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"  # proxies close idle connections
                        continue
                    yield f"event: masklet\nid: {event_id}\ndata: {text}\n\n"
            finally:
                hub.unsubscribe(key)

        return StreamingResponse(feed(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return app


def _objects_of(slot: SessionSlot, feeder: Any) -> set[int]:
    status = _session_status(slot, feeder)
    return set(status.objects) if status is not None else set()


def _objects_of_all(slot: SessionSlot, registry: StreamRegistry) -> int:
    return sum(len(_objects_of(slot, f)) for f in registry.all() if f.status.state not in ("finished", "failed"))


def _state(feeder: Any) -> str:
    return {"starting": "running"}.get(feeder.status.state, feeder.status.state)


def _session_status(slot: SessionSlot, feeder: Any) -> Any:
    if slot.session is None or feeder.status.size is None:
        return None
    try:
        return slot.session.status(feeder.stream_id)
    except (KeyError, ValueError):
        return feeder.status.last_status  # ended and closed: its final figures


def _encoded(cache: OverlayCache, feeder: Any, output: Any) -> Optional[bytes]:
    """`output`'s picture, or None when its pixels are not kept. In a worker thread: `rgb` may fetch
    the frame from Ray's object store, and encoding takes milliseconds."""
    return None if output.rgb is None else cache.picture(feeder, output)


def _latest(slot: SessionSlot, feeder: Any) -> Any:
    session = slot.require()
    try:
        return session.latest(feeder.stream_id)
    except (KeyError, ValueError):
        return feeder.status.last_output


def _latest_idx(session: Any, stream_id: str) -> int:
    try:
        output = session.latest(stream_id)
    except (KeyError, ValueError):
        output = None
    return output.record.frame_idx if output is not None else 0

