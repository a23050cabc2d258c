"""The API fixtures of tests/serve (a generated clip) for the hardening tests."""
from tests.serve.conftest import clip  # noqa: F401 - re-exported fixture
