"""Turning finished actor calls into completions, and actor deaths into recoveries (the executor's
update half; `pipeline.executor` holds the submit half)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from masklet.actors.backend import ActorCallError, ActorDiedError
from masklet.actors.payloads import PackedResult
from masklet.pipeline import commands as c

if TYPE_CHECKING:
    from masklet.pipeline.executor import Executor, _Call

_INPUT_ERRORS = ("InputError", "SourceError")


def complete(ex: "Executor", future: Any, call: "_Call", out: list) -> None:
    handler = _HANDLERS[call.kind]
    try:
        value = ex.backend.get(future)
    except ActorDiedError as exc:
        _on_death(ex, call, str(exc), out)
        return
    except ActorCallError as exc:
        _on_call_error(ex, call, exc, out)
        return
    handler(ex, call, value, out)


# -- values -------------------------------------------------------------------------------------


def _open_source(ex: "Executor", call: "_Call", info: Any, out: list) -> None:
    out.append(c.SourceOpened(call.payload.stream_id, info))


def _read(ex: "Executor", call: "_Call", metas: Any, out: list) -> None:
    cmd, pack = call.payload  # the read's frames, packed in one object: each frame is (pack, i)
    frames = tuple(c.FrameRef(j, pts, PackedResult(pack, i)) for i, (j, pts) in enumerate(metas))
    out.append(c.FramesRead(cmd.stream_id, frames))


def _decode(ex: "Executor", call: "_Call", statuses: Any, out: list) -> None:
    cmds, values = call.payload
    for cmd, status, value in zip(cmds, statuses, values):
        if status is None:
            out.append(c.FrameDecoded(cmd.stream_id, cmd.frame_idx, value))
        else:
            out.append(c.FrameFailed(cmd.stream_id, cmd.frame_idx, f"undecodable: {status}"))


def _encode(ex: "Executor", call: "_Call", statuses: Any, out: list) -> None:
    jobs, values = call.payload
    ex._encoding = [b for b in ex._encoding if b[2] in ex._pending]
    if call.generation != ex.encoder.generation:
        return  # a batch of an encoder that died meanwhile; its frames were re-queued
    for (sid, j, _), status, value in zip(jobs, statuses, values):
        out.append(c.Encoded(sid, j, value) if status is None else c.FrameFailed(sid, j, f"undecodable: {status}"))


def _run(ex: "Executor", call: "_Call", statuses: Any, out: list) -> None:
    ordered, values = call.payload
    for (cmd, epoch), status, value in zip(ordered, statuses, values):
        key = cmd.key
        if isinstance(cmd, c.CloseObject) or ex._epoch.get(key) != epoch:
            continue  # closed, or reopened since: this result belongs to an earlier life of the object
        tag = getattr(cmd, "tag", None)
        if status.error is not None:
            out.append(c.ObjectFailed(key, status.error, tag))
        elif isinstance(cmd, (c.Step, c.Refine)):
            out.append(c.StepDone(key, cmd.frame_idx, value, status.score, tag))
        elif isinstance(cmd, c.Snapshot):
            out.append(c.SnapshotTaken(key, value, tag))


def _publisher_open(ex: "Executor", call: "_Call", errors: Any, out: list) -> None:
    out.append(c.PublisherOpened(call.payload.info.stream_id, tuple(errors)))


def _publish(ex: "Executor", call: "_Call", acks: Any, out: list) -> None:
    out.extend(c.Published(cmd.meta.stream_id, cmd.meta.frame_idx, ack, cmd.tag) for cmd, ack in zip(call.payload, acks))


def _publisher_close(ex: "Executor", call: "_Call", errors: Any, out: list) -> None:
    out.append(c.PublisherClosed(call.payload.stream_id, tuple(errors)))


_HANDLERS = {"open_source": _open_source, "read": _read, "decode": _decode, "encode": _encode, "run": _run,
             "publisher_open": _publisher_open, "publish": _publish, "publisher_close": _publisher_close}


# -- failures -----------------------------------------------------------------------------------


def _stream_of(call: "_Call") -> str:
    payload = call.payload[0] if isinstance(call.payload, tuple) else call.payload  # publish: (cmds); others: (cmd, ...)
    if isinstance(payload, c.Publish):
        return payload.meta.stream_id
    if isinstance(payload, c.OpenPublisher):
        return payload.info.stream_id
    return payload.stream_id


def _on_call_error(ex: "Executor", call: "_Call", exc: ActorCallError, out: list) -> None:
    """A method raised (the actor lives). Tracker, encoder and decode calls report per item and do
    not raise for one bad item, so a raise there is a bug that fails what the call carried."""
    if call.kind == "encode":
        jobs, _ = call.payload
        ex._encoding = [b for b in ex._encoding if b[2] in ex._pending]
        out.extend(c.FrameFailed(sid, j, f"encoder failed: {exc}") for sid, j, _ in jobs)
    elif call.kind == "run":
        for cmd, epoch in call.payload[0]:
            if not isinstance(cmd, c.CloseObject) and ex._epoch.get(cmd.key) == epoch:
                out.append(c.ObjectFailed(cmd.key, f"tracker failed: {exc}", getattr(cmd, "tag", None)))
    elif call.kind == "decode":
        out.extend(c.FrameFailed(cmd.stream_id, cmd.frame_idx, f"decoder failed: {exc}") for cmd in call.payload[0])
    else:
        reason = exc.reason if exc.kind in _INPUT_ERRORS else str(exc)
        out.append(c.StreamFailed(_stream_of(call), reason))


def _on_death(ex: "Executor", call: "_Call", message: str, out: list) -> None:
    if call.kind == "encode":
        _restart_encoder(ex, call, message, out)
    elif call.kind == "run":
        _lose_tracker(ex, call, message, out)
    elif call.kind in ("open_source", "read", "decode"):
        _lose_decoder(ex, call, message, out)
    else:
        _lose_publisher(ex, call, message, out)


def _restart_encoder(ex: "Executor", call: "_Call", message: str, out: list) -> None:
    if ex.encoder is None or call.generation != ex.encoder.generation:
        return  # this death was already handled (every in-flight batch of it fails)
    dead = ex.encoder.generation
    lost = [job for g, jobs, _ in ex._encoding if g == dead for job in jobs]
    for f in [f for f, p in ex._pending.items() if p.kind == "encode" and p.generation == dead]:
        del ex._pending[f]
    ex._encoding = [b for b in ex._encoding if b[0] != dead]
    ex.encoder_restarts += 1
    ex.backend.restart(ex.encoder)
    if ex.encoder_restarts > ex.config.max_encoder_restarts:
        ex.event("encoder_failed", None, f"encoder keeps dying ({message}); {len(lost)} frames fail")
        out.extend(c.FrameFailed(sid, j, f"encoder keeps dying: {message}") for sid, j, _ in lost)
        return
    ex.event("encoder_restarted", None, f"encoder died ({message}); retrying {len(lost)} frames")
    ex.batcher.requeue_front(lost, ex.clock())


def _lose_tracker(ex: "Executor", call: "_Call", message: str, out: list) -> None:
    actor = call.actor
    if actor not in ex.trackers.actors:
        return  # already handled: every in-flight call of a dead actor fails
    lost = ex.trackers.remove_actor(actor)
    if ex.config.colocate and actor is ex.encoder:
        ex.backend.restart(actor)  # the shard is the encoder too: a fresh one serves the reopened objects
        ex.encoder_restarts += 1
    else:
        ex.backend.kill(actor)
    ex.tracker_restarts += 1
    ex.stats.set("masklet_tracker_actors", len(ex.trackers.actors))
    for f in [f for f, p in ex._pending.items() if p.kind == "run" and p.actor is actor]:
        del ex._pending[f]
    give_up = ex.tracker_restarts > ex.config.max_tracker_restarts
    ex.event("tracker_restarted" if not give_up else "tracker_failed", None,
             f"tracker actor {actor.name} died ({message}); {len(lost)} objects "
             + ("dropped: trackers keep dying" if give_up else "resume from their snapshots"))
    for key in lost:
        ex._epoch[key] += 1  # whatever it still had in flight is void
        if give_up:
            out.append(c.ObjectFailed(key, f"tracker actors keep dying: {message}"))
        else:
            ex.stats.inc("masklet_object_recoveries_total")
            out.append(c.ObjectLost(key, message))


def _retire_dead(ex: "Executor", pool: Any, actor: Any) -> tuple[list, list]:
    """Forget a dead decoder or publisher: its streams (now homeless) and its calls still in flight."""
    streams = pool.remove_actor(actor)
    ex.backend.kill(actor)
    in_flight = [(f, p) for f, p in ex._pending.items() if p.actor is actor]
    for f, _ in in_flight:
        del ex._pending[f]
    return streams, [p for _, p in in_flight]


def _lose_decoder(ex: "Executor", call: "_Call", message: str, out: list) -> None:
    actor = call.actor
    if actor not in ex.decoders.actors:
        return
    streams, resend = _retire_dead(ex, ex.decoders, actor)
    for sid in streams:
        if sid not in ex._restartable:
            out.append(c.StreamFailed(sid, f"decoder died: {message}"))
    # Live frames in flight go to a new decoder; file streams failed above.
    retry = [cmd for p in resend if p.kind == "decode" for cmd in p.payload[0] if cmd.stream_id in ex._restartable]
    if call.kind == "decode":
        retry += [cmd for cmd in call.payload[0] if cmd.stream_id in ex._restartable]
    if retry:
        ex.event("decoder_restarted", None, f"decoder died ({message}); retrying {len(retry)} live frames")
        ex.submit(retry)


def _lose_publisher(ex: "Executor", call: "_Call", message: str, out: list) -> None:
    actor = call.actor
    if actor not in ex.publishers.actors:
        return
    streams, in_flight = _retire_dead(ex, ex.publishers, actor)
    calls = [call] + in_flight
    again: list[Any] = []
    for sid in streams:
        if sid in ex._restartable and sid in ex._publisher_info:
            again.append(ex._publisher_info[sid])
        else:
            out.append(c.StreamFailed(sid, f"publisher died ({message}); outputs are incomplete"))
    if again:
        # Live streams have no files to lose: reopen on a new publisher, then republish in order.
        publishes = sorted((cmd for p in calls if p.kind == "publish" and _stream_of(p) in ex._restartable
                            for cmd in p.payload), key=lambda cmd: (cmd.meta.stream_id, cmd.meta.frame_idx))
        ex.event("publisher_restarted", None, f"publisher died ({message}); reopening {len(again)} live streams")
        ex.submit(again + publishes)  # calls to one actor run in order: each open precedes its publishes

