"""Issue 12, item 1: the real decoders of external messages, driven by hypothesis.

Each property: whatever the input, a decoder either returns a valid value or raises its one
documented error type (Rejected, RleError, MessageError, PromptLimitError, ValidationError);
anything else (RecursionError, UnicodeEncodeError, a crash in pycocotools) would kill a run or
answer HTTP 500. Inputs mix pure noise with near-valid records, where decoders are most fragile.
"""
from __future__ import annotations

import json
import string

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from masklet.actors.messages import FrameHeaders, MessageError, PromptMessage, load_json
from masklet.actors.prompt_limits import InputLimits, PromptLimitError, prompt_to_model
from masklet.actors.rle import RleError, compressed_runs, decode_rle, encode_mask
from masklet.actors.safe_yaml import load_yaml
from masklet.deploy.api_models import AddObject, RefineObject
from masklet.pipeline.kafka.codec import decode_frame, parse_prompt
from masklet.pipeline.kafka.deadletter import Rejected
from tests.hardening.gate_fakes import H, W, Record, frame_record, make_gate

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=30)
coords = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
rle_chars = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=40)
rle_like = st.fixed_dictionaries({
    "size": st.one_of(st.tuples(st.integers(-3, 80), st.integers(-3, 80)), json_values),
    "counts": st.one_of(rle_chars, st.text(alphabet=string.digits + string.ascii_letters + "[\\]^_`", max_size=40),
                        st.lists(st.integers(-5, 200), max_size=12), json_values),
})


def prompt_fields():
    """Dicts shaped like prompt/v1: right keys, values sometimes wrong, sometimes outrageous."""
    return st.fixed_dictionaries({
        "schema": st.sampled_from(["prompt/v1", "prompt/v2", 1]),
        "stream_id": st.one_of(st.just("cam"), st.text(max_size=300)),
        "object_id": st.one_of(st.integers(-1, 2_000_000), st.integers(), json_values),
        "frame_idx": st.one_of(st.integers(0, 100), st.integers(), st.text(max_size=30)),
        "action": st.sampled_from(["add", "refine", "remove", "explode"]),
    }, optional={
        "points": st.one_of(st.lists(st.tuples(coords, coords), max_size=80), json_values),
        "labels": st.one_of(st.lists(st.integers(-1, 2), max_size=80), json_values),
        "box": st.one_of(st.tuples(coords, coords, coords, coords), json_values),
        "mask": st.one_of(rle_like, json_values),
        "extra": json_values,
    })


@FUZZ
@given(st.one_of(st.binary(max_size=300), prompt_fields().map(lambda d: json.dumps(d).encode()),
                 json_values.map(lambda v: json.dumps(v).encode()),
                 st.integers(1, 3000).map(lambda n: b'{"schema":"prompt/v1","points":' + b"[" * n + b"]" * n + b"}")))
def test_parse_prompt_raises_only_rejected(data):
    gate, _ = make_gate()
    try:
        prompt = parse_prompt(data, {"cam": (W, H)})
    except Rejected as rejected:
        assert rejected.reason in ("malformed_prompt", "unknown_schema") and "\n" not in rejected.detail
    else:
        assert isinstance(prompt, PromptMessage) and len(prompt.points) <= InputLimits().max_points_per_prompt
    gate.prompt(Record("prompts", data))  # and the gate never raises for it


@FUZZ
@given(rle_like)
def test_decode_rle_raises_only_rle_error(rle):
    try:
        mask = decode_rle(rle)
    except RleError as error:
        assert "\n" not in str(error)
    else:
        assert mask.dtype == bool and list(mask.shape) == [int(v) for v in rle["size"]]


@FUZZ
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1), st.data())
def test_corrupted_rle_counts_never_reach_pycocotools_unchecked(height, width, seed, data):
    """Take a real mask's counts and damage them: the result is a correct-shape mask or RleError."""
    mask = np.random.default_rng(seed).random((height, width)) > 0.5
    counts = encode_mask(mask)["counts"]
    assert np.array_equal(decode_rle({"size": [height, width], "counts": counts}), mask)
    cut = data.draw(st.integers(0, len(counts)))
    noise = data.draw(st.text(alphabet=st.characters(min_codepoint=40, max_codepoint=130), max_size=6))
    damaged = counts[:cut] + noise + counts[cut + data.draw(st.integers(0, 3)):]
    try:
        decoded = decode_rle({"size": [height, width], "counts": damaged})
    except RleError:
        return
    # What passed the check decodes exactly as our own reading of the runs says (the C reader agrees).
    runs = compressed_runs(damaged.encode())
    values = np.arange(len(runs)) % 2 == 1  # runs alternate background, foreground, ...
    expected = np.repeat(values, runs).reshape(width, height).T  # COCO RLE is column-major
    assert np.array_equal(decoded, expected)


