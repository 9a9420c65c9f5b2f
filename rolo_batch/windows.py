"""Training and test samples for ROLO: windows of ``steps`` consecutive frames of one video.

A window ending at frame t holds, per step, the input ``feature ++ detection`` (``D + 6`` floats) of frames
``t - steps + 1 .. t``; its target is the ground truth of frame t as ``cxcywh_norm`` (normalised by that frame's
image size). With per-step loss (exp3), every step also carries its own frame's target and a mask.

Which windows exist follows the split (``rolo_batch.splits``):

- training windows: every frame of the window is an input frame of the split, and the supervised steps (the last
  step, or every step when the split's or the config's ``loss_steps`` is ``"all"``) are training-part frames with
  valid ground truth; a window with no supervised step is not emitted. exp1: all frames of training videos;
  exp2: windows entirely inside the first part; exp3: windows anywhere in the video, loss masked per step.
- test windows (validation loss): windows whose last frame is a test frame of the split with valid ground truth,
  last step supervised; their earlier steps may be any frame, as a tracker reads every frame before the one it
  scores.

A window never spans a gap in the frame numbers (a missing row in the features table). Ground truth is valid
when the features table says so (``gt_valid``) and the box is finite with positive width and height.

The detection input. By default each step's 6 detection values are the features table's ``detection`` column:
what the extractor chose for that frame (the most confident detection), the same value the tracker will feed at
test time. ``detection="best_iou_to_ground_truth"`` instead takes, per frame, the detection in ``detections``
with the highest IoU to that frame's ground truth, as the paper's training code did (``find_best_location``);
it USES GROUND TRUTH, so it applies to training windows only (test windows always use the table's column) and
falls back to the table's column where the frame has no valid ground truth or no detection overlaps it.

A frame without a detection (all zero in the table) enters as the previous frame's box with confidence 0, as a
missed detection enters tracking (``RoloTracker`` feeds its detection track's last box): the box says where the
target last was, the zero confidence says nothing was seen. Frames before a video's first detection stay all zero.

Everything here works on one video's rows (``FeatureFrames``), so a Ray Data ``map_batches`` over videos can call
it; ``iter_windows`` yields bounded chunks, so memory follows ``batch_size``, not the video's length x steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np

from rolo_batch import boxes
from rolo_batch.errors import ConfigError, InputError
from rolo_batch.splits import Split
from rolo_batch.tables import FeatureFrames

DetectionSource = Literal["table", "best_iou_to_ground_truth"]
Purpose = Literal["train", "test"]
DETECTION_SIZE = 6


@dataclass(frozen=True)
class WindowConfig:
    """How windows are cut.

    ``steps``: frames per window (the paper sweeps 1, 3, 6, 9). ``stride``: training windows start every
    ``stride`` frames (1: every valid frame is a target; ``steps``: non-overlapping windows as the paper's
    loader read them; larger strides trade samples for less correlated batches). Test windows use stride 1.
    ``detection``: the detection input (see the module docstring). ``loss_steps``: ``"split"`` follows the
    split; ``"last"`` or ``"all"`` override it.
    """

    steps: int = 6
    stride: int = 1
    detection: DetectionSource = "table"
    loss_steps: Literal["split", "last", "all"] = "split"

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.stride, int) or self.stride < 1:
            raise ConfigError(f"stride must be a positive integer, got {self.stride!r}")
        if self.detection not in ("table", "best_iou_to_ground_truth"):
            raise ConfigError(f"detection must be 'table' or 'best_iou_to_ground_truth', got {self.detection!r}")
        if self.loss_steps not in ("split", "last", "all"):
            raise ConfigError(f"loss_steps must be 'split', 'last' or 'all', got {self.loss_steps!r}")


@dataclass
class Windows:
    """A batch of windows (M windows, S steps, D feature size).

    ``inputs`` (M, S, D + 6) float32: per step ``feature ++ (class_id, cx, cy, w, h, confidence)``, box normalised.
    ``targets`` (M, 4) float32: the last frame's ground truth, ``cxcywh_norm``; zeros where ``weights`` is 0.
    ``weights`` (M,) float32: 1 where the last step is supervised (0 only for exp3 windows ending in test frames).
    ``step_targets`` (M, S, 4) float32 ``cxcywh_norm`` per step, zeros where ``step_mask`` is False.
    ``step_mask`` (M, S) bool: steps whose target enters the loss. ``video`` (M,) str and ``last_frame`` (M,)
    int32: the key of each window (frame numbers 1-based as in OTB).
    """

    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    step_targets: np.ndarray
    step_mask: np.ndarray
    video: np.ndarray
    last_frame: np.ndarray

    def __len__(self) -> int:
        return len(self.inputs)

    def to_batch(self) -> dict[str, np.ndarray]:
        """The columns as a dict of numpy arrays (a Ray Data batch; the keys ``objective`` reads)."""
        return {"inputs": self.inputs, "targets": self.targets, "weights": self.weights,
                "step_targets": self.step_targets, "step_mask": self.step_mask, "video": self.video,
                "last_frame": self.last_frame}

    @classmethod
    def empty(cls, steps: int, feature_dim: int) -> "Windows":
        return cls(np.zeros((0, steps, feature_dim + DETECTION_SIZE), np.float32), np.zeros((0, 4), np.float32),
                   np.zeros(0, np.float32), np.zeros((0, steps, 4), np.float32), np.zeros((0, steps), bool),
                   np.zeros(0, dtype=object), np.zeros(0, np.int32))

    @classmethod
    def concat(cls, parts: list["Windows"]) -> "Windows":
        """One batch from several (all with the same steps and feature size; at least one part)."""
        if not parts:
            raise ValueError("Windows.concat needs at least one part")
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in
                     ("inputs", "targets", "weights", "step_targets", "step_mask", "video", "last_frame")))


# --- per-frame inputs and targets ------------------------------------------------------------------------

def valid_targets(frames: FeatureFrames) -> np.ndarray:
    """``(N,)`` bool: the frame's ground truth can be a target (``gt_valid`` and a finite box of positive size)."""
    if len(frames) == 0:
        return np.zeros(0, bool)
    return np.asarray(frames.gt_valid, bool) & boxes.valid_mask(frames.gt_boxes_xywh_px)


