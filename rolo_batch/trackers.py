"""One tracker contract for every method: ``init(observation, box)``, then ``update(observation) -> estimate``.

``run_tracker`` owns the frame loop and the timing, so ROLO, YOLO-only, YOLO + Kalman, OpenCV's CSRT / KCF /
MIL and the identity baseline are all "just trackers". One-pass evaluation (OPE): a tracker gets the first
frame's box and nothing else about the ground truth.

Boxes are ``xywh_px`` (top-left x, y, width, height in pixels); detections are the features table's
``(class_id, cx, cy, w, h, confidence)`` rows, box normalised to 0-1 of the frame.
"""

from __future__ import annotations

import abc
import math
import time
from dataclasses import dataclass
from typing import ClassVar, Iterable

import cv2
import numpy as np

from rolo_batch import boxes, tables
from rolo_batch.errors import ConfigError


@dataclass(frozen=True)
class Observation:
    """What a tracker may look at in one frame.

    ``index`` 0-based position, ``frame`` 1-based OTB number, ``image_wh`` (width, height) in pixels,
    ``image`` (H, W, 3) uint8 BGR or None when no tracker of the run needs pixels, ``feature`` (D,) or None,
    ``detections`` (K, 6) float32 as in the features table.
    """

    index: int
    frame: int
    image_wh: tuple[int, int]
    detections: np.ndarray
    feature: np.ndarray | None = None
    image: np.ndarray | None = None


@dataclass(frozen=True)
class Estimate:
    """A tracker's answer for one frame: ``box_xywh_px`` (4,) (NaN when it reports nothing) and a 0-1
    ``confidence`` (NaN when the method has none)."""

    box_xywh_px: np.ndarray
    confidence: float = float("nan")


class Tracker(abc.ABC):
    """The contract. Subclasses set ``name`` and say whether they need pixels (``needs_images``)."""

    name: ClassVar[str]
    needs_images: ClassVar[bool] = False

    @abc.abstractmethod
    def init(self, observation: Observation, box_xywh_px: np.ndarray) -> None:
        """Start tracking the target given by ``box_xywh_px`` in the first frame."""

    @abc.abstractmethod
    def update(self, observation: Observation) -> Estimate:
        """The target's box in the next frame."""


def run_trackers(trackers: list[Tracker], observations: Iterable[Observation], first_box_xywh_px: np.ndarray,
                 video: str) -> list[tables.TrackRows]:
    """Run several trackers over one pass of a video's observations (frames decoded once), timing each.

    The first frame reports the given box (confidence 1), as OTB's one-pass evaluation does.
    """
    first = np.asarray(first_box_xywh_px, float)
    frames: list[int] = []
    found = [[] for _ in trackers]
    confidence = [[] for _ in trackers]
    times = [[] for _ in trackers]
    for observation in observations:
        for i, tracker in enumerate(trackers):
            started = time.perf_counter()
            if not frames:
                tracker.init(observation, first)
                estimate = Estimate(first.copy(), 1.0)
            else:
                estimate = tracker.update(observation)
            times[i].append((time.perf_counter() - started) * 1000)
            found[i].append(estimate.box_xywh_px)
            confidence[i].append(estimate.confidence)
        frames.append(observation.frame)
    return [tables.TrackRows(video=video, method=tracker.name, frame=np.array(frames, np.int32),
                             boxes_xywh_px=np.array(found[i], float).reshape(-1, 4),
                             confidence=np.array(confidence[i]), time_ms=np.array(times[i]))
            for i, tracker in enumerate(trackers)]


def run_tracker(tracker: Tracker, observations: Iterable[Observation], first_box_xywh_px: np.ndarray,
                video: str) -> tables.TrackRows:
    """Run one tracker over a video (see ``run_trackers``)."""
    return run_trackers([tracker], observations, first_box_xywh_px, video)[0]


# --- choosing a detection without ground truth -----------------------------------------------------------

