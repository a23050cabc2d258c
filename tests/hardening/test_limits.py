"""Issue 12, item 2: bounded work for every input. Each limit is a setting and refuses with a reason."""
from __future__ import annotations

import io
import json
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from masklet.actors.messages import PromptMessage
from masklet.actors.prompt_limits import InputLimits, PromptLimitError, check_object_count, prompt_to_model
from masklet.actors.rle import encode_mask
from masklet.deploy.prompt_specs import ObjectPrompt, PromptSpecError, build_prompt_spec, load_prompts_file
from masklet.pipeline.config import load_settings
from masklet.pipeline.kafka.codec import parse_prompt
from masklet.pipeline.kafka.deadletter import Rejected
from tests.hardening.gate_fakes import H, W, frame_record, make_gate, prompt_body, prompt_record


def _message(**fields) -> PromptMessage:
    base = {"stream_id": "cam", "object_id": 1, "frame_idx": 0, "action": "add"}
    return PromptMessage(**{**base, **fields})


# -- points per prompt ----------------------------------------------------------------------------

def test_a_prompt_with_100000_points_is_refused_before_any_model_work():
    points = [[1.0, 1.0]] * 100_000
    body = json.dumps(prompt_body(points=points, labels=[1] * 100_000)).encode()
    assert len(body) < InputLimits().max_prompt_bytes  # under the byte cap: the points cap must catch it
    started = time.monotonic()
    with pytest.raises(Rejected) as refused:
        parse_prompt(body)
    print(f"1.4 MB prompt of 100,000 points refused in {(time.monotonic() - started) * 1000:.1f} ms")
    assert (refused.value.reason, refused.value.kind) == ("malformed_prompt", "too_large")
    assert "holds about 300005 values, at most 256" in refused.value.detail  # counted, not parsed
    with pytest.raises(Rejected, match="65 points, at most 64"):  # just over: parsed, then counted
        parse_prompt(json.dumps(prompt_body(points=[[1.0, 1.0]] * 65, labels=[1] * 65)).encode())
    with pytest.raises(PromptLimitError) as error:
        prompt_to_model(_message(points=points, labels=[1] * 100_000), H, W)
    assert error.value.reason == "too_large"
    limits = load_settings(limits={"max_points_per_prompt": 100_000}).limits.input_limits()
    assert parse_prompt(body, limits=limits).points  # a setting, not a constant


# -- mask size, checked before decoding -------------------------------------------------------------

def test_a_65_byte_mask_declaring_50000x50000_is_refused_without_allocating():
    message = _message(mask={"size": [50000, 50000], "counts": ""})
    assert len(message.mask.model_dump_json()) < 70
    tracemalloc.start()
    try:
        with pytest.raises(PromptLimitError) as error:
            prompt_to_model(message, 720, 1280)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"peak Python allocation while refusing: {peak} bytes")
    assert error.value.reason == "out_of_range" and "[50000, 50000] != frame [720, 1280]" in error.value.detail
    assert peak < 1_000_000  # the 2.5 GB mask (plus its bool copy) was never allocated


def test_a_mask_of_the_right_size_decodes_and_an_empty_counts_string_is_refused():
    mask = np.zeros((H, W), bool)
    mask[5:20, 10:30] = True
    prompt = prompt_to_model(_message(mask=encode_mask(mask)), H, W)
    assert np.array_equal(prompt.mask, mask)
    with pytest.raises(PromptLimitError, match="empty"):  # pycocotools "decoded" it to uninitialised memory
        prompt_to_model(_message(mask={"size": [H, W], "counts": ""}), H, W)


def test_points_and_boxes_outside_the_frame_are_out_of_range():
    for fields in ({"points": [[W + 1, 1]], "labels": [1]}, {"box": [1, 1, 10, H + 5]}):
        with pytest.raises(PromptLimitError) as error:
            prompt_to_model(_message(**fields), H, W)
        assert error.value.reason == "out_of_range"


def test_the_kafka_gate_checks_mask_size_against_the_stream_before_the_session():
    gate, producer = make_gate()
    gate.frame(frame_record(0))
    big = prompt_body(points=[], labels=[], mask={"size": [50000, 50000], "counts": ""})
    assert gate.prompt(prompt_record(big)) is None
    [letter] = producer.letters()
    assert letter.reason == "malformed_prompt" and letter.detail.startswith("out_of_range: mask size")


# -- objects per stream and per run --------------------------------------------------------------

