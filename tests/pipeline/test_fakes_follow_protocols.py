"""Test doubles and plug-ins follow the same typed interfaces as the real thing: the fake model and
tracker (tests/pipeline/fakes.py), the null model (masklet.model.null_model), the real LiveSession
and the control API's fake session (tests/serve/fake_session.py). `isinstance` with a
runtime_checkable Protocol only checks that members exist; here every method's parameters must
also match the protocol's, name by name."""
from __future__ import annotations

import inspect
import typing

import pytest

from masklet.model.null_model import NullModel, NullTracker, build_null_model
from masklet.model.protocols import BatchedStepModel, SegmentationModel, Tracker
from masklet.pipeline.live import LiveSession
from masklet.pipeline.live_types import LiveSessionAPI
from tests.pipeline.fakes import FakeModel, FakeTracker
from tests.serve.fake_session import FakeLiveSession


def _methods(protocol) -> dict:
    return {name: member for name, member in vars(protocol).items()
            if callable(member) and not name.startswith("_")}


def mismatches(cls, protocol) -> list[str]:
    """Methods of `protocol` missing on `cls` or taking other parameters (names and kinds)."""
    out = []
    for base in protocol.__mro__:
        if base in (typing.Protocol, typing.Generic, object):
            continue
        for name, member in _methods(base).items():
            impl = getattr(cls, name, None)
            if impl is None:
                out.append(f"{cls.__name__}.{name} is missing")
                continue
            want = [(p.name, p.kind) for p in inspect.signature(member).parameters.values()]
            have = [(p.name, p.kind) for p in inspect.signature(impl).parameters.values()
                    if p.kind not in (p.VAR_KEYWORD,)]
            if want != have:
                out.append(f"{cls.__name__}.{name}{inspect.signature(impl)} != protocol {inspect.signature(member)}")
    return out


@pytest.mark.parametrize("cls, protocol", [
    (FakeModel, SegmentationModel), (FakeTracker, Tracker), (NullModel, BatchedStepModel), (NullTracker, Tracker),
    (LiveSession, LiveSessionAPI), (FakeLiveSession, LiveSessionAPI),
])
def test_doubles_and_plugins_follow_the_protocols(cls, protocol):
    assert not mismatches(cls, protocol)


def test_instances_pass_the_runtime_checks():
    null = build_null_model(image_size=64)
    assert isinstance(null, BatchedStepModel) and isinstance(null.new_tracker((48, 64)), Tracker)
    fake = FakeModel(64)
    assert isinstance(fake, SegmentationModel) and not isinstance(fake, BatchedStepModel)
    assert isinstance(fake.new_tracker((48, 64)), Tracker)
    assert isinstance(FakeLiveSession(), LiveSessionAPI)