def target_boxes(frames: FeatureFrames) -> np.ndarray:
    """``(N, 4)`` float32 ground truth as ``cxcywh_norm`` by each frame's image size; NaN rows where invalid."""
    if len(frames) == 0:
        return np.zeros((0, 4), np.float32)
    out = boxes.xywh_px_to_cxcywh_norm(frames.gt_boxes_xywh_px, frames.image_wh).astype(np.float32)
    out[~valid_targets(frames)] = np.nan
    return out


def detection_inputs(frames: FeatureFrames, source: DetectionSource = "table") -> np.ndarray:
    """``(N, 6)`` float32 detection input per frame (rows in frame order): the table's ``detection`` column, or
    (``source="best_iou_to_ground_truth"``, uses ground truth) the frame's detection with the highest IoU to its
    ground truth, falling back to the column where no detection overlaps a valid ground-truth box; frames with
    no detection carry the previous box forward (``carry_forward_missing``)."""
    if source == "table":
        return carry_forward_missing(frames.detection)
    chosen = np.asarray(frames.detection, np.float32).copy()
    gt = target_boxes(frames)
    for i in np.flatnonzero(valid_targets(frames)):
        candidates = np.asarray(frames.detections[i], np.float32).reshape(-1, DETECTION_SIZE)
        if len(candidates) == 0:
            continue
        ious = boxes.iou_xywh(_unit_xywh(candidates[:, 1:5]), np.repeat(_unit_xywh(gt[i:i + 1]), len(candidates), 0))
        best = int(np.argmax(ious))
        if ious[best] > 0:
            chosen[i] = candidates[best]
    return carry_forward_missing(chosen)


def carry_forward_missing(detections: np.ndarray) -> np.ndarray:
    """``(N, 6)`` detections in frame order, where a row with confidence 0 and no box (nothing detected) takes
    the previous row's box with confidence 0 (see the module docstring); a copy."""
    out = np.asarray(detections, np.float32).copy()
    missing = (out[:, 5] <= 0) & ~(out[:, 3:5] > 0).any(axis=1)
    for i in np.flatnonzero(missing):
        if i > 0:
            out[i, 1:5] = out[i - 1, 1:5]
    return out


def _unit_xywh(cxcywh_norm: np.ndarray) -> np.ndarray:
    """``cxcywh_norm`` boxes as ``xywh`` in a unit frame (the same normalised units)."""
    return boxes.cxcywh_norm_to_xywh_px(cxcywh_norm, (1.0, 1.0))


# --- which windows ---------------------------------------------------------------------------------------