def test_object_caps_refuse_a_new_object_with_a_reason():
    limits = InputLimits(max_objects_per_stream=2, max_objects_per_run=3)
    check_object_count(1, {1, 2}, 3, limits)  # an existing object (re-prompt) always passes
    with pytest.raises(PromptLimitError, match="max_objects_per_stream") as error:
        check_object_count(3, {1, 2}, 2, limits)
    assert error.value.reason == "too_many_objects"
    with pytest.raises(PromptLimitError, match="max_objects_per_run"):
        check_object_count(3, {1}, 3, limits)


def _segment(argv, capsys):
    from masklet.deploy.cli import main

    started = time.monotonic()
    code = main(["segment", *argv])
    return code, capsys.readouterr().err, time.monotonic() - started


def test_segment_refuses_too_many_objects_in_one_line(tmp_path, capsys, clip):
    spec = {"inputs": {"*": [{"points": [[10 + i, 10]]} for i in range(17)]}}
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(spec))
    code, err, _ = _segment([str(clip), "--out", str(tmp_path / "out"), "--prompts", str(prompts),
                             "--checkpoint", "random"], capsys)
    assert code == 2 and "17 objects, at most 16 per input (limits.max_objects_per_stream)" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1  # refused before anything starts

    spec = {"inputs": {"*": [{"points": [[10, 10]]}]}}
    prompts.write_text(json.dumps(spec))
    config = tmp_path / "limits.yaml"
    config.write_text("limits:\n  max_objects_per_run: 2\n")
    code, err, _ = _segment([str(clip), str(clip), str(clip), "--out", str(tmp_path / "out"), "--prompts",
                             str(prompts), "--checkpoint", "random", "--config", str(config)], capsys)
    assert code == 2 and "3 objects over all inputs, at most 2 per run" in err, err


# -- prompts files -------------------------------------------------------------------------------

