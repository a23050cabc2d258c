import json

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from masklet.actors.messages import (
    DeadLetter,
    FrameHeaders,
    MaskletRecord,
    MessageError,
    ObjectMask,
    PromptMessage,
    parse_message,
)
from masklet.actors.rle import RleError, decode_rle, encode_mask, encode_masks, mask_bbox, rle_area, rle_bbox


def _random_mask(seed, shape=(37, 53)):
    rng = np.random.default_rng(seed)
    return rng.random(shape) > 0.6


def test_rle_round_trip_matches_pycocotools():
    mask = _random_mask(0)
    rle = encode_mask(mask)
    assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
    assert np.array_equal(decode_rle(rle), mask)
    reference = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert rle["counts"].encode() == reference["counts"]
    assert rle_area(rle) == int(mask.sum())
    assert rle_bbox(rle) == mask_bbox(mask)
    json.dumps(rle)  # JSON-ready as is


def test_batch_encode_and_bbox_edge_cases():
    masks = np.stack([_random_mask(s) for s in range(3)] + [np.zeros((37, 53), bool)])
    batch = encode_masks(masks)
    assert [decode_rle(r).sum() for r in batch] == [int(m.sum()) for m in masks]
    assert batch[0] == encode_mask(masks[0])
    assert rle_bbox(batch[-1]) == [0, 0, 0, 0] == mask_bbox(masks[-1])
    box = np.zeros((10, 20), bool)
    box[2:5, 7:11] = True
    assert mask_bbox(box) == rle_bbox(encode_mask(box)) == [7, 2, 4, 3]
    assert encode_masks(np.zeros((0, 4, 4))) == []


def test_rle_rejects_bad_input():
    with pytest.raises(RleError, match="2-D"):
        encode_mask(np.zeros((2, 3, 4)))
    with pytest.raises(RleError, match="size"):
        decode_rle({"size": [0, 5], "counts": "0"})
    with pytest.raises(RleError, match="summing to 6"):
        decode_rle({"size": [2, 3], "counts": [1, 2]})
    assert decode_rle({"size": [2, 3], "counts": [1, 2, 3]}).sum() == 2


def _record(**overrides):
    mask = _random_mask(1, (24, 32))
    rle = encode_mask(mask)
    obj = ObjectMask(object_id=3, rle=rle, bbox=rle_bbox(rle), area=rle_area(rle), score=2.5, iou=0.8, present=True)
    fields = dict(stream_id="cam-1", frame_idx=7, pts=0.29, width=32, height=24, model="sam2.1_hiera_tiny", objects=[obj])
    fields.update(overrides)
    return MaskletRecord(**fields)


def test_masklet_record_json_round_trip():
    record = _record()
    data = record.to_json_bytes()
    payload = json.loads(data)
    assert payload["schema"] == "masklet/v1" and payload["dropped_frames_since_last"] == 0
    assert set(payload["objects"][0]) == {"object_id", "rle", "bbox", "area", "score", "iou", "present"}
    assert MaskletRecord.from_json_bytes(data) == record
    assert parse_message(data) == record
    assert record.record_id == ("cam-1", 7) and record.kafka_key() == b"cam-1"
    empty = _record(objects=[])
    assert MaskletRecord.from_json_bytes(empty.to_json_bytes()).objects == []


def test_masklet_record_rejects_inconsistent_objects():
    with pytest.raises(ValueError, match="RLE size"):
        _record(width=33)
    obj = _record().objects[0]
    with pytest.raises(ValueError, match="appears twice"):
        _record(objects=[obj, obj])
    with pytest.raises(ValueError):
        _record(pts=float("nan"))


def test_unknown_schema_versions_are_refused():
    data = _record().to_json_bytes().replace(b"masklet/v1", b"masklet/v2")
    with pytest.raises(MessageError, match="unsupported schema 'masklet/v2': expected 'masklet/v1'"):
        MaskletRecord.from_json_bytes(data)
    with pytest.raises(MessageError, match="unsupported schema 'masklet/v2'"):
        parse_message(data)
    with pytest.raises(MessageError, match="not valid JSON"):
        PromptMessage.from_json_bytes(b"{nope")
    with pytest.raises(MessageError, match='no "schema"'):
        PromptMessage.from_json_bytes(b"{}")


def test_frame_headers_round_trip_through_kafka_header_lists():
    headers = FrameHeaders(frame_idx=12, pts=0.5005, content_type="image/jpeg")
    kafka_headers = headers.to_kafka_headers() + [("traceparent", b"00-abc")]
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in kafka_headers)
    assert FrameHeaders.from_kafka_headers(kafka_headers) == headers
    with pytest.raises(MessageError, match="unsupported frame schema 'frame/v9'"):
        FrameHeaders.from_kafka_headers([("schema", b"frame/v9")])
    with pytest.raises(MessageError, match="lacks header"):
        FrameHeaders.from_kafka_headers([("schema", b"frame/v1"), ("frame_idx", b"1")])
    with pytest.raises(MessageError, match="content_type"):
        FrameHeaders.from_kafka_headers(
            [("schema", b"frame/v1"), ("frame_idx", b"1"), ("pts", b"0"), ("content_type", b"image/gif")]
        )


def _prompt(**fields):
    base = dict(schema="prompt/v1", stream_id="s", object_id=1, frame_idx=0, action="add")
    base.update(fields)
    return PromptMessage.from_json_bytes(json.dumps(base).encode())


def test_prompt_validation():
    prompt = _prompt(points=[[10, 20], [30, 40]], labels=[1, 0], box=[0, 0, 50, 60])
    assert prompt.points == [(10.0, 20.0), (30.0, 40.0)]
    assert PromptMessage.from_json_bytes(prompt.to_json_bytes()) == prompt
    masked = _prompt(mask=encode_mask(_random_mask(2, (8, 8))))
    assert decode_rle(masked.mask.model_dump()).shape == (8, 8)
    assert _prompt(action="remove").action == "remove"
    cases = [
        (dict(points=[[1, 2]], labels=[1, 1]), "1 points need 1 labels"),
        (dict(points=[[1, 2]], labels=[2]), "labels must be 1 (positive) or 0"),
        (dict(box=[10, 0, 5, 5]), "x0 < x1"),
        (dict(), "action 'add' needs points, a box or a mask"),
        (dict(action="refine", box=[0, 0, 1, 1]), "needs correction clicks"),
        (dict(action="remove", points=[[1, 1]], labels=[1]), "takes no points"),
        (dict(action="move", points=[[1, 1]], labels=[1]), "action"),
        (dict(stream_id=""), "stream_id"),
    ]
    for fields, expected in cases:
        with pytest.raises(MessageError) as info:
            _prompt(**fields)
        assert expected in str(info.value) and "\n" not in str(info.value), (fields, str(info.value))


def test_dead_letter_keeps_headers_as_text():
    letter = DeadLetter(
        reason="undecodable_frame",
        detail="cam-1: data is neither JPEG nor PNG",
        source_topic="masklet.frames",
        source_partition=0,
        source_offset=41,
        stream_id="cam-1",
        original_headers=DeadLetter.headers_as_text([("schema", b"frame/v1"), ("bin", b"\xff\x00")]),
    )
    back = DeadLetter.from_json_bytes(letter.to_json_bytes())
    assert back == letter and back.original_headers[1] == ("bin", "\\xff\x00")
    assert parse_message(letter.to_json_bytes()) == letter
    with pytest.raises(MessageError, match="reason"):
        DeadLetter.from_json_bytes(json.dumps({"schema": "deadletter/v1", "reason": "oops", "detail": ""}).encode())
