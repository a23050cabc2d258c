"""One schedule -> execute -> update round of a live session over the shared executor.

The session lock is held while stream state changes and released while the executor submits
and waits, so `submit_frame` and `submit_prompt` from other threads (the Serve app, a Kafka
consumer loop) never wait for an actor. Outputs leave in order per stream: publications are
acknowledged by publisher actors possibly out of order, and are held until the ones before them
are out.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from masklet.actors.payloads import FrameMeta
from masklet.pipeline import commands as c
from masklet.pipeline.live_state import LiveFrame, LiveStream
from masklet.pipeline.live_types import LiveOutput

if TYPE_CHECKING:  # the session calls in here; nothing here imports it at run time
    from masklet.pipeline.live import LiveSession


@dataclass
class _Publication:
    frame: LiveFrame
    revision: int
    tokens: tuple
    first: bool
    output: Optional[LiveOutput] = None   # set once acknowledged (or at once, for a failed frame)


@dataclass
class StreamRuntime:
    """A live stream's state plus what the session needs to hand its outputs out in order."""

    state: LiveStream
    latest: Optional[LiveOutput] = None
    awaiting: deque = field(default_factory=deque)   # _Publication, in publication order


def run_round(ses: "LiveSession", deadline: float, outputs: list) -> bool:
    """Returns whether anything moved (a command issued, a completion handled, an output emitted)."""
    ses._wake.clear()
    with ses._lock:
        commands, ses._queued = ses._queued, []
        for rt in ses._streams.values():
            commands += rt.state.take()
            commands += rt.state.schedule()
        commands += _publish(ses)  # frames that need no model work are ready at once
        new = _emit(ses)
        ses.stats.set("masklet_active_objects",
                      sum(1 for rt in ses._streams.values() for i in rt.state.incs if i.end is None))
        # A partial batch waits up to max_wait_ms for frames of other streams, unless no stream can
        # add one before something finishes (all at their in-flight bound, or closing).
        flush = all(rt.state.closing or rt.state.in_flight() >= rt.state.max_in_flight for rt in ses._streams.values())
    ses.executor.submit(commands)
    wait_s = 0.0 if (outputs or commands or new) else max(0.0, deadline - ses.clock())
    if not ses.executor.busy and wait_s > 0:
        ses._wake.wait(wait_s)  # a submit from another thread ends the wait early
        wait_s = 0.0
    done = ses.executor.poll(wait_s, flush=flush)
    with ses._lock:
        for completion in done:
            _update(ses, completion)
        publishes = _publish(ses)
        new += _emit(ses)
    ses.executor.submit(publishes)
    for out in new:
        if ses.on_output is not None:
            ses.on_output(out)
    outputs += new
    return bool(commands) or bool(done) or bool(new) or bool(publishes)


def _stream_of(completion: Any) -> str:
    key = getattr(completion, "key", None)
    return key.stream_id if key is not None else completion.stream_id


def _update(ses: "LiveSession", done: Any) -> None:
    rt = ses._streams.get(_stream_of(done))
    if rt is None:
        return
    st = rt.state
    if isinstance(done, c.FrameDecoded):
        st.on_decoded(done.frame_idx, done.rgb)
    elif isinstance(done, c.Encoded):
        st.on_encoded(done.frame_idx, done.embedding)
    elif isinstance(done, c.FrameFailed):
        ses.events.append(f"{st.stream_id}: frame {done.frame_idx}: {done.reason}")
        st.on_frame_failed(done.frame_idx, done.reason)
    elif isinstance(done, c.StepDone):
        kind, generation, seq = done.tag
        if kind == "result":
            st.on_result(done.key, generation, done.frame_idx, seq, done.result, done.score)
    elif isinstance(done, c.SnapshotTaken):
        _, generation, frame_idx = done.tag
        st.on_snapshot(done.key, generation, frame_idx, done.snapshot)
    elif isinstance(done, c.ObjectLost):
        _on_object_lost(ses, st, done)
    elif isinstance(done, c.ObjectFailed):
        _on_object_failed(ses, st, done)
    elif isinstance(done, c.Published):
        _on_published(ses, rt, done)
    elif isinstance(done, c.StreamFailed):
        ses.events.append(f"{st.stream_id}: {done.reason}")
    elif isinstance(done, c.PublisherOpened) and done.errors:
        ses.events.append(f"{st.stream_id}: publisher: {'; '.join(done.errors)}")