def detection_boxes_px(detections: np.ndarray, image_wh: tuple[int, int]) -> np.ndarray:
    """(K, 4) xywh pixel boxes of (K, 6) detections."""
    if len(detections) == 0:
        return np.zeros((0, 4))
    return boxes.cxcywh_norm_to_xywh_px(np.asarray(detections)[:, 1:5], image_wh)


def choose_detection(detections: np.ndarray, reference_xywh_px: np.ndarray, image_wh: tuple[int, int],
                     gate: float = 1.5) -> int | None:
    """Index of the detection that continues the track, or None.

    The detection with the highest IoU with ``reference_xywh_px`` (the track's last box) wins, ties broken by
    confidence. With no overlap, the nearest centre within ``gate`` reference diagonals wins. Uses no ground
    truth: this is the one-pass evaluation rule for every tracker that reads detections.
    """
    if len(detections) == 0 or not np.isfinite(reference_xywh_px).all():
        return None
    return _choose(detections, _pixel_boxes(detections, image_wh), reference_xywh_px, gate)


def _choose(detections: np.ndarray, candidates_xywh_px: list, reference: np.ndarray, gate: float = 1.5
            ) -> int | None:
    """``choose_detection`` on the detections' pixel boxes (computed once by the caller, as a list of rows).
    Plain Python on purpose: it runs once per frame and video on a handful of boxes, where numpy's per-call
    overhead was most of a tracking run's time."""
    rx, ry, rw, rh = (float(v) for v in reference)
    rx2, ry2, rcx, rcy = rx + rw, ry + rh, rx + rw / 2.0, ry + rh / 2.0
    best, best_key, nearest, nearest_distance = None, (0.0, 0.0), None, math.inf
    for index, ((x, y, w, h), confidence) in enumerate(zip(candidates_xywh_px, detections[:, 5].tolist())):
        iw, ih = min(x + w, rx2) - max(x, rx), min(y + h, ry2) - max(y, ry)
        inter = iw * ih if iw > 0 and ih > 0 else 0.0
        union = w * h + rw * rh - inter
        overlap = inter / union if union > 0 and w > 0 and h > 0 else 0.0
        if overlap > 0 and (best is None or (overlap, confidence) > best_key):  # ties: the first keeps it
            best, best_key = index, (overlap, confidence)
        distance = math.hypot(x + w / 2.0 - rcx, y + h / 2.0 - rcy)
        if distance < nearest_distance:
            nearest, nearest_distance = index, distance
    if best is not None:
        return best
    return nearest if nearest_distance <= gate * math.hypot(rw, rh) else None