header_names = st.sampled_from(["schema", "frame_idx", "pts", "content_type", "width", "height", "x-trace"])
header_values = st.one_of(st.sampled_from([b"frame/v1", b"image/jpeg", b"image/png", b"0", b"7", b"1e999", b"nan",
                                           b"99999999999999999999999", b"-1", b"64", b"48", b"\xff\xfe"]),
                          st.binary(max_size=12), st.none())


@FUZZ
@given(st.lists(st.tuples(header_names, header_values), max_size=8),
       st.one_of(st.none(), st.binary(max_size=200), st.binary(max_size=60).map(lambda b: b"\xff\xd8\xff" + b),
                 st.binary(max_size=60).map(lambda b: b"\x89PNG\r\n\x1a\n" + b)),
       st.one_of(st.none(), st.just(b"cam"), st.binary(max_size=300)))
def test_decode_frame_raises_only_rejected(headers, value, key):
    try:
        decode_frame(key, value, headers, max_pixels=W * H * 4)
    except Rejected as rejected:
        assert "\n" not in rejected.detail
    gate, _ = make_gate()
    gate.frame(Record("frames", value, key=key, headers=headers))


@FUZZ
@given(st.lists(st.tuples(header_names, header_values), max_size=8))
def test_frame_headers_raise_only_message_error(headers):
    try:
        FrameHeaders.from_kafka_headers(headers)
    except MessageError:
        pass


@FUZZ
@given(st.integers(0, 3).flatmap(lambda n: st.lists(st.tuples(coords, coords), min_size=n, max_size=n * 40)),
       st.one_of(st.none(), st.tuples(coords, coords, coords, coords)),
       st.one_of(st.none(), st.fixed_dictionaries({"size": st.tuples(st.integers(1, 50_000), st.integers(1, 50_000)),
                                                   "counts": rle_chars})),
       st.integers(1, 100), st.integers(1, 100))
def test_prompt_to_model_raises_only_prompt_limit_error(points, box, mask, height, width):
    try:
        message = PromptMessage(stream_id="cam", object_id=1, frame_idx=0, action="add", points=points,
                                labels=[1] * len(points), box=box, mask=mask)
    except ValidationError:
        return
    try:
        prompt = prompt_to_model(message, height, width)
    except PromptLimitError as error:
        assert error.reason in ("invalid_prompt", "out_of_range", "too_large")
    else:
        prompt.check_inside((height, width))  # what the model itself would check later


@FUZZ
@given(st.dictionaries(st.sampled_from(["points", "labels", "box", "mask", "frame_idx", "object_id", "colour"]),
                       json_values, max_size=5), st.sampled_from([AddObject, RefineObject]))
def test_api_prompt_bodies_are_a_validation_error_or_a_checked_prompt(body, model):
    """The API's body models, then the same conversion the app runs before the session sees a prompt."""
    try:
        parsed = model.model_validate(body)
    except ValidationError:
        return
    action = "add" if model is AddObject else "refine"
    try:
        prompt_to_model(parsed.to_prompt("cam", 1, 0, action), H, W)
    except PromptLimitError:
        pass


@FUZZ
@given(st.one_of(st.text(max_size=300),
                 json_values.map(lambda v: json.dumps(v)),
                 st.integers(1, 400).map(lambda n: "a: " + "[" * n + "]" * n),
                 st.integers(1, 12).map(lambda n: "a: &x [1]\n" + "".join(f"b{i}: &x{i} [*x, *x]\n" for i in range(n)))))
def test_structured_text_loaders_raise_one_error_type(text):
    for load in (lambda t: load_yaml(t, 32), lambda t: load_json(t, 32)):
        try:
            load(text)
        except MessageError as error:
            assert "\n" not in str(error)