def _on_object_lost(ses: "LiveSession", st: LiveStream, done: c.ObjectLost) -> None:
    inc = st.find(done.key)
    if inc is None:
        return
    rolled = st.on_tracker_lost(done.key)
    if rolled is None:
        ses.events.append(f"{st.stream_id}: object {done.key.object_id} lost ({done.reason}); "
                          "frames to replay were evicted")
        return
    rolled.opened = True
    ses._queued.append(c.OpenObject(done.key, (st.height, st.width), snapshot=rolled.snapshot))
    ses.events.append(f"{st.stream_id}: tracker of object {done.key.object_id} restarted from frame "
                      f"{rolled.snapshot_frame if rolled.snapshot is not None else rolled.start} ({done.reason})")


def _on_object_failed(ses: "LiveSession", st: LiveStream, done: c.ObjectFailed) -> None:
    """A tracker op raised (not a crash): the object cannot go on; it leaves the records from the
    first unpublished frame, and the stream continues."""
    inc = st.find(done.key)
    if inc is None or inc.end is not None and inc.end <= (st.first_unpublished() or 0):
        return
    inc.generation += 1  # its outstanding results are void
    st.end_at(inc, st.first_unpublished())
    ses.events.append(f"{st.stream_id}: object {done.key.object_id} stopped: {done.reason}")


def _publish(ses: "LiveSession") -> list[Any]:
    """Publish commands for every frame (or revision) whose results are all in; failed frames get
    their output at once."""
    out: list[Any] = []
    for rt in ses._streams.values():
        st = rt.state
        for frame, results in st.ready_to_publish():
            first = frame.revision == 0 or st.published_until is None or frame.frame_idx > st.published_until
            pub = _Publication(frame, frame.revision, frame.tokens, True)
            rt.awaiting.append(pub)
            st.unacked += 1
            if frame.failure is not None:
                pub.output = LiveOutput(None, frame.tokens, frame.failure)
                continue
            meta = FrameMeta(st.stream_id, frame.frame_idx, frame.pts, st.width, st.height, frame.dropped_before,
                             frame.lost_before, frame.revision, republished=not first)
            out.append(c.Publish(meta, None, tuple(results), tag=pub))
        for frame, results in st.ready_to_revise():
            pub = _Publication(frame, frame.revision, (), False)
            rt.awaiting.append(pub)
            meta = FrameMeta(st.stream_id, frame.frame_idx, frame.pts, st.width, st.height, 0, 0, frame.revision,
                             republished=True)
            out.append(c.Publish(meta, None, tuple(results), tag=pub))
    return out


def _on_published(ses: "LiveSession", rt: "StreamRuntime", done: c.Published) -> None:
    pub: _Publication = done.tag
    if pub is None or done.ack.record is None:
        return
    frame, backend = pub.frame, ses.backend
    pixels = frame.pixels
    pub.output = LiveOutput(done.ack.record, pub.tokens,
                            fetch_rgb=None if pixels is None else (lambda ref=pixels: backend.get(ref)))


def _emit(ses: "LiveSession") -> list[LiveOutput]:
    out = []
    now = ses.clock()
    for rt in ses._streams.values():
        st = rt.state
        while rt.awaiting and rt.awaiting[0].output is not None:
            pub = rt.awaiting.popleft()
            output = pub.output
            if pub.first:
                st.unacked -= 1
            if pub.first and output.record is None:
                ses.stats.inc("masklet_frames_dropped_total", reason="undecodable")  # its output is a failure
            elif pub.first:
                st.frames_published += 1
                st.publish_times = [t for t in st.publish_times[-63:] if t > now - 3.0] + [now]
                ses.stats.observe("masklet_end_to_end_latency_seconds", now - pub.frame.submitted_at)
            else:
                st.revisions_published += 1
            if output.record is not None and (rt.latest is None or _newer(output.record, rt.latest.record)):
                rt.latest = output  # a revision of an older frame does not move `latest` back
            out.append(output)
    return out


def _newer(record: Any, than: Any) -> bool:
    return (record.frame_idx, record.revision) >= (than.frame_idx, than.revision)
