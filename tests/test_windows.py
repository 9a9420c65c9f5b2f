"""Training and test windows cut from one video's feature rows, following the split."""

from __future__ import annotations

import numpy as np
import pytest

from rolo_batch import boxes, splits
from rolo_batch.errors import ConfigError, InputError
from rolo_batch.tables import FeatureFrames
from rolo_batch.windows import WindowConfig, Windows, build_windows, detection_inputs, iter_windows

DIM = 4
EXP1 = splits.get_split("exp1", train_videos=["v"], test_videos=["t"])


def make_video(n: int = 30, video: str = "v", first_frame: int = 1, invalid: tuple[int, ...] = (),
               seed: int = 0) -> FeatureFrames:
    """A video of ``n`` frames; feature[i] = frame number (to trace rows); gt boxes of 40x30 px in 320x240."""
    rng = np.random.default_rng(seed)
    frames = np.arange(first_frame, first_frame + n)
    gt = np.column_stack([rng.uniform(0, 200, n), rng.uniform(0, 150, n), np.full(n, 40.0), np.full(n, 30.0)])
    gt = gt.astype(np.float32)
    valid = np.ones(n, bool)
    for i in invalid:
        valid[i] = False
    detection = np.column_stack([np.zeros(n), rng.uniform(0.2, 0.8, (n, 2)), np.full((n, 2), 0.1),
                                 np.full(n, 0.9)]).astype(np.float32)
    return FeatureFrames(video=video, frame=frames, image_wh=np.tile([320, 240], (n, 1)),
                         feature=np.repeat(frames[:, None], DIM, axis=1).astype(np.float32),
                         detection=detection, detections=[detection[i:i + 1] for i in range(n)],
                         gt_boxes_xywh_px=gt, gt_valid=valid)


def window_frames(windows: Windows) -> np.ndarray:
    """``(M, S)`` frame numbers of every step (the features are the frame numbers)."""
    return windows.inputs[:, :, 0].astype(int)


@pytest.mark.parametrize("steps", [1, 3, 6, 9])
def test_every_full_window_of_a_training_video(steps):
    windows = build_windows(make_video(30), EXP1, WindowConfig(steps=steps))
    assert len(windows) == 30 - steps + 1
    assert windows.inputs.shape == (30 - steps + 1, steps, DIM + 6) and windows.inputs.dtype == np.float32
    np.testing.assert_array_equal(windows.last_frame, np.arange(steps, 31))
    np.testing.assert_array_equal(window_frames(windows), windows.last_frame[:, None] - steps + 1 + np.arange(steps))
    assert (windows.video == "v").all() and (windows.weights == 1).all()


def test_stride_and_short_videos():
    assert len(build_windows(make_video(30), EXP1, WindowConfig(steps=6, stride=6))) == 5
    empty = build_windows(make_video(5), EXP1, WindowConfig(steps=6))
    assert len(empty) == 0 and empty.inputs.shape == (0, 6, DIM + 6)


def test_target_is_the_last_frames_ground_truth_normalised_by_its_image_size():
    video = make_video(12)
    video.image_wh[-1] = [640, 480]
    windows = build_windows(video, EXP1, WindowConfig(steps=3))
    expected = boxes.xywh_px_to_cxcywh_norm(video.gt_boxes_xywh_px[2:], video.image_wh[2:])
    np.testing.assert_allclose(windows.targets, expected, rtol=1e-6)
    np.testing.assert_allclose(windows.step_targets[:, -1], windows.targets)
    np.testing.assert_array_equal(windows.inputs[:, -1, DIM:], video.detection[2:])


def test_invalid_ground_truth_never_becomes_a_target():
    video = make_video(20, invalid=(3, 10))
    video.gt_boxes_xywh_px[15] = np.nan  # missing box although flagged valid
    video.gt_boxes_xywh_px[17, 2] = 0  # zero-width box
    for loss_steps in ("last", "all"):
        windows = build_windows(video, EXP1, WindowConfig(steps=3, loss_steps=loss_steps))
        targeted = window_frames(windows)[windows.step_mask]
        assert not set(targeted) & {4, 11, 16, 18}
        assert np.isfinite(windows.step_targets).all() and np.isfinite(windows.targets).all()
    assert set(build_windows(video, EXP1, WindowConfig(steps=3)).last_frame) == set(range(3, 21)) - {4, 11, 16, 18}


