"""LiveSession in-process with the fake model: drops, late/future prompts, remove, refine, recovery."""
from __future__ import annotations

import numpy as np
import pytest

from masklet.actors.payloads import EmbeddingPayload, ModelSpec
from masklet.model.types import Prompt
from masklet.monitoring.stats import frames_reconcile
from masklet.actors.backend import InProcessBackend
from masklet.actors.tracker import CloseObject, ObjectKey, RefineObject
from masklet.pipeline.live import LiveConfig, LiveSession, PromptRejected
from masklet.actors.messages import PromptMessage
from masklet.actors.rle import decode_rle
from tests.pipeline.configs import live_cfg
from tests.pipeline.fakes import FakeModel, synthetic_frames

FAKE = ModelSpec(name="fake", image_size=64, factory="tests.pipeline.fakes:build_fake_model")
H, W = 48, 64
FRAMES = synthetic_frames(40, H, W)


def square_centre(i: int) -> tuple[float, float]:
    return 4 + (i * 2) % (W - 20) + 7, H // 3 + 7


def add(sid: str, obj: int, frame: int, action: str = "add") -> PromptMessage:
    x, y = square_centre(frame)
    return PromptMessage(stream_id=sid, object_id=obj, frame_idx=frame, action=action, points=[(x, y)], labels=[1])


