import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from masklet.deploy.prompt_specs import (
    ObjectPrompt,
    PromptSpecError,
    build_prompt_spec,
    load_prompts_file,
    parse_box_flag,
    parse_point_flag,
    validate_prompts,
)


def test_point_and_box_flags():
    assert parse_point_flag("320,240", 1) == ObjectPrompt(1, 0, ((320.0, 240.0),), (1,))
    assert parse_point_flag(" 10.5, 7 @12", 2).frame_idx == 12
    assert parse_box_flag("1,2,30,40@5", 3) == ObjectPrompt(3, 5, box=(1.0, 2.0, 30.0, 40.0))


@pytest.mark.parametrize(
    "parser, text, expected",
    [
        (parse_point_flag, "320", "--point '320': expected x,y[@frame]"),
        (parse_point_flag, "a,b", "expected x,y[@frame]"),
        (parse_point_flag, "1,2@-1", "expected x,y[@frame]"),
        (parse_box_flag, "1,2,3", "--box '1,2,3': expected x0,y0,x1,y1[@frame]"),
        (parse_box_flag, "30,2,10,40", "needs x0 < x1 and y0 < y1"),
    ],
)
def test_flag_syntax_errors(parser, text, expected):
    with pytest.raises(PromptSpecError) as info:
        parser(text, 1)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_flags_apply_to_every_input():
    spec = build_prompt_spec(points=["5,5", "9,9@3"], boxes=["0,0,4,4"])
    for name in ("a.mp4", "/x/b.mp4"):
        prompts = spec.prompts_for(name)
        assert [p.object_id for p in prompts] == [1, 3, 2]  # sorted by frame, then id
    assert spec.object_ids_for("a.mp4") == [1, 2, 3]
    with pytest.raises(PromptSpecError, match="no prompts"):
        build_prompt_spec()


def test_yaml_prompts_file_per_input(tmp_path):
    Image.fromarray(np.pad(np.full((4, 4), 255, np.uint8), ((0, 16), (0, 28)))).save(tmp_path / "m.png")
    (tmp_path / "p.yaml").write_text(
        """
inputs:
  01_dog.mp4:
    - frame: 0
      points: [[10, 10], [20, 5]]
      labels: [1, 0]
    - id: 7
      prompts:
        - {frame: 0, box: [1, 1, 30, 15]}
        - {frame: 4, mask: m.png}
  "*":
    - {points: [[3, 3]]}
"""
    )
    spec = build_prompt_spec(points=["2,2"], prompts_file=tmp_path / "p.yaml")
    dog = spec.prompts_for(Path("/videos/01_dog.mp4"))
    assert [(p.object_id, p.frame_idx) for p in dog] == [(1, 0), (2, 0), (3, 0), (7, 0), (7, 4)]
    assert next(p for p in dog if p.object_id == 2).points == ((3.0, 3.0),)  # "*" objects are numbered first
    clicked = next(p for p in dog if p.object_id == 3)
    assert clicked.points == ((10.0, 10.0), (20.0, 5.0)) and clicked.labels == (1, 0)
    masked = next(p for p in dog if p.frame_idx == 4)
    assert masked.mask == tmp_path / "m.png" and masked.load_mask().sum() == 16
    validate_prompts(dog, width=32, height=20, num_frames=5)
    assert [p.object_id for p in spec.prompts_for("02_cups.mp4")] == [1, 2]


def test_json_prompts_file_and_stem_matching(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"inputs": {"clip": [{"id": 4, "frame": 2, "box": [0, 0, 5, 5]}]}}))
    per_input = load_prompts_file(path)
    assert per_input["clip"] == (ObjectPrompt(4, 2, box=(0.0, 0.0, 5.0, 5.0)),)
    assert build_prompt_spec(prompts_file=path).prompts_for("/data/clip.mkv")[0].object_id == 4


@pytest.mark.parametrize(
    "content, expected",
    [
        ("inputs: [", "invalid YAML"),
        ("- 1\n", "top level must be a mapping"),
        ("objects: {}\n", "inputs: Field required"),
        ("inputs:\n  a: [{frame: 0}]\n", "inputs.a.0: needs points, a box or a mask"),
        ("inputs:\n  a: [{points: [[1, 2]], labels: [1, 1]}]\n", "1 points need 1 labels"),
        ("inputs:\n  a: [{points: [[1, 2]], labels: [3]}]\n", "labels must be 1 (positive) or 0"),
        ("inputs:\n  a: [{box: [5, 0, 1, 1]}]\n", "x0 < x1"),
        ("inputs:\n  a: [{frame: -1, box: [0, 0, 1, 1]}]\n", "frame"),
        ("inputs:\n  a: [{box: [0, 0, 1, 1], colour: red}]\n", "colour: Extra inputs are not permitted"),
        ("inputs:\n  a: [{box: [0, 0, 1, 1], prompts: [{box: [0, 0, 1, 1]}]}]\n", "either 'prompts' or inline"),
        ("inputs:\n  a: [{id: 1, prompts: [{box: [0, 0, 1, 1]}, {points: [[1, 1]]}]}]\n", "two prompts on one frame"),
        ("inputs:\n  a: [{id: 1, box: [0, 0, 1, 1]}]\n", "object id 1 is already used by a --point/--box flag"),
        ("inputs:\n  '*': [{id: 5, box: [0, 0, 1, 1]}]\n  a: [{id: 5, points: [[1, 1]]}]\n", "id 5 is already used under '*'"),
    ],
)
def test_prompts_file_errors(tmp_path, content, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(PromptSpecError) as info:
        build_prompt_spec(points=["1,1"], prompts_file=path)
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message, message


def test_missing_prompts_file():
    with pytest.raises(PromptSpecError, match="cannot read prompts file"):
        build_prompt_spec(prompts_file="/nonexistent/p.yaml")


@pytest.mark.parametrize(
    "prompt, expected",
    [
        (ObjectPrompt(1, 0, ((1300.0, 10.0),), (1,)), "object 1 at frame 0: point (1300, 10) is outside the 1280x720 frame"),
        (ObjectPrompt(2, 0, box=(0.0, 0.0, 100.0, 800.0)), "box (0, 0, 100, 800) is outside the 1280x720 frame"),
        (ObjectPrompt(3, 300, ((1.0, 1.0),), (1,)), "object 3 at frame 300: the input has only 289 frames"),
        (ObjectPrompt(4, 0, mask=Path("/nonexistent.png")), "cannot read mask"),
    ],
)
def test_validate_against_video(prompt, expected):
    with pytest.raises(PromptSpecError) as info:
        prompt.validate_against(1280, 720, 289)
    assert expected in str(info.value)
    if prompt.frame_idx == 300:
        prompt.validate_against(1280, 720, None)  # unknown length: checked when the stream ends


def test_mask_size_must_match_frame(tmp_path):
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(PromptSpecError, match="is 10x10, the frame is 1280x720"):
        ObjectPrompt(1, 0, mask=tmp_path / "m.png").validate_against(1280, 720, 10)
