import io
import shutil

import av
import numpy as np
import pytest
from PIL import Image

from masklet.actors.sources import DecodedFrame, SourceError, decode_image_bytes, open_source


def _first_frames(source, count):
    frames = []
    for frame in source.frames():
        frames.append(frame)
        if len(frames) == count:
            break
    return frames


def test_real_clips_decode_in_order_with_pts(video_paths):
    assert len(video_paths) >= 3
    for path in video_paths:
        with open_source(path, max_frames=4) as source:
            assert (source.width, source.height) == (1280, 720) and source.fps and source.fps > 0
            assert source.frame_count == 4 and not source.is_live
            frames = list(source.frames())
        assert [f.frame_idx for f in frames] == [0, 1, 2, 3]
        assert all(isinstance(f, DecodedFrame) for f in frames)
        assert frames[0].rgb.shape == (720, 1280, 3) and frames[0].rgb.dtype == np.uint8
        assert frames[0].original_size == (1280, 720) and not frames[0].rgb.flags.writeable
        pts = [f.pts for f in frames]
        assert pts == sorted(pts) and len(set(pts)) == 4
        assert pts[1] - pts[0] == pytest.approx(1 / source.fps, rel=0.05)


def test_full_clip_estimate(video_paths):
    juggle = next(p for p in video_paths if "juggle" in p.name)
    with open_source(juggle) as source:
        assert source.frame_count == 247 and source.fps == pytest.approx(24.0)
        frames = _first_frames(source, 2)
    assert frames[1].pts == pytest.approx(1 / 24)


def _write_clip(path, frames, fps=10, rotation=None, time_stamps=None):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        if time_stamps is not None:
            stream.time_base = __import__("fractions").Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if time_stamps is not None:
                frame.pts, frame.time_base = time_stamps[index], stream.time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _marker_frame(width=64, height=32):
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[:, :16] = 255  # a white band on the left edge of the coded picture
    return rgb


@pytest.mark.parametrize("rotation, band", [(-90, "top"), (90, "bottom"), (180, "right")])
def test_rotation_metadata_is_applied(tmp_path, rotation, band):
    clip = tmp_path / "rotated.mp4"
    _write_clip(clip, [_marker_frame()] * 2, rotation=rotation)
    with open_source(clip) as source:
        frame = next(iter(source.frames()))
    expected_size = (64, 32) if rotation == 180 else (32, 64)
    assert source.width == expected_size[0] and frame.original_size == expected_size
    assert frame.rotation % 360 == rotation % 360
    gray = frame.rgb.mean(axis=2)
    edges = {"top": gray[:8].mean(), "bottom": gray[-8:].mean(), "right": gray[:, -8:].mean(), "left": gray[:, :8].mean()}
    assert edges[band] > 200 and min(edges.values()) < 50


def test_variable_frame_rate_keeps_container_timestamps(tmp_path):
    clip = tmp_path / "vfr.mkv"
    stamps = [0, 40, 200, 240, 520]  # milliseconds, irregular gaps (multiples of the 25 fps codec tick)
    _write_clip(clip, [_marker_frame()] * len(stamps), fps=25, time_stamps=stamps)
    with open_source(clip) as source:
        pts = [frame.pts for frame in source.frames()]
    assert pts == pytest.approx([s / 1000 for s in stamps], abs=1e-3)


def test_image_folder(tmp_path):
    for index in range(3):
        value = 40 * (index + 1)
        Image.fromarray(np.full((20, 30, 3), value, np.uint8)).save(tmp_path / f"{index:05d}.png")
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "00003.jpg", quality=95)
    (tmp_path / "notes.txt").write_text("ignored")
    with open_source(tmp_path, image_fps=5.0) as source:
        assert (source.width, source.height, source.frame_count, source.fps) == (30, 20, 4, 5.0)
        frames = list(source.frames())
    assert [f.frame_idx for f in frames] == [0, 1, 2, 3]
    assert [f.pts for f in frames] == pytest.approx([0, 0.2, 0.4, 0.6])
    assert [int(f.rgb[0, 0, 0]) for f in frames[:3]] == [40, 80, 120]
    assert abs(int(frames[3].rgb[0, 0, 0]) - 200) <= 2
    assert len(list(open_source(tmp_path, max_frames=2).frames())) == 2


