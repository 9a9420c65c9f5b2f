"""Overlay videos: frames come back with the boxes in the paper's colours and the heatmap, in a format that is
probed, checked before it is published, and played by a real browser (headless Chromium)."""

from __future__ import annotations

import dataclasses
import warnings

import cv2
import numpy as np
import pytest

from rolo_batch import datasets, render, storage
from rolo_batch.datasets.images import encode_jpeg
from rolo_batch.datasets.synthetic import SynthConfig, synthesize
from rolo_batch.errors import InputError
from rolo_batch.tables import TrackRows
from tests.browser import chromium_or_skip, play_video

WIDTH, HEIGHT, FRAMES = 96, 72, 8


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> datasets.VideoSource:
    root = tmp_path_factory.mktemp("synth")
    synthesize(str(root), SynthConfig(videos=1, frames=FRAMES, width=WIDTH, height=HEIGHT))
    return datasets.open_video(datasets.discover(str(root)).videos[0])


def far_box(gt_box: np.ndarray) -> np.ndarray:
    """A 30x22 box in the horizontal half of the frame the ground-truth box's centre is not in."""
    centre_x = gt_box[0] + gt_box[2] / 2
    x = 60.0 if centre_x < WIDTH / 2 else 4.0
    return np.array([x, 40.0, 30.0, 22.0])


def fake_tracks(video) -> dict[str, TrackRows]:
    gt = video.groundtruth.boxes_xywh_px
    frames = video.frame_numbers
    rolo = np.stack([far_box(b) for b in gt])
    yolo = rolo + [0.0, -30.0, 0.0, 0.0]  # above the rolo box
    return {"rolo": TrackRows(video.name, "rolo", frames, rolo),
            "yolo": TrackRows(video.name, "yolo", frames, yolo),
            "kcf": TrackRows(video.name, "kcf", frames[:3], np.full((3, 4), np.nan))}  # reports nothing


