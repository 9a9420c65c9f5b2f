"""Overlay videos: frames come back from the mp4 with the boxes in the paper's colours, and the heatmap."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from rolo_batch import datasets, render, storage
from rolo_batch.datasets.synthetic import SynthConfig, synthesize
from rolo_batch.errors import InputError
from rolo_batch.tables import TrackRows

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


def read_mp4(path) -> list[np.ndarray]:
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
    """Channel ``channel`` (BGR index) beats both others by ``margin`` (mp4v leaves some colour bleed)."""
    others = [pixel[c] for c in range(3) if c != channel]
    return all(pixel[channel] - o >= margin for o in others)


def test_overlay_has_every_frame_and_the_paper_colours(video, tmp_path):
    out = tmp_path / "out" / "overlay.mp4"
    tracks = fake_tracks(video)
    written = render.render_overlay(video, tracks, str(out), thickness=3)
    assert written == FRAMES and out.is_file()
    frames = read_mp4(out)
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
    plain, hot = tmp_path / "plain.mp4", tmp_path / "hot.mp4"
    render.render_overlay(video, [], str(plain), legend=False)
    render.render_overlay(video, [], str(hot), heatmaps=heat, legend=False)
    a, b = read_mp4(plain)[3].astype(int), read_mp4(hot)[3].astype(int)
    corner = np.abs(a[-12:, -12:] - b[-12:, -12:]).mean()
    cold = np.abs(a[:25, :25] - b[:25, :25]).mean()
    assert corner > 30 and cold < 5


def test_overlay_lands_on_s3(video, bucket, s3_client):
    uri = f"s3://{bucket}/renders/{video.name}.mp4"
    heat = {int(n): np.full((32, 32), 0.5, np.float32) for n in video.frame_numbers[:2]}
    assert render.render_overlay(video, fake_tracks(video), uri, heatmaps=heat, stop=4) == 4
    data = s3_client.get_object(Bucket=bucket, Key=f"renders/{video.name}.mp4")["Body"].read()
    assert data[4:8] == b"ftyp"  # an mp4 container
    assert storage.exists(uri)


@pytest.mark.parametrize("kwargs,match", [
    ({"tracks": [TrackRows("other-video", "rolo", [1], [[0, 0, 1, 1]])]}, "is for video 'other-video'"),
    ({"heatmaps": np.zeros((3, 32, 32))}, "heatmaps has shape"),
    ({"start": 5, "stop": 5}, "no frames to render"),
], ids=["track of another video", "heatmaps not aligned", "empty range"])
def test_bad_inputs_are_named(video, tmp_path, kwargs, match):
    kwargs = {"tracks": [], **kwargs}
    with pytest.raises(InputError, match=match):
        render.render_overlay(video, out_uri=str(tmp_path / "x.mp4"), **kwargs)
    assert not (tmp_path / "x.mp4").exists()
