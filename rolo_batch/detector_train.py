"""Detector training: the YOLO v1 network of ``rolo_batch.detector`` learns the tracked targets, data-parallel
on Ray Train, from the ground-truth boxes of the frames a split lets train.

Design. The objective, the augmentation and the quality metric are plain functions without Ray, tested on hand-built
cases: ``yolo_v1_loss`` (coordinates, objectness of the responsible predictor, no-object, class; one target per
frame, class-agnostic "target" unless classes are given), ``augment`` (zoom/shift/flip with the box following the
pixels, colour jitter with almost no hue change) and ``detection_quality`` (VOC AP@0.5 and the mean IoU of each
frame's most confident detection). Data goes through Ray Data, as ROLO training's windows do: ``index_videos``
opens every video on the cluster (listing and ground truth), the driver applies the split (``plan_samples``:
training frames are ``Split.target_mask`` frames, held-out frames are ``Split.test_mask`` frames, both only
with valid ground truth) and writes its manifest, and ``samples_dataset`` decodes just those frames on the
cluster, resized once to the network's input exactly as ``Detector.preprocess`` does, and keeps them in the
object store for every epoch. Augmentation runs in each worker's batch collation (Ray Data's prefetch threads),
seeded by (seed, epoch, video, frame): reproducible, different every epoch, whatever the sharding.
``train_loop_per_worker`` is the Ray Train loop (DDP, AdamW with warm-up and cosine decay, per-epoch report,
held-out evaluation every ``eval_every`` epochs with each worker scoring its shard and the matches gathered
for one AP, checkpoints of model + optimizer + history, resume after a worker failure or on a re-run), built
on the Ray Train plumbing it shares with ROLO training (``rolo_batch.raytrain``). ``run_detector_training`` is
the driver; it writes ``<out>/detectors/<run>/``: ``detector.pt`` (``detector.save_detector``: what
``build_detector(None, uri)`` and ``rolo-batch extract --weights`` load), ``split.json``, ``config.json``,
``metrics.json``/``metrics.csv``, ``training.png`` and Ray Train's checkpoints (``ray/``). There are no
pretrained weights to start from, so what makes minutes of CPU enough is: a small input (the targets of
tracking videos are large: 128 px sees them), a cheap backbone, the head's biases started at the mean
training box (``init_head_bias``), objectness target 1 and no dropout; ``FAST_CPU_OVERRIDES`` is the
configuration measured on the demo data. The exported detector is the last epoch's: the held-out frames are
the split's test frames, and choosing the best epoch on them would tune on the test set.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping, NamedTuple, Sequence

import cv2
import numpy as np

from rolo_batch import splits, storage
from rolo_batch.console import Progress, warn
from rolo_batch.errors import ConfigError, InputError, StorageError

if TYPE_CHECKING:
    from rolo_batch.datasets import VideoRef
    from rolo_batch.detector import DetectorConfig

ObjectnessTarget = Literal["iou", "one"]


# --- the objective: YOLO v1's loss, pure torch -----------------------------------------------------------

@dataclass(frozen=True)
class LossConfig:
    """The weights of YOLO v1's sum-squared loss (Redmon et al. 2016, eq. 3).

    ``lambda_coord`` (5): weight of the box terms of the responsible predictor; ``lambda_noobj`` (0.5): weight
    of the confidence of every predictor that is not responsible for an object (most of them, so without it
    "nothing here" drowns the few positives). ``objectness_target``: what the responsible predictor's
    confidence regresses to. ``"one"`` (the default): plain objectness, so a detector trained for a few
    minutes from scratch already gives its target confident detections (with ``"iou"`` a fresh detector's
    boxes overlap little, its confidence targets stay near 0 for many epochs and few detections pass
    ``conf_threshold``; measured on the demo data, see the module docstring). ``"iou"``: the paper's and
    darknet's ``rescore=1``, the IoU of its box with the target (detached), so confidence ranks boxes by
    expected overlap; better for long training.
    """

    lambda_coord: float = 5.0
    lambda_noobj: float = 0.5
    objectness_target: ObjectnessTarget = "one"

    def __post_init__(self) -> None:
        for name in ("lambda_coord", "lambda_noobj"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if self.objectness_target not in ("iou", "one"):
            raise ConfigError(f"objectness_target must be 'iou' or 'one', got {self.objectness_target!r}")


def split_head(head, config):
    """The raw head ``(N, S*S*(C + B*5))`` as its three parts, views without copies:
    class probabilities ``(N, S*S, C)``, confidences ``(N, S*S, B)``, boxes ``(N, S*S, B, 4)`` as
    ``x, y`` (centre offset in the cell, 0-1) and ``sqrt(w), sqrt(h)`` (of the size as a fraction of the image)."""
    n, s, b, c = head.shape[0], config.grid, config.boxes_per_cell, config.num_classes
    cells = s * s
    return (head[:, :cells * c].reshape(n, cells, c), head[:, cells * c:cells * (c + b)].reshape(n, cells, b),
            head[:, cells * (c + b):].reshape(n, cells, b, 4))


def target_cells(boxes_cxcywh_norm, grid: int):
    """For ``(N, 4)`` boxes ``cxcywh_norm`` (finite): the cell holding each centre, ``(N,)`` int64
    (``row * S + col``), and the box in head coordinates ``(N, 4)``: the centre's offset in that cell and the
    square roots of the size."""
    import torch

    centre = boxes_cxcywh_norm[:, :2] * grid
    col_row = centre.floor().clamp(0, grid - 1)
    offset = centre - col_row
    root = boxes_cxcywh_norm[:, 2:].clamp(min=0).sqrt()
    cell = (col_row[:, 1] * grid + col_row[:, 0]).long()
    return cell, torch.cat([offset, root], dim=1)


def head_boxes_to_cxcywh(coords, cell, grid: int):
    """Boxes in head coordinates ``(..., 4)`` (``x, y`` in the cell, ``sqrt(w), sqrt(h)``) of cells ``cell``
    (broadcastable to ``coords[..., 0]``) as ``cxcywh_norm``, exactly as ``detector.decode`` reads them."""
    import torch

    col, row = (cell % grid).to(coords.dtype), (cell // grid).to(coords.dtype)
    return torch.stack([(coords[..., 0] + col) / grid, (coords[..., 1] + row) / grid,
                        coords[..., 2] ** 2, coords[..., 3] ** 2], dim=-1)


def iou_cxcywh(a, b):
    """Element-wise IoU of broadcastable ``(..., 4)`` torch boxes ``cxcywh`` (0 where the union is empty)."""
    import torch

    a_lo, a_hi = a[..., :2] - a[..., 2:] / 2, a[..., :2] + a[..., 2:] / 2
    b_lo, b_hi = b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2
    inter = (torch.minimum(a_hi, b_hi) - torch.maximum(a_lo, b_lo)).clamp(min=0).prod(-1)
    union = a[..., 2:].prod(-1) + b[..., 2:].prod(-1) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def responsible_predictor(coords, cell, target_coords, grid: int):
    """Which of the ``B`` predictors of the target's cell is responsible for it, and their IoUs.

    ``coords`` ``(N, S*S, B, 4)`` predicted boxes (head coordinates), ``cell`` ``(N,)``, ``target_coords``
    ``(N, 4)`` (head coordinates, as ``target_cells`` gives). The predictor whose box has the highest IoU with
    the target; where every predictor's IoU is 0 (early in training), the one with the smallest squared error
    of its coordinates (darknet's rule). Returns ``(index (N,) int64, iou (N, B))``, without gradient.
    """
    import torch

    with torch.no_grad():
        n = coords.shape[0]
        mine = coords[torch.arange(n, device=coords.device), cell]  # (N, B, 4)
        predicted = head_boxes_to_cxcywh(mine, cell[:, None], grid)
        target = head_boxes_to_cxcywh(target_coords[:, None, :], cell[:, None], grid)
        iou = iou_cxcywh(predicted, target)
        error = (mine - target_coords[:, None, :]).square().sum(-1)
        score = torch.where((iou > 0).any(dim=1, keepdim=True), iou, -error)
        return score.argmax(dim=1), iou


def yolo_v1_loss(head, boxes_cxcywh_norm, present, class_ids, config, loss: LossConfig = LossConfig()):
    """YOLO v1's loss for one target (or none) per image, vectorised over the batch.

    ``head`` ``(N, S*S*(C + B*5))`` raw network output in ``detector``'s layout; ``boxes_cxcywh_norm``
    ``(N, 4)`` the target box per image (normalised centre and size; ignored where not present, may be NaN
    there); ``present`` ``(N,)`` bool, whether the image shows its target; ``class_ids`` ``(N,)`` int64, the
    target's class (0 for a class-agnostic detector); ``config`` the ``DetectorConfig``.

    Per image, summed over cells and predictors, then averaged over the batch:

    - ``lambda_coord * [(x - x^)^2 + (y - y^)^2 + (sqrt w - sqrt w^)^2 + (sqrt h - sqrt h^)^2]`` for the
      responsible predictor (``responsible_predictor``) of the cell holding the target's centre;
    - ``(conf - t)^2`` for that predictor, ``t`` = its IoU with the target (detached) or 1
      (``loss.objectness_target``);
    - ``lambda_noobj * conf^2`` for every other predictor of every cell (all of them in an image without
      target);
    - ``sum_c (p_c - [c = class])^2`` in the target's cell.

    Returns ``(loss, metrics)``: the scalar loss, and per-batch sums of each term (``coord_sum``,
    ``object_sum``, ``noobject_sum``, ``class_sum``, unweighted), ``iou_sum`` (IoU of the responsible
    predictor's box with the target) and ``num_targets``, ``num_images``: sums, so that batches and workers
    add up.
    """
    import torch

    probs, conf, coords = split_head(head, config)
    n, cells, b = conf.shape
    present = present.to(torch.bool)
    weight = present.to(head.dtype)
    safe_boxes = torch.where(present[:, None], boxes_cxcywh_norm.to(head.dtype),
                             torch.full_like(boxes_cxcywh_norm, 0.5, dtype=head.dtype))
    cell, target_coords = target_cells(safe_boxes, config.grid)
    chosen, iou = responsible_predictor(coords, cell, target_coords, config.grid)
    rows = torch.arange(n, device=head.device)

    coord_err = (coords[rows, cell, chosen] - target_coords).square().sum(-1) * weight
    object_target = iou[rows, chosen] if loss.objectness_target == "iou" else torch.ones_like(weight)
    object_err = (conf[rows, cell, chosen] - object_target).square() * weight
    responsible = torch.zeros(n, cells, b, dtype=torch.bool, device=head.device)
    responsible[rows, cell, chosen] = present
    noobject_err = conf.square().masked_fill(responsible, 0.0).sum(dim=(1, 2))
    one_hot = torch.nn.functional.one_hot(class_ids.long().clamp(0, config.num_classes - 1),
                                          config.num_classes).to(head.dtype)
    class_err = (probs[rows, cell] - one_hot).square().sum(-1) * weight

    per_image = loss.lambda_coord * coord_err + object_err + loss.lambda_noobj * noobject_err + class_err
    total = per_image.mean() if n else head.sum() * 0.0
    with torch.no_grad():
        metrics = {"coord_sum": float(coord_err.sum()), "object_sum": float(object_err.sum()),
                   "noobject_sum": float(noobject_err.sum()), "class_sum": float(class_err.sum()),
                   "iou_sum": float((iou[rows, chosen] * weight).sum()), "num_targets": float(weight.sum()),
                   "num_images": float(n)}
    return total, metrics


def encode_head(boxes_cxcywh_norm, present, class_ids, config, *, predictor: int = 0):
    """The head a perfect detector would output for these targets (the inverse of ``decode`` for one box per
    image): in the target's cell, predictor ``predictor`` holds the box with confidence 1 and the class
    probability is one-hot; everything else is 0. ``(N, S*S*(C + B*5))`` float32 torch. For tests and as the
    definition of what the loss asks for."""
    import torch

    boxes_cxcywh_norm = torch.as_tensor(boxes_cxcywh_norm, dtype=torch.float32)
    present = torch.as_tensor(present, dtype=torch.bool)
    class_ids = torch.as_tensor(class_ids, dtype=torch.int64)
    n = len(boxes_cxcywh_norm)
    head = torch.zeros(n, config.head_size)
    probs, conf, coords = split_head(head, config)
    cell, target_coords = target_cells(torch.nan_to_num(boxes_cxcywh_norm, nan=0.5), config.grid)
    rows = torch.arange(n)[present]
    probs[rows, cell[present], class_ids[present]] = 1.0
    conf[rows, cell[present], predictor] = 1.0
    coords[rows, cell[present], predictor] = target_coords[present]
    return head


# --- augmentation, numpy/cv2 -----------------------------------------------------------------------------

@dataclass(frozen=True)
class AugmentConfig:
    """Random augmentation of a training frame and its box; every range is multiplied by ``strength``
    (0 turns augmentation off, 1 is the default, more augments harder).

    - ``scale``: zoom by a factor in ``[1 - scale, 1 + scale]`` about the frame centre; ``translate``: shift
      by up to this fraction of the frame size in x and y. The part of the frame moved in from outside is
      ``fill`` grey. The box moves with the pixels and is clipped to the frame; when less than
      ``min_visible`` of its area stays inside, the frame counts as showing no target.
    - ``flip``: probability of a horizontal flip (not scaled by ``strength``, only turned off by 0).
    - ``brightness``, ``contrast``, ``saturation``: factors in ``[1 - x, 1 + x]``.
    - ``hue``: shift of at most this many OpenCV hue units (0-180 scale). Kept very small on purpose: the
      look-alike distractors of the synthetic videos (and the confusers of real ones) differ from the target
      mainly by hue (12-25 units in the generator), so a large hue jitter would teach the detector that a
      distractor is the target.
    """

    strength: float = 1.0
    scale: float = 0.25
    translate: float = 0.2
    flip: float = 0.5
    brightness: float = 0.35
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 2.0
    min_visible: float = 0.5
    fill: int = 114

    def __post_init__(self) -> None:
        for name in ("strength", "scale", "translate", "brightness", "contrast", "saturation", "hue"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ConfigError(f"augmentation {name} must be a number >= 0, got {value!r}")
        for name in ("flip", "min_visible"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
                raise ConfigError(f"augmentation {name} must be in [0, 1], got {value!r}")
        if self.strength * self.scale >= 1:
            raise ConfigError(f"augmentation scale x strength must be below 1 (a zoom factor stays positive), "
                              f"got {self.scale} x {self.strength}")
        if not isinstance(self.fill, int) or not 0 <= self.fill <= 255:
            raise ConfigError(f"augmentation fill must be a grey level 0-255, got {self.fill!r}")

    @property
    def enabled(self) -> bool:
        return self.strength > 0


@dataclass(frozen=True)
class Affine:
    """``x' = sx * x + tx``, ``y' = sy * y + ty`` in normalised frame coordinates (0-1, edges); ``sx < 0``
    flips horizontally."""

    sx: float = 1.0
    sy: float = 1.0
    tx: float = 0.0
    ty: float = 0.0

    def pixel_matrix(self, width: int, height: int) -> np.ndarray:
        """The 2x3 ``cv2.warpAffine`` matrix (pixel-centre coordinates: pixel ``i`` covers edges ``[i, i+1]``)."""
        ax, ay = self.sx, self.sy
        bx, by = self.tx * width, self.ty * height
        return np.array([[ax, 0.0, bx + 0.5 * ax - 0.5], [0.0, ay, by + 0.5 * ay - 0.5]], np.float64)

    def apply_box(self, box_cxcywh_norm: np.ndarray) -> np.ndarray:
        """The box ``(4,)`` ``cxcywh_norm`` mapped (not clipped)."""
        cx, cy, w, h = (float(v) for v in box_cxcywh_norm)
        return np.array([self.sx * cx + self.tx, self.sy * cy + self.ty, abs(self.sx) * w, abs(self.sy) * h])


def random_affine(rng: np.random.Generator, aug: AugmentConfig) -> Affine:
    """A random zoom about the centre, shift and horizontal flip, as ``aug`` allows."""
    s = 1.0 + rng.uniform(-1, 1) * aug.scale * aug.strength
    dx, dy = rng.uniform(-1, 1, 2) * aug.translate * aug.strength
    flip = aug.strength > 0 and rng.random() < aug.flip
    # zoom about the centre, shift, then flip about the centre: x' = f * (s * (x - 0.5) + dx) + 0.5
    f = -1.0 if flip else 1.0
    return Affine(sx=f * s, sy=s, tx=0.5 - f * (0.5 * s - dx), ty=0.5 - 0.5 * s + dy)


def transform_box(box_cxcywh_norm: np.ndarray, present: bool, affine: Affine,
                  min_visible: float) -> tuple[np.ndarray, bool]:
    """The box under ``affine``, clipped to the frame: ``(box (4,) cxcywh_norm, present)``; not present (box
    zeros) when it was not, or when less than ``min_visible`` of its mapped area lies inside the frame."""
    if not present or not np.isfinite(box_cxcywh_norm).all():
        return np.zeros(4, np.float32), False
    cx, cy, w, h = affine.apply_box(box_cxcywh_norm)
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, 1.0), min(y1, 1.0)
    area = w * h
    inside = max(cx1 - cx0, 0.0) * max(cy1 - cy0, 0.0)
    if area <= 0 or inside < min_visible * area or inside <= 0:
        return np.zeros(4, np.float32), False
    return np.array([(cx0 + cx1) / 2, (cy0 + cy1) / 2, cx1 - cx0, cy1 - cy0], np.float32), True


def jitter_colour(image: np.ndarray, rng: np.random.Generator, aug: AugmentConfig) -> np.ndarray:
    """Brightness, contrast, saturation (and a tiny hue shift) of an ``(H, W, 3)`` uint8 BGR image."""
    k = aug.strength
    brightness = 1.0 + rng.uniform(-1, 1) * aug.brightness * k
    contrast = 1.0 + rng.uniform(-1, 1) * aug.contrast * k
    saturation = 1.0 + rng.uniform(-1, 1) * aug.saturation * k
    hue = rng.uniform(-1, 1) * aug.hue * k
    out = image.astype(np.float32)
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)[..., None]
    out = gray + saturation * (out - gray)
    mean = float(gray.mean())
    out = (out - mean) * contrast + mean
    out *= brightness
    out = np.clip(out, 0, 255).astype(np.uint8)
    if abs(hue) >= 0.5:
        hsv = cv2.cvtColor(out, cv2.COLOR_BGR2HSV)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + int(round(hue))) % 180).astype(np.uint8)
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    return out


def augment(image: np.ndarray, box_cxcywh_norm: np.ndarray, present: bool, rng: np.random.Generator,
            aug: AugmentConfig) -> tuple[np.ndarray, np.ndarray, bool]:
    """One augmented training sample: ``image`` ``(H, W, 3)`` uint8 BGR (any size; the same size comes back),
    its target box ``(4,)`` ``cxcywh_norm`` and whether the target is in the frame. Deterministic given the
    state of ``rng``. Geometry first (``random_affine``: zoom, shift, flip; the box follows and is clipped,
    ``transform_box``), then colour (``jitter_colour``)."""
    if not aug.enabled:
        box = np.asarray(box_cxcywh_norm, np.float32)
        return image, (box if present else np.zeros(4, np.float32)), bool(present)
    affine = random_affine(rng, aug)
    height, width = image.shape[:2]
    warped = cv2.warpAffine(image, affine.pixel_matrix(width, height), (width, height), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(aug.fill,) * 3)
    box, present = transform_box(np.asarray(box_cxcywh_norm, np.float64), bool(present), affine, aug.min_visible)
    return jitter_colour(warped, rng, aug), box, present


def sample_rng(seed: int, epoch: int, video: str, frame: int) -> np.random.Generator:
    """The generator of one sample's augmentation in one epoch: the same whatever worker, batch or order the
    sample lands in, different every epoch."""
    return np.random.default_rng([seed, epoch, zlib.crc32(video.encode()), int(frame)])


# --- detection quality -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DetectionQuality:
    """Detection quality on a set of frames with one ground-truth box each.

    ``ap50``: average precision at IoU 0.5 (VOC, all-point interpolation) over every detection of every
    frame ranked by confidence (with classes: the mean over the ground truth's classes of each class's AP);
    ``mean_iou``: mean over frames of the IoU of the frame's most confident detection (any class) with its
    ground truth, 0 for a frame without detection; ``frames``, ``detections``: counts.
    """

    ap50: float
    mean_iou: float
    frames: int
    detections: int


class FrameMatch(NamedTuple):
    """One frame's detections matched against its ground truth (``match_frame``): per detection, highest
    confidence first, ``confidence``, ``true_positive`` and ``classes``; the target's ``gt_class`` (None:
    class-agnostic) and ``best_iou``, the IoU of the most confident detection (0 without detection)."""

    confidence: np.ndarray
    true_positive: np.ndarray
    classes: np.ndarray
    gt_class: int | None
    best_iou: float


def match_frame(detections: np.ndarray, gt_cxcywh_norm: np.ndarray, gt_class: int | None = None,
                iou_threshold: float = 0.5) -> FrameMatch:
    """VOC matching of one frame's detections against its one ground-truth box.

    ``detections`` ``(K, 6)`` rows ``class_id, cx, cy, w, h, confidence`` (``decode``'s format, normalised);
    ``gt_cxcywh_norm`` ``(4,)``; ``gt_class``: the target's class (None: any class matches). In order of
    decreasing confidence (ties in input order), the first detection (of the target's class) with
    IoU >= ``iou_threshold`` is a true positive; every other one, duplicates included, a false positive.
    """
    from rolo_batch import boxes

    dets = np.asarray(detections, np.float64).reshape(-1, 6)
    if len(dets) == 0:
        return FrameMatch(np.zeros(0), np.zeros(0, bool), np.zeros(0, np.int64), gt_class, 0.0)
    dets = dets[np.argsort(-dets[:, 5], kind="stable")]
    gt = np.asarray(gt_cxcywh_norm, np.float64).reshape(1, 4)
    gt_xywh = np.concatenate([gt[:, :2] - gt[:, 2:] / 2, gt[:, 2:]], axis=1)
    det_xywh = np.concatenate([dets[:, 1:3] - dets[:, 3:5] / 2, dets[:, 3:5]], axis=1)
    ious = boxes.iou_xywh(det_xywh, np.repeat(gt_xywh, len(dets), axis=0))
    classes = dets[:, 0].astype(np.int64)
    hit = ious >= iou_threshold
    if gt_class is not None:
        hit &= classes == int(gt_class)
    tp = np.zeros(len(dets), bool)
    if hit.any():
        tp[int(np.argmax(hit))] = True
    return FrameMatch(dets[:, 5], tp, classes, gt_class, float(ious[0]))


def average_precision(confidence: np.ndarray, true_positive: np.ndarray, num_ground_truth: int) -> float:
    """VOC all-point interpolated AP: the area under the precision-recall curve of the detections ranked by
    ``confidence`` (``(K,)``; ties keep their order), precision made monotone (at each recall, the best
    precision at that recall or beyond). ``true_positive`` ``(K,)`` bool; ``num_ground_truth``: the objects
    (recall's denominator). 0 when there are no detections; NaN when there is no ground truth."""
    if num_ground_truth <= 0:
        return float("nan")
    confidence = np.asarray(confidence, np.float64).reshape(-1)
    tp = np.asarray(true_positive, bool).reshape(-1)
    if len(confidence) == 0:
        return 0.0
    tp = tp[np.argsort(-confidence, kind="stable")]
    tp_cum = np.cumsum(tp)
    recall = np.concatenate([[0.0], tp_cum / num_ground_truth, [1.0]])
    precision = np.concatenate([[0.0], tp_cum / np.arange(1, len(tp) + 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def detection_quality(detections: Sequence[np.ndarray], gt_cxcywh_norm: np.ndarray,
                      gt_class: np.ndarray | None = None, iou_threshold: float = 0.5) -> DetectionQuality:
    """AP at ``iou_threshold`` and mean best-detection IoU of per-frame ``detections`` (each ``(K, 6)``,
    ``decode``'s rows) against ``gt_cxcywh_norm`` ``(N, 4)``, one ground-truth box per frame (every frame
    counts: give only frames with valid ground truth). ``gt_class`` ``(N,)``: the class of each frame's
    target (None: class-agnostic)."""
    gt = np.asarray(gt_cxcywh_norm, np.float64).reshape(-1, 4)
    if len(detections) != len(gt):
        raise ValueError(f"{len(detections)} frames of detections but {len(gt)} ground-truth boxes")
    if gt_class is not None and len(gt_class) != len(gt):
        raise ValueError(f"{len(gt_class)} ground-truth classes for {len(gt)} frames")
    return quality_from_matches([match_frame(d, g, None if gt_class is None else int(gt_class[i]), iou_threshold)
                                 for i, (d, g) in enumerate(zip(detections, gt))])


def quality_from_matches(matches: Sequence[FrameMatch]) -> DetectionQuality:
    """``DetectionQuality`` from ``match_frame`` results (possibly gathered from several workers)."""
    frames = len(matches)
    if not frames:
        return DetectionQuality(float("nan"), float("nan"), 0, 0)
    confidence = np.concatenate([m.confidence for m in matches])
    tp = np.concatenate([m.true_positive for m in matches])
    mean_iou = sum(m.best_iou for m in matches) / frames
    gt_classes = [m.gt_class for m in matches]
    if all(c is None for c in gt_classes):
        ap = average_precision(confidence, tp, frames)
    else:
        classes = np.concatenate([m.classes for m in matches])
        wanted = sorted({int(c) for c in gt_classes if c is not None})
        ap = float(np.mean([average_precision(confidence[classes == c], tp[classes == c],
                                              sum(g == c for g in gt_classes)) for c in wanted]))
    return DetectionQuality(ap50=ap, mean_iou=mean_iou, frames=frames, detections=int(len(confidence)))


# --- configuration ---------------------------------------------------------------------------------------

Gpu = Literal["auto", "on", "off"]
LrSchedule = Literal["cosine", "constant"]
AGNOSTIC_CLASS = "target"


@dataclass(frozen=True)
class DetectorTrainConfig:
    """Everything a detector training run needs; built once (from CLI flags) and passed explicitly.

    Data: ``data_uri`` an OTB-layout collection or folder of video files (local or S3); ``videos`` keeps only
    these; ``split``/``first_part``/``train_list``/``test_list`` as ``splits.get_split`` (exp2: the first
    part of every video trains, the rest is held out; exp1: the training videos train, the test videos are
    held out). Only frames with valid ground truth are used. ``video_classes``: ``(video, class)`` pairs
    for a detector with classes (every training video needs one); None: one class, ``"target"``.

    Network: ``detector`` a preset of ``rolo_batch.detector.PRESETS`` with ``overrides`` (``DetectorConfig``
    fields: ``input_size``, ``grid``, ``backbone``, ``feature_dim``, ``dropout``, ``conf_threshold``, ...;
    the classes come from ``video_classes``). ``init_weights``: a detector checkpoint or Darknet weights to
    start from (a checkpoint brings its own architecture; overrides may then only change non-architecture
    fields such as dropout or thresholds); None: seeded random weights, with the head's biases set to the
    training boxes' mean (see ``init_head_bias``); a pretrained architecture (``efficientnet-yolo``) starts
    its backbone from ``backbone_weights`` (None: the ImageNet weights of the pinned package).

    Optimisation: AdamW, ``batch_size`` frames per worker per step (global batch ``batch_size * workers``),
    ``learning_rate`` with a linear warm-up over ``warmup_epochs`` and then ``lr_schedule`` (cosine decays
    to ``min_lr_fraction`` of it at the last epoch), ``grad_clip`` (0: none). ``loss``: YOLO v1's weights;
    ``augment``: the augmentation (``AugmentConfig.strength`` scales it).

    Ray: ``workers`` data-parallel Ray Train workers, ``threads_per_worker`` torch threads each (None: the
    cores of the worker's machine divided among the workers on it), ``gpu``: ``"auto"`` uses a GPU per worker
    when the cluster has them. ``checkpoint_every``/``eval_every``: epochs between checkpoints / held-out
    evaluations (the last epoch always does both; evaluation runs the detector on every held-out frame,
    which costs about a third of a training epoch per two held-out frames per training frame).
    ``max_failures``: worker-group restarts, each from the last checkpoint. ``cache_frames``: decode the
    frames once (resized to the input size) and keep them in Ray's object store for every epoch; off, every
    epoch decodes again (collections larger than the cluster's memory and disk). ``run``: the run's name;
    re-running the same name under the same ``out_uri`` resumes it.
    """

    data_uri: str
    out_uri: str
    run: str = "detector"
    detector: str = "yolo-tiny"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    init_weights: str | None = None
    backbone_weights: str | None = None
    split: str = "exp2"
    first_part: str = "otb30"
    train_list: str | None = None
    test_list: str | None = None
    videos: tuple[str, ...] | None = None
    video_classes: tuple[tuple[str, str], ...] | None = None
    epochs: int = 60
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    warmup_epochs: float = 1.0
    lr_schedule: LrSchedule = "cosine"
    min_lr_fraction: float = 0.05
    grad_clip: float = 0.0
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    workers: int = 1
    threads_per_worker: int | None = None
    gpu: Gpu = "auto"
    checkpoint_every: int = 5
    eval_every: int = 5
    max_failures: int = 0
    seed: int = 0
    cache_frames: bool = True
    shuffle_buffer: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.overrides, Mapping) and not isinstance(self.overrides, dict):
            object.__setattr__(self, "overrides", dict(self.overrides))
        for name in ("epochs", "batch_size", "workers", "checkpoint_every", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("max_failures", "shuffle_buffer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        if self.threads_per_worker is not None and (not isinstance(self.threads_per_worker, int)
                                                    or self.threads_per_worker < 1):
            raise ConfigError(f"threads_per_worker must be an integer >= 1 or None, got {self.threads_per_worker!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        for name in ("weight_decay", "warmup_epochs", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.min_lr_fraction <= 1:
            raise ConfigError(f"min_lr_fraction must be in [0, 1], got {self.min_lr_fraction!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.gpu not in ("auto", "on", "off"):
            raise ConfigError(f"gpu must be auto, on or off, got {self.gpu!r}")
        if not self.run or "/" in self.run or self.run.startswith(".") or self.run != self.run.strip():
            raise ConfigError(f"run name {self.run!r} must be a plain name (no '/', not starting with '.')")
        if not isinstance(self.loss, LossConfig) or not isinstance(self.augment, AugmentConfig):
            raise ConfigError("loss must be a LossConfig and augment an AugmentConfig")
        if self.videos is not None:
            object.__setattr__(self, "videos", tuple(self.videos))
            if not self.videos:
                raise ConfigError("videos, when given, must name at least one video")
        if self.video_classes is not None:
            pairs = tuple((str(v), str(c)) for v, c in (dict(self.video_classes).items()
                                                        if isinstance(self.video_classes, Mapping)
                                                        else self.video_classes))
            if not pairs or any(not v or not c for v, c in pairs) or len({v for v, _ in pairs}) != len(pairs):
                raise ConfigError("video_classes must give one non-empty class per video (no video twice)")
            object.__setattr__(self, "video_classes", pairs)
        self.split_config()  # an unknown split or bad lists fail here
        clashing = {"num_classes", "class_names"} & set(self.overrides)
        if clashing:
            raise ConfigError(f"set the classes with video_classes, not overrides {sorted(clashing)}")
        if self.init_weights is None:
            self.detector_config()  # validates preset and overrides now, before any cluster work

    @property
    def run_uri(self) -> str:
        return storage.join(self.out_uri, DETECTORS_DIR, self.run)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The detector's classes: sorted classes of ``video_classes``, or ``("target",)``."""
        if self.video_classes is None:
            return (AGNOSTIC_CLASS,)
        return tuple(sorted({c for _, c in self.video_classes}))

    def class_id(self, video: str) -> int | None:
        """The class index of ``video``'s target (0 for a class-agnostic detector), None if it has none."""
        if self.video_classes is None:
            return 0
        name = dict(self.video_classes).get(video)
        return None if name is None else self.class_names.index(name)

    def detector_config(self, base: "DetectorConfig | None" = None) -> "DetectorConfig":
        """The network to train: ``base`` (an initial checkpoint's config) or the preset, with ``overrides``
        and the classes applied (validated; ``ConfigError`` names the problem)."""
        from rolo_batch import detector as det

        classes = self.class_names
        if base is None:
            return det.detector_config(self.detector, **{**self.overrides, "num_classes": len(classes),
                                                         "class_names": classes})
        unknown = sorted(set(self.overrides) - {f.name for f in dataclasses.fields(det.DetectorConfig)})
        if unknown:
            raise ConfigError(f"unknown detector setting(s) {unknown}")
        return dataclasses.replace(base, **{**self.overrides, "num_classes": len(classes), "class_names": classes})

    def split_config(self) -> "splits.Split":
        options: dict[str, Any] = {}
        if self.train_list:
            options["train_list"] = self.train_list
        if self.test_list:
            options["test_list"] = self.test_list
        if self.split != "exp1":
            options["first_part"] = self.first_part
        return splits.get_split(self.split, **options)


DETECTORS_DIR = "detectors"
DETECTOR_FILE = "detector.pt"
SPLIT_FILE = "split.json"
PLOT_FILE = "training.png"

# yolo-tiny's layout at 128 px with narrower convolutions (about 48M multiply-adds per frame: 0.6x yolo-tiny's
# backbone at 128 px, 0.2x at its 224 px), a 4x4 grid and no dropout. On the demo data (8 synthetic videos of
# 150 frames, 320x240, exp2: 400 training and 800 held-out frames), 60 epochs of batch 16 at lr 2e-3 reached
# AP@0.5 0.73-0.82 on the held-out frames over three seeds/runs in about 3 minutes of training on 2 CPU cores
# (yolo-tiny's backbone at 128 px: 0.77-0.82 for 1.6x the time; at 96 px with a 3x3 grid: about 0.7).
FAST_CPU_OVERRIDES: Mapping[str, Any] = MappingProxyType({
    "input_size": 128, "grid": 4, "dropout": 0.0,
    "backbone": ("16x3/2", "24x3", "M", "48x3", "M", "96x3", "M", "192x3", "M", "64x1")})


@dataclass(frozen=True)
class TrainingDefaults:
    """What ``train-detector`` uses for a network unless told otherwise: epochs, peak learning rate and
    augmentation strength."""

    epochs: int
    learning_rate: float
    augment: float


# yolo-tiny's were measured on the demo (see FAST_CPU_OVERRIDES). efficientnet-yolo's were chosen on real video by
# a rule that never reads the test frames: train on the first ninth of each of the 14 real sequences, pick the
# highest AP@0.5 on the rest of their first third (README, "Real video"). A pretrained backbone needs fewer
# epochs and a smaller rate; harder augmentation keeps it from learning where each target was.
TRAINING_DEFAULTS: Mapping[str, TrainingDefaults] = MappingProxyType({
    "yolo-tiny": TrainingDefaults(60, 2e-3, 1.0),
    "yolo-v1-small": TrainingDefaults(60, 2e-3, 1.0),
    "efficientnet-yolo": TrainingDefaults(10, 1e-3, 2.0),
})


def init_head_bias(net, mean_box_cxcywh_norm: Sequence[float]) -> None:
    """Start the head at an informed guess instead of zero: every predictor's box at its cell's centre with
    the mean training box's size, class probabilities ``1 / C``, confidences 0 (the head's weights stay as
    initialised). Without this, a fresh head predicts zero-size boxes whose IoU with every target is 0, and
    the first epochs go to learning the typical size."""
    import torch

    config = net.config
    if config.pretrained:
        net.set_head_prior(mean_box_cxcywh_norm)
        return
    with torch.no_grad():
        probs, conf, coords = split_head(net.head.bias.data[None], config)
        probs.fill_(1.0 / config.num_classes)
        conf.zero_()
        coords[..., 0:2] = 0.5
        coords[..., 2] = math.sqrt(max(float(mean_box_cxcywh_norm[2]), 1e-4))
        coords[..., 3] = math.sqrt(max(float(mean_box_cxcywh_norm[3]), 1e-4))


# --- data through Ray Data -------------------------------------------------------------------------------

@dataclass(frozen=True)
class VideoIndex:
    """What the driver needs of one video, read on the cluster: ``frames`` ``(N,)`` OTB frame numbers,
    ``boxes_xywh_px`` ``(N, 4)`` aligned ground truth (NaN where none), ``valid`` ``(N,)``, frame size in
    pixels; or ``error``, why the video cannot be used."""

    ref: "VideoRef"
    frames: np.ndarray
    boxes_xywh_px: np.ndarray
    valid: np.ndarray
    width: int
    height: int
    error: str | None = None


def _index_row(row: dict) -> dict:
    """Ray Data UDF: open one video (its listing and ground truth; no frame but the first is decoded)."""
    from rolo_batch import datasets

    ref = datasets.VideoRef(row["name"], row["kind"], row["uri"], row["groundtruth_uri"] or None)
    try:
        video = datasets.open_video(ref)
        gt = video.groundtruth
        width, height = video.image_size
        return {**row, "frames": np.asarray(video.frame_numbers, np.int64),
                "boxes": np.asarray(gt.boxes_xywh_px, np.float64).reshape(-1), "valid": np.asarray(gt.valid, bool),
                "width": int(width), "height": int(height), "error": ""}
    except (InputError, StorageError) as exc:
        return {**row, "frames": np.zeros(0, np.int64), "boxes": np.zeros(0), "valid": np.zeros(0, bool),
                "width": 0, "height": 0, "error": str(exc)}


def index_videos(refs: Sequence["VideoRef"]) -> list[VideoIndex]:
    """Open every video on the cluster (Ray Data, one task per video) and bring back its frame numbers and
    ground truth; a video that cannot be opened comes back with its ``error``."""
    import ray

    items = [{"name": r.name, "kind": r.kind, "uri": r.uri, "groundtruth_uri": r.groundtruth_uri or ""}
             for r in refs]
    rows = ray.data.from_items(items, override_num_blocks=len(items)).map(_index_row, num_cpus=0.5).take_all()
    by_name = {row["name"]: row for row in rows}
    out = []
    for ref in refs:
        row = by_name[ref.name]
        out.append(VideoIndex(ref, np.asarray(row["frames"], np.int64),
                              np.asarray(row["boxes"], np.float64).reshape(-1, 4), np.asarray(row["valid"], bool),
                              int(row["width"]), int(row["height"]), row["error"] or None))
    return out


@dataclass(frozen=True)
class SampleSet:
    """The frames of one purpose (``"train"`` or ``"test"``) as Ray Data work items: per item, one video's
    ``indices`` (0-based positions), frame numbers, boxes ``cxcywh_norm`` and class id; plus counts."""

    items: list[dict]
    frames: int
    videos: int


def plan_samples(index: Sequence[VideoIndex], split: "splits.Split", config: DetectorTrainConfig,
                 purpose: Literal["train", "test"], chunk: int = 64) -> SampleSet:
    """The frames ``purpose`` uses: training frames (``split.target_mask``: the training part, valid ground
    truth) or held-out frames (``split.test_mask`` and valid ground truth), as work items of at most
    ``chunk`` frames (a video file is one item: it is decoded sequentially)."""
    from rolo_batch import boxes

    items, frames, videos = [], 0, 0
    for video in index:
        name = video.ref.name
        if purpose == "train":
            mask = split.target_mask(name, video.frames, video.valid)
        else:
            mask = split.test_mask(name, video.frames) & video.valid
        chosen = np.flatnonzero(mask)
        if not len(chosen):
            continue
        class_id = config.class_id(name)
        if class_id is None:
            raise ConfigError(f"video {name!r} has no class in video_classes (classes: {list(config.class_names)})")
        norm = boxes.xywh_px_to_cxcywh_norm(video.boxes_xywh_px[chosen], (video.width, video.height))
        step = len(chosen) if video.ref.kind == "file" else chunk
        for start in range(0, len(chosen), step):
            part = chosen[start:start + step]
            items.append({"name": name, "kind": video.ref.kind, "uri": video.ref.uri,
                          "groundtruth_uri": video.ref.groundtruth_uri or "", "indices": part.tolist(),
                          "frames": video.frames[part].tolist(),
                          "boxes": norm[start:start + step].astype(np.float32).tolist(), "class_id": class_id})
        frames += len(chosen)
        videos += 1
    return SampleSet(items, frames, videos)


def decode_samples(batch: Mapping[str, np.ndarray], input_size: int,
                   failures_uri: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: decode the frames of each work item and resize them to ``input_size`` x ``input_size``
    exactly as ``Detector.preprocess`` does (bilinear, aspect ratio not kept; still BGR uint8). Yields one
    batch per item: ``image`` ``(n, S, S, 3)`` uint8, ``box`` ``(n, 4)`` float32 ``cxcywh_norm``,
    ``class_id`` ``(n,)``, ``video_key`` ``(n,)`` (CRC-32 of the name) and ``frame`` ``(n,)``.

    An item with a frame that cannot be read (missing, truncated) fails alone: with ``failures_uri`` its error
    is recorded there (``raytrain.record_failure``) and the item gives no frames; without, it raises."""
    from rolo_batch import datasets, raytrain

    for i in range(len(batch["name"])):
        name = str(batch["name"][i])
        ref = datasets.VideoRef(name, str(batch["kind"][i]), str(batch["uri"][i]),
                                str(batch["groundtruth_uri"][i]) or None)
        indices = [int(k) for k in batch["indices"][i]]
        images = np.empty((len(indices), input_size, input_size, 3), np.uint8)
        try:
            video = datasets.open_video(ref)
            for row, index in enumerate(indices):
                images[row] = cv2.resize(np.ascontiguousarray(video.read_frame(index)), (input_size, input_size),
                                         interpolation=cv2.INTER_LINEAR)
        except (InputError, StorageError) as exc:
            if failures_uri is None:
                raise
            raytrain.record_failure(failures_uri, name, "frames", exc)
            continue
        yield {"image": images, "box": np.asarray([list(b) for b in batch["boxes"][i]], np.float32).reshape(-1, 4),
               "class_id": np.full(len(indices), int(batch["class_id"][i]), np.int64),
               "video_key": np.full(len(indices), zlib.crc32(name.encode()), np.int64),
               "frame": np.asarray(batch["frames"][i], np.int64)}


def samples_dataset(samples: SampleSet, input_size: int, cache: bool, failures_uri: str | None = None):
    """A Ray Data dataset of decoded, resized frames (``decode_samples``' columns), materialised in the
    object store when ``cache``; ``failures_uri``: where a video whose frames fail records its error."""
    import ray

    ds = ray.data.from_items(samples.items, override_num_blocks=max(1, len(samples.items)))
    ds = ds.map_batches(decode_samples, fn_kwargs={"input_size": input_size, "failures_uri": failures_uri},
                        batch_size=1, num_cpus=0.5)
    return ds.materialize() if cache else ds


# --- one step, no Ray ------------------------------------------------------------------------------------

def images_to_tensor(images_bgr: np.ndarray):
    """``(N, S, S, 3)`` uint8 BGR -> ``(N, 3, S, S)`` float32 RGB 0-1 in channels-last memory (what
    ``Detector.preprocess`` gives after its resize, in oneDNN's fast layout on a CPU)."""
    import torch

    rgb = np.ascontiguousarray(np.asarray(images_bgr, np.uint8)[..., ::-1])
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float().div_(255.0)


def make_batch(images_bgr: np.ndarray, boxes_cxcywh_norm: np.ndarray, present: np.ndarray,
               class_ids: np.ndarray) -> dict:
    """A training batch of torch tensors: ``image`` (``images_to_tensor``), ``box`` ``(N, 4)`` float32,
    ``present`` ``(N,)`` bool, ``class_id`` ``(N,)`` int64."""
    import torch

    return {"image": images_to_tensor(images_bgr),
            "box": torch.from_numpy(np.array(boxes_cxcywh_norm, np.float32).reshape(-1, 4)),
            "present": torch.from_numpy(np.array(present, bool)),
            "class_id": torch.from_numpy(np.array(class_ids, np.int64))}


def augment_batch(batch: Mapping[str, np.ndarray], aug: AugmentConfig, seed: int, epoch: int) -> dict:
    """Augment a numpy batch of ``decode_samples`` rows (each sample with ``sample_rng``) into ``make_batch``
    tensors."""
    images, out_boxes, present = [], [], []
    for i in range(len(batch["image"])):
        rng = np.random.default_rng([seed, epoch, int(batch["video_key"][i]), int(batch["frame"][i])])
        image, box, shown = augment(batch["image"][i], batch["box"][i], True, rng, aug)
        images.append(image)
        out_boxes.append(box)
        present.append(shown)
    return make_batch(np.stack(images), np.stack(out_boxes), np.asarray(present), batch["class_id"])


def objective(model, batch: Mapping[str, Any], loss: LossConfig = LossConfig()):
    """``(loss, metrics)`` of a ``YoloNet`` (or DDP wrapper) on a ``make_batch`` batch (``yolo_v1_loss``)."""
    inner = getattr(model, "module", model)
    device = next(inner.parameters()).device
    _, head = model(batch["image"].to(device, non_blocking=True))
    return yolo_v1_loss(head, batch["box"].to(device), batch["present"].to(device), batch["class_id"].to(device),
                        inner.config, loss)


def train_step(model, optimizer, batch: Mapping[str, Any], loss: LossConfig = LossConfig(),
               grad_clip: float = 0.0) -> dict[str, float]:
    """One optimisation step; returns ``yolo_v1_loss``'s metrics plus ``loss_sum`` (loss x images)."""
    import torch

    model.train()
    optimizer.zero_grad(set_to_none=True)
    value, metrics = objective(model, batch, loss)
    value.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return {**metrics, "loss_sum": float(value.detach()) * metrics["num_images"]}


def evaluate_batch(model, batch: Mapping[str, Any], loss: LossConfig = LossConfig()
                   ) -> tuple[dict[str, float], list[FrameMatch]]:
    """Held-out metrics of one batch: loss sums, and ``match_frame`` per frame of ``decode``'s detections
    (the config's thresholds: what extraction will see)."""
    import torch

    from rolo_batch.detector import decode

    inner = getattr(model, "module", model)
    inner.eval()
    device = next(inner.parameters()).device
    with torch.no_grad():
        _, head = inner(batch["image"].to(device, non_blocking=True))
        value, metrics = yolo_v1_loss(head, batch["box"].to(device), batch["present"].to(device),
                                      batch["class_id"].to(device), inner.config, loss)
    detections = decode(head, inner.config)
    agnostic = inner.config.num_classes == 1
    gt = batch["box"].cpu().numpy()
    classes = batch["class_id"].cpu().numpy()
    matches = [match_frame(d, gt[i], None if agnostic else int(classes[i])) for i, d in enumerate(detections)]
    return {**metrics, "loss_sum": float(value) * metrics["num_images"]}, matches


def learning_rate_at(config: Mapping[str, Any], progress: float) -> float:
    """The learning rate ``progress`` epochs into training (fractional): linear warm-up over
    ``warmup_epochs``, then constant or cosine down to ``min_lr_fraction`` at ``epochs``."""
    base = config["learning_rate"]
    warm = config["warmup_epochs"]
    factor = min(1.0, (progress + 1e-9) / warm) if warm > 0 else 1.0
    if config["lr_schedule"] == "cosine":
        t = min(max((progress - warm) / max(config["epochs"] - warm, 1e-9), 0.0), 1.0)
        low = config["min_lr_fraction"]
        factor *= low + (1 - low) * 0.5 * (1 + math.cos(math.pi * t))
    return base * factor


# --- the Ray Train loop ----------------------------------------------------------------------------------

class _TrainCollate:
    """``iter_torch_batches`` collate function of one epoch: augments in Ray Data's prefetch threads, so that
    augmentation overlaps the training step."""

    def __init__(self, aug: AugmentConfig, seed: int, epoch: int) -> None:
        self.aug, self.seed, self.epoch = aug, seed, epoch

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict:
        return augment_batch(batch, self.aug, self.seed, self.epoch)


class _EvalCollate:
    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict:
        return make_batch(batch["image"], batch["box"], np.ones(len(batch["image"]), bool), batch["class_id"])


def _collate(fn):
    """``fn`` as the collate class Ray Data expects (numpy batches in)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch):
            return fn(batch)

    return Collate()


def transfer_weights(source, target) -> list[str]:
    """Copy every tensor of ``source``'s state dict into ``target`` (both ``YoloNet``) where names and shapes
    agree; returns the names left as they were (the head, when the class count or grid differs). Any other
    mismatch is a ``ConfigError``: the overrides changed the architecture away from the initial weights."""
    import torch

    mine, theirs = target.state_dict(), source.state_dict()
    kept = [k for k in mine if k not in theirs or tuple(theirs[k].shape) != tuple(mine[k].shape)]
    foreign = [k for k in kept if not k.startswith("head.")]
    if foreign:
        raise ConfigError(f"the initial weights do not fit {target.config.name} as configured: tensors "
                          f"{foreign[:4]} differ in shape; keep the backbone, input size, grid and feature "
                          f"size of the initial detector")
    with torch.no_grad():
        for key, value in mine.items():
            if key not in kept:
                value.copy_(theirs[key].to(value.dtype))
    return kept


def _initial_net(loop: Mapping[str, Any]):
    """The network every worker starts from (identical on every worker; DDP checks it): seeded random
    weights with the head's prior (``init_head_bias``), then the initial weights copied in where they fit
    (``transfer_weights``: a head for other classes stays fresh)."""
    from rolo_batch import detector as det

    config = det.DetectorConfig.from_dict(loop["detector"])
    net = det.new_net(config, loop["seed"], backbone_weights=loop["backbone_weights"])
    init_head_bias(net, loop["mean_box"])
    if loop["init_weights"]:
        source_config = det.DetectorConfig.from_dict(loop["init_config"]) if loop["init_config"] else None
        source = det.build_detector(source_config, loop["init_weights"])
        fresh = transfer_weights(source.net, net)
        if fresh and _rank() == 0:
            print(f"train-detector: {', '.join(fresh)} start fresh (the initial detector has another head)",
                  flush=True)
    return net


def _default_threads(workers_here: int) -> int:
    """Torch threads for a worker: this machine's cores shared among its workers (Ray itself sets one thread
    per requested CPU, which would leave the other cores of a one-worker CPU run idle)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, workers_here))


def _rank() -> int:
    import ray.train

    return ray.train.get_context().get_world_rank()


def train_loop_per_worker(loop: dict) -> None:
    """The Ray Train worker loop (see the module docstring). ``loop`` is ``_loop_config``'s dict."""
    import ray.train
    import ray.train.torch
    import torch

    from rolo_batch import raytrain

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(loop["threads"] or _default_threads(context.get_local_world_size()))
    torch.manual_seed(loop["seed"])
    device = ray.train.torch.get_device() if loop["use_gpu"] else torch.device("cpu")
    net = _initial_net(loop)
    if device.type == "cpu":
        net = net.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(net, move_to_device=device)
    inner = getattr(model, "module", model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=loop["learning_rate"], weight_decay=loop["weight_decay"])
    loss_config = LossConfig(**loop["loss"])
    aug = AugmentConfig(**loop["augment"])

    start_epoch, history = 0, []
    state = raytrain.load_checkpoint_state()
    if state is not None:
        inner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        if rank == 0:
            print(f"train-detector: resuming from the checkpoint of epoch {start_epoch}", flush=True)

    train_shard = ray.train.get_dataset_shard("train")
    test_shard = ray.train.get_dataset_shard("test")
    steps_per_epoch = max(1, math.ceil(loop["train_frames"] / world / loop["batch_size"]))
    for epoch in range(start_epoch, loop["epochs"]):
        started = time.perf_counter()
        totals: dict[str, float] = {}
        step, lr = 0, float("nan")
        for batch in train_shard.iter_torch_batches(
                batch_size=loop["batch_size"], collate_fn=_collate(_TrainCollate(aug, loop["seed"], epoch)),
                local_shuffle_buffer_size=loop["shuffle_buffer"] or None, local_shuffle_seed=loop["seed"] + epoch,
                prefetch_batches=2):
            lr = learning_rate_at(loop, epoch + min(step / steps_per_epoch, 1.0))
            for group in optimizer.param_groups:
                group["lr"] = lr
            for key, value in train_step(model, optimizer, batch, loss_config, loop["grad_clip"]).items():
                totals[key] = totals.get(key, 0.0) + value
            step += 1
        seconds = time.perf_counter() - started
        local_images = totals.get("num_images", 0.0)
        totals = raytrain.all_reduce_sums({k: totals.get(k, 0.0) for k in _SUM_KEYS})
        last = epoch + 1 == loop["epochs"]
        record = {"epoch": epoch + 1, "session": loop["session"], **_rates(totals, "train_"),
                  "lr": lr, "train_frames": int(totals["num_images"]),
                  "frames_per_s_per_worker": local_images / seconds if seconds > 0 else 0.0,
                  "epoch_seconds": seconds, "workers": world}
        if last or (epoch + 1) % loop["eval_every"] == 0:
            record.update(_evaluate(model, test_shard, loop["batch_size"], loss_config))
        else:
            record.update({"ap50": float("nan"), "mean_iou": float("nan"), "test_loss": float("nan"),
                           "test_frames": 0, "test_detections": 0, "eval_seconds": 0.0})
        history.append(record)
        if rank == 0:
            print(f"train-detector: epoch {epoch + 1}/{loop['epochs']}  loss {record['train_loss']:.3f}  "
                  f"train IoU {record['train_iou']:.3f}  held-out AP50 {record['ap50']:.3f}  "
                  f"mean IoU {record['mean_iou']:.3f}  {record['frames_per_s_per_worker']:.0f} frames/s/worker",
                  flush=True)
        if last or (epoch + 1) % loop["checkpoint_every"] == 0:
            raytrain.report(record, {"epoch": epoch, "model": inner.state_dict(),
                                     "optimizer": optimizer.state_dict(), "history": history})
        else:
            raytrain.report(record)


_SUM_KEYS = ("loss_sum", "coord_sum", "object_sum", "noobject_sum", "class_sum", "iou_sum", "num_targets",
             "num_images")


def _rates(totals: Mapping[str, float], prefix: str) -> dict[str, float]:
    """Per-image loss and per-target terms from summed metrics."""
    images, targets = max(totals["num_images"], 1.0), max(totals["num_targets"], 1.0)
    return {f"{prefix}loss": totals["loss_sum"] / images, f"{prefix}coord": totals["coord_sum"] / targets,
            f"{prefix}object": totals["object_sum"] / targets, f"{prefix}noobject": totals["noobject_sum"] / images,
            f"{prefix}class": totals["class_sum"] / targets, f"{prefix}iou": totals["iou_sum"] / targets}


def _evaluate(model, shard, batch_size: int, loss: LossConfig) -> dict[str, float]:
    """AP50, mean IoU and loss on this worker's share of the held-out frames, combined over workers."""
    from rolo_batch import raytrain

    started = time.perf_counter()
    totals: dict[str, float] = {}
    matches: list[FrameMatch] = []
    for batch in shard.iter_torch_batches(batch_size=max(batch_size, 64), collate_fn=_collate(_EvalCollate()),
                                          prefetch_batches=1):
        metrics, frame_matches = evaluate_batch(model, batch, loss)
        for key in _SUM_KEYS:
            totals[key] = totals.get(key, 0.0) + metrics[key]
        matches.extend(frame_matches)
    totals = raytrain.all_reduce_sums({k: totals.get(k, 0.0) for k in _SUM_KEYS})
    gathered = [m for part in raytrain.all_gather(matches) for m in part]
    quality = quality_from_matches(gathered)
    return {"ap50": quality.ap50, "mean_iou": quality.mean_iou,
            "test_loss": totals["loss_sum"] / max(totals["num_images"], 1.0), "test_frames": quality.frames,
            "test_detections": quality.detections, "eval_seconds": time.perf_counter() - started}


# --- the driver ------------------------------------------------------------------------------------------

@dataclass
class DetectorTrainResult:
    """What a run produced: the exported detector (``detector_uri``, loadable with
    ``build_detector(None, uri)`` and ``rolo-batch extract --weights``), its ``detector_id``, the per-epoch
    history of every session of the run, the epoch this session started after (0 for a fresh run), and the
    held-out quality of the final detector."""

    run_uri: str
    detector_uri: str
    detector_id: str
    history: list[dict]
    resumed_from_epoch: int
    skipped_videos: dict[str, str] = field(default_factory=dict)

    @property
    def final(self) -> dict:
        return self.history[-1]

    @property
    def ap50(self) -> float:
        return self.final["ap50"]

    @property
    def mean_iou(self) -> float:
        return self.final["mean_iou"]


def run_detector_training(config: DetectorTrainConfig, log=print) -> DetectorTrainResult:
    """Train the detector on the connected Ray cluster (see the module docstring); resumes an interrupted
    run of the same name. ``log`` receives one-line progress messages (None: silent). The same seed, worker
    count and threads per worker give the same detector (``raytrain.ordered_data``)."""
    from rolo_batch import raytrain

    with raytrain.ordered_data():
        return _run_detector_training(config, log)


def _run_detector_training(config: DetectorTrainConfig, log) -> DetectorTrainResult:
    from rolo_batch import datasets, raytrain
    from rolo_batch import detector as det

    say = log or (lambda *_: None)
    finished = finished_run(config)
    if finished is not None:
        say(f"train-detector: {config.run_uri} already finished its {config.epochs} epochs with these settings")
        return finished
    split = config.split_config()
    base, init_config = None, None
    if config.init_weights:
        with storage.open_input_file(config.init_weights) as handle:
            is_checkpoint = det.looks_like_checkpoint(handle.read(4))
        if is_checkpoint:
            base = det.build_detector(None, config.init_weights).config
        else:  # Darknet weights: the preset (its classes) with the architecture overrides describes the file
            init_config = det.detector_config(config.detector, **config.overrides).to_dict()
    detector_config = config.detector_config(base)

    refs = datasets.discover(config.data_uri, list(config.videos) if config.videos else None).require_videos()
    say(f"train-detector: indexing {len(refs)} video(s) under {config.data_uri}")
    index = index_videos(refs)
    skipped = {v.ref.name: v.error for v in index if v.error}
    for name, error in skipped.items():
        say(f"train-detector: skipping video {name}: {error}")
    index = [v for v in index if not v.error]
    if not index:
        raise InputError("no usable video", path=config.data_uri)
    train_set = plan_samples(index, split, config, "train")
    test_set = plan_samples(index, split, config, "test")
    if not train_set.frames:
        raise ConfigError(f"split {split.name} leaves no training frames with valid ground truth among "
                          f"{len(index)} video(s)")
    if not test_set.frames:
        raise ConfigError(f"split {split.name} leaves no held-out frames with valid ground truth among "
                          f"{len(index)} video(s): AP cannot be measured")
    for line in splits.first_part_warnings(split, {v.ref.name: len(v.frames) for v in index}):
        warn(line)
    manifest = splits.split_manifest(split, {v.ref.name: v.frames for v in index})
    splits.write_manifest(storage.join(config.run_uri, SPLIT_FILE), manifest)
    mean_box = np.mean([b for item in train_set.items for b in item["boxes"]], axis=0)
    storage.write_text(storage.join(config.run_uri, "config.json"), _json({
        "train": _config_dict(config), "detector": detector_config.to_dict(), "split": split.describe(),
        "train_frames": train_set.frames, "train_videos": train_set.videos, "test_frames": test_set.frames,
        "test_videos": test_set.videos, "skipped_videos": skipped}))
    say(f"train-detector: {train_set.frames} training frames of {train_set.videos} video(s), {test_set.frames} "
        f"held-out frames of {test_set.videos}; decoding them at {detector_config.input_size} px")

    failures_uri = storage.join(config.run_uri, raytrain.FAILED_DIR)
    storage.delete(failures_uri)  # failures of an earlier session are not this one's
    train_ds = samples_dataset(train_set, detector_config.input_size, config.cache_frames, failures_uri)
    test_ds = samples_dataset(test_set, detector_config.input_size, config.cache_frames, failures_uri)
    use_gpu = raytrain.use_gpu(config.gpu, config.workers)
    session = raytrain.new_session()
    loop = {**_loop_config(config, detector_config, use_gpu), "session": session,
            "train_frames": train_set.frames, "mean_box": [float(v) for v in mean_box],
            "init_config": init_config}
    progress = Progress("train-detector", config.epochs, unit="epochs", interval_s=0) if log is not None else None
    state = raytrain.fit(train_loop_per_worker, loop, config.run_uri, workers=config.workers, gpu=use_gpu,
                         max_failures=config.max_failures, datasets={"train": train_ds, "test": test_ds},
                         on_epoch=progress and (lambda r: progress.set_done(int(r["epoch"]), _epoch_summary(r))))
    if progress is not None:
        progress.close()
    history = state["history"]
    net = det.make_net(detector_config)
    net.load_state_dict(state["model"])
    detector = det.Detector(net)
    detector_uri = storage.join(config.run_uri, DETECTOR_FILE)
    det.save_detector(detector, detector_uri)
    raytrain.write_metrics(config.run_uri, history, {PLOT_FILE: _training_plot(history)})
    skipped.update(raytrain.read_failures(failures_uri))
    return DetectorTrainResult(config.run_uri, detector_uri, detector.detector_id, history,
                               raytrain.resumed_from_epoch(history, session), dict(sorted(skipped.items())))


def _epoch_summary(record: Mapping[str, Any]) -> str:
    held_out = "" if math.isnan(record["ap50"]) else f", held-out AP@0.5 {record['ap50']:.3f}"
    return f"loss {record['train_loss']:.3f}, train IoU {record['train_iou']:.3f}{held_out}"


# Settings that change how a run executes, not what it computes: a finished run is reused whatever they are.
_EXECUTION_SETTINGS = ("workers", "threads_per_worker", "gpu", "max_failures", "cache_frames", "checkpoint_every")


def finished_run(config: DetectorTrainConfig) -> DetectorTrainResult | None:
    """The result of the run ``config`` names when it already finished with the same settings (its
    ``detector.pt`` and ``metrics.json`` are written after the last epoch; ``config.json`` records the settings),
    so that a re-run returns at once instead of starting Ray Train to find nothing left to do; else None."""
    from rolo_batch import detector as det

    paths = {name: storage.join(config.run_uri, name) for name in ("config.json", "metrics.json", DETECTOR_FILE)}
    if not all(storage.is_file(uri) for uri in paths.values()):
        return None
    try:
        recorded = json.loads(storage.read_text(paths["config.json"]))
        history = json.loads(storage.read_text(paths["metrics.json"]))["epochs"]
    except (ValueError, KeyError, TypeError):
        return None
    wanted = json.loads(_json(_config_dict(config)))
    same = {k: v for k, v in recorded.get("train", {}).items() if k not in _EXECUTION_SETTINGS} == \
        {k: v for k, v in wanted.items() if k not in _EXECUTION_SETTINGS}
    if not same or not history or history[-1].get("epoch") != config.epochs:
        return None
    detector = det.build_detector(None, paths[DETECTOR_FILE])
    return DetectorTrainResult(config.run_uri, paths[DETECTOR_FILE], detector.detector_id, history, len(history),
                               dict(recorded.get("skipped_videos") or {}))


def _config_dict(config: DetectorTrainConfig) -> dict:
    out = dataclasses.asdict(config)
    out["overrides"] = dict(config.overrides)
    return out


def _loop_config(config: DetectorTrainConfig, detector_config, use_gpu: bool) -> dict:
    return {"detector": detector_config.to_dict(), "init_weights": config.init_weights,
            "backbone_weights": config.backbone_weights, "epochs": config.epochs,
            "batch_size": config.batch_size, "learning_rate": config.learning_rate,
            "weight_decay": config.weight_decay, "warmup_epochs": config.warmup_epochs,
            "lr_schedule": config.lr_schedule, "min_lr_fraction": config.min_lr_fraction,
            "grad_clip": config.grad_clip, "loss": dataclasses.asdict(config.loss),
            "augment": dataclasses.asdict(config.augment), "checkpoint_every": config.checkpoint_every,
            "eval_every": config.eval_every, "seed": config.seed, "shuffle_buffer": config.shuffle_buffer,
            "use_gpu": use_gpu, "threads": config.threads_per_worker}


def _training_plot(history: list[dict]) -> bytes:
    """Training and held-out loss (left), held-out AP50 and mean IoU with training IoU (right), per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rolo_batch.raytrain import figure_png

    epochs = [h["epoch"] for h in history]
    evaluated = [h for h in history if h.get("test_frames")]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    left.plot(epochs, [h["train_loss"] for h in history], label="training loss")
    left.plot([h["epoch"] for h in evaluated], [h["test_loss"] for h in evaluated], "o-", label="held-out loss")
    left.set_xlabel("epoch")
    left.set_ylabel("YOLO v1 loss per frame")
    left.set_yscale("log")
    left.legend()
    right.plot([h["epoch"] for h in evaluated], [h["ap50"] for h in evaluated], "o-", label="held-out AP@0.5")
    right.plot([h["epoch"] for h in evaluated], [h["mean_iou"] for h in evaluated], "s-",
               label="held-out IoU of best detection")
    right.plot(epochs, [h["train_iou"] for h in history], "--", label="training IoU (responsible box)")
    right.set_xlabel("epoch")
    right.set_ylim(0, 1)
    right.legend()
    return figure_png(figure)


def _json(data: Any) -> str:
    from rolo_batch.raytrain import to_json

    return to_json(data)