def test_windows_never_span_a_gap_in_frame_numbers():
    video = make_video(12)
    keep = np.arange(12) != 5  # frame 6 missing from the table
    video = FeatureFrames(video.video, video.frame[keep], video.image_wh[keep], video.feature[keep],
                          video.detection[keep], [d for d, k in zip(video.detections, keep) if k],
                          video.gt_boxes_xywh_px[keep], video.gt_valid[keep])
    windows = build_windows(video, EXP1, WindowConfig(steps=3))
    assert (np.diff(window_frames(windows), axis=1) == 1).all()
    np.testing.assert_array_equal(windows.last_frame, [3, 4, 5, 9, 10, 11, 12])


def test_rows_in_any_order_give_the_same_windows():
    video = make_video(15)
    order = np.random.default_rng(1).permutation(15)
    shuffled = FeatureFrames(video.video, video.frame[order], video.image_wh[order], video.feature[order],
                             video.detection[order], [video.detections[i] for i in order],
                             video.gt_boxes_xywh_px[order], video.gt_valid[order])
    a = build_windows(video, EXP1, WindowConfig(steps=3))
    b = build_windows(shuffled, EXP1, WindowConfig(steps=3))
    np.testing.assert_array_equal(a.inputs, b.inputs)
    np.testing.assert_array_equal(a.targets, b.targets)


def test_a_test_video_gives_no_training_windows_but_test_windows():
    video = make_video(10, video="t")
    assert len(build_windows(video, EXP1, WindowConfig(steps=3))) == 0
    test = build_windows(video, EXP1, WindowConfig(steps=3), purpose="test")
    np.testing.assert_array_equal(test.last_frame, np.arange(3, 11))
    with pytest.raises(InputError, match="'other'"):
        build_windows(make_video(10, video="other"), EXP1, WindowConfig(steps=3))


@pytest.mark.parametrize("steps", [1, 3, 6, 9])
def test_exp2_training_windows_stay_inside_the_first_third(steps):
    video = make_video(60, first_frame=101, invalid=(7,))  # first part: frames 101-120
    split = splits.get_split("exp2")
    windows = build_windows(video, split, WindowConfig(steps=steps))
    assert len(windows) == 20 - steps + 1 - (1 if steps <= 8 else 0)
    assert window_frames(windows).max() <= 120 and window_frames(windows).min() >= 101
    assert (windows.step_mask[:, :-1] == 0).all() and windows.step_mask[:, -1].all()
    test = build_windows(video, split, WindowConfig(steps=steps), purpose="test")
    np.testing.assert_array_equal(test.last_frame, np.arange(121, 161))  # the test part; inputs may precede it
    assert test.step_mask[:, -1].all() and not test.step_mask[:, :-1].any()


def test_exp3_windows_cross_into_the_test_part_with_the_loss_masked_per_step():
    video = make_video(30, invalid=(2,))  # first part: frames 1-10; frame 3 has no ground truth
    windows = build_windows(video, splits.get_split("exp3"), WindowConfig(steps=4))
    frames = window_frames(windows)
    # every window with at least one supervised step: last frames 4 .. 13 (13 covers 10..13)
    np.testing.assert_array_equal(windows.last_frame, np.arange(4, 14))
    np.testing.assert_array_equal(windows.step_mask, (frames <= 10) & (frames != 3))
    assert (windows.step_targets[~windows.step_mask] == 0).all()
    np.testing.assert_array_equal(windows.weights, windows.step_mask[:, -1].astype(np.float32))
    assert frames.max() == 13  # inputs reach past the first part


def test_exp3_never_reads_a_test_frames_ground_truth():
    video = make_video(30)
    video.gt_boxes_xywh_px[10:] = np.nan  # no ground truth after the first part: nothing may change
    full = build_windows(make_video(30), splits.get_split("exp3"), WindowConfig(steps=4))
    hidden = build_windows(video, splits.get_split("exp3"), WindowConfig(steps=4))
    np.testing.assert_array_equal(full.step_targets, hidden.step_targets)
    np.testing.assert_array_equal(full.step_mask, hidden.step_mask)


