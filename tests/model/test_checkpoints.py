"""Checkpoint registry, resumable download (against a local HTTP server), safe reading and strict loading."""
from __future__ import annotations

import http.server
import io
import pickle
import random
import re
import socket
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from masklet.model import checkpoints
from masklet.model.checkpoints import (
    CHECKPOINT_URLS,
    CheckpointDownloadError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    default_cache_dir,
    describe_variant,
    download_checkpoint,
    load_state_dict_strict,
    read_checkpoint,
    resolve_checkpoint,
)

PAYLOAD = random.Random(0).randbytes(300_000)
NAME = "sam2.1_hiera_tiny"


class FakeCheckpointServer:
    """Serves PAYLOAD with Range support; can fail, cut bodies short, or ignore Range on request."""

    def __init__(self) -> None:
        self.fail_first = 0  # answer this many requests with `fail_status`
        self.fail_status = 503
        self.cut_first = 0  # cut this many (successful) bodies after `cut_after` bytes
        self.cut_after = 100_000
        self.ignore_range = False
        self.requests: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._bodies_sent = 0
        server_state = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                with server_state._lock:
                    server_state.requests.append(dict(self.headers))
                    request_number = len(server_state.requests)
                if request_number <= server_state.fail_first:
                    self.send_error(server_state.fail_status)
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if match and not server_state.ignore_range:
                    start = int(match.group(1))
                    if start >= len(PAYLOAD):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                body = PAYLOAD[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                self.end_headers()
                with server_state._lock:
                    server_state._bodies_sent += 1
                    cut = server_state._bodies_sent <= server_state.cut_first
                if cut:
                    self.wfile.write(body[: server_state.cut_after])
                    self.close_connection = True
                else:
                    self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/{NAME}.pt"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    fake = FakeCheckpointServer()
    yield fake
    fake.close()


@pytest.fixture(autouse=True)
def fast_and_isolated(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoints, "_BACKOFF_BASE_SECONDS", 0.01)
    monkeypatch.delenv("MASKLET_CHECKPOINT_BASE_URL", raising=False)
    monkeypatch.setenv("MASKLET_CACHE_DIR", str(tmp_path / "env-cache"))


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{NAME}.pt"


# ---------------------------------------------------------------- registry and cache location


def test_registry_has_the_eight_official_urls():
    assert len(CHECKPOINT_URLS) == 8
    assert CHECKPOINT_URLS["sam2_hiera_base_plus"] == (
        "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_base_plus.pt"
    )
    assert CHECKPOINT_URLS["sam2.1_hiera_large"] == (
        "https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_large.pt"
    )


def test_default_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MASKLET_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("MASKLET_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "masklet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "masklet"


def test_unknown_name_lists_available(tmp_path):
    with pytest.raises(ValueError, match="sam2.1_hiera_small"):
        download_checkpoint("sam3_hiera_huge", tmp_path)


# ---------------------------------------------------------------- download


@pytest.mark.parametrize("progress", [False, True])
def test_download_then_cache_hit_makes_no_request(server, tmp_path, capsys, progress):
    path = download_checkpoint(NAME, tmp_path, url=server.url, progress=progress)
    assert path == tmp_path / f"{NAME}.pt"
    assert path.read_bytes() == PAYLOAD
    assert not path.with_name(path.name + ".part").exists()
    assert bool(capsys.readouterr().err) == progress
    assert download_checkpoint(NAME, tmp_path, url=server.url, progress=progress) == path
    assert len(server.requests) == 1


def test_mirror_base_url_and_env_cache_dir(server, monkeypatch, tmp_path):
    monkeypatch.setenv("MASKLET_CHECKPOINT_BASE_URL", server.url.rsplit("/", 1)[0] + "/")
    path = download_checkpoint(NAME, progress=False)
    assert path == tmp_path / "env-cache" / f"{NAME}.pt"
    assert path.read_bytes() == PAYLOAD


def test_resume_from_part_file_uses_range(server, tmp_path):
    (tmp_path / f"{NAME}.pt.part").write_bytes(PAYLOAD[:123_456])
    path = download_checkpoint(NAME, tmp_path, url=server.url, progress=False)
    assert server.requests[0]["Range"] == "bytes=123456-"
    assert path.read_bytes() == PAYLOAD


def test_complete_part_file_is_finalised_on_416(server, tmp_path):
    (tmp_path / f"{NAME}.pt.part").write_bytes(PAYLOAD)
    path = download_checkpoint(NAME, tmp_path, url=server.url, progress=False)
    assert path.read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.ignore_range = True
    (tmp_path / f"{NAME}.pt.part").write_bytes(b"stale bytes that must not survive")
    path = download_checkpoint(NAME, tmp_path, url=server.url, progress=False)
    assert "Range" in server.requests[0]
    assert path.read_bytes() == PAYLOAD


def test_transient_failures_are_retried(server, tmp_path):
    server.fail_first = 2
    path = download_checkpoint(NAME, tmp_path, url=server.url, progress=False, retries=3)
    assert path.read_bytes() == PAYLOAD
    assert len(server.requests) == 3


def test_gives_up_after_retries(server, tmp_path):
    server.fail_first = 100
    with pytest.raises(CheckpointDownloadError, match="HTTP 503.*after 3 attempts"):
        download_checkpoint(NAME, tmp_path, url=server.url, progress=False, retries=2)
    assert len(server.requests) == 3
    assert not (tmp_path / f"{NAME}.pt").exists()


def test_not_found_is_not_retried(server, tmp_path):
    server.fail_first, server.fail_status = 100, 404
    with pytest.raises(CheckpointDownloadError, match="HTTP 404"):
        download_checkpoint(NAME, tmp_path, url=server.url, progress=False, retries=3)
    assert len(server.requests) == 1


def test_offline_gives_one_actionable_line(tmp_path):
    url = closed_port_url()
    with pytest.raises(CheckpointDownloadError) as caught:
        download_checkpoint(NAME, tmp_path, url=url, progress=False, retries=1, timeout=5)
    message = str(caught.value)
    assert "\n" not in message
    assert url in message and "--checkpoint" in message and str(tmp_path / f"{NAME}.pt") in message
    assert isinstance(caught.value, CheckpointError) and isinstance(caught.value, RuntimeError)
    assert not (tmp_path / f"{NAME}.pt").exists()


def test_truncated_body_fails_then_resumes(server, tmp_path):
    server.cut_first = 1
    with pytest.raises(CheckpointDownloadError, match="connection closed after 100000 of 300000 bytes"):
        download_checkpoint(NAME, tmp_path, url=server.url, progress=False, retries=0)
    assert not (tmp_path / f"{NAME}.pt").exists()
    assert (tmp_path / f"{NAME}.pt.part").read_bytes() == PAYLOAD[:100_000]

    path = download_checkpoint(NAME, tmp_path, url=server.url, progress=False, retries=0)
    assert server.requests[-1]["Range"] == "bytes=100000-"
    assert path.read_bytes() == PAYLOAD


def test_cut_connection_is_resumed_within_retries(server, tmp_path):
    server.cut_first = 2
    path = download_checkpoint(NAME, tmp_path, url=server.url, progress=False, retries=2)
    assert [r.get("Range") for r in server.requests] == [None, "bytes=100000-", "bytes=200000-"]
    assert path.read_bytes() == PAYLOAD


# ---------------------------------------------------------------- reading


class NotATensor:
    """An arbitrary class: weights_only loading must refuse to rebuild it."""


class _OpensAFileWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def saved_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def sample_state_dict() -> dict[str, torch.Tensor]:
    return {"head.weight": torch.arange(6.0).reshape(2, 3), "head.bias": torch.ones(2)}


@pytest.mark.parametrize("wrapped", [True, False])
def test_read_official_and_bare_formats(tmp_path, wrapped):
    state_dict = sample_state_dict()
    path = tmp_path / "ckpt.pt"
    path.write_bytes(saved_bytes({"model": state_dict} if wrapped else state_dict))
    loaded = read_checkpoint(path)
    assert loaded.keys() == state_dict.keys()
    assert all(torch.equal(loaded[key], state_dict[key]) for key in state_dict)


@pytest.mark.parametrize(
    "content, reason",
    [
        (saved_bytes({"model": sample_state_dict()})[:300], "truncated or corrupt"),
        (random.Random(1).randbytes(4096), "truncated or corrupt"),
        (b"", "truncated or corrupt"),
        (saved_bytes({"model": sample_state_dict(), "extra": NotATensor()}), "NotATensor object"),
        (saved_bytes({"model": {"w": torch.zeros(1), "step": 3}}), "not a state dict of tensors"),
    ],
    ids=["truncated", "random-bytes", "empty", "arbitrary-object", "non-tensor-value"],
)
def test_unreadable_files_give_one_clear_line(tmp_path, content, reason):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointFormatError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and reason in message
    assert caught.value.__cause__ is None  # no torch traceback chained under ours


def test_malicious_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_OpensAFileWhenUnpickled(marker), protocol=2))
    with pytest.raises(CheckpointFormatError, match="io.open object.*refused for safety"):
        read_checkpoint(path)
    assert not marker.exists()


