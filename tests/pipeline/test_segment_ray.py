"""`masklet segment` and the engine on the Ray backend, with the real model (random weights, 256 px).

One Ray session (2 CPUs) for the whole module; the CLI run is shared by several checks.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import av
import numpy as np
import pytest
import ray

from masklet.actors.payloads import ModelSpec
from masklet.actors.tracker import ObjectKey
from masklet.model import build_model
from masklet.model.config import get_config
from masklet.model.types import Prompt
from masklet.actors.backend import InProcessBackend, RayBackend
from masklet.deploy.cli import main
from masklet.pipeline.engine import Engine, StreamSpec
from masklet.actors.rle import decode_rle
from masklet.actors.sinks import SegmentOutputs
from masklet.actors.sinks import read_jsonl_records
from masklet.actors.sources import open_source
from tests.pipeline.fakes import fake_opener
from tests.pipeline.configs import engine_cfg

IMAGE_SIZE = 256
MAX_FRAMES = 6
MODEL = ModelSpec("sam2.1_hiera_tiny", None, IMAGE_SIZE, "cpu")
DELAY = get_config(MODEL.name, image_size=IMAGE_SIZE).max_obj_ptrs_in_encoder - 1


@pytest.fixture(scope="module")
def ray_session():
    from masklet.actors.backend import init_ray

    init_ray(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


PROMPTS_YAML = """
inputs:
  01_dog.mp4:
    - {id: 1, frame: 2, points: [[640, 360]]}
  02_cups.mp4:
    - {id: 1, frame: 0, box: [300, 200, 700, 600]}
    - {id: 2, frame: 3, points: [[900, 400], [100, 100]], labels: [1, 0]}
  05_default_juggle.mp4:
    - {id: 1, frame: 0, points: [[5000, 10]]}
  "*":
    - {id: 7, frame: 1, points: [[10, 10]]}
"""


@pytest.fixture(scope="module")
def cli_run(ray_session, video_paths, tmp_path_factory):
    """dog + cups (good), juggle (prompt outside the frame), an empty, a non-video and a truncated file."""
    tmp = tmp_path_factory.mktemp("segment")
    by_name = {p.name: p for p in video_paths}
    (tmp / "empty.mp4").write_bytes(b"")
    (tmp / "notes.mp4").write_text("this is not a video\n")
    data = by_name["01_dog.mp4"].read_bytes()
    (tmp / "cut.mp4").write_bytes(data[: len(data) // 3])
    prompts = tmp / "prompts.yaml"
    prompts.write_text(PROMPTS_YAML)
    inputs = [str(by_name["01_dog.mp4"]), str(by_name["02_cups.mp4"]), str(by_name["05_default_juggle.mp4"]),
              str(tmp / "empty.mp4"), str(tmp / "notes.mp4"), str(tmp / "cut.mp4")]
    out = tmp / "out"
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["segment", *inputs, "--out", str(out), "--prompts", str(prompts), "--checkpoint", "random",
                     "--image-size", str(IMAGE_SIZE), "--max-frames", str(MAX_FRAMES)])
    return {"code": code, "stderr": err.getvalue(), "out": out, "inputs": inputs, "tmp": tmp}


def _frames(path, n=MAX_FRAMES):
    with open_source(str(path), max_frames=n) as src:
        return [f.rgb for f in src.frames()]


def reference_masks(path, objects, n=MAX_FRAMES):
    """The model API called directly, in-process: encode each frame, step the trackers by hand,
    and run the backward pass as the official predictor's reverse=True does (after the forward)."""
    import torch

    torch.manual_seed(MODEL.seed)
    model = build_model(MODEL.name, checkpoint=None, image_size=IMAGE_SIZE, device="cpu")
    frames = _frames(path, n)
    emb = [model.encode(f[None])[0] for f in frames]
    out = {j: {} for j in range(len(frames))}
    for oid, by_frame in objects.items():
        k = min(by_frame)
        t = model.new_tracker(frames[0].shape[:2])
        rt = None
        for j in range(k, len(frames)):
            out[j][oid] = t.step(j, emb[j], by_frame.get(j)).mask.numpy()
            if j == min(k + DELAY, len(frames) - 1) and k > 0:
                rt = t.reverse_tracker()
        for j in range(k - 1, -1, -1):
            out[j][oid] = rt.step(j, emb[j]).mask.numpy()
    return out


def records_masks(path):
    return {r.frame_idx: {o.object_id: decode_rle(o.rle.model_dump()) for o in r.objects} for r in read_jsonl_records(path)}


