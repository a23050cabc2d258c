"""One schedule -> execute -> update round of a `LiveSession` (kept apart so live.py stays the API).

The lock is held while state changes and released while waiting on actors, so `submit_frame`
and `submit_prompt` from other threads (the Serve app) never wait for a model call.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from masklet.actors.tracker import FORWARD
from masklet.actors.backend import ActorCallError, ActorDiedError
from masklet.pipeline.live_state import Encode, Refine, Retire, Step, TakeSnapshot

if TYPE_CHECKING:
    from masklet.pipeline.live import LiveOutput, LiveSession, _Stream


def run_round(ses: "LiveSession", deadline: float, outputs: list) -> bool:
    """Returns whether anything moved (a command issued, a call finished, an output emitted)."""
    ses._wake.clear()
    with ses._lock:
        issued = _schedule(ses)
        futures = list(ses._pending)
        wake_at = ses.batcher.deadline()
    now = ses.clock()
    # Never block once there is something to hand back or new work was just issued.
    wait_s = 0.0 if (outputs or issued) else max(0.0, deadline - now)
    if wake_at is not None:
        wait_s = min(wait_s, max(0.0, wake_at - now))
    ready: list = []
    if futures:
        ready, _ = ses.backend.wait(futures, wait_s)
    elif wait_s > 0:
        ses._wake.wait(wait_s)  # a submit from another thread ends the wait early
    with ses._lock:
        done = _update(ses, ready)
        new = _emit(ses)
    for out in new:
        if ses.on_output is not None:
            ses.on_output(out)
    outputs += new
    return issued or done or bool(new)


# -- schedule -----------------------------------------------------------------------------------


def _schedule(ses: "LiveSession") -> bool:
    issued = False
    now = ses.clock()
    for s in ses._streams.values():
        st = s.state
        for frame in st.take():
            ses.stats.observe("masklet_stage_latency_seconds", now - frame.submitted_at, stage="queue")
            issued = True
        for cmd in st.schedule():
            _execute(ses, s, cmd)
            issued = True
    ses.stats.set("masklet_active_objects",
                  sum(1 for s in ses._streams.values() for i in s.state.incs if i.end is None))
    # A partial batch waits up to max_wait_ms for frames of other streams, unless no stream can
    # add one before something finishes (all at their in-flight bound, or closing).
    flush = all(s.state.closing or s.state.in_flight() >= s.state.max_in_flight for s in ses._streams.values())
    live = [b for b in ses._encoding if b[0] == ses.encoder.generation]
    while len(live) < ses.config.encoder_queue_depth:
        batch = ses.batcher.next_batch(now, flush=flush)
        if batch is None:
            break
        batch = [job for job in batch if job[0] in ses._streams]
        if batch:
            live.append(_submit_encode(ses, batch))
            issued = True
    return issued


def _submit_encode(ses: "LiveSession", jobs: list) -> tuple:
    futures = ses.backend.call(ses.encoder, "encode", *[ref for _, _, ref in jobs], num_returns=len(jobs))
    futures = [futures] if len(jobs) == 1 else futures
    entry = (ses.encoder.generation, jobs, futures)
    ses._encoding.append(entry)
    from masklet.pipeline.live import _Call

    for (sid, j, _), f in zip(jobs, futures):
        ses._pending[f] = _Call("embedding", sid, j, encoder_generation=ses.encoder.generation)
    return entry


def _execute(ses: "LiveSession", s: "_Stream", cmd: Any) -> None:
    from masklet.pipeline.live import _Call

    st, sid = s.state, s.state.stream_id
    if isinstance(cmd, Encode):
        frame = st.ring.get(cmd.frame_idx)
        if frame is None:  # pragma: no cover - schedule() only names buffered frames
            st.requested.discard(cmd.frame_idx)
            return
        if frame.rgb_ref is None:
            frame.rgb_ref = ses.backend.put(frame.rgb)
        ses.batcher.add((sid, cmd.frame_idx, frame.rgb_ref), ses.clock())
        return
    if isinstance(cmd, Retire):
        ses._retire(s, cmd.key)
        return
    inc = st._find(cmd.key)
    generation = inc.generation if inc is not None else -1
    actor = s.trackers.get(cmd.key) or ses._spawn_tracker(s, cmd.key)
    call = ses.backend.call
    if isinstance(cmd, Step):
        f = call(actor, "step", FORWARD, cmd.frame_idx, cmd.embedding, cmd.prompt)
        if cmd.refine is not None:  # the refine's result is the frame's; the step only feeds it
            ses._pending[f] = _Call("aux", sid, cmd.frame_idx, cmd.key, generation)
            f = call(actor, "refine", cmd.embedding, cmd.refine)
        ses._pending[f] = _Call("result", sid, cmd.frame_idx, cmd.key, generation, next(ses._seq))
    elif isinstance(cmd, Refine):
        f = call(actor, "refine", cmd.embedding, cmd.prompt)
        ses._pending[f] = _Call("result", sid, cmd.frame_idx, cmd.key, generation, next(ses._seq))
    elif isinstance(cmd, TakeSnapshot):
        ses._pending[call(actor, "snapshot")] = _Call("snapshot", sid, cmd.frame_idx, cmd.key, generation)
    else:  # pragma: no cover - a state/executor mismatch is a bug
        raise TypeError(f"unknown command {cmd!r}")


# -- update -------------------------------------------------------------------------------------


def _update(ses: "LiveSession", ready: list) -> bool:
    done = False
    for f in ready:
        call = ses._pending.pop(f, None)
        if call is None:
            continue
        done = True
        if call.kind == "embedding":
            _on_embedding(ses, f, call)
            continue
        s = ses._streams.get(call.stream_id)
        if s is None:
            continue
        try:
            ses.backend.get(f)
        except ActorDiedError as exc:
            _on_tracker_lost(ses, s, call, str(exc))
            continue
        except ActorCallError as exc:
            _on_tracker_failed(ses, s, call, str(exc))
            continue
        if call.kind == "result":
            s.state.on_result(call.key, call.generation, call.frame_idx, call.seq, f)
        elif call.kind == "snapshot":
            s.state.on_snapshot(call.key, call.generation, call.frame_idx, f)
    return done


def _on_embedding(ses: "LiveSession", f: Any, call: Any) -> None:
    if call.encoder_generation != ses.encoder.generation:
        return  # from a dead encoder; its frames were re-queued
    try:
        ses.backend.get(f)
    except ActorDiedError as exc:
        ses._pending[f] = call  # still unencoded: goes back to the batcher with the others
        _restart_encoder(ses, str(exc))
        return
    except ActorCallError as exc:
        s = ses._streams.get(call.stream_id)
        ses.events.append(f"{call.stream_id}: frame {call.frame_idx} failed to encode: {exc}")
        if s is not None:
            s.state.on_encode_failed(call.frame_idx)
        return
    ses._encoding = [b for b in ses._encoding if any(x in ses._pending for x in b[2])]
    s = ses._streams.get(call.stream_id)
    if s is not None:
        s.state.on_encoded(call.frame_idx, f)


def _restart_encoder(ses: "LiveSession", message: str) -> None:
    dead = ses.encoder.generation
    lost = [job for g, jobs, futures in ses._encoding if g == dead
            for job, x in zip(jobs, futures) if x in ses._pending]
    for x in [x for x, c in ses._pending.items() if c.kind == "embedding" and c.encoder_generation == dead]:
        del ses._pending[x]
    ses._encoding = [b for b in ses._encoding if b[0] != dead]
    ses.encoder_restarts += 1
    if ses.encoder_restarts > ses.config.max_encoder_restarts:
        ses.events.append(f"encoder keeps dying ({message}); its frames are published without objects")
        for sid, j, _ in lost:
            if sid in ses._streams:
                ses._streams[sid].state.on_encode_failed(j)
    else:
        ses.events.append(f"encoder died ({message}); retrying {len(lost)} frames")
    ses.backend.restart(ses.encoder)
    if ses.encoder_restarts <= ses.config.max_encoder_restarts:
        ses.batcher.requeue_front(lost, ses.clock())


def _on_tracker_lost(ses: "LiveSession", s: "_Stream", call: Any, message: str) -> None:
    st = s.state
    inc = st._find(call.key)
    if inc is None or inc.generation != call.generation:
        return  # already handled (several calls of one dead actor fail together)
    ses.tracker_restarts += 1
    if ses.tracker_restarts > ses.config.max_tracker_restarts:
        st.end_at(inc, st._first_unpublished())
        ses.events.append(f"{st.stream_id}: object {inc.object_id} dropped, trackers keep dying: {message}")
        return
    rolled = st.on_tracker_lost(call.key, call.generation)
    if rolled is None:
        ses.events.append(f"{st.stream_id}: object {inc.object_id} lost ({message}); frames to replay were evicted")
        return
    ses._spawn_tracker(s, call.key, rolled.snapshot)
    ses.events.append(f"{st.stream_id}: tracker of object {inc.object_id} restarted from frame "
                      f"{rolled.snapshot_frame if rolled.snapshot is not None else rolled.start} ({message})")


def _on_tracker_failed(ses: "LiveSession", s: "_Stream", call: Any, message: str) -> None:
    """A tracker call raised (not a crash): the object cannot go on; it leaves the records from the
    first unpublished frame, and the stream continues."""
    st = s.state
    inc = st._find(call.key)
    if inc is None or inc.end is not None and inc.end <= (st._first_unpublished() or 0):
        return
    inc.generation += 1  # its outstanding results are void
    st.end_at(inc, st._first_unpublished())
    ses.events.append(f"{st.stream_id}: object {inc.object_id} stopped: {message}")


# -- emit ---------------------------------------------------------------------------------------


def _emit(ses: "LiveSession") -> list["LiveOutput"]:
    out = []
    for s in ses._streams.values():
        for frame, futures in s.state.ready_to_publish():
            masks = [ses.backend.get(f) for f in futures]
            frame.rgb_ref = None  # a catch-up re-puts it; the object store need not hold it meanwhile
            out.append(ses._output(s, frame, masks))
    return out
