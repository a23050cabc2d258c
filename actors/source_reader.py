"""A stream's video source (file, folder, http(s) or RTSP URL) read and decoded in its own actor.

Why: the control API fed each stream from a thread of its replica, so decoding (and copying every
frame into the object store) shared the replica's one core with the HTTP loop and the session's
driver. Measured with bench/serve_overload_bench.py --ingress direct --clip
../shared/videos/01_dog.mp4 (a 720p stream paced at 30 fps) during 200-request floods: the replica
used 0.92-0.99 cores with the decoding in it, 0.76-0.80 with it here (this actor: 0.19-0.22 cores),
and the app's 503s to frame.jpg floods came back in 80-96 ms p50 instead of 92-150 ms.

`next_frame()` is called with two returns, `(meta, pixels)`: the caller owns both (Ray makes the
submitter of a call the owner of its results), so a frame outlives this actor, and the pixels stay
in the object store, never copied into the caller. Calls run one at a time, in order; a paced
source blocks in here until its next frame is due.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterator, Optional

from masklet.actors.runtime import in_actor_process, keep_freed_memory


class CountedEvents:
    """Stands in for a Stats in the source's reader: counter increments are kept until the next frame
    carries them to the caller, whose Stats records them (`masklet_reconnects_total`, ...)."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, float, dict[str, Any]]] = []

    def inc(self, name: str, amount: float = 1, **labels: Any) -> None:
        self.pending.append((name, amount, labels))

    def take(self) -> list[tuple[str, float, dict[str, Any]]]:
        taken, self.pending = self.pending, []
        return taken


class SourceReader:
    """`make_frames(stats=...)` gives the source's `frames(stop)` generator of frames with `frame_idx`,
    `pts`, `rgb` (uint8 [H, W, 3]) and `fps` (deploy.feeders.source_frames, passed in by the caller:
    actors never import the layers above them)."""

    def __init__(self, make_frames: Callable[..., Callable[[threading.Event], Iterator[Any]]]) -> None:
        if in_actor_process():
            keep_freed_memory()  # every frame is a fresh frame-sized array, freed once stored
        self._counts = CountedEvents()
        self._stop = threading.Event()
        self._frames: Optional[Iterator[Any]] = make_frames(stats=self._counts)(self._stop)

    def next_frame(self) -> tuple[Optional[dict[str, Any]], Any]:
        """(meta, pixels) of the next frame; (None, None) once the source has ended. A source that
        fails raises here, with its one-line reason (SourceError, or a reconnect policy giving up)."""
        frame = next(self._frames, None) if self._frames is not None else None
        if frame is None:
            self._frames = None
            return None, None
        height, width = frame.rgb.shape[:2]
        meta = {"frame_idx": int(frame.frame_idx), "pts": float(frame.pts), "fps": frame.fps,
                "height": int(height), "width": int(width), "counters": self._counts.take()}
        return meta, frame.rgb

    def stop(self) -> None:
        self._stop.set()
