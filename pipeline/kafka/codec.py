"""frame/v1 and prompt/v1 on the wire: encoding for producers, strict validation for consumers.

Validation never trusts a header: the declared content type must match the magic bytes, the
pixel cap is checked on the optional `width`/`height` headers and again on the size in the
bitstream before any pixel is decoded, and pickle payloads are refused without being touched.
Message shapes come from `actors.messages`; this module adds the security checks and maps
every failure to a dead-letter reason (`Rejected`).
"""
from __future__ import annotations

import io
import math
from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

from masklet.pipeline.kafka.deadletter import Rejected
from masklet.actors.payloads import EncodedImage
from masklet.actors.messages import (FRAME_SCHEMA, FrameHeaders, MessageError, MessageTooLarge, PromptMessage,
                                     load_json)
from masklet.actors.prompt_limits import InputLimits, PromptLimitError, check_prompt

JPEG = "image/jpeg"
PNG = "image/png"
SUPPORTED_CONTENT_TYPES = (JPEG, PNG)
DEFAULT_LIMITS = InputLimits()  # settings.limits.input_limits() in `masklet run`
MAX_PROMPT_BYTES = DEFAULT_LIMITS.max_prompt_bytes
MAX_STREAM_ID_CHARS = 256  # as prompt/v1's stream_id
MAX_OBJECT_ID = DEFAULT_LIMITS.max_object_id

_MAGIC = {JPEG: b"\xff\xd8\xff", PNG: b"\x89PNG\r\n\x1a\n"}
_PIL_FORMAT = {JPEG: "JPEG", PNG: "PNG"}
_EXIF_ORIENTATION = 0x0112
_EXIF_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height
_END_MARKER = {JPEG: b"\xff\xd9", PNG: b"IEND"}  # JPEG EOI marker, PNG IEND chunk
_END_SEARCH = 4096  # trailing bytes searched (encoders may pad after the marker)

Headers = Sequence[tuple[str, bytes]]


def frame_headers(frame_idx: int, pts: float, width: int, height: int, content_type: str = JPEG) -> list[tuple[str, bytes]]:
    """frame/v1 headers plus `width`/`height`, which let consumers refuse oversized frames unread."""
    headers = FrameHeaders(frame_idx=frame_idx, pts=pts, content_type=content_type).to_kafka_headers()
    return headers + [("width", str(width).encode()), ("height", str(height).encode())]


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 RGB [H, W, 3], got {rgb.dtype} {rgb.shape}")
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def sniff_content_type(data: bytes) -> Optional[str]:
    for content_type, magic in _MAGIC.items():
        if data.startswith(magic):
            return content_type
    return None


def looks_like_pickle(data: bytes) -> bool:
    # Protocols 2-5 open with PROTO (0x80) and the protocol number; that is all we need to refuse it.
    return len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5


def _header_dict(headers: Optional[Headers]) -> dict[str, str]:
    values = {}
    for name, raw in headers or ():
        values[name] = bytes(raw or b"").decode("utf-8", "replace")
    return values


def parse_frame_headers(key: Optional[bytes], headers: Optional[Headers]) -> tuple[str, FrameHeaders, Optional[tuple[int, int]]]:
    """(stream_id, frame/v1 headers, declared (width, height) or None); raises `Rejected`."""
    values = _header_dict(headers)
    if "schema" in values and values["schema"] != FRAME_SCHEMA:
        raise Rejected("unknown_schema", "unknown_schema", f"frame schema {values['schema']!r}, expected {FRAME_SCHEMA!r}")
    content_type = values.get("content_type", "")
    if content_type and content_type not in SUPPORTED_CONTENT_TYPES:
        kind = "pickle_payload" if "pickle" in content_type.lower() else "unsupported_content_type"
        raise Rejected("undecodable_frame", kind, f"content type {content_type!r} is not {' or '.join(SUPPORTED_CONTENT_TYPES)}")
    try:
        parsed = FrameHeaders.from_kafka_headers(headers)
    except MessageError as exc:
        raise Rejected("bad_frame_headers", "bad_frame_headers", str(exc)) from None
    if not math.isfinite(parsed.pts):
        raise Rejected("bad_frame_headers", "bad_frame_headers", f"pts {parsed.pts} is not finite")
    try:
        stream_id = (key or b"").decode("utf-8")
    except UnicodeDecodeError:
        stream_id = ""
    if not stream_id:
        raise Rejected("bad_frame_headers", "bad_key", "record key (stream id) is empty or not UTF-8")
    if len(stream_id) > MAX_STREAM_ID_CHARS:
        raise Rejected("bad_frame_headers", "bad_key", f"record key (stream id) is {len(stream_id)} characters, "
                                                       f"at most {MAX_STREAM_ID_CHARS}")
    size = None
    if "width" in values or "height" in values:
        try:
            size = (int(values["width"]), int(values["height"]))
        except (KeyError, ValueError):
            raise Rejected("bad_frame_headers", "bad_frame_headers", "width/height headers must be integers") from None
        if size[0] <= 0 or size[1] <= 0:
            raise Rejected("bad_frame_headers", "bad_frame_headers", f"non-positive size {size[0]}x{size[1]}")
    return stream_id, parsed, size


