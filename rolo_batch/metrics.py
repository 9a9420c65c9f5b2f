"""OTB one-pass evaluation (OPE): success, precision and normalised precision, per video and over a set.

Everything here is plain numpy over one video's aligned arrays (no Ray): ``score_video`` scores one
(video, method), ``summarise`` averages over videos, ``scores_table`` turns the results into the scores
table. Boxes are OTB ``xywh_px`` (top-left x, y, width, height in pixels, continuous coordinates).

Two protocols (``Protocol.otb()``, ``Protocol.rolo(steps)``; ``conventions_text`` states them in words):

- ``otb``: the common toolkits' conventions (got10k, pysot). IoU thresholds 0, 0.05, ..., 1.0 (21) with
  success = IoU > threshold, so even a perfect tracker scores 0 at threshold 1.0 and its AUC is 20/21.
- ``rolo``: the ROLO paper's own scoring, to set figures beside the paper's: 20 IoU thresholds 0, ..., 0.95
  with success = IoU >= threshold, and the first ``steps`` frames of every video (which ROLO cannot predict,
  its window is not full yet) not scored.

Common to both: precision thresholds 0..50 px (51), precision = centre error <= threshold; centres are
``x + w / 2, y + h / 2`` (got10k/pysot write ``x + (w - 1) / 2``; the centre *difference* is the same);
normalised precision divides the centre offset by the ground-truth width / height per axis, thresholds
0..0.5 (51), reported as its AUC; frames whose ground truth is invalid (NaN, zero or negative size) and
frames outside the split's test frames are not scored; a frame where the tracker reports nothing (NaN box)
counts as IoU 0 and infinite centre error; boxes are not clipped to the image; a video's AUC is the mean of
its success curve; over a set, per-video curves are averaged (each video weighs the same, whatever its
length), not frames pooled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa

from rolo_batch import boxes, contracts
from rolo_batch.errors import ConfigError, InputError
from rolo_batch.tables import TrackRows

PROTOCOL_META_KEY = "rolo_batch.protocol"
PROTOCOL_NAMES = ("otb", "rolo")
PRECISION_AT_PX = 20.0
OTB_IOU_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(21))
ROLO_IOU_THRESHOLDS = OTB_IOU_THRESHOLDS[:20]
ERROR_THRESHOLDS_PX = tuple(float(i) for i in range(51))
NORM_ERROR_THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(51))


# --- protocols -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Protocol:
    """How frames are scored.

    ``iou_thresholds``: the success curve's x values; success at a threshold is ``IoU >= t`` when
    ``success_inclusive`` else ``IoU > t``. ``error_thresholds_px``: the precision curve's x values in pixels
    (must contain 20). ``norm_error_thresholds``: the normalised precision curve's x values (fractions of the
    ground-truth size). ``skip_first``: how many frames at the start of every video are not scored.
    """

    name: str
    iou_thresholds: tuple[float, ...]
    success_inclusive: bool
    error_thresholds_px: tuple[float, ...] = ERROR_THRESHOLDS_PX
    norm_error_thresholds: tuple[float, ...] = NORM_ERROR_THRESHOLDS
    skip_first: int = 0

    def __post_init__(self) -> None:
        if self.name not in PROTOCOL_NAMES:
            raise ConfigError(f"unknown scoring protocol {self.name!r}; choose one of {', '.join(PROTOCOL_NAMES)}")
        for label in ("iou_thresholds", "error_thresholds_px", "norm_error_thresholds"):
            values = np.asarray(getattr(self, label), dtype=float)
            if values.ndim != 1 or len(values) == 0 or np.any(np.diff(values) <= 0):
                raise ConfigError(f"protocol {self.name}: {label} must be a non-empty increasing sequence")
        if PRECISION_AT_PX not in self.error_thresholds_px:
            raise ConfigError(f"protocol {self.name}: error_thresholds_px must contain {PRECISION_AT_PX:g}")
        if self.skip_first < 0:
            raise ConfigError(f"protocol {self.name}: skip_first must be >= 0, got {self.skip_first}")

    @classmethod
    def otb(cls) -> "Protocol":
        """The got10k / pysot conventions: 21 IoU thresholds 0..1, success = IoU > t, every frame scored."""
        return cls("otb", OTB_IOU_THRESHOLDS, success_inclusive=False)

    @classmethod
    def rolo(cls, steps: int) -> "Protocol":
        """The ROLO paper's scoring: 20 IoU thresholds 0..0.95, success = IoU >= t, first ``steps`` frames
        of each video not scored (``steps``: the LSTM window length the track was made with, >= 1)."""
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ConfigError(f"the rolo protocol needs steps >= 1 (the LSTM window length), got {steps!r}")
        return cls("rolo", ROLO_IOU_THRESHOLDS, success_inclusive=True, skip_first=int(steps))

    @classmethod
    def named(cls, name: str, steps: int | None = None) -> "Protocol":
        """The protocol called ``name`` (``otb`` or ``rolo``; ``rolo`` needs ``steps``)."""
        if name == "otb":
            return cls.otb()
        if name == "rolo":
            if steps is None:
                raise ConfigError("the rolo protocol needs steps (the LSTM window length the track used)")
            return cls.rolo(steps)
        raise ConfigError(f"unknown scoring protocol {name!r}; choose one of {', '.join(PROTOCOL_NAMES)}")

    @property
    def tag(self) -> str:
        """A short name that ``from_tag`` reads back: ``otb`` or ``rolo/steps=6``."""
        return self.name if self.name == "otb" else f"{self.name}/steps={self.skip_first}"

    @classmethod
    def from_tag(cls, tag: str) -> "Protocol":
        """Inverse of ``tag``."""
        name, _, rest = tag.strip().partition("/")
        if name == "rolo":
            if not rest.startswith("steps=") or not rest[6:].isdigit():
                raise ConfigError(f"protocol tag {tag!r} should look like rolo/steps=<n>")
            return cls.rolo(int(rest[6:]))
        return cls.named(name)

    @property
    def precision_index(self) -> int:
        """Index of the 20 px threshold in the precision curve."""
        return self.error_thresholds_px.index(PRECISION_AT_PX)


def conventions_text(protocol: Protocol) -> str:
    """The protocol's conventions in words, one sentence per line, for reports and docs."""
    iou = protocol.iou_thresholds
    comparison = ">=" if protocol.success_inclusive else ">"
    lines = [
        f"Protocol `{protocol.tag}`"
        + (" (common toolkits: got10k / pysot conventions)." if protocol.name == "otb"
           else " (the ROLO paper's own scoring, for comparison with the paper's figures)."),
        f"Success: a frame succeeds at IoU threshold t when IoU {comparison} t; {len(iou)} thresholds "
        f"{iou[0]:g}, {iou[1]:g}, ..., {iou[-1]:g}. AUC = mean of the success curve"
        + (" (a perfect tracker scores 20/21, since IoU 1 is not > 1)." if not protocol.success_inclusive
           else "."),
        f"Precision: centre error <= t pixels, thresholds {protocol.error_thresholds_px[0]:g} to "
        f"{protocol.error_thresholds_px[-1]:g} px; reported at {PRECISION_AT_PX:g} px. "
        "Centre = (x + w/2, y + h/2) of the (x, y, w, h) pixel box.",
        "Normalised precision: centre offset divided by the ground-truth width and height per axis, "
        f"thresholds {protocol.norm_error_thresholds[0]:g} to {protocol.norm_error_thresholds[-1]:g}; "
        "reported as the mean over thresholds (AUC).",
        "One-pass evaluation: the tracker gets the first frame's box only"
        + ("; that frame is scored like any other." if protocol.skip_first == 0 else
           f"; the first {protocol.skip_first} frames of each video (the LSTM's first window, steps="
           f"{protocol.skip_first}) are not predicted and not scored."),
        "Frames without valid ground truth (NaN, zero or negative size) and frames the split used for "
        "training are not scored.",
        "A frame where the tracker reports no box counts as IoU 0 and infinite centre error; boxes are not "
        "clipped to the image.",
        "Over a set of videos, the per-video curves are averaged (every video weighs the same); frames are "
        "summed. Speed (fps) = timed frames / total tracking time: the tracking step only; for methods that read "
        "the features table (YOLO only, YOLO + Kalman, ROLO) it excludes the detector, which ran at extraction.",
    ]
    return "\n".join(lines)


