"""Bad input goes to the dead-letter topic with a reason, and the stream goes on."""
import json
import pickle

import numpy as np
import pytest

from masklet.monitoring.stats import Stats
from masklet.pipeline.kafka.client import producer_kwargs
from masklet.pipeline.kafka.codec import encode_jpeg, frame_headers
from masklet.pipeline.kafka.deadletter import DeadLetterPublisher
from masklet.pipeline.kafka.gate import InputGate
from masklet.pipeline.kafka.producer import RecoveringProducer
from masklet.actors.messages import DeadLetter

W, H = 160, 120


def _frame(idx: int) -> bytes:
    rng = np.random.default_rng(idx)
    return encode_jpeg(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))


class _Pickled:
    """Unpickling this would run code; the gate must refuse it without unpickling."""

    def __reduce__(self):
        return (pytest.fail, ("the payload was unpickled",))


def _prompt(**fields) -> bytes:
    body = {"schema": "prompt/v1", "stream_id": "cam", "object_id": 1, "frame_idx": 0, "action": "add",
            "points": [[10, 10]], "labels": [1]}
    body.update(fields)
    return json.dumps(body).encode()


@pytest.fixture
def producer(kafka_settings):
    producer = RecoveringProducer(producer_kwargs(kafka_settings))
    yield producer
    producer.close()


