"""The plug-in contract (masklet.model.protocols) describes Masklet's own model exactly."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from masklet.model import (
    BatchedStepModel, ObjectTracker, Prompt, SAM2Model, SegmentationModel, Tracker, build_model,
)


@pytest.fixture(scope="module")
def model():
    return build_model("sam2.1_hiera_tiny", checkpoint=None, image_size=64)


def test_build_model_satisfies_the_protocols(model):
    assert isinstance(model, SegmentationModel)
    assert isinstance(model, BatchedStepModel)
    tracker = model.new_tracker((48, 64))
    assert isinstance(tracker, Tracker)
    embedding = model.encode(np.zeros((1, 48, 64, 3), np.uint8))[0]
    tracker.step(3, embedding, Prompt(points=[[30, 20]], labels=[1]))
    assert isinstance(tracker.reverse_tracker(), Tracker)
    assert isinstance(model.restore_tracker(tracker.state_dict()), Tracker)
    tracking_only = build_model("sam2.1_hiera_tiny", checkpoint=None, image_size=64, with_image_encoder=False)
    assert isinstance(tracking_only, BatchedStepModel)


def test_a_model_without_step_many_is_still_a_segmentation_model(model):
    class OneByOne:  # what a plug-in without batching looks like
        config, image_size = model.config, model.image_size
        encode, new_tracker, restore_tracker = model.encode, model.new_tracker, model.restore_tracker

    assert isinstance(OneByOne(), SegmentationModel)
    assert not isinstance(OneByOne(), BatchedStepModel)
    assert not isinstance(object(), SegmentationModel)


def _parameters(fn) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("protocol, real", [
    (BatchedStepModel, SAM2Model),
    (Tracker, ObjectTracker),
])
def test_protocol_signatures_match_the_real_methods(protocol, real):
    methods = [name for name, value in vars(protocol).items() if inspect.isfunction(value) and not name.startswith("_")]
    for base in protocol.__mro__[1:]:
        methods += [n for n, v in vars(base).items() if inspect.isfunction(v) and not n.startswith("_") and n not in methods]
    assert methods, protocol
    for name in methods:
        want, have = _parameters(getattr(protocol, name)), _parameters(getattr(real, name))
        assert want == have, f"{real.__name__}.{name}: protocol {want} vs real {have}"
    print(protocol.__name__, "methods checked:", sorted(methods))