class SpyBackend(InProcessBackend):
    """Records every tracker op it carries, so tests can see which objects were refined or closed."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list = []

    def call(self, actor, method, *args, num_returns=1):
        if method == "run":
            self.ops += list(args[0])
        return super().call(actor, method, *args, num_returns=num_returns)


def session(**config) -> tuple[LiveSession, SpyBackend]:
    backend = SpyBackend()
    return LiveSession(backend, FAKE, live_cfg(**config)), backend


def feed(ses: LiveSession, sid: str, frames: range, poll: bool = True) -> list:
    outs = []
    for i in frames:
        ses.submit_frame(sid, i, i / 25, FRAMES[i], token=i)
        if poll:
            outs += ses.poll(1.0)
    return outs


def drain(ses: LiveSession, rounds: int = 50) -> list:
    outs = []
    for _ in range(rounds):
        outs += ses.poll(0.05)
    return outs


def reference_masks(start: int, stop: int) -> dict[int, np.ndarray]:
    """The fake tracker driven by hand from a prompt at `start`, through frame stop - 1."""
    model = FakeModel(64)
    tracker = model.new_tracker((H, W))
    out = {}
    for j in range(start, stop):
        emb = EmbeddingPayload.from_embedding(model.encode(FRAMES[j][None])[0]).to_embedding()
        prompt = Prompt(points=[square_centre(start)], labels=[1]) if j == start else None
        out[j] = (tracker.step(j, emb, prompt).logits > 0).numpy()
    return out


def objects(outs) -> dict[int, list[int]]:
    return {o.record.frame_idx: [ob.object_id for ob in o.record.objects] for o in outs}


def test_one_record_per_frame_and_no_encoding_without_objects():
    ses, backend = session()
    ses.open_stream("cam", W, H, 25.0)
    outs = feed(ses, "cam", range(6)) + drain(ses, 3)
    assert [o.record.frame_idx for o in outs] == list(range(6))
    assert all(o.record.objects == [] and o.tokens == (o.record.frame_idx,) for o in outs)
    assert not any(method == "encode" for _, method in backend.calls)  # skipped: nothing to track

    ses.submit_prompt(add("cam", 1, 8))  # a future frame: held until it arrives
    outs = feed(ses, "cam", range(6, 12)) + drain(ses, 3)
    assert objects(outs) == {6: [], 7: [], 8: [1], 9: [1], 10: [1], 11: [1]}
    assert ses.stats_snapshot().value("masklet_frames_encoded_total") == 4  # frames 8..11 only
    ref = reference_masks(8, 12)
    for o in outs[2:]:
        assert np.array_equal(o.masks[1], ref[o.record.frame_idx])
        rle = o.record.objects[0].rle
        assert np.array_equal(decode_rle({"size": list(rle.size), "counts": rle.counts}), ref[o.record.frame_idx])
    status = ses.status("cam")
    assert (status.frames_in, status.frames_published, status.frames_dropped, status.lag_frames) == (12, 12, 0, 0)
    assert set(status.objects) == {1}
    assert ses.latest("cam").record.frame_idx == 11
    ses.shutdown()


def test_drop_oldest_counts_and_reports_every_drop():
    ses, _ = session(queue_capacity=3)
    ses.open_stream("cam", W, H)
    ses.submit_prompt(add("cam", 1, 0))
    feed(ses, "cam", range(10), poll=False)  # nobody polls: the queue overflows
    outs = drain(ses, 5)
    assert [o.record.frame_idx for o in outs] == [7, 8, 9]
    assert [o.record.dropped_frames_since_last for o in outs] == [7, 0, 0]
    assert outs[0].tokens == (0, 1, 2, 3, 4, 5, 6, 7)  # the drops are settled with the next output
    assert objects(outs) == {7: [1], 8: [1], 9: [1]}  # the prompt of dropped frame 0 applies at 7
    snap = ses.stats_snapshot()
    assert snap.value("masklet_frames_dropped_total", reason="queue_full") == 7
    assert snap.value("masklet_frames_in_total", source_type="live") == 10
    assert snap.value("masklet_frames_published_total") == 3 and frames_reconcile(snap)
    assert ses.status("cam").frames_dropped == 7

    ses.submit_frame("cam", 5, 0.2, FRAMES[5], token="late")  # not newer: refused, counted, reported next
    outs = feed(ses, "cam", range(10, 11)) + drain(ses, 3)
    assert outs[0].tokens == ("late", 10) and outs[0].record.dropped_frames_since_last == 1
    assert ses.stats_snapshot().value("masklet_frames_dropped_total", reason="out_of_order") == 1
    ses.shutdown()


def test_late_prompt_at_a_buffered_frame_catches_up():
    ses, _ = session(ring_buffer_frames=8, snapshot_every=4)
    ses.open_stream("cam", W, H)
    published = feed(ses, "cam", range(12)) + drain(ses, 3)
    assert len(published) == 12
    ses.submit_prompt(add("cam", 1, 7))  # frame 7 is in the ring (4..11) and already published
    revised = drain(ses, 5)
    # The catch-up republishes the frames it changed, in order, one revision up, tokens already settled.
    assert [(o.record.frame_idx, o.record.revision, o.tokens) for o in revised] == [(j, 1, ()) for j in range(7, 12)]
    assert objects(revised) == {j: [1] for j in range(7, 12)}
    outs = feed(ses, "cam", range(12, 16)) + drain(ses, 3)
    assert objects(outs) == {12: [1], 13: [1], 14: [1], 15: [1]}
    assert all(o.record.revision == 0 for o in outs)
    ref = reference_masks(7, 16)  # applied at 7, then caught up through 8..11 before 12
    for o in revised + outs:
        assert np.array_equal(o.masks[1], ref[o.record.frame_idx])
    assert ses.status("cam").revisions == 5
    assert ses.stats_snapshot().value("masklet_revisions_published_total") == 5
    with pytest.raises(PromptRejected) as err:
        ses.submit_prompt(add("cam", 2, 2))  # evicted from the ring
    assert err.value.reason == "frame_too_old"
    ses.shutdown()


def test_remove_and_refine():
    ses, backend = session()
    ses.open_stream("cam", W, H)
    ses.submit_prompt(add("cam", 1, 0))
    ses.submit_prompt(add("cam", 2, 0))
    outs = feed(ses, "cam", range(4)) + drain(ses, 3)
    assert objects(outs) == {i: [1, 2] for i in range(4)}

    x, y = square_centre(3)
    ses.submit_prompt(PromptMessage(stream_id="cam", object_id=1, frame_idx=3, action="refine",
                                    points=[(x, y), (x + 20, y)], labels=[1, 0]))
    with pytest.raises(PromptRejected) as err:
        ses.submit_prompt(PromptMessage(stream_id="cam", object_id=1, frame_idx=1, action="refine",
                                        points=[(x, y)], labels=[1]))
    assert err.value.reason == "not_latest_frame"
    ses.submit_prompt(PromptMessage(stream_id="cam", object_id=2, frame_idx=6, action="remove"))
    outs = feed(ses, "cam", range(4, 9)) + drain(ses, 3)
    assert [op.key.object_id for op in backend.ops if isinstance(op, RefineObject)] == [1]
    # the refine corrected frame 3, already published: it comes again as revision 1
    assert [o.record.revision for o in outs if o.record.frame_idx == 3] == [1]
    assert objects(outs) == {3: [1, 2], 4: [1, 2], 5: [1, 2], 6: [1], 7: [1], 8: [1]}
    closed = [op.key for op in backend.ops if isinstance(op, CloseObject)]
    assert [k.object_id for k in closed] == [2] and closed[0] not in ses.executor.trackers
    assert set(ses.status("cam").objects) == {1}

    for msg, reason in [(add("nope", 1, 0), "unknown_stream"),
                        (PromptMessage(stream_id="cam", object_id=9, frame_idx=9, action="remove"), "unknown_object"),
                        (PromptMessage(stream_id="cam", object_id=3, frame_idx=9, action="add", points=[(500, 5)],
                                       labels=[1]), "out_of_range")]:
        with pytest.raises(PromptRejected) as err:
            ses.submit_prompt(msg)
        assert err.value.reason == reason
    ses.shutdown()


def test_tracker_death_resumes_from_snapshot_with_identical_masks():
    ses, backend = session(snapshot_every=3)
    ses.open_stream("cam", W, H)
    ses.submit_prompt(add("cam", 1, 0))
    outs = feed(ses, "cam", range(8))
    key = next(k for k in [ObjectKey("cam", 1, s) for s in range(3)] if k in ses.executor.trackers)
    backend.kill(ses.executor.trackers.actor_of(key))
    outs += feed(ses, "cam", range(8, 14)) + drain(ses, 3)
    assert ses.tracker_restarts == 1 and any("restarted from frame" in e for e in ses.events)
    ref = reference_masks(0, 14)
    assert [o.record.frame_idx for o in outs] == list(range(14))
    for o in outs:
        assert np.array_equal(o.masks[1], ref[o.record.frame_idx])
    ses.shutdown()


def test_two_streams_share_encoder_batches_and_stay_ordered():
    ses, _ = session(max_batch_size=8, max_in_flight=4)
    for sid in ("a", "b"):
        ses.open_stream(sid, W, H)
        ses.submit_prompt(add(sid, 1, 0))
    outs = []
    for i in range(12):
        for sid in ("a", "b"):
            ses.submit_frame(sid, i, i / 25, FRAMES[i])
        if i % 4 == 3:
            outs += ses.poll(0.0)
    outs += drain(ses, 5)
    per_stream = {sid: [o.record.frame_idx for o in outs if o.record.stream_id == sid] for sid in ("a", "b")}
    assert per_stream == {"a": list(range(12)), "b": list(range(12))}
    assert max(ses.encoder_batch_sizes()) > 1
    with pytest.raises(ValueError):
        ses.open_stream("a", W, H)
    ses.close_stream("a")
    assert ses.streams() == ["b"]
    ses.shutdown()


def test_late_prompt_at_the_oldest_buffered_frame_is_not_evicted_under_it():
    ses, _ = session(ring_buffer_frames=4, snapshot_every=2)
    ses.open_stream("cam", W, H)
    feed(ses, "cam", range(10))
    oldest = ses._streams["cam"].state.oldest_buffered
    ses.submit_prompt(add("cam", 1, oldest))  # the ring is over its size until the next round evicts
    outs = drain(ses, 3) + feed(ses, "cam", range(10, 13)) + drain(ses, 3)
    ref = reference_masks(oldest, 13)
    # frames oldest..9 were published without the object: they come again as revision 1
    assert [(o.record.frame_idx, o.record.revision) for o in outs] == \
        [(j, 1) for j in range(oldest, 10)] + [(10, 0), (11, 0), (12, 0)]
    assert objects(outs) == {j: [1] for j in range(oldest, 13)}
    for o in outs:
        assert np.array_equal(o.masks[1], ref[o.record.frame_idx])
    assert len(ses._streams["cam"].state.ring) <= 4 + 1
    ses.shutdown()


def _jpeg(rgb):
    from masklet.actors.payloads import EncodedImage
    from masklet.pipeline.kafka.codec import encode_jpeg

    return EncodedImage(encode_jpeg(rgb, quality=95), "image/jpeg", rgb.shape[1], rgb.shape[0])


def test_live_publisher_and_decoder_deaths_lose_no_frame():
    """Live streams have no files to lose: a dead publisher or decoder is replaced, the calls it had
    in flight are sent again, and every frame still gets exactly one record, in order."""
    ses, backend = session(max_in_flight=2)
    ses.open_stream("cam", W, H)
    ses.submit_prompt(add("cam", 1, 0))
    outs = []
    for i in range(12):
        ses.submit_frame("cam", i, i / 25, _jpeg(FRAMES[i]), token=i)  # decoded in a decoder actor
        if i == 4:
            backend.kill(ses.executor.publishers.actor_of("cam"))
        if i == 8:
            backend.kill(ses.executor.decoders.actor_of("cam"))
        outs += ses.poll(1.0)
    outs += drain(ses, 10)
    assert [o.record.frame_idx for o in outs] == list(range(12))
    assert [o.tokens for o in outs] == [(i,) for i in range(12)]
    assert all(o.record.objects for o in outs)
    assert any("publisher died" in e for e in ses.events) and any("decoder died" in e for e in ses.events)
    ses.shutdown()


def test_an_undecodable_live_frame_is_a_failure_output_and_the_stream_goes_on():
    from masklet.actors.payloads import EncodedImage

    ses, _ = session()
    ses.open_stream("cam", W, H)
    outs = []
    for i in range(4):
        image = EncodedImage(b"\xff\xd8\xff broken", "image/jpeg", W, H) if i == 2 else _jpeg(FRAMES[i])
        ses.submit_frame("cam", i, i / 25, image, token=i)
        outs += ses.poll(1.0)
    outs += drain(ses, 5)
    assert [(o.tokens, o.record is None) for o in outs] == [((0,), False), ((1,), False), ((2,), True), ((3,), False)]
    assert "undecodable" in outs[2].failure
    assert ses.stats_snapshot().value("masklet_frames_dropped_total", reason="undecodable") == 1
    ses.shutdown()