def assert_masks_match(actual, expected, tolerance=0.0):
    assert sorted(actual) == sorted(expected)
    for j in expected:
        assert sorted(actual[j]) == sorted(expected[j]), f"frame {j}"
        for oid, mask in expected[j].items():
            differing = np.mean(actual[j][oid] != mask)
            assert differing <= tolerance, f"frame {j} object {oid}: {differing:.2%} pixels differ"


def _count_frames(path):
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def test_segment_outputs_one_record_per_frame(cli_run):
    assert cli_run["code"] == 1  # some inputs are bad
    for stem, objects in (("01_dog", [1, 7]), ("02_cups", [1, 2, 7])):
        folder = cli_run["out"] / stem
        records = read_jsonl_records(folder / "masklets.jsonl")
        assert [r.frame_idx for r in records] == list(range(MAX_FRAMES))
        for r in records:
            assert (r.width, r.height) == (1280, 720) and r.model == MODEL.name
            assert [o.object_id for o in r.objects] == objects
            for o in r.objects:
                assert decode_rle(o.rle.model_dump()).shape == (720, 1280)
        assert _count_frames(folder / "preview.mp4") == MAX_FRAMES
        for oid in objects:
            assert _count_frames(folder / f"object_{oid}_mask.mkv") == MAX_FRAMES


def test_bad_inputs_get_one_error_line_and_the_others_finish(cli_run):
    errors = [line for line in cli_run["stderr"].splitlines() if "error:" in line]
    tmp = cli_run["tmp"]
    expected = {"05_default_juggle.mp4": "outside the 1280x720 frame", "empty.mp4": "empty file",
                "notes.mp4": "", "cut.mp4": ""}
    assert len(errors) == len(expected), errors
    for name, reason in expected.items():
        line = next(e for e in errors if name in e)
        assert reason in line
    assert "Traceback" not in cli_run["stderr"]
    assert "RANDOM WEIGHTS" in cli_run["stderr"]
    assert not (tmp / "out" / "empty").exists() or not (tmp / "out" / "empty" / "masklets.jsonl").exists()


def test_pipeline_equals_model_api(cli_run):
    dog = cli_run["inputs"][0]
    objects = {1: {2: Prompt(points=[[640, 360]], labels=[1])}, 7: {1: Prompt(points=[[10, 10]], labels=[1])}}
    expected = reference_masks(dog, objects)
    # Batched encoding (several frames and streams per pass) may move a logit by float rounding.
    assert_masks_match(records_masks(cli_run["out"] / "01_dog" / "masklets.jsonl"), expected, tolerance=1e-3)


def test_two_inputs_together_equal_each_alone(cli_run, tmp_path):
    cups = cli_run["inputs"][1]
    objects = {1: {0: Prompt(box=[300, 200, 700, 600])}, 2: {3: Prompt(points=[[900, 400], [100, 100]], labels=[1, 0])},
               7: {1: Prompt(points=[[10, 10]], labels=[1])}}
    import functools

    spec = StreamSpec("02_cups", functools.partial(open_source, cups, max_frames=MAX_FRAMES), objects,
                      SegmentOutputs(str(tmp_path / "alone"), False, False))
    config = engine_cfg(max_batch_size=1, backward_delay=DELAY)
    report = Engine(InProcessBackend(), MODEL, config).run([spec])
    assert report.streams["02_cups"].ok
    assert_masks_match(records_masks(cli_run["out"] / "02_cups" / "masklets.jsonl"),
                       records_masks(tmp_path / "alone" / "masklets.jsonl"), tolerance=1e-3)


FAKE = ModelSpec(name="fake", image_size=64, factory="tests.pipeline.fakes:build_fake_model")


def _kill_run(ray_session, tmp_path, model, killer, n=14, config=None):
    config = config or engine_cfg(max_batch_size=2, max_wait_ms=1, snapshot_every=3, replay_frames=6,
                                    queue_capacity=6, backward_delay=2)
    objects = {1: {3: Prompt(points=[[20, 20]], labels=[1])}}
    spec = StreamSpec("k", fake_opener(num_frames=n), objects, SegmentOutputs(str(tmp_path / "ray"), False, False))
    backend = RayBackend()
    engine = Engine(backend, model, config, on_progress=lambda outcome: killer(engine, outcome))
    killer.done = False
    report = engine.run([spec])
    engine.shutdown()
    reference = Engine(InProcessBackend(), model, config).run(
        [StreamSpec("k", fake_opener(num_frames=n), objects, SegmentOutputs(str(tmp_path / "ref"), False, False))])
    assert report.streams["k"].ok and reference.streams["k"].ok
    records = read_jsonl_records(tmp_path / "ray" / "masklets.jsonl")
    assert [r.frame_idx for r in records] == list(range(n))
    assert_masks_match(records_masks(tmp_path / "ray" / "masklets.jsonl"),
                       records_masks(tmp_path / "ref" / "masklets.jsonl"))
    return report


