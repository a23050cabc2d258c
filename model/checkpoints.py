"""Official SAM 2 / 2.1 checkpoints: registry, resumable download into a cache, safe reading, strict loading.

Every failure surfaces as a `CheckpointError` whose message says what to do next, because the usual
causes (no internet on the host, wrong variant for the config, a half-written file) are user-fixable.
"""
from __future__ import annotations

import contextlib
import http.client
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

_OFFICIAL_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2"
_SIZES = ("tiny", "small", "base_plus", "large")

CHECKPOINT_URLS: dict[str, str] = {
    **{f"sam2_hiera_{size}": f"{_OFFICIAL_BASE}/072824/sam2_hiera_{size}.pt" for size in _SIZES},
    **{f"sam2.1_hiera_{size}": f"{_OFFICIAL_BASE}/092824/sam2.1_hiera_{size}.pt" for size in _SIZES},
}

# Hiera trunk fingerprints (embed_dim, number of blocks) of the official sizes, used to name the variant
# a mismatching checkpoint actually holds.
_TRUNK_FINGERPRINTS = {(96, 12): "tiny", (96, 16): "small", (112, 24): "base_plus", (144, 48): "large"}
# Parameters that exist only in SAM 2.1 models.
_SAM21_ONLY_PREFIXES = ("no_obj_embed_spatial", "obj_ptr_tpos_proj")

_BACKOFF_BASE_SECONDS = 1.0  # tests shrink this
_BACKOFF_MAX_SECONDS = 30.0
_CHUNK_BYTES = 1 << 20
_LIST_LIMIT = 10


class CheckpointError(RuntimeError):
    """Base class of every checkpoint problem."""


class CheckpointDownloadError(CheckpointError):
    """The checkpoint could not be fetched (offline, HTTP error, truncated transfer)."""


class CheckpointFormatError(CheckpointError):
    """The file is not a readable torch state dict (corrupt, truncated, or holds non-tensor objects)."""


class CheckpointNotFoundError(CheckpointError):
    """A checkpoint path given by the user does not exist."""


class CheckpointMismatchError(CheckpointError):
    """The state dict's keys or shapes do not match the model."""


class _TransientDownloadError(Exception):
    """Internal: an attempt failed in a way worth retrying."""


def default_cache_dir() -> Path:
    if explicit := os.environ.get("MASKLET_CACHE_DIR"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg).expanduser() / "masklet"
    return Path.home() / ".cache" / "masklet"


def checkpoint_url(name: str) -> str:
    """Official URL of `name`, or the same file name under MASKLET_CHECKPOINT_BASE_URL when that is set."""
    if name not in CHECKPOINT_URLS:
        raise ValueError(f"unknown checkpoint {name!r}; available: {', '.join(CHECKPOINT_URLS)}")
    if mirror := os.environ.get("MASKLET_CHECKPOINT_BASE_URL"):
        return f"{mirror.rstrip('/')}/{name}.pt"
    return CHECKPOINT_URLS[name]


def download_checkpoint(
    name: str,
    cache_dir: str | Path | None = None,
    *,
    url: str | None = None,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 30.0,
) -> Path:
    """Return the cached `<cache_dir>/<name>.pt`, downloading it first (resumably, with retries) if absent."""
    if url is None:
        url = checkpoint_url(name)
    elif not re.fullmatch(r"[\w.\-]+", name):
        raise ValueError(f"checkpoint name {name!r} must be a plain file stem")
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final_path = target / f"{name}.pt"
    if final_path.is_file():
        return final_path

    def failure(reason: str) -> CheckpointDownloadError:
        one_line_reason = " ".join(reason.split())
        return CheckpointDownloadError(
            f"cannot download {name} from {url}: {one_line_reason}. Download it elsewhere and pass "
            f"--checkpoint /path/to/{name}.pt (or place it at {final_path})"
        )

    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise failure(f"cannot create cache directory {target} ({exc})") from None

    part_path = final_path.with_name(final_path.name + ".part")
    with _exclusive_lock(final_path.with_name(final_path.name + ".lock")):
        if final_path.is_file():  # another process finished it while we waited for the lock
            return final_path
        attempts = max(0, retries) + 1
        for attempt in range(attempts):
            try:
                _download_once(url, part_path, progress=progress, timeout=timeout, label=final_path.name)
                break
            except _TransientDownloadError as exc:
                if attempt + 1 == attempts:
                    raise failure(f"{exc} (after {attempts} attempt{'s' if attempts > 1 else ''})") from None
                time.sleep(min(_BACKOFF_BASE_SECONDS * 2**attempt, _BACKOFF_MAX_SECONDS))
            except CheckpointDownloadError as exc:
                raise failure(str(exc)) from None
        os.replace(part_path, final_path)
    return final_path