def _sorted_frames(frames: FeatureFrames) -> FeatureFrames:
    """The rows in frame order; repeated frame numbers are an ``InputError``."""
    order = np.argsort(np.asarray(frames.frame), kind="stable")
    numbers = np.asarray(frames.frame)[order]
    if len(numbers) > 1 and (np.diff(numbers) == 0).any():
        raise InputError(f"frame {int(numbers[np.flatnonzero(np.diff(numbers) == 0)[0]])} appears more than once",
                         video=frames.video)
    if (order == np.arange(len(order))).all():
        return frames
    return FeatureFrames(video=frames.video, frame=numbers, image_wh=frames.image_wh[order],
                         feature=frames.feature[order], detection=frames.detection[order],
                         detections=[frames.detections[i] for i in order],
                         gt_boxes_xywh_px=frames.gt_boxes_xywh_px[order], gt_valid=frames.gt_valid[order])


def _window_rows(ends: np.ndarray, steps: int) -> np.ndarray:
    """``(M, steps)`` row indices of the windows ending at rows ``ends``."""
    return ends[:, None] - (steps - 1) + np.arange(steps)[None, :]


def _all_in_window(mask: np.ndarray, ends: np.ndarray, steps: int) -> np.ndarray:
    """``(M,)`` bool: ``mask`` holds on every row of each window (by a running count, O(N))."""
    running = np.concatenate([[0], np.cumsum(~mask)])
    return running[ends + 1] - running[ends + 1 - steps] == 0


def plan_windows(frames: FeatureFrames, split: Split, config: WindowConfig,
                 purpose: Purpose = "train") -> tuple[np.ndarray, np.ndarray]:
    """The windows of one video (rows in frame order): ``(M,)`` last-row indices and ``(M, S)`` step mask."""
    steps, n = config.steps, len(frames)
    if n < steps:
        return np.zeros(0, np.int64), np.zeros((0, steps), bool)
    frame_numbers = np.asarray(frames.frame, np.int64)
    ends = np.arange(steps - 1, n)
    keep = frame_numbers[ends] - frame_numbers[ends - steps + 1] == steps - 1
    valid = valid_targets(frames)
    if purpose == "test":
        targets = split.test_mask(frames.video, frame_numbers) & valid
        step_mask = np.zeros((len(ends), steps), bool)
        step_mask[:, -1] = targets[ends]
    elif purpose == "train":
        keep &= (ends - (steps - 1)) % config.stride == 0
        keep &= _all_in_window(split.input_mask(frames.video, frame_numbers), ends, steps)
        targets = split.target_mask(frames.video, frame_numbers, valid)
        loss_steps = split.loss_steps if config.loss_steps == "split" else config.loss_steps
        if loss_steps == "all":
            step_mask = targets[_window_rows(ends, steps)]
        else:
            step_mask = np.zeros((len(ends), steps), bool)
            step_mask[:, -1] = targets[ends]
    else:
        raise ConfigError(f"purpose must be 'train' or 'test', got {purpose!r}")
    keep &= step_mask.any(axis=1)
    return ends[keep], step_mask[keep]


# --- building them ---------------------------------------------------------------------------------------

def iter_windows(frames: FeatureFrames, split: Split, config: WindowConfig, *, purpose: Purpose = "train",
                 batch_size: int = 256) -> Iterator[Windows]:
    """Windows of one video in chunks of at most ``batch_size`` (in frame order); nothing if it has none."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    frames = _sorted_frames(frames)
    ends, step_mask = plan_windows(frames, split, config, purpose)
    if len(ends) == 0:
        return
    source: DetectionSource = config.detection if purpose == "train" else "table"
    per_frame = np.concatenate([np.asarray(frames.feature, np.float32), detection_inputs(frames, source)], axis=1)
    targets = np.nan_to_num(target_boxes(frames), nan=0.0)
    for start in range(0, len(ends), batch_size):
        chunk_ends, chunk_mask = ends[start:start + batch_size], step_mask[start:start + batch_size]
        rows = _window_rows(chunk_ends, config.steps)
        step_targets = np.where(chunk_mask[..., None], targets[rows], 0.0).astype(np.float32)
        yield Windows(
            inputs=per_frame[rows],
            targets=step_targets[:, -1].copy(),
            weights=chunk_mask[:, -1].astype(np.float32),
            step_targets=step_targets,
            step_mask=chunk_mask.copy(),
            video=np.full(len(chunk_ends), frames.video, dtype=object),
            last_frame=np.asarray(frames.frame, np.int32)[chunk_ends],
        )


def build_windows(frames: FeatureFrames, split: Split, config: WindowConfig, *,
                  purpose: Purpose = "train") -> Windows:
    """All windows of one video as one batch (``iter_windows`` concatenated; empty when none)."""
    parts = list(iter_windows(frames, split, config, purpose=purpose, batch_size=max(len(frames), 1)))
    return Windows.concat(parts) if parts else Windows.empty(config.steps, frames.feature_dim)