def read_video(path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, image = capture.read()
        if not ok:
            break
        frames.append(image)
    capture.release()
    return frames


def edge_pixel(image: np.ndarray, box: np.ndarray, edge: str) -> np.ndarray:
    """The pixel in the middle of the top or bottom edge of an xywh box (where draw_box puts the line)."""
    x = int(round(box[0] + box[2] / 2))
    y = int(round(box[1])) if edge == "top" else int(round(box[1] + box[3])) - 1
    return image[y, x].astype(int)


def dominant(pixel: np.ndarray, channel: int, margin: int = 60) -> bool:
    """Channel ``channel`` (BGR index) beats both others by ``margin`` (lossy codecs leave some colour bleed)."""
    others = [pixel[c] for c in range(3) if c != channel]
    return all(pixel[channel] - o >= margin for o in others)


def test_overlay_has_every_frame_and_the_paper_colours(video, tmp_path):
    out = tmp_path / "out" / f"overlay{render.overlay_suffix()}"
    tracks = fake_tracks(video)
    written = render.render_overlay(video, tracks, str(out), thickness=3)
    assert written == FRAMES and out.is_file()
    frames = read_video(out)
    assert len(frames) == FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3)
    gt = video.groundtruth.boxes_xywh_px
    for index in (0, FRAMES // 2, FRAMES - 1):
        image = frames[index]
        rolo = tracks["rolo"].boxes_xywh_px[index]
        assert dominant(edge_pixel(image, gt[index], "top"), 2), "ground truth should be red"
        assert dominant(edge_pixel(image, rolo, "bottom"), 1), "rolo should be green"
        assert dominant(edge_pixel(image, tracks["yolo"].boxes_xywh_px[index], "bottom"), 0), "yolo should be blue"


def test_method_colours_follow_the_paper_and_stay_distinct():
    colours = render.method_colours(["kcf", "rolo", "csrt", "yolo", "mil", "kalman"])
    assert colours["rolo"] == (0, 255, 0) and colours["yolo"] == (255, 0, 0)
    assert render.GROUND_TRUTH_COLOUR == (0, 0, 255)
    assert len(set(colours.values()) | {render.GROUND_TRUTH_COLOUR}) == 7


def test_heatmap_is_blended_over_the_frame(video, tmp_path):
    heat = np.zeros((FRAMES, 32, 32), np.float32)
    heat[:, 20:, 20:] = 1.0  # hot in the bottom-right corner
    plain, hot = (tmp_path / f"{name}{render.overlay_suffix()}" for name in ("plain", "hot"))
    render.render_overlay(video, [], str(plain), legend=False)
    render.render_overlay(video, [], str(hot), heatmaps=heat, legend=False)
    a, b = read_video(plain)[3].astype(int), read_video(hot)[3].astype(int)
    corner = np.abs(a[-12:, -12:] - b[-12:, -12:]).mean()
    cold = np.abs(a[:25, :25] - b[:25, :25]).mean()
    assert corner > 30 and cold < 5


def test_overlay_lands_on_s3(video, bucket, s3_client):
    key = f"renders/{video.name}{render.overlay_suffix()}"
    uri = f"s3://{bucket}/{key}"
    heat = {int(n): np.full((32, 32), 0.5, np.float32) for n in video.frame_numbers[:2]}
    assert render.render_overlay(video, fake_tracks(video), uri, heatmaps=heat, stop=4) == 4
    data = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert data[:4] == b"\x1a\x45\xdf\xa3" and b"\x42\x82\x84webm" in data[:64]  # EBML header, DocType webm
    assert storage.exists(uri)


@pytest.mark.parametrize("kwargs,match", [
    ({"tracks": [TrackRows("other-video", "rolo", [1], [[0, 0, 1, 1]])]}, "is for video 'other-video'"),
    ({"heatmaps": np.zeros((3, 32, 32))}, "heatmaps has shape"),
    ({"start": 5, "stop": 5}, "no frames to render"),
], ids=["track of another video", "heatmaps not aligned", "empty range"])
def test_bad_inputs_are_named(video, tmp_path, kwargs, match):
    kwargs = {"tracks": [], **kwargs}
    with pytest.raises(InputError, match=match):
        render.render_overlay(video, out_uri=str(tmp_path / "x.webm"), **kwargs)
    assert not (tmp_path / "x.webm").exists()


# --- the video format ------------------------------------------------------------------------------------

def test_this_opencv_writes_a_browser_format_and_overlays_use_the_first():
    # The pinned wheel's FFmpeg has libvpx (VP8, VP9) but no H.264 or AV1 encoder.
    works = {f.name: render.probe_format(f) == [] for f in render.BROWSER_FORMATS + (render.MPEG4_MP4,)}
    assert works == {"VP8 in WebM": True, "VP9 in WebM": True, "MPEG-4 Part 2 in mp4": True}
    assert render.overlay_format() is render.VP8_WEBM and render.overlay_suffix() == ".webm"


@pytest.mark.parametrize("video_format", [render.VP8_WEBM, render.VP9_WEBM, render.MPEG4_MP4], ids=lambda f: f.fourcc)
def test_each_format_reads_back_whole_in_its_own_container(video, tmp_path, video_format):
    out = tmp_path / f"overlay{video_format.suffix}"
    assert render.render_overlay(video, fake_tracks(video), str(out), video_format=video_format) == FRAMES
    head = out.read_bytes()[:64]
    assert head[:4] == b"\x1a\x45\xdf\xa3" if video_format.container == "webm" else head[4:8] == b"ftyp"
    frames = read_video(out)
    assert len(frames) == FRAMES and {f.shape for f in frames} == {(HEIGHT, WIDTH, 3)}
    assert render.check_video_file(str(out), video_format, FRAMES, (WIDTH, HEIGHT)) == []


@pytest.mark.parametrize("checked_as,frames,size,problems", [
    (render.MPEG4_MP4, FRAMES, (WIDTH, HEIGHT),
     ["the file is webm, expected mp4", "it reads back as codec 'VP80', expected FMP4 or mp4v"]),
    (render.VP9_WEBM, FRAMES, (WIDTH, HEIGHT), ["it reads back as codec 'VP80', expected VP90"]),
    (render.VP8_WEBM, FRAMES + 1, (WIDTH, HEIGHT), [f"it reads back {FRAMES} frames, expected {FRAMES + 1}"]),
    (render.VP8_WEBM, FRAMES, (WIDTH + 2, HEIGHT),
     [f"it reads back as {WIDTH}x{HEIGHT}, expected {WIDTH + 2}x{HEIGHT}"]),
], ids=["other container", "other codec", "frame missing", "other size"])
def test_the_file_check_names_what_is_wrong(video, tmp_path, checked_as, frames, size, problems):
    out = tmp_path / "overlay.webm"
    render.render_overlay(video, [], str(out), video_format=render.VP8_WEBM)
    assert render.check_video_file(str(out), checked_as, frames, size) == problems


def test_the_file_check_refuses_an_empty_or_foreign_file(tmp_path):
    empty, text = tmp_path / "empty.webm", tmp_path / "text.webm"
    empty.write_bytes(b"")
    text.write_bytes(b"not a video" * 100)
    assert render.check_video_file(str(empty), render.VP8_WEBM, 1, (2, 2)) == ["no file was written"]
    assert render.check_video_file(str(text), render.VP8_WEBM, 1, (2, 2)) == [
        "the file is no known container, expected webm", "OpenCV cannot open it again"]


@pytest.mark.parametrize("head,container", [
    (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm\x42\x87", "webm"),
    (b"\x1a\x45\xdf\xa3\xa3\x42\x86\x81\x01\x42\x82\x88matroska", "matroska"),
    (b"\x00\x00\x00\x1cftypisom", "mp4"),
    (b"\x1a\x45\xdf\xa3", None),  # EBML without a DocType
    (b"", None),
    (b"RIFF\x00\x00\x00\x00AVI ", None),
], ids=["webm", "matroska", "mp4", "ebml without doctype", "empty", "avi"])
def test_container_of(head, container):
    assert render.container_of(head) == container


@pytest.fixture
def fresh_format_choice():
    """``overlay_format`` decides again (it caches its probe for the process), before and after the test."""
    render.overlay_format.cache_clear()
    yield
    render.overlay_format.cache_clear()


BROKEN = render.VideoFormat("nothing", "XXXX", ".webm", "webm", ("XXXX",), browser=True)


def test_without_a_browser_format_overlays_fall_back_to_mp4v_with_a_warning(monkeypatch, fresh_format_choice):
    monkeypatch.setattr(render, "BROWSER_FORMATS", (BROKEN,))
    with pytest.warns(RuntimeWarning, match="browsers do not play: OpenCV cannot write a browser format here "
                                            r"\(nothing: OpenCV's FFmpeg has no writer for 'XXXX' in .webm\)"):
        assert render.overlay_format() is render.MPEG4_MP4
    assert render.overlay_suffix() == ".mp4"


def test_without_any_format_rendering_fails_naming_what_was_tried(monkeypatch, fresh_format_choice):
    monkeypatch.setattr(render, "BROWSER_FORMATS", (BROKEN,))
    monkeypatch.setattr(render, "MPEG4_MP4", dataclasses.replace(BROKEN, name="mp4 too"))
    with pytest.raises(RuntimeError, match="cannot write any overlay video format here.*nothing: .*mp4 too: "):
        render.overlay_format()


def test_a_name_with_another_video_suffix_warns_and_the_format_stays(video, tmp_path):
    out = tmp_path / "overlay.mp4"
    with pytest.warns(RuntimeWarning, match=r"overlay.mp4: the overlay is VP8 in WebM; name it \*.webm"):
        render.render_overlay(video, [], str(out), video_format=render.VP8_WEBM)
    assert out.read_bytes()[:4] == b"\x1a\x45\xdf\xa3"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        render.render_overlay(video, [], str(tmp_path / "overlay"), video_format=render.VP8_WEBM)  # no suffix


def test_an_odd_frame_size_gets_a_black_column_and_row(tmp_path):
    folder = tmp_path / "data" / "Odd"
    for n in range(1, 5):
        image = np.full((25, 33, 3), 200, np.uint8)
        storage.write_bytes(str(folder / "img" / f"{n:04d}.jpg"), encode_jpeg(image))
    storage.write_text(str(folder / "groundtruth_rect.txt"), "2,2,10,10\n" * 4)
    odd = datasets.open_video(datasets.discover(str(tmp_path / "data")).videos[0])
    out = tmp_path / "odd.webm"
    assert render.render_overlay(odd, [], str(out), legend=False, video_format=render.VP8_WEBM) == 4
    frame = read_video(out)[0]
    assert frame.shape == (26, 34, 3)
    assert frame[:, -1].max() < 40 and frame[-1, :].max() < 40 and frame[12, 20].min() > 150


# --- in a real browser -----------------------------------------------------------------------------------

def assert_plays(state: dict, width: int, height: int, frames: int, fps: float, first_frame_bgr: np.ndarray) -> None:
    """What Chromium's ``<video>`` reported (``play_video``) shows a decoded, playing video of that size."""
    assert state["error"] is None and state["playError"] is None, state
    assert (state["videoWidth"], state["videoHeight"]) == (width, height), state
    assert state["readyState"] >= 2 and "loadeddata" in state["events"], state  # a frame is decoded
    assert state["maxTime"] > 0 or state["ended"], state  # playback moved on
    assert state["duration"] == pytest.approx(frames / fps, abs=1.5 / fps), state
    # the first frame Chromium decoded looks like the one OpenCV reads back (mean colour per channel)
    np.testing.assert_allclose(state["firstFrameMeanRgb"], first_frame_bgr.reshape(-1, 3).mean(0)[::-1], atol=4.0)


def test_chromium_plays_the_overlay(video, tmp_path):
    chromium_or_skip()
    out = tmp_path / f"overlay{render.overlay_suffix()}"
    render.render_overlay(video, fake_tracks(video), str(out))
    state = play_video(out)
    assert_plays(state, WIDTH, HEIGHT, FRAMES, 30.0, read_video(out)[0])


def test_chromium_refuses_the_old_mp4v_overlay(video, tmp_path):
    """The negative control: the check above can fail, and fails for the format overlays used to have."""
    chromium_or_skip()
    out = tmp_path / "overlay.mp4"
    render.render_overlay(video, fake_tracks(video), str(out), video_format=render.MPEG4_MP4)
    state = play_video(out)
    assert state["error"] is not None and state["error"]["code"] == 4, state  # MEDIA_ERR_SRC_NOT_SUPPORTED
    assert state["videoWidth"] == 0 and "loadeddata" not in state["events"], state