def test_tracker_killed_mid_stream_resumes_from_snapshot(ray_session, tmp_path):
    """Real model: the replacement resumes from ObjectTracker.state_dict() and replays."""
    def killer(engine, outcome):
        if not killer.done and outcome.frames_published >= 4:
            killer.done = True
            ray.kill(engine.executor.trackers.actor_of(ObjectKey("k", 1)).impl, no_restart=True)

    report = _kill_run(ray_session, tmp_path, MODEL, killer, n=10)
    assert report.tracker_restarts == 1


def test_encoder_and_tracker_sigkilled_mid_stream(ray_session, tmp_path):
    def killer(engine, outcome):
        if not killer.done and outcome.frames_published >= 5:
            killer.done = True
            for actor in (engine.executor.encoder, engine.executor.trackers.actor_of(ObjectKey("k", 1))):
                pid = ray.get(actor.impl.pid.remote())
                os.kill(pid, signal.SIGKILL)

    report = _kill_run(ray_session, tmp_path, FAKE, killer, n=24)
    assert report.tracker_restarts >= 1 and report.encoder_restarts >= 1


def test_tracker_process_hosting_two_streams_sigkilled(ray_session, tmp_path):
    """One tracker process hosts both streams' objects (packing); SIGKILL it mid-run: every object is
    reopened from its own snapshot and the masks equal an uninterrupted run."""
    config = engine_cfg(max_batch_size=2, max_wait_ms=1, snapshot_every=3, replay_frames=6, queue_capacity=6)
    objects = {1: {0: Prompt(points=[[20, 20]], labels=[1])}, 2: {1: Prompt(points=[[40, 24]], labels=[1])}}

    def specs(sub):
        return [StreamSpec(f"s{s}", fake_opener(num_frames=20, seed=s), objects,
                           SegmentOutputs(str(tmp_path / sub / f"s{s}"), False, False), bidirectional=False)
                for s in range(2)]

    hosted: list = []

    def killer(engine, outcome):
        if not hosted and outcome.frames_published >= 6:
            actor = engine.executor.trackers.actor_of(ObjectKey("s0", 1))
            hosted.extend(engine.executor.trackers.members_of(actor))
            os.kill(ray.get(actor.impl.pid.remote()), signal.SIGKILL)

    engine = Engine(RayBackend(), FAKE, config, on_progress=lambda outcome: killer(engine, outcome))
    report = engine.run(specs("ray"))
    engine.shutdown()
    reference = Engine(InProcessBackend(), FAKE, config).run(specs("ref"))
    assert {k.stream_id for k in hosted} == {"s0", "s1"} and len(hosted) == 4, hosted
    assert report.tracker_restarts == 1
    assert sorted(e.message.split(":")[0] for e in report.events if e.kind == "object_recovered") == \
        ["object 1", "object 1", "object 2", "object 2"]
    for s in ("s0", "s1"):
        assert report.streams[s].ok and reference.streams[s].ok
        assert_masks_match(records_masks(tmp_path / "ray" / s / "masklets.jsonl"),
                           records_masks(tmp_path / "ref" / s / "masklets.jsonl"))


def test_colocated_shard_on_ray_equals_the_in_process_run(ray_session, tmp_path):
    """The shard layout (encoder + trackers in one actor process) on real Ray processes."""
    config = engine_cfg(max_batch_size=4, max_wait_ms=1, snapshot_every=3, replay_frames=6, colocate=True)
    objects = {1: {0: Prompt(points=[[20, 20]], labels=[1])}}

    def specs(sub):
        return [StreamSpec(f"c{s}", fake_opener(num_frames=10, seed=s), objects,
                           SegmentOutputs(str(tmp_path / sub / f"c{s}"), False, False)) for s in range(2)]

    engine = Engine(RayBackend(), FAKE, config)
    report = engine.run(specs("ray"))
    engine.shutdown()
    reference = Engine(InProcessBackend(), FAKE, engine_cfg(max_batch_size=4, max_wait_ms=0)).run(specs("ref"))
    assert set(report.actors) >= {"shard"} and not any(n.startswith("encoder") for n in report.actors)
    for s in ("c0", "c1"):
        assert report.streams[s].ok and reference.streams[s].ok
        assert_masks_match(records_masks(tmp_path / "ray" / s / "masklets.jsonl"),
                           records_masks(tmp_path / "ref" / s / "masklets.jsonl"))