def protocol_metadata(protocol: Protocol) -> dict[str, str]:
    """The scores table's file metadata: the protocol tag on the first line, then its conventions."""
    return {PROTOCOL_META_KEY: f"{protocol.tag}\n{conventions_text(protocol)}"}


# --- per-frame measures ----------------------------------------------------------------------------------

def centre_errors_px(gt_boxes_xywh_px: np.ndarray, pred_boxes_xywh_px: np.ndarray) -> np.ndarray:
    """``(N,)`` Euclidean distance in pixels between box centres; ``inf`` where the prediction is not finite."""
    gt, pred = boxes.as_boxes(gt_boxes_xywh_px), boxes.as_boxes(pred_boxes_xywh_px)
    with np.errstate(invalid="ignore"):
        errors = np.linalg.norm(boxes.centers_xywh(pred) - boxes.centers_xywh(gt), axis=1)
    return np.where(np.isfinite(pred).all(axis=1), errors, np.inf)


def normalised_centre_errors(gt_boxes_xywh_px: np.ndarray, pred_boxes_xywh_px: np.ndarray) -> np.ndarray:
    """``(N,)`` L2 norm of the centre offset divided by the ground-truth (w, h) per axis (unitless);
    ``inf`` where the prediction is not finite. Meaningless where the ground truth has no positive size
    (such frames are never scored)."""
    gt, pred = boxes.as_boxes(gt_boxes_xywh_px), boxes.as_boxes(pred_boxes_xywh_px)
    with np.errstate(invalid="ignore", divide="ignore"):
        offset = (boxes.centers_xywh(pred) - boxes.centers_xywh(gt)) / gt[:, 2:]
        errors = np.linalg.norm(offset, axis=1)
    return np.where(np.isfinite(pred).all(axis=1), errors, np.inf)