def test_streaming_chunks_are_bounded_and_add_up_to_the_whole():
    video = make_video(40)
    config = WindowConfig(steps=6)
    chunks = list(iter_windows(video, EXP1, config, batch_size=7))
    assert [len(c) for c in chunks] == [7, 7, 7, 7, 7]
    whole = build_windows(video, EXP1, config)
    joined = Windows.concat(chunks)
    for name, value in whole.to_batch().items():
        np.testing.assert_array_equal(joined.to_batch()[name], value)


def test_best_iou_detection_uses_ground_truth_and_only_for_training():
    video = make_video(6)
    gt_norm = boxes.xywh_px_to_cxcywh_norm(video.gt_boxes_xywh_px, video.image_wh).astype(np.float32)
    far = np.array([3, 0.02, 0.02, 0.01, 0.01, 0.99], np.float32)  # most confident, far from the target
    elsewhere = np.array([5, 0.98, 0.98, 0.01, 0.01, 0.3], np.float32)  # overlaps nothing either
    for i in range(6):
        near = np.concatenate([[7], gt_norm[i] + [0.01, 0, 0, 0], [0.4]]).astype(np.float32)
        video.detections[i] = np.stack([far, near]) if i != 4 else elsewhere[None]  # frame 5: no overlap
        video.detection[i] = far
    chosen = detection_inputs(video, "best_iou_to_ground_truth")
    assert (chosen[[0, 1, 2, 3, 5], 0] == 7).all() and chosen[4, 0] == 3
    np.testing.assert_array_equal(detection_inputs(video, "table"), video.detection)
    config = WindowConfig(steps=1, detection="best_iou_to_ground_truth")
    assert (build_windows(video, EXP1, config).inputs[[0, 1, 2, 3, 5], 0, DIM] == 7).all()
    test_video = make_video(6, video="t")
    test_video.detections = video.detections
    assert (build_windows(test_video, EXP1, config, purpose="test").inputs[:, 0, DIM] != 7).all()


def test_a_frame_without_detection_enters_as_the_previous_box_with_confidence_zero():
    video = make_video(10)
    video.detection[[0, 4, 5]] = 0.0
    for source in ("table", "best_iou_to_ground_truth"):
        chosen = detection_inputs(video, source)
        assert (chosen[0] == 0).all()  # nothing seen yet: nothing to carry
        assert chosen[4, 5] == 0 and chosen[5, 5] == 0
        np.testing.assert_array_equal(chosen[4, 1:5], chosen[3, 1:5])
        np.testing.assert_array_equal(chosen[5, 1:5], chosen[3, 1:5])
    windows = build_windows(video, EXP1, WindowConfig(steps=3))
    row = list(windows.last_frame).index(6)  # the window of frames 4, 5, 6
    np.testing.assert_array_equal(windows.inputs[row, 2, DIM + 1:DIM + 5], video.detection[3, 1:5])


@pytest.mark.parametrize("options, message", [
    ({"steps": 0}, "steps"), ({"stride": 0}, "stride"), ({"detection": "gt"}, "detection"),
    ({"loss_steps": "first"}, "loss_steps"),
])
def test_window_config_is_validated(options, message):
    with pytest.raises(ConfigError, match=message):
        WindowConfig(**options)


def test_repeated_frames_are_an_input_error():
    video = make_video(5)
    video.frame[3] = video.frame[2]
    with pytest.raises(InputError, match="'v'.*frame 3 appears more than once"):
        build_windows(video, EXP1, WindowConfig(steps=2))


def test_windows_feed_the_objective_as_a_numpy_batch():
    torch = pytest.importorskip("torch")
    from rolo_batch import rolo

    windows = build_windows(make_video(30), splits.get_split("exp3"), WindowConfig(steps=4))
    model = rolo.build_model(rolo.RoloConfig(form="compact", feature_dim=DIM, steps=4, hidden_size=8,
                                             projection_size=4))
    loss, metrics = rolo.objective(model, windows.to_batch())
    assert torch.isfinite(loss) and metrics["num_targets"] == int(windows.step_mask.sum())