def inspect_frame(key: Optional[bytes], value: Optional[bytes], headers: Optional[Headers],
                  max_pixels: int) -> tuple[str, FrameHeaders, EncodedImage]:
    """Validate a frames-topic record from its headers and its image header only; raises `Rejected`.

    No pixel is decoded here (that happens in a decoder actor, `LiveSession.submit_frame` with an
    `EncodedImage`); the size is the one after EXIF orientation, as the decoder will produce it.
    """
    stream_id, meta, declared = parse_frame_headers(key, headers)
    data = value or b""
    if looks_like_pickle(data):
        raise Rejected("undecodable_frame", "pickle_payload", f"payload is a pickle stream declared as {meta.content_type}")
    actual = sniff_content_type(data)
    if actual != meta.content_type:
        raise Rejected("undecodable_frame", "content_type_mismatch",
                       f"declared {meta.content_type}, magic bytes say {actual or 'unknown'} ({data[:8].hex()})")
    if declared is not None and declared[0] * declared[1] > max_pixels:
        raise Rejected("frame_too_large", "oversized_header",
                       f"header size {declared[0]}x{declared[1]} exceeds {max_pixels} pixels")
    try:
        image = Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[meta.content_type]])
        width, height = image.size  # from the bitstream's header; no pixel decoded yet
        if image.getexif().get(_EXIF_ORIENTATION) in _EXIF_TRANSPOSED:
            width, height = height, width  # the decoder applies EXIF orientation
    except Exception as exc:  # PIL raises many types for hostile input
        raise Rejected("undecodable_frame", "corrupt_image", f"unreadable image header: {exc}") from None
    if width * height > max_pixels:
        raise Rejected("frame_too_large", "oversized_bitstream", f"image is {width}x{height}, over {max_pixels} pixels")
    if declared is not None and declared != (width, height):
        raise Rejected("bad_frame_headers", "size_mismatch",
                       f"headers say {declared[0]}x{declared[1]}, image is {width}x{height}")
    if _END_MARKER[meta.content_type] not in data[-_END_SEARCH:]:
        # The commonest corruption (a cut-off upload) is caught here without decoding; anything
        # subtler fails in the decoder actor and comes back as a failed output (dead-lettered too).
        raise Rejected("undecodable_frame", "corrupt_image", "image is truncated: no end-of-image marker")
    return stream_id, meta, EncodedImage(bytes(data), meta.content_type, width, height)


def decode_frame(key: Optional[bytes], value: Optional[bytes], headers: Optional[Headers],
                 max_pixels: int) -> tuple[str, FrameHeaders, np.ndarray]:
    """Validate a frames-topic record and decode it to uint8 RGB [H, W, 3]; raises `Rejected`."""
    stream_id, meta, encoded = inspect_frame(key, value, headers, max_pixels)
    try:
        image = Image.open(io.BytesIO(encoded.data), formats=[_PIL_FORMAT[meta.content_type]])
        image.load()
        rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)
    except Exception as exc:
        raise Rejected("undecodable_frame", "corrupt_image", f"image does not decode: {exc}") from None
    return stream_id, meta, rgb


def parse_prompt(value: Optional[bytes], streams: Optional[Mapping[str, tuple[int, int]]] = None,
                 limits: InputLimits = DEFAULT_LIMITS) -> PromptMessage:
    """Validate a prompts-topic record; raises `Rejected`.

    `streams` maps the stream ids seen so far to their (width, height): a prompt for one of them
    must lie inside its frames. A prompt for another stream passes; `check_prompt_range` decides
    once that stream's first frame is known. The `limits` (points, object id, nesting, bytes) apply
    to every prompt.
    """
    data = value or b""
    if looks_like_pickle(data):
        raise Rejected("malformed_prompt", "pickle_payload", "prompt payload is a pickle stream")
    if len(data) > limits.max_prompt_bytes:
        raise Rejected("malformed_prompt", "too_large", f"prompt of {len(data)} bytes exceeds {limits.max_prompt_bytes}")
    try:
        # A prompt is a dozen fields plus 3 values per point (x, y, label): more values than that
        # are refused before parsing (parsing and validating 100,000s of points takes seconds).
        payload = load_json(data, limits.max_nesting_depth, max_values=3 * limits.max_points_per_prompt + 64,
                            what=f"{PromptMessage.SCHEMA} message")
        _check_point_count(payload, limits)
        if not isinstance(payload, dict):
            raise MessageError(f"prompt message must be a JSON object, got {type(payload).__name__}")
        prompt = PromptMessage.from_payload(payload)
    except MessageTooLarge as exc:
        raise Rejected("malformed_prompt", "too_large", str(exc)) from None
    except MessageError as exc:
        kind = "unknown_schema" if "unsupported schema" in str(exc) else "malformed_prompt"
        raise Rejected("unknown_schema" if kind == "unknown_schema" else "malformed_prompt", kind, str(exc)) from None
    size = streams.get(prompt.stream_id) if streams is not None else None
    _check(prompt, size, limits)
    return prompt


def _check_point_count(payload: object, limits: InputLimits) -> None:
    if isinstance(payload, dict):
        for name in ("points", "labels"):
            items = payload.get(name)
            if isinstance(items, list) and len(items) > limits.max_points_per_prompt:
                raise Rejected("malformed_prompt", "too_large", f"{len(items)} {name}, at most "
                                                                f"{limits.max_points_per_prompt} per prompt")


def check_prompt_range(prompt: PromptMessage, streams: Mapping[str, tuple[int, int]],
                       limits: InputLimits = DEFAULT_LIMITS) -> None:
    """The prompt's stream is known and the prompt fits its frames (size checks only: nothing decoded)."""
    if prompt.stream_id not in streams:
        raise Rejected("unknown_stream", "unknown_stream", f"no frames seen for stream {prompt.stream_id!r}")
    _check(prompt, streams[prompt.stream_id], limits)


def _check(prompt: PromptMessage, size: Optional[tuple[int, int]], limits: InputLimits) -> None:
    width, height = size if size is not None else (None, None)
    try:
        check_prompt(prompt, height, width, limits)
    except PromptLimitError as exc:
        raise Rejected("malformed_prompt", exc.reason, exc.detail) from None
