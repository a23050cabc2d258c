"""Issue 12, item 1: no record kills the run. Each known poison pill is a dead letter or a 4xx."""
from __future__ import annotations

import json

import pytest

from masklet.actors.messages import MessageError, PromptMessage
from masklet.actors.prompt_limits import PromptLimitError, prompt_to_model
from masklet.actors.rle import RleError, decode_rle
from masklet.deploy.serve_app import create_app
from masklet.pipeline.config import ServeSettings
from masklet.pipeline.kafka.codec import parse_prompt
from masklet.pipeline.kafka.deadletter import Rejected
from tests.hardening.gate_fakes import H, W, frame_record, make_gate, prompt_body, prompt_record
from tests.serve.conftest import TOKEN, Client, LoopbackServer, wait_for
from tests.serve.fake_session import FakeLiveSession

NESTED_PROMPT = b'{"schema": "prompt/v1", "points": ' + b"[" * 1000 + b"]" * 1000 + b"}"  # ~2 KB
NON_ASCII_MASK = {"size": [H, W], "counts": "\u00ff\u00fe"}  # "ÿþ"


def test_a_prompt_of_1000_nested_brackets_is_a_dead_letter_not_a_recursion_error():
    with pytest.raises(Rejected) as refused:
        parse_prompt(NESTED_PROMPT)
    assert refused.value.reason == "malformed_prompt" and "nested deeper than" in refused.value.detail
    gate, producer = make_gate()
    assert gate.prompt(prompt_record(NESTED_PROMPT)) is None
    assert gate.frame(frame_record(0)) is not None  # the next record goes through
    [letter] = producer.letters()
    assert letter.reason == "malformed_prompt" and "nested deeper than 32 levels" in letter.detail


def test_a_mask_with_non_ascii_rle_counts_is_refused_in_one_line():
    with pytest.raises(RleError, match="ASCII"):
        decode_rle(NON_ASCII_MASK)
    message = PromptMessage(stream_id="cam", object_id=1, frame_idx=0, action="add", mask=NON_ASCII_MASK)
    with pytest.raises(PromptLimitError) as refused:
        prompt_to_model(message, H, W)
    assert refused.value.reason == "invalid_prompt"
    gate, producer = make_gate()
    gate.frame(frame_record(0))
    body = prompt_body(points=[], labels=[], mask=NON_ASCII_MASK)
    assert gate.prompt(prompt_record(body)) is None  # a dead letter at the gate, before the session
    assert gate.prompt(prompt_record(prompt_body())) is not None  # and the next prompt goes through
    [letter] = producer.letters()
    assert letter.reason == "malformed_prompt" and letter.detail.startswith("invalid_prompt: RLE counts must be ASCII")


@pytest.fixture()
def api(clip):
    fake = FakeLiveSession()
    with LoopbackServer(create_app(fake, ServeSettings(), token=TOKEN)) as server:
        client = Client(server.url)
        created = client.post("/streams", json={"stream_id": "cam1", "source": str(clip), "loop": True})
        assert created.status_code == 201, created.text
        wait_for(lambda: client.get("/streams/cam1").json()["frames_in"] > 0, message="first frame")
        yield client, fake


def test_api_mask_with_non_ascii_counts_is_422_not_500(api):
    client, fake = api
    response = client.post("/streams/cam1/objects", json={"mask": {"size": [64, 96], "counts": "\u00ff\u00fe"}})
    assert response.status_code == 422, response.text
    assert "ASCII" in response.json()["detail"] and not fake.prompts


def test_api_source_path_with_a_component_over_255_bytes_is_422_not_500(api):
    client, _ = api
    for source in ("/tmp/" + "a" * 300 + "/clip.mp4", "/tmp/" + "b" * 300, "file:///tmp/" + "c" * 300):
        response = client.post("/streams", json={"stream_id": "long", "source": source})
        assert response.status_code == 422, (source[:20], response.status_code, response.text)
        assert "File name too long" in response.json()["detail"]


def test_api_body_nested_past_the_json_parsers_recursion_limit_is_4xx_not_500(api):
    client, _ = api
    body = b'{"points": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    response = client.post("/streams/cam1/objects", data=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:200])


class _Exploding:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __call__(self, *args, **kwargs):
        raise self.exc


@pytest.mark.parametrize("exc", [RecursionError("maximum recursion depth exceeded"), MemoryError(),
                                 UnicodeEncodeError("ascii", "\u00ff", 0, 1, "ordinal not in range"),
                                 KeyError("bug")], ids=lambda e: type(e).__name__)
def test_the_gate_turns_any_decoder_failure_into_a_dead_letter(monkeypatch, exc):
    """The one guard: whatever a decoder raises (a bug, RecursionError, MemoryError), the record
    becomes a dead letter with reason internal_error and the gate goes on; nothing reaches the run."""
    import masklet.pipeline.kafka.gate as gate_module

    gate, producer = make_gate()
    assert gate.frame(frame_record(0)) is not None
    monkeypatch.setattr(gate_module, "inspect_frame", _Exploding(exc))
    monkeypatch.setattr(gate_module, "parse_prompt", _Exploding(exc))
    assert gate.frame(frame_record(1)) is None
    assert gate.prompt(prompt_record(prompt_body())) is None
    monkeypatch.undo()
    assert gate.frame(frame_record(2)) is not None
    letters = producer.letters()
    assert [letter.reason for letter in letters] == ["internal_error", "internal_error"]
    assert letters[0].detail.startswith("unexpected_frame_error: " + type(exc).__name__)
    assert letters[1].detail.startswith("unexpected_prompt_error: " + type(exc).__name__)


def test_load_json_reports_deep_nesting_in_one_line():
    from masklet.actors.messages import load_json

    for text in ("[" * 100 + "]" * 100, "[" * 100_000 + "]" * 100_000):
        with pytest.raises(MessageError, match="nested deeper than 32 levels"):
            load_json(text, 32)
    assert load_json(json.dumps({"a": [[1, 2]]}), 32) == {"a": [[1, 2]]}
