"""The plug-in seam end to end: `masklet segment --model-factory module:function` runs a model of
one's own (here masklet.model.null_model, which follows masklet.model.protocols) through the whole
pipeline, and a bad factory is one clear line."""
from __future__ import annotations

import contextlib
import io

from masklet.actors.sinks import read_jsonl_records
from masklet.deploy.cli import main

NULL = "masklet.model.null_model:build_null_model"


def segment(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["segment", *args])
    return code, err.getvalue()


def test_segment_runs_a_plugin_model(video_paths, tmp_path):
    clip = video_paths[0]
    code, err = segment(str(clip), "--out", str(tmp_path), "--model-factory", NULL, "--model", "null",
                        "--checkpoint", "random", "--image-size", "256", "--max-frames", "4", "--point", "640,360",
                        "--box", "100,100,300,300", "--backend", "inprocess", "--no-preview")
    assert code == 0, err
    records = read_jsonl_records(tmp_path / clip.stem / "masklets.jsonl")
    assert [r.frame_idx for r in records] == [0, 1, 2, 3] and all(r.model == "null" for r in records)
    for r in records:
        assert [o.object_id for o in r.objects] == [1, 2] and all(o.area > 0 for o in r.objects)
        cx = r.objects[0].bbox[0] + r.objects[0].bbox[2] / 2
        assert abs(cx - 640) < 20  # the null model's blob sits on its prompt
    assert (tmp_path / clip.stem / "object_2_mask.mkv").is_file()


def test_a_bad_factory_is_one_line(video_paths, tmp_path):
    code, err = segment(str(video_paths[0]), "--out", str(tmp_path), "--model-factory", "not a factory",
                        "--point", "1,1")
    assert code == 2 and "module:function" in err and "Traceback" not in err
    code, err = segment(str(video_paths[0]), "--out", str(tmp_path), "--model-factory", "no_such_module:build",
                        "--model", "x", "--checkpoint", "random", "--point", "1,1", "--backend", "inprocess")
    assert code == 1 and "no_such_module" in err and "Traceback" not in err, err


def test_precision_reaches_every_model_copy_of_the_pipeline(video_paths, tmp_path):
    """--precision bf16 (settings -> ModelSpec -> each actor's build) runs the encoder and the
    tracker copies in bf16; fp32 stays the default."""
    import functools

    from masklet.actors.backend import InProcessBackend
    from masklet.actors.sinks import JsonlOutputs
    from masklet.actors.sources import open_source
    from masklet.actors.tracker import ObjectKey
    from masklet.model.types import Prompt
    from masklet.pipeline.config import load_settings
    from masklet.pipeline.configure import engine_config, model_spec
    from masklet.pipeline.engine import Engine, StreamSpec

    for precision in ("fp32", "bf16"):
        settings = load_settings(model={"checkpoint": "random", "image_size": 256, "device": "cpu",
                                        **({"precision": precision} if precision != "fp32" else {})})
        spec = model_spec(settings)
        engine = Engine(InProcessBackend(), spec, engine_config(settings, spec))
        clip = video_paths[0]
        stream = StreamSpec(clip.stem, functools.partial(open_source, str(clip), max_frames=3),
                            {1: {0: Prompt(points=[[640, 360]], labels=[1])}}, JsonlOutputs(str(tmp_path / precision)),
                            bidirectional=False)
        report = engine.run([stream])
        assert report.streams[clip.stem].ok and report.streams[clip.stem].frames_published == 3
        encoder = engine.executor.encoder.impl.instance.model
        tracker = engine.executor.trackers.actor_of(ObjectKey(clip.stem, 1))
        assert spec.precision == precision and encoder.precision == precision
        assert tracker is None or tracker.impl.instance.model.precision == precision
        for actor in engine.executor.trackers.actors:
            assert actor.impl.instance.model.precision == precision