def test_image_folder_errors(tmp_path):
    with pytest.raises(SourceError, match="holds no .jpg/.jpeg/.png images"):
        open_source(tmp_path)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((21, 30, 3), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(SourceError, match=r"b.png: image is 30x21, the folder's frames are 30x20"):
        list(open_source(tmp_path).frames())


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("just some text, not a video\n" * 20), "not a readable video"),
        (lambda p: None, "no such file"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, make, reason):
    path = tmp_path / "input.mp4"
    make(path)
    with pytest.raises(SourceError) as info:
        open_source(path)
    message = str(info.value)
    assert message.startswith(str(path)) and reason in message and "\n" not in message


def test_truncated_clip_is_detected(tmp_path, video_paths):
    truncated = tmp_path / "cut.mp4"
    data = video_paths[0].read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SourceError, match=r"cut.mp4: truncated"):
        open_source(truncated)


def test_pixel_cap_is_checked_before_decoding(video_paths, tmp_path):
    with pytest.raises(SourceError, match=r"1280x720 \(921600 pixels\) exceeds max_pixels=921599"):
        open_source(video_paths[0], max_pixels=1280 * 720 - 1)
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(SourceError, match="exceeds max_pixels=100"):
        open_source(tmp_path, max_pixels=100)


def test_bad_arguments_and_schemes(video_paths):
    with pytest.raises(SourceError, match="unsupported URL scheme"):
        open_source("ftp://example.invalid/clip.mp4")
    with pytest.raises(SourceError, match="max_frames must be >= 1"):
        open_source(video_paths[0], max_frames=0)
    with pytest.raises(SourceError, match="rtsp_transport"):
        open_source("rtsp://127.0.0.1:1/x", rtsp_transport="quic")


def test_unreachable_stream_fails_fast():
    with pytest.raises(SourceError, match=r"^http://127.0.0.1:9/clip.mp4: "):
        open_source("http://127.0.0.1:9/clip.mp4", timeout_s=2)


def _encoded(array, fmt):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_decode_image_bytes():
    rgb = np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    assert np.array_equal(decode_image_bytes(_encoded(rgb, "PNG"), "image/png"), rgb)
    jpeg = decode_image_bytes(_encoded(rgb, "JPEG"), "image/jpeg")
    assert jpeg.shape == (12, 16, 3)
    with pytest.raises(SourceError, match="content_type is image/jpeg but the data is image/png"):
        decode_image_bytes(_encoded(rgb, "PNG"), "image/jpeg")
    with pytest.raises(SourceError, match="neither JPEG nor PNG"):
        decode_image_bytes(b"GIF89a....", "image/png")
    with pytest.raises(SourceError, match="exceeds max_pixels=100"):
        decode_image_bytes(_encoded(rgb, "PNG"), "image/png", max_pixels=100)
    with pytest.raises(SourceError, match="cannot decode image/png"):
        decode_image_bytes(_encoded(rgb, "PNG")[:60], "image/png")
    with pytest.raises(SourceError, match="unsupported content_type"):
        decode_image_bytes(b"x", "image/gif")


def test_decode_image_bytes_applies_exif_orientation():
    rgb = np.zeros((10, 20, 3), np.uint8)
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image_bytes(buffer.getvalue(), "image/jpeg").shape == (20, 10, 3)


def test_copy_of_clip_decodes(tmp_path, video_paths):
    copy = tmp_path / "copy of clip.mp4"
    shutil.copy(video_paths[1], copy)
    assert len(list(open_source(f"file://{copy}", max_frames=2).frames())) == 2


def test_an_archive_folder_stands_for_its_videos_and_an_image_folder_for_itself(tmp_path):
    from masklet.actors.sources import expand_inputs

    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("b.mp4", "a.MOV", "notes.txt"):
        (archive / name).write_bytes(b"x")
    images = tmp_path / "images"
    images.mkdir()
    (images / "0001.jpg").write_bytes(b"x")
    (images / "clip.mp4").write_bytes(b"x")  # a folder with images is an image sequence
    url = "rtsp://camera/stream"
    assert expand_inputs([str(archive), str(images), url]) == [str(archive / "a.MOV"), str(archive / "b.mp4"),
                                                                str(images), url]