def test_bad_frames_are_dead_lettered_and_the_stream_continues(kafka_settings, consume_records, producer):
    topics = kafka_settings.topics
    good = _frame(0)
    corrupt = good[: len(good) // 2]
    sends = [
        (good, frame_headers(0, 0.0, W, H)),
        (corrupt, frame_headers(1, 0.1, W, H)),
        (_frame(2), frame_headers(2, 0.2, W, H)),
        (pickle.dumps(_Pickled()), frame_headers(3, 0.3, W, H)),
        (_frame(4), frame_headers(4, 0.4, W, H)),
        (_frame(5), frame_headers(5, 0.5, 50_000, 50_000)),  # header claims an oversized frame
        (_frame(6), frame_headers(6, 0.6, W, H)),
        (b"GIF89a....", frame_headers(7, 0.7, W, H)),  # not the declared content type
        (_frame(8), frame_headers(8, 0.8, W, H)),
    ]
    for value, headers in sends:
        producer.send(topics.frames, value=value, key=b"cam", headers=headers)
    assert producer.flush(15).complete

    stats = Stats()
    gate = InputGate(DeadLetterPublisher(producer, topics.deadletter, stats), max_pixels=1920 * 1080, stats=stats)
    accepted = [gate.frame(record) for record in consume_records(kafka_settings, topics.frames, len(sends))]
    assert producer.flush(15).complete

    assert [frame.frame_idx for frame in accepted if frame] == [0, 2, 4, 6, 8]
    assert all(frame.size == (W, H) for frame in accepted if frame)

    letters = [DeadLetter.from_json_bytes(r.value) for r in consume_records(kafka_settings, topics.deadletter, 4)]
    assert [(letter.reason, letter.detail.split(":")[0]) for letter in letters] == [
        ("undecodable_frame", "corrupt_image"),
        ("undecodable_frame", "pickle_payload"),
        ("frame_too_large", "oversized_header"),
        ("undecodable_frame", "content_type_mismatch"),
    ]
    assert [letter.source_offset for letter in letters] == [1, 3, 5, 7]
    assert all(letter.stream_id == "cam" and letter.source_topic == topics.frames for letter in letters)
    assert ("frame_idx", "3") in letters[1].original_headers
    snapshot = stats.snapshot()
    assert snapshot.value("masklet_deadletter_total", reason="undecodable_frame") == 3
    assert snapshot.value("masklet_deadletter_total", reason="frame_too_large") == 1
    assert snapshot.total("masklet_frames_dropped_total") == 4


def test_bad_prompts_are_dead_lettered(kafka_settings, consume_records, producer):
    topics = kafka_settings.topics
    producer.send(topics.frames, value=_frame(0), key=b"cam", headers=frame_headers(0, 0.0, W, H))
    prompts = [
        b'{"schema": "prompt/v1", "stream_id": ',     # malformed JSON
        _prompt(points=[[W + 50, 10]]),               # outside the 160x120 frame
        _prompt(stream_id="nobody"),                  # no frame of it yet: passes, rechecked later
        pickle.dumps({"schema": "prompt/v1"}),        # pickle, never loaded
        _prompt(action="remove", points=[], labels=[]),  # valid
    ]
    for value in prompts:
        producer.send(topics.prompts, value=value, key=b"cam")
    assert producer.flush(15).complete

    gate = InputGate(DeadLetterPublisher(producer, topics.deadletter), max_pixels=1920 * 1080)
    [frame_record] = consume_records(kafka_settings, topics.frames, 1)
    assert gate.frame(frame_record) is not None  # the gate now knows stream "cam" is 160x120
    records = consume_records(kafka_settings, topics.prompts, len(prompts))
    results = [gate.prompt(r) for r in records]
    assert results[2].stream_id == "nobody"  # the runner holds it until a frame of "nobody" arrives...
    assert gate.recheck(results[2], records[2]) is False  # ...and one that never does is refused
    assert gate.recheck(results[4], records[4]) is True
    assert producer.flush(15).complete

    assert [results[i] for i in (0, 1, 3)] == [None] * 3
    assert results[4].action == "remove" and results[4].object_id == 1
    letters = [DeadLetter.from_json_bytes(r.value) for r in consume_records(kafka_settings, topics.deadletter, 4)]
    assert [(letter.reason, letter.detail.split(":")[0]) for letter in letters] == [
        ("malformed_prompt", "malformed_prompt"),
        ("malformed_prompt", "out_of_range"),
        ("malformed_prompt", "pickle_payload"),
        ("unknown_stream", "unknown_stream"),  # refused on recheck, after the gate saw every prompt
    ]


def test_poison_pills_through_the_broker_are_dead_letters_and_the_stream_goes_on(kafka_settings, consume_records,
                                                                                producer):
    """Issue 12: records that used to kill `masklet run` (and be replayed on every restart) or silence a
    stream: a 2 KB prompt of 1,000 nested brackets (RecursionError), a mask with non-ASCII RLE counts
    (UnicodeEncodeError), a frame_idx of 99999999999999999999999 (every later frame "out of order")."""
    topics = kafka_settings.topics
    huge = [(k, b"99999999999999999999999" if k == "frame_idx" else v) for k, v in frame_headers(0, 0.05, W, H)]
    frames = [(_frame(0), frame_headers(0, 0.0, W, H)), (_frame(1), huge)]
    frames += [(_frame(i), frame_headers(i, 0.1 * i, W, H)) for i in range(1, 13)]
    for value, headers in frames:
        producer.send(topics.frames, value=value, key=b"cam", headers=headers)
    nested = b'{"schema": "prompt/v1", "points": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    prompts = [nested, _prompt(points=[], labels=[], mask={"size": [H, W], "counts": "\u00ff\u00fe"}), _prompt()]
    for value in prompts:
        producer.send(topics.prompts, value=value, key=b"cam")
    assert producer.flush(15).complete

    gate = InputGate(DeadLetterPublisher(producer, topics.deadletter), max_pixels=1920 * 1080)
    accepted = [gate.frame(r) for r in consume_records(kafka_settings, topics.frames, len(frames))]
    parsed = [gate.prompt(r) for r in consume_records(kafka_settings, topics.prompts, len(prompts))]
    assert producer.flush(15).complete
    assert [f.frame_idx for f in accepted if f] == list(range(13))  # 12 of 12 later frames go on
    assert parsed[:2] == [None, None] and parsed[2].points == [(10.0, 10.0)]
    letters = [DeadLetter.from_json_bytes(r.value) for r in consume_records(kafka_settings, topics.deadletter, 3)]
    assert sorted((letter.reason, letter.detail.split(":")[0]) for letter in letters) == [
        ("bad_frame_headers", "bad_frame_headers"),   # frame_idx over 2**53 - 1
        ("malformed_prompt", "invalid_prompt"),       # RLE counts must be ASCII
        ("malformed_prompt", "malformed_prompt"),     # nested deeper than 32 levels
    ]