def _download_once(url: str, part_path: Path, *, progress: bool, timeout: float, label: str) -> None:
    """One HTTP attempt that appends to (or restarts) `part_path`; leaves it complete on success."""
    offset = part_path.stat().st_size if part_path.is_file() else 0
    headers = {"User-Agent": "masklet-checkpoints/1", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # Our .part is as long as (or longer than) the file: trust it only if the server says it is exact.
            total = _total_from_content_range(exc.headers.get("Content-Range", ""))
            if total == offset:
                return
            part_path.unlink(missing_ok=True)
            raise _TransientDownloadError("stale partial download discarded (HTTP 416)") from None
        reason = f"HTTP {exc.code} {exc.reason}"
        if exc.code in (408, 425, 429) or exc.code >= 500:
            raise _TransientDownloadError(reason) from None
        raise CheckpointDownloadError(reason) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _TransientDownloadError(_describe_network_error(exc, timeout)) from None

    with response:
        content_length = response.headers.get("Content-Length")
        body_bytes = int(content_length) if content_length and content_length.isdigit() else None
        if offset and response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                part_path.unlink(missing_ok=True)
                raise _TransientDownloadError(f"server resumed at the wrong offset ({content_range!r})")
            total = _total_from_content_range(content_range)
            mode = "ab"
        else:  # no Range sent, or the server ignored it and is sending the whole file: start over
            offset, total, mode = 0, body_bytes, "wb"
        if total is None and body_bytes is not None:
            total = offset + body_bytes

        received = 0
        with open(part_path, mode) as part_file, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=label, disable=not progress, leave=False,
        ) as bar:
            try:
                while chunk := response.read(_CHUNK_BYTES):
                    part_file.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                raise _TransientDownloadError(_describe_network_error(exc, timeout)) from None
            finally:
                part_file.flush()
                os.fsync(part_file.fileno())

    # urllib returns a short body silently when the connection drops, so the length check is the real guard.
    if (body_bytes is not None and received != body_bytes) or (total is not None and offset + received != total):
        raise _TransientDownloadError(
            f"connection closed after {offset + received} of {total} bytes (partial file kept at {part_path})"
        )


def _total_from_content_range(content_range: str) -> int | None:
    match = re.search(r"/(\d+)\s*$", content_range)
    return int(match.group(1)) if match else None


