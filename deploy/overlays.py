"""GET /streams/{id}/frame.jpg and frame.png: the latest frame with its masks drawn, encoded once per
published output and format.

The console polls the frame, and every viewer (or dashboard) of a stream asks for the same picture
until the stream publishes its next record. Drawing and encoding it is the API's costliest answer,
on the replica that also answers every other route. Measured for a 720p frame of
../shared/videos/01_dog.mp4 with one object, CPU time on this project's 2-core machine: the overlay
14 ms, then PNG (compress_level 1) 65 ms and 1.06 MB, or JPEG (quality 85) 3.7 ms and 165 KB. So the
console shows JPEG, and frame.png stays for lossless pictures.

Each stream's latest picture per format is kept and served again until a newer output (a later frame,
or a revision of the same one) replaces it; requests that arrive while it is being encoded wait for
that one encoding instead of starting their own. Measured with bench/serve_overload_bench.py
--clip ../shared/videos/01_dog.mp4 (direct ingress, 200 frame.png requests always outstanding): the
app's 503s came back in 2,150-2,475 ms p50 when every request encoded its own PNG, 155-210 ms with
one encoding per output (README "Benchmarks").
"""
from __future__ import annotations

import io
import threading
import weakref
from typing import Any, Callable, Optional

JPEG_QUALITY = 85
MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}


def overlay_image(output: Any, fmt: str) -> bytes:
    """`output`'s frame with its masks blended in and labelled, encoded as `fmt` ("jpeg" or "png")."""
    from PIL import Image

    from masklet.actors.sinks import draw_overlay

    image = Image.fromarray(draw_overlay(output.rgb, output.masks))
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=1)  # speed over size
    elif fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        raise ValueError(f"unknown overlay format {fmt!r}; expected one of {sorted(MEDIA_TYPES)}")
    return buffer.getvalue()


def _order(output: Any) -> tuple[int, int]:
    return output.record.frame_idx, output.record.revision


class OverlayCache:
    """Per stream, the picture (in one format) of the newest output asked for; one per stream is kept.

    Keyed weakly by the stream's feeder (`StreamRegistry.get`), not its id: a deleted or forgotten
    stream's picture goes with its feeder, and a stream created again under the same id starts afresh.
    """

    def __init__(self, fmt: str, render: Optional[Callable[[Any, str], bytes]] = None) -> None:
        if fmt not in MEDIA_TYPES:
            raise ValueError(f"unknown overlay format {fmt!r}; expected one of {sorted(MEDIA_TYPES)}")
        self.fmt, self.media_type = fmt, MEDIA_TYPES[fmt]
        self._render = render if render is not None else overlay_image
        self._lock = threading.Lock()  # guards the two maps, never held while encoding
        self._latest: weakref.WeakKeyDictionary[Any, tuple[tuple[int, int], bytes]] = weakref.WeakKeyDictionary()
        self._encoding: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
        self.renders = 0  # encodings done

    def picture(self, stream: Any, output: Any) -> bytes:
        """The picture of `output` (a LiveOutput with a record and pixels) of `stream`, encoded at most
        once while it is the newest output asked for. Keyed by the record's (frame_idx, revision):
        a stream's latest output only moves forward (live_round: a revision of an older frame does not
        move it back) and a revision raises the pair. Only the picture is kept, not the frame."""
        key = _order(output)
        cached = self._cached(stream, key)
        if cached is not None:
            return cached
        with self._lock:
            encoding = self._encoding.setdefault(stream, threading.Lock())
        with encoding:
            cached = self._cached(stream, key)  # encoded while this request waited
            if cached is not None:
                return cached
            picture = self._render(output, self.fmt)
            with self._lock:
                self.renders += 1
                current = self._latest.get(stream)
                # A request still holding an older output must not evict the newer one's picture.
                if current is None or key >= current[0]:
                    self._latest[stream] = (key, picture)
            return picture

    def cached(self, stream: Any, output: Any) -> Optional[bytes]:
        """`output`'s picture if it is already encoded, else None; never waits for an encoding (the
        lock it takes guards two dict lookups): what the API answers on its event loop."""
        return self._cached(stream, _order(output))

    def _cached(self, stream: Any, key: tuple[int, int]) -> Optional[bytes]:
        with self._lock:
            entry = self._latest.get(stream)
        return entry[1] if entry is not None and entry[0] == key else None