def test_a_prompts_file_over_the_size_cap_is_refused_unparsed(tmp_path):
    path = tmp_path / "big.yaml"
    line = "    - {id: 1, points: [[1.5, 2.5], [3.5, 4.5]]}\n"
    path.write_text("inputs:\n  a.mp4:\n" + line * (50 * 1024 * 1024 // len(line)))  # 50 MB
    started = time.monotonic()
    with pytest.raises(PromptSpecError, match="over 1048576 bytes"):
        load_prompts_file(path)
    print(f"50 MB prompts file refused in {time.monotonic() - started:.3f} s")


def test_100000_points_in_a_prompts_file_is_one_line(tmp_path, capsys, clip):
    path = tmp_path / "points.json"
    path.write_text(json.dumps({"inputs": {"*": [{"points": [[1, 1]] * 100_000}]}}))
    code, err, seconds = _segment([str(clip), "--out", str(tmp_path / "out"), "--prompts", str(path),
                                   "--checkpoint", "random", "--config", str(_big_file_config(tmp_path))], capsys)
    print(f"segment answered in {seconds:.2f} s")
    assert code == 2 and "100000 points in one prompt, at most 64" in err, err


def _big_file_config(tmp_path):
    config = tmp_path / "big-files.yaml"
    config.write_text("limits:\n  max_prompts_file_bytes: 4194304\n")  # the file is ~0.7 MB: the points cap decides
    return config


@pytest.mark.parametrize("name,text,expected", [
    ("deep.yaml", "inputs: " + "[" * 2000 + "]" * 2000, "nest"),
    ("deep.json", '{"inputs": ' + "[" * 5000 + "]" * 5000 + "}", "nested deeper than 32 levels"),
    ("bomb.yaml", "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                  "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ninputs: {x: *d}\n",
     "aliases (*name) are not allowed"),
    ("merge.yaml", "base: &b {points: [[1, 1]]}\ninputs:\n  '*':\n    - <<: *b\n", "aliases"),
    ("python.yaml", "inputs: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
])
def test_nested_and_hostile_prompts_files_end_in_one_line(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PromptSpecError) as error:
        build_prompt_spec(prompts_file=path)
    message = str(error.value)
    assert expected in message and "\n" not in message and str(path) in message, message


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, with a tiny (truncated) IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height", [(60_000, 60_000), (20_000, 20_000)])
def test_a_mask_file_that_is_a_decompression_bomb_ends_in_one_line(tmp_path, width, height):
    mask = tmp_path / "bomb.png"
    mask.write_bytes(_png_header_only(width, height))
    prompt = ObjectPrompt(1, 0, mask=mask)
    with pytest.raises(PromptSpecError) as error:
        prompt.load_mask()
    message = str(error.value)
    assert "\n" not in message and ("pixels" in message or "decompression bomb" in message), message
    with pytest.raises(PromptSpecError):
        prompt.validate_against(96, 64, None)


def test_a_normal_mask_file_still_loads(tmp_path):
    mask = tmp_path / "m.png"
    Image.fromarray((np.arange(96 * 64).reshape(64, 96) % 3 == 0).astype(np.uint8) * 255).save(mask)
    assert ObjectPrompt(1, 0, mask=mask).load_mask().shape == (64, 96)


# -- frame_idx window in the Kafka gate ----------------------------------------------------------

def test_a_frame_idx_far_ahead_is_a_dead_letter_and_the_stream_goes_on():
    gate, producer = make_gate()
    accepted = [gate.frame(frame_record(i)) for i in (0, 1)]
    assert all(accepted)
    assert gate.frame(frame_record(99999999999999999999999)) is None    # not even a JSON-safe integer
    assert gate.frame(frame_record(10**12)) is None                     # an integer, far beyond the window
    later = [gate.frame(frame_record(i)) for i in range(2, 14)]
    assert [f.frame_idx for f in later] == list(range(2, 14))          # 12 of 12 later frames pass
    letters = producer.letters()
    assert [letter.reason for letter in letters] == ["bad_frame_headers", "bad_frame_headers"]
    assert letters[1].detail.startswith("frame_idx_out_of_window: frame_idx 1000000000000 is")


def test_a_producer_that_really_jumped_ahead_is_followed_after_a_few_frames():
    gate, producer = make_gate(limits=InputLimits(max_frame_gap=1000, frame_gap_resync=3))
    assert gate.frame(frame_record(0))
    jumped = [gate.frame(frame_record(50_000 + i)) for i in range(5)]
    assert [f is not None for f in jumped] == [False, False, True, True, True]
    assert len(producer.letters()) == 2
    assert gate.frame(frame_record(0, stream=b"other"))  # windows are per stream


# -- the same limits on the control API ----------------------------------------------------------

@pytest.fixture()
def api(clip):
    from masklet.deploy.serve_app import create_app
    from masklet.pipeline.config import LimitsSettings, ServeSettings
    from tests.serve.conftest import TOKEN, Client, LoopbackServer, wait_for
    from tests.serve.fake_session import FakeLiveSession

    fake = FakeLiveSession()
    limits = LimitsSettings(max_objects_per_stream=2, max_objects_per_run=3)
    with LoopbackServer(create_app(fake, ServeSettings(), token=TOKEN, limits=limits)) as server:
        client = Client(server.url)
        for stream_id in ("cam1", "cam2"):
            body = {"stream_id": stream_id, "source": str(clip), "loop": True}
            assert client.post("/streams", json=body).status_code == 201
            wait_for(lambda: client.get(f"/streams/{stream_id}").json()["frames_in"] > 0, message="first frame")
        yield client, fake


def test_api_refuses_too_many_points_and_an_oversized_mask_with_422(api):
    client, fake = api
    many = client.post("/streams/cam1/objects", json={"points": [[1, 1]] * 65, "labels": [1] * 65})
    assert many.status_code == 422 and many.json()["detail"].startswith("too_large: 65 points"), many.text
    started = time.monotonic()
    bomb = client.post("/streams/cam1/objects", json={"mask": {"size": [50000, 50000], "counts": ""}})
    print(f"65-byte 50000x50000 mask refused in {(time.monotonic() - started) * 1000:.1f} ms")
    assert bomb.status_code == 422 and bomb.json()["detail"].startswith("out_of_range: mask size"), bomb.text
    outside = client.post("/streams/cam1/objects", json={"points": [[500, 10]], "labels": [1]})
    assert outside.status_code == 422 and outside.json()["detail"].startswith("out_of_range"), outside.text
    assert not fake.prompts  # none of them reached the session


def test_api_refuses_objects_over_the_stream_and_run_caps_with_409(api):
    client, fake = api
    add = lambda stream_id, x: client.post(f"/streams/{stream_id}/objects", json={"points": [[x, 10]], "labels": [1]})
    assert [add("cam1", 10).status_code, add("cam1", 20).status_code] == [202, 202]
    third = add("cam1", 30)
    assert third.status_code == 409 and "too_many_objects" in third.json()["detail"]
    assert "max_objects_per_stream" in third.json()["detail"]
    again = client.post("/streams/cam1/objects", json={"object_id": 1, "points": [[12, 12]], "labels": [1]})
    assert again.status_code == 202  # re-prompting an existing object is no new object
    assert add("cam2", 10).status_code == 202  # the run's third object
    fourth = add("cam2", 20)
    assert fourth.status_code == 409 and "max_objects_per_run" in fourth.json()["detail"]
    assert client.delete("/streams/cam1/objects/2").status_code == 202
    assert add("cam2", 20).status_code == 202  # a removed object frees its place