def _describe_network_error(exc: BaseException, timeout: float) -> str:
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return f"no response within {timeout:g} s"
    if isinstance(reason, socket.gaierror):
        return f"host name lookup failed ({reason}); is this machine offline?"
    return str(reason) or type(reason).__name__


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Serialise downloads of one file across processes (several actors may share a host cache)."""
    try:
        import fcntl
    except ImportError:  # non-POSIX: no cross-process lock, the atomic rename still keeps the cache sane
        yield
        return
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from an official `{"model": state_dict}` file or a bare state dict, tensors only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        raise CheckpointFormatError(f"cannot read checkpoint {path}: {_explain_load_error(exc)}") from None

    state_dict = loaded.get("model", loaded) if isinstance(loaded, Mapping) else loaded
    if not isinstance(state_dict, Mapping):
        raise CheckpointFormatError(
            f"cannot read checkpoint {path}: expected a state dict or {{'model': state_dict}}, "
            f"got {type(loaded).__name__}"
        )
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors or not all(isinstance(key, str) for key in state_dict):
        shown = ", ".join(map(repr, not_tensors[:_LIST_LIMIT])) or "non-string keys"
        raise CheckpointFormatError(
            f"cannot read checkpoint {path}: not a state dict of tensors (offending entries: {shown})"
        )
    return dict(state_dict)


def _explain_load_error(exc: Exception) -> str:
    """One line out of torch's multi-paragraph load errors: refused object, or the corruption detail."""
    text = str(exc)
    refused_global = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused_global:
        return (
            f"it contains a pickled {refused_global.group(1)} object, not only tensors; "
            "refused for safety (only plain state dicts are accepted)"
        )
    unpickler_detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    detail = unpickler_detail.group(1) if unpickler_detail else (text.strip().split(". ")[0] or type(exc).__name__)
    if unpickler_detail and "Unsupported operand" not in detail:
        return f"refused for safety by weights-only loading ({' '.join(detail.split())[:200]})"
    return f"not a readable torch checkpoint; the file may be truncated or corrupt ({' '.join(detail.split())[:200]})"


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    model_name: str = "",
    source: str = "",
) -> None:
    """Load `state_dict` into `module` only if every key and shape matches; otherwise explain the difference."""
    expected = module.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    shape_mismatches = [
        (key, tuple(state_dict[key].shape), tuple(expected[key].shape))
        for key in expected
        if key in state_dict and tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    model_label = model_name or type(module).__name__
    source_label = f" {source}" if source else ""
    if missing or unexpected or shape_mismatches:
        lines = [
            f"checkpoint{source_label} does not match model {model_label}: {len(missing)} missing key(s), "
            f"{len(unexpected)} unexpected key(s), {len(shape_mismatches)} shape mismatch(es)"
        ]
        lines += _listing("missing from the checkpoint", missing)
        lines += _listing("unexpected in the checkpoint", unexpected)
        lines += _listing(
            "shape mismatches (checkpoint vs model)",
            [f"{key}: {tuple(got)} vs {tuple(want)}" for key, got, want in shape_mismatches],
        )
        hints = _mismatch_hints(state_dict, expected, missing, unexpected, shape_mismatches)
        lines += [f"hint: {hint}" for hint in hints]
        raise CheckpointMismatchError("\n".join(lines))
    try:
        module.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as exc:  # e.g. a dtype torch cannot copy; keys and shapes were already fine
        raise CheckpointMismatchError(
            f"checkpoint{source_label} could not be loaded into {model_label}: {exc}"
        ) from None


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    shown = [f"  {item}" for item in items[:_LIST_LIMIT]]
    more = [f"  ... and {len(items) - _LIST_LIMIT} more"] if len(items) > _LIST_LIMIT else []
    return [f"{title} ({len(items)}):", *shown, *more]


def describe_variant(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """Best guess of the official variant a state dict came from, e.g. 'sam2.1_hiera_small', or None."""
    patch_weight = state_dict.get("image_encoder.trunk.patch_embed.proj.weight")
    if patch_weight is None:
        return None
    block_ids = {
        int(match.group(1))
        for key in state_dict
        if (match := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", key))
    }
    size = _TRUNK_FINGERPRINTS.get((int(patch_weight.shape[0]), len(block_ids)))
    if size is None:
        return None
    version = "sam2.1" if any(key.startswith(_SAM21_ONLY_PREFIXES) for key in state_dict) else "sam2"
    return f"{version}_hiera_{size}"


def _mismatch_hints(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    missing: list[str],
    unexpected: list[str],
    shape_mismatches: list[tuple[str, tuple, tuple]],
) -> list[str]:
    hints = []
    if unexpected and all(key.startswith(("module.", "model.")) for key in unexpected):
        hints.append("checkpoint keys carry a 'module.'/'model.' prefix; strip it before loading")
    trunk_prefix = "image_encoder.trunk."
    if any(key.startswith(trunk_prefix) for key in [*missing, *unexpected, *(m[0] for m in shape_mismatches)]):
        guess = describe_variant(state_dict)
        wanted = describe_variant(expected)
        detail = f" (checkpoint looks like {guess}" + (f", model is {wanted})" if wanted else ")") if guess else ""
        hints.append(
            f"this checkpoint is probably a different size (tiny/small/base_plus/large) than the model{detail}; "
            "pick the matching model config or checkpoint"
        )
    sam21_missing = [key for key in missing if key.startswith(_SAM21_ONLY_PREFIXES)]
    sam21_unexpected = [key for key in unexpected if key.startswith(_SAM21_ONLY_PREFIXES)]
    if sam21_missing:
        hints.append(
            "sam2 vs sam2.1 mismatch: the model is SAM 2.1 but the checkpoint lacks "
            f"{', '.join(sam21_missing[:3])}, so it is probably a sam2_* checkpoint; use a sam2.1_* checkpoint"
        )
    if sam21_unexpected:
        hints.append(
            f"sam2 vs sam2.1 mismatch: the checkpoint has {', '.join(sam21_unexpected[:3])}, so it is probably a "
            "sam2.1_* checkpoint loaded into a SAM 2 model; use the sam2.1 model config"
        )
    return hints


def resolve_checkpoint(
    name: str,
    checkpoint: str | Path | None,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Path | None:
    """Interpret a --checkpoint value: None/"random" -> None, "auto" -> downloaded file, else an existing path."""
    if checkpoint is None or str(checkpoint) == "random":
        return None
    if str(checkpoint) == "auto":
        return download_checkpoint(name, cache_dir, progress=progress)
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise CheckpointNotFoundError(
            f"checkpoint {path} {what}; pass --checkpoint auto to download {name}, "
            "or --checkpoint random for random weights"
        )
    return path