def _pixel_boxes(detections: np.ndarray, image_wh: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    """``detection_boxes_px`` as a list of rows, in plain Python (the same arithmetic)."""
    width, height = float(image_wh[0]), float(image_wh[1])
    rows = []
    for cx, cy, w, h in detections[:, 1:5].tolist():
        pw, ph = w * width, h * height
        rows.append((cx * width - pw / 2.0, cy * height - ph / 2.0, pw, ph))
    return rows


def choose_by_groundtruth(detections: np.ndarray, gt_xywh_px: np.ndarray, image_wh: tuple[int, int]) -> int | None:
    """ORACLE: the detection with the best IoU with this frame's ground truth, as the ROLO paper's code did.

    It reads the answer, so results that use it are not one-pass evaluation; offered only as the named
    ``oracle`` detection mode, to reproduce the paper.
    """
    if len(detections) == 0 or not np.isfinite(gt_xywh_px).all():
        return None
    candidates = detection_boxes_px(detections, image_wh)
    overlap = boxes.iou_xywh(np.repeat(boxes.as_boxes(gt_xywh_px), len(candidates), axis=0), candidates)
    return int(np.argmax(overlap)) if overlap.max() > 0 else None


# --- baselines -------------------------------------------------------------------------------------------

class IdentityTracker(Tracker):
    """Reports the first box in every frame: the floor every method must beat, and a test double."""

    name = "identity"

    def init(self, observation: Observation, box_xywh_px: np.ndarray) -> None:
        self.box = np.asarray(box_xywh_px, float).copy()

    def update(self, observation: Observation) -> Estimate:
        return Estimate(self.box.copy(), 1.0)


class YoloTracker(Tracker):
    """YOLO only: each frame, the detection that best continues the previous box; when there is none, the
    previous box again (confidence 0)."""

    name = "yolo"

    def init(self, observation: Observation, box_xywh_px: np.ndarray) -> None:
        self.box = np.asarray(box_xywh_px, float).copy()

    def update(self, observation: Observation) -> Estimate:
        chosen = choose_detection(observation.detections, self.box, observation.image_wh)
        if chosen is None:
            return Estimate(self.box.copy(), 0.0)
        self.box = detection_boxes_px(observation.detections[chosen:chosen + 1], observation.image_wh)[0]
        return Estimate(self.box.copy(), float(observation.detections[chosen, 5]))


class KalmanTracker(Tracker):
    """YOLO + a constant-velocity Kalman filter on (cx, cy, w, h) (the paper's SORT-style baseline).

    Each frame the filter predicts, picks the detection that best continues the prediction, and corrects
    with it; with no detection it reports the prediction. Noise scales with the box size, as in SORT.
    """

    name = "yolo-kalman"

    def __init__(self, position_noise: float = 0.05, velocity_noise: float = 0.01,
                 measurement_noise: float = 0.05) -> None:
        self.position_noise = position_noise
        self.velocity_noise = velocity_noise
        self.measurement_noise = measurement_noise
        self.transition = np.eye(8)
        self.transition[:4, 4:] = np.eye(4)
        self.observe = np.eye(4, 8)

    def _box(self) -> np.ndarray:
        cx, cy, w, h = self.state[:4]
        w, h = max(w, 1.0), max(h, 1.0)
        return np.array([cx - w / 2, cy - h / 2, w, h])

    def init(self, observation: Observation, box_xywh_px: np.ndarray) -> None:
        x, y, w, h = np.asarray(box_xywh_px, float)
        self.state = np.array([x + w / 2, y + h / 2, w, h, 0, 0, 0, 0], float)
        scale = max(w, h)
        self.covariance = np.diag([scale * 0.1] * 4 + [scale * 0.5] * 4) ** 2

    def update(self, observation: Observation) -> Estimate:
        scale = max(self.state[2], self.state[3], 1.0)
        process = np.diag([self.position_noise * scale] * 4 + [self.velocity_noise * scale] * 4) ** 2
        self.state = self.transition @ self.state
        self.covariance = self.transition @ self.covariance @ self.transition.T + process
        chosen = choose_detection(observation.detections, self._box(), observation.image_wh)
        if chosen is None:
            return Estimate(self._box(), 0.0)
        x, y, w, h = detection_boxes_px(observation.detections[chosen:chosen + 1], observation.image_wh)[0]
        measurement = np.array([x + w / 2, y + h / 2, w, h])
        noise = np.diag([self.measurement_noise * scale] * 4) ** 2
        innovation = measurement - self.observe @ self.state
        gain_denominator = self.observe @ self.covariance @ self.observe.T + noise
        gain = self.covariance @ self.observe.T @ np.linalg.inv(gain_denominator)
        self.state = self.state + gain @ innovation
        self.covariance = (np.eye(8) - gain @ self.observe) @ self.covariance
        return Estimate(self._box(), float(observation.detections[chosen, 5]))


_OPENCV_FACTORIES = {
    "csrt": lambda: cv2.TrackerCSRT.create(),
    "kcf": lambda: cv2.TrackerKCF.create(),
    "mil": lambda: cv2.TrackerMIL.create(),
}


class OpenCVTracker(Tracker):
    """OpenCV's CSRT, KCF or MIL tracker on the frames. When it reports a failure, the last box is kept
    (confidence 0), so every frame has a box as in OPE."""

    needs_images = True

    def __init__(self, kind: str) -> None:
        if kind not in _OPENCV_FACTORIES:
            raise ConfigError(f"unknown OpenCV tracker {kind!r}; choose from {', '.join(_OPENCV_FACTORIES)}")
        self.kind = kind
        self.name = kind  # type: ignore[misc]

    def init(self, observation: Observation, box_xywh_px: np.ndarray) -> None:
        if observation.image is None:
            raise ConfigError(f"{self.kind} needs the video frames")
        self.tracker = _OPENCV_FACTORIES[self.kind]()
        self.box = np.asarray(box_xywh_px, float).copy()
        self.tracker.init(observation.image, _int_rect(self.box, observation.image_wh))

    def update(self, observation: Observation) -> Estimate:
        ok, rect = self.tracker.update(observation.image)
        if not ok:
            return Estimate(self.box.copy(), 0.0)
        self.box = np.array(rect, float)
        return Estimate(self.box.copy(), 1.0)


def _int_rect(box_xywh_px: np.ndarray, image_wh: tuple[int, int]) -> tuple[int, int, int, int]:
    """An integer rectangle inside the image, at least 2x2 (what OpenCV's trackers accept)."""
    width, height = image_wh
    x, y, w, h = box_xywh_px
    x0 = int(np.clip(round(x), 0, width - 2))
    y0 = int(np.clip(round(y), 0, height - 2))
    return x0, y0, int(np.clip(round(w), 2, width - x0)), int(np.clip(round(h), 2, height - y0))


# --- ROLO ------------------------------------------------------------------------------------------------

class DetectionFeed:
    """What ROLO reads of each frame: the feature ++ the detection that continues the detection track (or, in
    ``oracle`` mode, the one that best overlaps the ground truth ``groundtruth_xywh_px``). The track starts at
    the given first box and moves with each chosen detection; a frame without one enters as the track's last
    box with confidence 0. The LSTM's estimates never steer it, so a whole video's detections are known
    before the model runs (``feed_detections``)."""

    def __init__(self, first_box_xywh_px: np.ndarray, oracle: bool = False,
                 groundtruth_xywh_px: np.ndarray | None = None) -> None:
        if oracle and groundtruth_xywh_px is None:
            raise ConfigError("the oracle detection mode needs the ground truth")
        self.track_box = np.asarray(first_box_xywh_px, float).copy()
        self.oracle = oracle
        self.groundtruth = groundtruth_xywh_px

    def step_input(self, observation: Observation) -> np.ndarray:
        """This frame's ``feature ++ detection`` ``(D + 6,)``; moves the track on when a detection continues it."""
        if observation.feature is None:
            raise ConfigError("ROLO needs the features of every frame")
        return np.concatenate([np.asarray(observation.feature, np.float32), self.detection(observation)])

    def detection(self, observation: Observation) -> np.ndarray:
        """This frame's detection ``(6,)`` as ROLO reads it; moves the track on when a detection continues it."""
        candidates = _pixel_boxes(observation.detections, observation.image_wh)
        if self.oracle:
            chosen = choose_by_groundtruth(observation.detections, self.groundtruth[observation.index],
                                           observation.image_wh)
        elif len(candidates) and np.isfinite(self.track_box).all():
            chosen = _choose(observation.detections, candidates, self.track_box)
        else:
            chosen = None
        detection = np.zeros(6, np.float32)
        if chosen is not None:
            detection[:] = observation.detections[chosen]
            self.track_box = np.array(candidates[chosen])
        else:  # a miss: where the track last was, with confidence 0
            detection[1:5] = boxes.xywh_px_to_cxcywh_norm(self.track_box[None], observation.image_wh)[0]
        return detection


def feed_detections(observations: Iterable[Observation], first_box_xywh_px: np.ndarray, oracle: bool = False,
                    groundtruth_xywh_px: np.ndarray | None = None) -> np.ndarray:
    """A whole video's detections ``(frames, 6)`` as ROLO reads them (see ``DetectionFeed``)."""
    feed = DetectionFeed(first_box_xywh_px, oracle, groundtruth_xywh_px)
    return np.stack([feed.detection(o) for o in observations])


class RoloTracker(Tracker):
    """ROLO: each frame, the detection that continues the detection track (or, in the named ``oracle`` mode,
    the one that best overlaps the ground truth, as the paper's code did) joins the window of the last
    ``steps`` frames (feature ++ detection), and the LSTM reads the box off the window.

    The detection track is what YOLO-only follows: each frame's chosen detection is the reference for the next
    choice, starting from the given first box. The LSTM's own estimate does not steer the choice, so a frame
    it gets wrong cannot lead it onto a distractor or away from every detection (on the demo, steering by the
    estimate cost 0.10 success AUC). A frame where no detection continues the track enters as the track's last
    box with confidence 0, as training windows enter one (never as a zero box: that made the estimate
    collapse to the corner). Until ``steps`` frames have been seen, the window is padded with the first frame.
    ``prepare``/``accept`` split ``update`` in two so that many videos can share one model call
    (``step_many``). ``groundtruth_xywh_px`` (N, 4) is read only in oracle mode.

    This is the frame-by-frame form of the tracker contract; batch tracking (``track.track_rolo``) chooses a
    whole video's detections with the same ``DetectionFeed`` and runs the model over chunks of frames.
    """

    name = "rolo"

    def __init__(self, model, steps: int, oracle: bool = False,
                 groundtruth_xywh_px: np.ndarray | None = None) -> None:
        if oracle and groundtruth_xywh_px is None:
            raise ConfigError("the oracle detection mode needs the ground truth")
        self.feed: DetectionFeed | None = None
        self.model = model
        self.steps = steps
        self.oracle = oracle
        self.groundtruth = groundtruth_xywh_px

    def init(self, observation: Observation, box_xywh_px: np.ndarray) -> None:
        self.estimate = np.asarray(box_xywh_px, float).copy()
        self.feed = DetectionFeed(self.estimate, self.oracle, self.groundtruth)
        self.window = [self.feed.step_input(observation)] * self.steps

    def prepare(self, observation: Observation) -> np.ndarray:
        """The window ending at this frame, ``(steps, D + 6)``."""
        self.window = self.window[1:] + [self.feed.step_input(observation)]
        return np.stack(self.window)

    def accept(self, box_cxcywh_norm: np.ndarray, observation: Observation) -> Estimate:
        """Take the model's box for this frame as the new estimate."""
        self.estimate = boxes.cxcywh_norm_to_xywh_px(box_cxcywh_norm, observation.image_wh)[0]
        return Estimate(self.estimate.copy())

    def update(self, observation: Observation) -> Estimate:
        return step_many(self.model, [self], [observation])[0]


def step_many(model, trackers: list[RoloTracker], observations: list[Observation]) -> list[Estimate]:
    """Advance several ROLO trackers (one per video) by one frame with a single batched model call."""
    import torch

    windows = np.stack([t.prepare(o) for t, o in zip(trackers, observations)])
    parameter = next(model.parameters())
    with torch.inference_mode():
        predicted = model(torch.as_tensor(windows, dtype=parameter.dtype, device=parameter.device))
    predicted = predicted.float().cpu().numpy()
    return [t.accept(p, o) for t, p, o in zip(trackers, predicted, observations)]


BASELINES = ("yolo", "yolo-kalman", "csrt", "kcf", "mil", "identity")


def make_baseline(name: str) -> Tracker:
    """A baseline tracker by method name (see ``BASELINES``)."""
    if name == "yolo":
        return YoloTracker()
    if name == "yolo-kalman":
        return KalmanTracker()
    if name == "identity":
        return IdentityTracker()
    if name in _OPENCV_FACTORIES:
        return OpenCVTracker(name)
    raise ConfigError(f"unknown tracking method {name!r}; choose from rolo, {', '.join(BASELINES)}")
