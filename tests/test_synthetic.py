"""The synthetic generator: deterministic, exact ground truth, and the difficulties it promises."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from rolo_batch import datasets
from rolo_batch.datasets.synthetic import SynthConfig, render_video, synthesize
from rolo_batch.errors import ConfigError


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    config = SynthConfig(videos=2, frames=8, width=96, height=72, seed=11)
    synthesize(str(tmp_path / "a"), config)
    synthesize(str(tmp_path / "b"), config)
    synthesize(str(tmp_path / "c"), SynthConfig(videos=2, frames=8, width=96, height=72, seed=12))
    a, b, c = (tree_digest(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a if k.endswith(".jpg"))


def test_otb_layout_is_readable_by_the_otb_reader(tmp_path):
    names = synthesize(str(tmp_path), SynthConfig(videos=3, frames=10, seed=1))
    found = datasets.discover(str(tmp_path))
    assert [v.name for v in found.videos] == names == ["synth-000", "synth-001", "synth-002"]
    video = datasets.open_video(found.videos[0])
    assert len(video) == 10 and video.image_size == (320, 240) and video.groundtruth.valid.all()
    assert (tmp_path / "synth-000" / "attributes.csv").read_text().startswith("frame,visible_fraction")


def test_groundtruth_is_the_full_extent_of_the_target():
    config = SynthConfig(videos=1, frames=40, seed=4, distractors=0, occluders=0)
    checked = 0
    for frame in render_video(config, 0, with_masks=True):
        if frame.blurred:  # motion blur smears the mask beyond the object's extent
            continue
        ys, xs = np.nonzero(frame.target_mask)
        x, y, w, h = frame.box_xywh_px
        assert abs(xs.min() - x) <= 1.0 and abs(xs.max() + 1 - (x + w)) <= 1.0
        assert abs(ys.min() - y) <= 1.0 and abs(ys.max() + 1 - (y + h)) <= 1.0
        assert x >= 0 and y >= 0 and x + w <= config.width and y + h <= config.height
        assert frame.visible_fraction == pytest.approx(1.0)
        checked += 1
    assert checked >= 10


def test_videos_contain_the_promised_difficulties():
    config = SynthConfig(videos=6, frames=120, seed=0)
    frames = [f for i in range(config.videos) for f in render_video(config, i)]
    visible = np.array([f.visible_fraction for f in frames])
    assert (visible < 0.05).any(), "no full occlusion"
    assert ((visible > 0.2) & (visible < 0.8)).any(), "no partial occlusion"
    assert max(f.speed_px for f in frames) > 6, "no fast motion"
    assert any(f.blurred for f in frames), "no motion blur"
    areas = np.array([f.box_xywh_px[2] * f.box_xywh_px[3] for f in frames[:120]])
    assert areas.max() / areas.min() > 1.15, "no scale change"
    brightness = np.array([f.image.mean() for f in frames[:120]])
    assert brightness.max() - brightness.min() > 15, "no illumination change"


def test_distractors_look_like_the_target():
    """With distractors the frame has more target-coloured pixels outside the target's box than without."""
    def outside_similarity(distractors: int) -> float:
        frame = next(iter(render_video(SynthConfig(videos=1, frames=2, seed=9, distractors=distractors,
                                                   occluders=0), 0, with_masks=True)))
        target_pixels = frame.image[frame.target_mask].astype(float)
        mean = target_pixels.mean(axis=0)
        x, y, w, h = frame.box_xywh_px.astype(int)
        outside = np.ones(frame.image.shape[:2], bool)
        outside[max(y, 0):y + h, max(x, 0):x + w] = False
        distance = np.linalg.norm(frame.image[outside].astype(float) - mean, axis=1)
        return float((distance < 40).mean())

    assert outside_similarity(3) > outside_similarity(0) + 0.01


def test_video_file_output(tmp_path):
    synthesize(str(tmp_path), SynthConfig(videos=1, frames=12, width=96, height=64, seed=3, video_files=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth-000.attributes.csv", "synth-000.groundtruth.txt",
                                                          "synth-000.mp4"]
    video = datasets.open_video(datasets.discover(str(tmp_path)).videos[0])
    assert len(video) == 12 and video.groundtruth.valid.all()
    rendered = [f.image for f in render_video(SynthConfig(videos=1, frames=12, width=96, height=64, seed=3), 0)]
    decoded = video.read_frame(5).astype(float)
    assert np.abs(decoded - rendered[5]).mean() < 12, "the mp4 does not show the rendered frames"


@pytest.mark.parametrize("kwargs", [{"videos": 0}, {"frames": 1}, {"width": 10}, {"distractors": -1},
                                    {"jpeg_quality": 0}])
def test_bad_configs_are_refused(kwargs):
    with pytest.raises(ConfigError):
        SynthConfig(**kwargs)
