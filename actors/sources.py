"""Frame sources: video files, HTTP(S)/RTSP streams and image folders (PyAV), plus JPEG/PNG bytes.

Every source yields `DecodedFrame`s in presentation order with a stream-local `frame_idx`
(0, 1, 2, ...), `pts` in seconds, and RGB pixels in display orientation (rotation metadata
applied). Any failure is a `SourceError` whose message is one line naming the input and reason.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image, ImageOps

# DCI 4K (4096x2160, ~8.8 MP) covers every mainstream camera and archive format, UHD and
# portrait (rotated) variants included. One RGB frame at the cap is ~26.5 MB, so a full
# 64-frame queue stays under ~1.7 GB per stream; anything larger (8K, image bombs) is
# refused at decode time instead of exhausting host memory.
DEFAULT_MAX_PIXELS = 4096 * 2160


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".ts", ".mpg", ".mpeg")
LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "udp", "srt")
NETWORK_SCHEMES = ("http", "https") + LIVE_SCHEMES
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class SourceError(Exception):
    """An input cannot be read; str(error) is one line: '<input>: <reason>'."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")

    def __reduce__(self):
        # Exceptions unpickle as cls(*self.args), and args holds only the joined message, which does
        # not fit this two-argument constructor; Ray and multiprocessing would then fail to rebuild it.
        return (type(self), (self.source, self.reason), self.__dict__)


@dataclass(frozen=True)
class DecodedFrame:
    frame_idx: int
    pts: float
    rgb: np.ndarray = field(repr=False)  # uint8 [H, W, 3], display orientation, read-only
    original_size: tuple[int, int]  # (width, height) at source resolution, after rotation
    rotation: int = 0  # degrees counter-clockwise that were applied to the coded picture

    @property
    def width(self) -> int:
        return self.original_size[0]

    @property
    def height(self) -> int:
        return self.original_size[1]