def test_read_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        read_checkpoint(tmp_path / "nope.pt")


# ---------------------------------------------------------------- strict loading


class TinyModel(nn.Module):
    def __init__(self, width: int = 4, sam21: bool = False) -> None:
        super().__init__()
        self.image_encoder = nn.Module()
        self.image_encoder.trunk = nn.Linear(width, width)
        self.head = nn.Linear(width, 2)
        self.register_buffer("counts", torch.zeros(2))
        if sam21:
            self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, width))


def test_matching_state_dict_loads():
    source = TinyModel()
    nn.init.constant_(source.head.weight, 0.5)
    target = TinyModel()
    load_state_dict_strict(target, source.state_dict())
    assert torch.equal(target.head.weight, source.head.weight)


def test_missing_key_is_named():
    state_dict = TinyModel().state_dict()
    del state_dict["head.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"1 missing key\(s\)[\s\S]*head\.bias"):
        load_state_dict_strict(TinyModel(), state_dict, model_name="tiny-test", source="x.pt")


def test_unexpected_key_is_named():
    state_dict = {**TinyModel().state_dict(), "decoder.extra": torch.zeros(1)}
    with pytest.raises(CheckpointMismatchError, match=r"unexpected in the checkpoint \(1\):\n  decoder\.extra"):
        load_state_dict_strict(TinyModel(), state_dict)


def test_shape_mismatch_is_named_with_size_hint():
    model = TinyModel(width=4)
    nn.init.zeros_(model.head.bias)
    with pytest.raises(CheckpointMismatchError) as caught:
        load_state_dict_strict(model, TinyModel(width=8).state_dict(), model_name="sam2_hiera_tiny", source="b.pt")
    message = str(caught.value)
    assert "checkpoint b.pt does not match model sam2_hiera_tiny" in message
    assert "image_encoder.trunk.weight: (8, 8) vs (4, 4)" in message
    assert "probably a different size" in message
    assert torch.count_nonzero(model.head.bias) == 0  # refused before any tensor was copied


def test_long_listings_are_capped():
    state_dict = {**TinyModel().state_dict(), **{f"extra.{i}": torch.zeros(1) for i in range(25)}}
    with pytest.raises(CheckpointMismatchError, match=r"unexpected in the checkpoint \(25\)[\s\S]*and 15 more"):
        load_state_dict_strict(TinyModel(), state_dict)


@pytest.mark.parametrize("model_is_sam21", [True, False])
def test_sam2_vs_sam21_hint(model_is_sam21):
    checkpoint_state = TinyModel(sam21=not model_is_sam21).state_dict()
    with pytest.raises(CheckpointMismatchError, match="sam2 vs sam2.1 mismatch"):
        load_state_dict_strict(TinyModel(sam21=model_is_sam21), checkpoint_state)


def test_describe_variant_from_trunk_fingerprint():
    state_dict = {"image_encoder.trunk.patch_embed.proj.weight": torch.empty(96, 3, 7, 7)}
    state_dict.update({f"image_encoder.trunk.blocks.{i}.norm1.weight": torch.empty(1) for i in range(16)})
    assert describe_variant(state_dict) == "sam2_hiera_small"
    state_dict["no_obj_embed_spatial"] = torch.empty(1, 64)
    assert describe_variant(state_dict) == "sam2.1_hiera_small"
    assert describe_variant({"head.weight": torch.empty(1)}) is None


# ---------------------------------------------------------------- resolve


def test_resolve_checkpoint(server, monkeypatch, tmp_path):
    assert resolve_checkpoint(NAME, None) is None
    assert resolve_checkpoint(NAME, "random") is None
    local = tmp_path / "mine.pt"
    local.write_bytes(b"x")
    assert resolve_checkpoint(NAME, str(local)) == local
    with pytest.raises(CheckpointNotFoundError, match="--checkpoint auto"):
        resolve_checkpoint(NAME, tmp_path / "missing.pt")
    monkeypatch.setenv("MASKLET_CHECKPOINT_BASE_URL", server.url.rsplit("/", 1)[0])
    downloaded = resolve_checkpoint(NAME, "auto", progress=False)
    assert downloaded == tmp_path / "env-cache" / f"{NAME}.pt"
    assert downloaded.read_bytes() == PAYLOAD