def success_curve(ious: np.ndarray, thresholds: Sequence[float], inclusive: bool) -> np.ndarray:
    """``(T,)`` fraction of the ``(N,)`` IoUs above each threshold (``>=`` when ``inclusive``); NaN if N = 0."""
    ious = np.asarray(ious, dtype=float)[:, None]
    thr = np.asarray(thresholds, dtype=float)[None, :]
    return _rate(ious >= thr if inclusive else ious > thr, len(thresholds))


def precision_curve(errors: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """``(T,)`` fraction of the ``(N,)`` errors ``<=`` each threshold; NaN if N = 0."""
    errors = np.asarray(errors, dtype=float)[:, None]
    return _rate(errors <= np.asarray(thresholds, dtype=float)[None, :], len(thresholds))


def _rate(hits: np.ndarray, width: int) -> np.ndarray:
    if hits.shape[0] == 0:
        return np.full(width, np.nan)
    return hits.mean(axis=0)


def scored_mask(frame_numbers: np.ndarray, gt_boxes_xywh_px: np.ndarray, gt_valid: np.ndarray,
                protocol: Protocol, allowed_frames: Iterable[int] | np.ndarray | None = None) -> np.ndarray:
    """``(N,)`` bool: the frames that count. Valid ground truth (flag set, finite, positive size), in
    ``allowed_frames`` (1-based frame numbers, e.g. a split's test frames; ``None`` = all), and not among the
    protocol's ``skip_first`` lowest frame numbers of the video."""
    frames = np.asarray(frame_numbers)
    mask = np.asarray(gt_valid, dtype=bool) & boxes.valid_mask(gt_boxes_xywh_px)
    if allowed_frames is not None:
        mask &= np.isin(frames, np.fromiter(allowed_frames, dtype=np.int64))
    if protocol.skip_first:
        skipped = np.argsort(frames, kind="stable")[:protocol.skip_first]
        mask[skipped] = False
    return mask


# --- results ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class VideoScore:
    """The evaluation of one method on one video, or (``video is None``) averaged over ``videos`` videos.

    ``success_curve`` ``(len(protocol.iou_thresholds),)`` and ``precision_curve``
    ``(len(protocol.error_thresholds_px),)`` are fractions 0-1, NaN when no frame was scored;
    ``norm_precision`` is the normalised precision AUC; ``timed_frames`` / ``time_s`` give the speed.
    """

    video: str | None
    method: str
    protocol: Protocol
    frames: int
    success_curve: np.ndarray
    precision_curve: np.ndarray
    norm_precision: float
    timed_frames: int = 0
    time_s: float = 0.0
    videos: int = 1

    @property
    def success_auc(self) -> float:
        """Area under the success curve: its mean (as got10k / pysot compute it), 0-1."""
        return float(np.mean(self.success_curve))

    @property
    def precision_20px(self) -> float:
        """The precision curve at 20 pixels."""
        return float(self.precision_curve[self.protocol.precision_index])

    @property
    def fps(self) -> float | None:
        """Frames per second over the timed frames; ``None`` when the method recorded no times."""
        if self.timed_frames == 0 or self.time_s <= 0:
            return None
        return self.timed_frames / self.time_s

    @property
    def is_overall(self) -> bool:
        return self.video is None


def score_video(gt_boxes_xywh_px: np.ndarray, gt_valid: np.ndarray, pred_boxes_xywh_px: np.ndarray,
                frame_numbers: np.ndarray, protocol: Protocol,
                allowed_frames: Iterable[int] | np.ndarray | None = None, time_ms: np.ndarray | None = None,
                *, video: str, method: str) -> VideoScore:
    """Score one method on one video.

    Arrays are aligned row by row, one row per frame: ``gt_boxes_xywh_px`` ``(N, 4)`` float pixels,
    ``gt_valid`` ``(N,)`` bool, ``pred_boxes_xywh_px`` ``(N, 4)`` float pixels with NaN rows where the
    tracker reported nothing, ``frame_numbers`` ``(N,)`` 1-based, distinct. ``allowed_frames``: the frame
    numbers that may be scored (the split's test frames; ``None`` = all). ``time_ms`` ``(N,)`` per-frame
    tracking time in milliseconds, NaN where not timed (all rows count for the speed, scored or not).
    A video with no scored frame gets ``frames == 0`` and NaN curves.
    """
    gt, pred, valid, frames, times = _check_video_arrays(gt_boxes_xywh_px, gt_valid, pred_boxes_xywh_px,
                                                         frame_numbers, time_ms, video)
    mask = scored_mask(frames, gt, valid, protocol, allowed_frames)
    gt, pred = gt[mask], pred[mask]
    timed = np.isfinite(times)
    return VideoScore(
        video=video, method=method, protocol=protocol, frames=int(mask.sum()),
        success_curve=success_curve(boxes.iou_xywh(gt, pred), protocol.iou_thresholds,
                                    protocol.success_inclusive),
        precision_curve=precision_curve(centre_errors_px(gt, pred), protocol.error_thresholds_px),
        norm_precision=float(np.mean(precision_curve(normalised_centre_errors(gt, pred),
                                                     protocol.norm_error_thresholds))),
        timed_frames=int(timed.sum()), time_s=float(times[timed].sum()) / 1000.0,
    )


def _check_video_arrays(gt_boxes, gt_valid, pred_boxes, frame_numbers, time_ms, video: str):
    """The inputs of ``score_video`` as float / bool / int64 arrays, or ``InputError`` naming the bad one."""
    frames = np.asarray(frame_numbers)
    n = len(frames) if frames.ndim == 1 else -1
    if n < 0 or (n and not np.issubdtype(frames.dtype, np.integer)):
        raise InputError(f"frame_numbers must be a (N,) integer array, got shape {frames.shape} "
                         f"dtype {frames.dtype}", video=video)
    arrays = {"gt_boxes_xywh_px": (np.asarray(gt_boxes, dtype=float), (n, 4)),
              "pred_boxes_xywh_px": (np.asarray(pred_boxes, dtype=float), (n, 4)),
              "gt_valid": (np.asarray(gt_valid, dtype=bool), (n,)),
              "time_ms": (np.full(n, np.nan) if time_ms is None else np.asarray(time_ms, dtype=float), (n,))}
    for label, (arr, shape) in arrays.items():
        if arr.shape != shape:
            if n == 0 and arr.size == 0:
                arrays[label] = (arr.reshape(shape), shape)
                continue
            raise InputError(f"{label} has shape {arr.shape}, expected {shape} (one row per frame)", video=video)
    if len(np.unique(frames)) != n:
        raise InputError("frame_numbers has duplicates; one row per frame expected", video=video)
    (gt, _), (pred, _), (valid, _), (times, _) = arrays.values()
    return gt, pred, valid, frames.astype(np.int64), times


def align_track(track: TrackRows, frame_numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The track's ``(N, 4)`` boxes and ``(N,)`` times aligned to ``frame_numbers`` ``(N,)``; NaN where the
    track has no row for a frame (the method reported nothing there). Track rows for other frames are dropped."""
    frames = np.asarray(frame_numbers, dtype=np.int64)
    out_boxes = np.full((len(frames), 4), np.nan)
    out_times = np.full(len(frames), np.nan)
    if len(np.unique(track.frame)) != len(track.frame):
        raise InputError(f"track of method {track.method!r} has several rows for one frame", video=track.video)
    position = {int(f): i for i, f in enumerate(track.frame)}
    for i, frame in enumerate(frames.tolist()):
        j = position.get(frame)
        if j is not None:
            out_boxes[i] = track.boxes_xywh_px[j]
            out_times[i] = track.time_ms[j]
    return out_boxes, out_times


def score_track(track: TrackRows, frame_numbers: np.ndarray, gt_boxes_xywh_px: np.ndarray,
                gt_valid: np.ndarray, protocol: Protocol,
                allowed_frames: Iterable[int] | np.ndarray | None = None) -> VideoScore:
    """``score_video`` for a ``TrackRows``, aligned by frame number to the video's ground truth
    (``frame_numbers`` ``(N,)``, ``gt_boxes_xywh_px`` ``(N, 4)``, ``gt_valid`` ``(N,)``)."""
    pred, times = align_track(track, frame_numbers)
    return score_video(gt_boxes_xywh_px, gt_valid, pred, frame_numbers, protocol, allowed_frames, times,
                       video=track.video, method=track.method)


def summarise(scores: Iterable[VideoScore]) -> list[VideoScore]:
    """One overall row per method (sorted by method): the mean of its per-video curves (videos with no
    scored frame left out), frames and times summed. All rows must share one protocol."""
    scores = list(scores)
    protocol = common_protocol(scores)
    by_method: dict[str, list[VideoScore]] = {}
    for score in scores:
        if score.is_overall:
            raise InputError(f"summarise takes per-video scores; got an overall row for {score.method!r}")
        by_method.setdefault(score.method, []).append(score)
    return [_average(method, by_method[method], protocol) for method in sorted(by_method)]


def _average(method: str, scores: list[VideoScore], protocol: Protocol) -> VideoScore:
    used = [s for s in scores if s.frames > 0]
    if used:
        success = np.mean([s.success_curve for s in used], axis=0)
        precision = np.mean([s.precision_curve for s in used], axis=0)
        norm = float(np.mean([s.norm_precision for s in used]))
    else:
        success = np.full(len(protocol.iou_thresholds), np.nan)
        precision = np.full(len(protocol.error_thresholds_px), np.nan)
        norm = math.nan
    return VideoScore(video=None, method=method, protocol=protocol, frames=sum(s.frames for s in scores),
                      success_curve=success, precision_curve=precision, norm_precision=norm,
                      timed_frames=sum(s.timed_frames for s in scores), time_s=sum(s.time_s for s in scores),
                      videos=len(used))


def common_protocol(scores: Sequence[VideoScore]) -> Protocol:
    """The one protocol all ``scores`` were made under; ``InputError`` if they mix protocols or are empty."""
    protocols = {s.protocol for s in scores}
    if len(protocols) != 1:
        found = ", ".join(sorted(p.tag for p in protocols)) or "no scores at all"
        raise InputError(f"scores must share one protocol, found: {found}")
    return protocols.pop()


# --- the scores table ------------------------------------------------------------------------------------

def scores_table(results: Iterable[VideoScore]) -> pa.Table:
    """The rows given (per-video and / or overall, e.g. ``rows + summarise(rows)``) as a pyarrow table
    conformed to the scores contract; ``video`` is null on overall rows; the protocol goes in the metadata."""
    results = list(results)
    protocol = common_protocol(results)
    table = pa.table({
        "video": pa.array([s.video for s in results], pa.string()),
        "method": pa.array([s.method for s in results], pa.string()),
        "protocol": pa.array([s.protocol.name for s in results], pa.string()),
        "frames": pa.array([s.frames for s in results], pa.int32()),
        "success_auc": pa.array([s.success_auc for s in results], pa.float64()),
        "precision_20px": pa.array([s.precision_20px for s in results], pa.float64()),
        "norm_precision": pa.array([s.norm_precision for s in results], pa.float64()),
        "success_curve": pa.array([s.success_curve.tolist() for s in results], pa.list_(pa.float64())),
        "precision_curve": pa.array([s.precision_curve.tolist() for s in results], pa.list_(pa.float64())),
        "fps": pa.array([s.fps for s in results], pa.float64()),
    })
    return contracts.load("scores").conform(table, metadata=protocol_metadata(protocol))


def scores_from_table(table: pa.Table) -> list[VideoScore]:
    """``VideoScore`` rows back from a scores table (validated). The protocol comes from the file metadata
    (``otb`` may also come from the ``protocol`` column). Speeds come back as ``timed_frames / time_s = fps``;
    an overall row's ``videos`` is the number of that method's per-video rows with scored frames."""
    contracts.load("scores").validate(table, source="scores table")
    protocol = _table_protocol(table)
    rows = table.to_pylist()
    counts: dict[str, int] = {}
    for row in rows:
        if row["video"] is not None and row["frames"] > 0:
            counts[row["method"]] = counts.get(row["method"], 0) + 1
    out = []
    for row in rows:
        if row["protocol"] != protocol.name:
            raise InputError(f"row for {row['method']!r} has protocol {row['protocol']!r}, the table "
                             f"says {protocol.tag!r}", path="scores table")
        fps = row["fps"]
        out.append(VideoScore(
            video=row["video"], method=row["method"], protocol=protocol, frames=int(row["frames"]),
            success_curve=np.asarray(row["success_curve"], dtype=float),
            precision_curve=np.asarray(row["precision_curve"], dtype=float),
            norm_precision=float(row["norm_precision"]),
            timed_frames=max(int(row["frames"]), 1) if fps else 0,
            time_s=max(int(row["frames"]), 1) / fps if fps else 0.0,
            videos=1 if row["video"] is not None else counts.get(row["method"], 0)))
    return out


def _table_protocol(table: pa.Table) -> Protocol:
    meta = (table.schema.metadata or {}).get(PROTOCOL_META_KEY.encode())
    if meta:
        return Protocol.from_tag(meta.decode().splitlines()[0])
    names = set(table.column("protocol").to_pylist())
    if names == {"otb"}:
        return Protocol.otb()
    raise InputError(f"scores table has no {PROTOCOL_META_KEY} metadata to tell the protocol "
                     f"(column says {sorted(names)})", path="scores table")