def _check_pixels(source: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise SourceError(source, f"invalid frame size {width}x{height}")
    if width * height > max_pixels:
        raise SourceError(
            source, f"frame size {width}x{height} ({width * height} pixels) exceeds max_pixels={max_pixels}"
        )


def _read_only(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.flags.writeable = False
    return array


def decode_image_bytes(
    data: bytes, content_type: str, max_pixels: int = DEFAULT_MAX_PIXELS, *, name: str = "image"
) -> np.ndarray:
    """Decode JPEG/PNG bytes to RGB uint8 [H, W, 3], EXIF orientation applied.

    The magic bytes must match `content_type`, and the pixel cap is checked from the header
    before the pixels are decoded.
    """
    if content_type not in ("image/jpeg", "image/png"):
        raise SourceError(name, f"unsupported content_type {content_type!r} (expected image/jpeg or image/png)")
    if not data:
        raise SourceError(name, "empty image data")
    actual = "image/jpeg" if data.startswith(_JPEG_MAGIC) else "image/png" if data.startswith(_PNG_MAGIC) else None
    if actual is None:
        raise SourceError(name, f"data is neither JPEG nor PNG (starts with {bytes(data[:8])!r})")
    if actual != content_type:
        raise SourceError(name, f"content_type is {content_type} but the data is {actual}")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        _check_pixels(name, image.width, image.height, max_pixels)
        image.load()
        image = ImageOps.exif_transpose(image)
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except SourceError:
        raise
    except Exception as exc:  # PIL raises OSError/SyntaxError/ValueError for corrupt data
        raise SourceError(name, f"cannot decode {actual}: {exc}") from None
    return _read_only(rgb)


def _display_transform(rgb: np.ndarray, rotation: int, matrix: Optional[np.ndarray]) -> np.ndarray:
    """Apply a container display matrix the way ffmpeg's autorotate does (multiples of 90 degrees)."""
    clockwise = (-int(round(rotation))) % 360
    m3 = matrix[3] if matrix is not None else 0
    if clockwise == 90:
        # ffmpeg: transpose=cclock_flip when the matrix also mirrors, else transpose=clock
        return rgb.transpose(1, 0, 2) if m3 > 0 else np.rot90(rgb, k=-1)
    if clockwise == 180:
        if matrix is None:
            return rgb[::-1, ::-1]
        out = rgb[:, ::-1] if matrix[0] < 0 else rgb
        return out[::-1] if matrix[4] < 0 else out
    if clockwise == 270:
        return np.rot90(rgb, k=-1)[::-1] if m3 < 0 else np.rot90(rgb, k=1)
    if matrix is not None and matrix[4] < 0:
        return rgb[::-1]
    return rgb  # arbitrary (non-right-angle) rotations are rare and left as coded


def _display_matrix(frame: av.VideoFrame) -> Optional[np.ndarray]:
    container = frame.side_data
    for item in container:
        # Iterating gives the entries up to PyAV 18.1.0 (whose values() raises) and the entries'
        # types, as a mapping's keys, from 18.1.1 on.
        side_data = item if hasattr(item, "type") else container[item]
        if str(side_data.type).endswith("DISPLAYMATRIX"):
            return np.frombuffer(bytes(side_data), dtype="<i4")[:9]
    return None


# Threads per video decoder in this process (None: FFmpeg's choice, one per core). Decoder actors
# set it to their thread cap: FFmpeg's frame threads cost CPU (720p H.264 measured: 5.4 ms of CPU per
# frame with threads on 2 cores, 4.0 ms with one) and hold frames back (a frame of latency per
# thread), which an actor serving several streams on shared cores pays for and does not need.
_decode_threads: Optional[int] = None


def set_decode_threads(num_threads: Optional[int]) -> Optional[int]:
    """Decode videos opened from now on in this process with at most `num_threads` threads; returns
    the previous setting (to restore it)."""
    global _decode_threads
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"decode threads must be at least 1, got {num_threads}")
    previous, _decode_threads = _decode_threads, num_threads
    return previous


class FrameSource:
    """Common interface: `fps`, `frame_count` (estimate, may be None), `width`, `height`, `frames()`."""

    name: str
    fps: Optional[float]
    frame_count: Optional[int]
    width: int
    height: int
    is_live: bool

    def frames(self) -> Iterator[DecodedFrame]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class VideoSource(FrameSource):
    """A video file or network stream decoded with PyAV."""

    def __init__(
        self,
        uri: str,
        *,
        max_pixels: int,
        max_frames: Optional[int],
        rtsp_transport: str,
        timeout_s: float,
    ):
        self.name = uri
        self._max_pixels = max_pixels
        self._max_frames = max_frames
        scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
        options: dict[str, str] = {}
        if scheme in ("rtsp", "rtsps"):
            options["rtsp_transport"] = rtsp_transport
        if scheme in NETWORK_SCHEMES:
            options["rw_timeout"] = str(int(timeout_s * 1_000_000))  # microseconds; stalls mid-stream
        else:
            self._check_local_file(uri)
        try:
            self._container = av.open(uri, options=options, timeout=(timeout_s, timeout_s) if options else None)
        except av.error.FFmpegError as exc:
            raise SourceError(uri, f"not a readable video ({_ffmpeg_reason(exc)})") from None
        except OSError as exc:
            raise SourceError(uri, f"cannot open ({exc.strerror or exc})") from None
        try:
            if not self._container.streams.video:
                raise SourceError(uri, "contains no video stream")
            self._stream = self._container.streams.video[0]
            self._stream.thread_type = "AUTO"
            if _decode_threads is not None:
                self._stream.codec_context.thread_count = _decode_threads
            codec = self._stream.codec_context
            _check_pixels(uri, codec.width, codec.height, max_pixels)
            if scheme not in NETWORK_SCHEMES:
                self._check_index_within_file(uri)
            self.is_live = scheme in LIVE_SCHEMES or self._container.duration is None
            rate = self._stream.average_rate or self._stream.guessed_rate
            self.fps = float(rate) if rate else None
            self.frame_count = self._estimate_frame_count()
            self.width, self.height = codec.width, codec.height
            self._pending_first: Optional[DecodedFrame] = None
            # One reformatter for the whole input: it keeps its swscale context, and with it the
            # conversion's worker threads. frame.to_ndarray(format="rgb24") builds a new context per
            # frame, and FFmpeg 8's swscale starts its threads anew each time: 2 threads (8 MB stacks,
            # faulted in, then unmapped) per frame, ~1-2 ms of a 720p frame's ~5 ms on 2 cores.
            # The pixels are the same (checked against to_ndarray on the shared clips).
            self._rgb = VideoReformatter()
            self._rgb_threads = _decode_threads or 0  # 0: swscale's own choice
            self._decoder = self._decode()
            # Decoding the first frame up front proves the input is a video and gives display size.
            self._pending_first = next(self._decoder, None)
            if self._pending_first is None:
                raise SourceError(uri, "contains no decodable frames")
            self.width, self.height = self._pending_first.original_size
        except BaseException:
            self._container.close()
            raise

    @staticmethod
    def _check_local_file(uri: str) -> None:
        path = Path(uri)
        try:
            if not path.exists():
                raise SourceError(uri, "no such file")
            if not path.is_file():
                raise SourceError(uri, "not a regular file")
            if path.stat().st_size == 0:
                raise SourceError(uri, "empty file")
        except (OSError, ValueError) as exc:  # name too long, NUL byte, permission: one line, not a traceback
            raise SourceError(uri, f"cannot access ({getattr(exc, 'strerror', None) or exc})") from None

    def _check_index_within_file(self, uri: str) -> None:
        # A container index pointing past the end of the file means the file was cut short.
        entries = getattr(self._stream, "index_entries", None)
        if not entries:
            return
        needed = max(entry.pos + entry.size for entry in entries)
        actual = Path(uri).stat().st_size
        if needed > actual:
            raise SourceError(uri, f"truncated: the index needs {needed} bytes, the file has {actual}")

    def _estimate_frame_count(self) -> Optional[int]:
        count: Optional[int] = self._stream.frames or None
        if count is None and self._stream.duration and self.fps:
            count = int(round(float(self._stream.duration * self._stream.time_base) * self.fps)) or None
        if count is not None and self._max_frames is not None:
            count = min(count, self._max_frames)
        return None if self.is_live and self._stream.frames == 0 else count

    def _decode(self) -> Iterator[DecodedFrame]:
        frame_idx = 0
        last_pts: Optional[float] = None
        step = 1.0 / self.fps if self.fps else 0.0
        try:
            for frame in self._container.decode(self._stream):
                if self._max_frames is not None and frame_idx >= self._max_frames:
                    return
                _check_pixels(self.name, frame.width, frame.height, self._max_pixels)
                pts = frame.time
                if pts is None or (last_pts is not None and pts <= last_pts):
                    # Missing or non-increasing timestamps: extrapolate so pts stays monotonic.
                    pts = (last_pts + step) if last_pts is not None else 0.0
                last_pts = pts
                rotation = int(frame.rotation or 0)
                converted = self._rgb.reformat(frame, format="rgb24", threads=self._rgb_threads)
                rgb = _display_transform(converted.to_ndarray(), rotation, _display_matrix(frame))
                yield DecodedFrame(
                    frame_idx=frame_idx,
                    pts=float(pts),
                    rgb=_read_only(rgb),
                    original_size=(rgb.shape[1], rgb.shape[0]),
                    rotation=rotation,
                )
                frame_idx += 1
        except av.error.FFmpegError as exc:
            raise SourceError(self.name, f"decoding failed after {frame_idx} frames ({_ffmpeg_reason(exc)})") from None
        expected = self._stream.frames
        if not self.is_live and expected and frame_idx < expected and self._max_frames is None:
            raise SourceError(self.name, f"truncated: decoded {frame_idx} of {expected} frames")

    def frames(self) -> Iterator[DecodedFrame]:
        if self._pending_first is not None:
            first, self._pending_first = self._pending_first, None
            yield first
        yield from self._decoder

    def close(self) -> None:
        self._container.close()


class ImageFolderSource(FrameSource):
    """Sorted *.jpg/*.jpeg/*.png files of one folder, played at a fixed `fps`."""

    def __init__(self, folder: Path, *, max_pixels: int, max_frames: Optional[int], fps: float):
        self.name = str(folder)
        if fps <= 0 or not math.isfinite(fps):
            raise SourceError(self.name, f"image folder fps must be positive, got {fps}")
        try:
            files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        except OSError as exc:
            raise SourceError(self.name, f"cannot list the folder ({exc.strerror or exc})") from None
        if not files:
            raise SourceError(self.name, "folder holds no .jpg/.jpeg/.png images")
        self._files = files[:max_frames] if max_frames is not None else files
        self._max_pixels = max_pixels
        self.fps = fps
        self.frame_count = len(self._files)
        self.is_live = False
        first = self._load(0)
        self.width, self.height = first.shape[1], first.shape[0]

    def _load(self, index: int) -> np.ndarray:
        path = self._files[index]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SourceError(str(path), f"cannot read ({exc.strerror or exc})") from None
        content_type = "image/png" if data.startswith(_PNG_MAGIC) else "image/jpeg"
        return decode_image_bytes(data, content_type, self._max_pixels, name=str(path))

    def frames(self) -> Iterator[DecodedFrame]:
        for index, path in enumerate(self._files):
            rgb = self._load(index)
            if (rgb.shape[1], rgb.shape[0]) != (self.width, self.height):
                raise SourceError(
                    str(path), f"image is {rgb.shape[1]}x{rgb.shape[0]}, the folder's frames are {self.width}x{self.height}"
                )
            yield DecodedFrame(frame_idx=index, pts=index / self.fps, rgb=rgb, original_size=(self.width, self.height))


def _ffmpeg_reason(exc: av.error.FFmpegError) -> str:
    return (getattr(exc, "strerror", None) or str(exc)).strip().rstrip(".")


def expand_inputs(inputs: list[str]) -> list[str]:
    """An archive folder (video files, no images) stands for its videos, sorted; everything else
    (files, URLs, image folders) is kept as given."""
    out: list[str] = []
    for text in inputs:
        folder = Path(text)
        try:
            entries = sorted(folder.iterdir()) if "://" not in text and folder.is_dir() else None
        except OSError:
            entries = None  # open_source reports it with the reason
        if entries is not None:
            videos = [str(e) for e in entries if e.is_file() and e.suffix.lower() in VIDEO_SUFFIXES]
            if videos and not any(e.suffix.lower() in IMAGE_SUFFIXES for e in entries):
                out += videos
                continue
        out.append(text)
    return out


def open_source(
    uri: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: Optional[int] = None,
    image_fps: float = 30.0,
    rtsp_transport: str = "tcp",
    timeout_s: float = 10.0,
) -> FrameSource:
    """Open a video file, an http(s)/rtsp URL or an image folder. Raises SourceError."""
    if max_frames is not None and max_frames < 1:
        raise SourceError(str(uri), f"max_frames must be >= 1, got {max_frames}")
    if rtsp_transport not in ("tcp", "udp"):
        raise SourceError(str(uri), f"rtsp_transport must be 'tcp' or 'udp', got {rtsp_transport!r}")
    text = str(uri)
    if text.startswith("file://"):
        text = text[len("file://") :]
    try:
        is_folder = "://" not in text and Path(text).is_dir()
    except (OSError, ValueError) as exc:  # name too long, NUL byte: one line, not a traceback
        raise SourceError(text, f"cannot access ({getattr(exc, 'strerror', None) or exc})") from None
    if is_folder:
        return ImageFolderSource(Path(text), max_pixels=max_pixels, max_frames=max_frames, fps=image_fps)
    if "://" in text and text.split("://", 1)[0].lower() not in NETWORK_SCHEMES + ("file",):
        raise SourceError(text, f"unsupported URL scheme (use a file, folder, {', '.join(NETWORK_SCHEMES)})")
    return VideoSource(
        text, max_pixels=max_pixels, max_frames=max_frames, rtsp_transport=rtsp_transport, timeout_s=timeout_s
    )
