"""Detector training: the YOLO v1 loss, augmentation, AP@0.5, sample planning, and the Ray Train run
(checkpoint that extraction loads, resume, two data-parallel workers on S3)."""

from __future__ import annotations

import dataclasses
import json
import math

import cv2
import numpy as np
import pytest
import torch

from rolo_batch import storage, tables
from rolo_batch import detector_train as dt
from rolo_batch.datasets import VideoRef, discover
from rolo_batch.detector import build_detector, decode, detector_config
from rolo_batch.errors import ConfigError
from rolo_batch.splits import get_split

# S = 2, B = 2, C = 1: head = 4 class probs, 8 confidences, 32 coordinates
SMALL = detector_config("yolo-tiny", input_size=64, grid=2, feature_dim=16)


def _loss(head, boxes, present=None, classes=None, config=SMALL, **loss):
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = len(boxes)
    present = torch.ones(n, dtype=torch.bool) if present is None else torch.as_tensor(present)
    classes = torch.zeros(n, dtype=torch.long) if classes is None else torch.as_tensor(classes)
    return dt.yolo_v1_loss(head, boxes, present, classes, config, dt.LossConfig(**loss))


# --- the loss --------------------------------------------------------------------------------------------

BOXES = [[0.30, 0.30, 0.20, 0.40], [0.80, 0.60, 0.30, 0.10], [0.50, 0.50, 0.90, 0.90]]


@pytest.mark.parametrize("objectness", ["iou", "one"])
@pytest.mark.parametrize("predictor", [0, 1])
def test_a_perfect_head_has_zero_loss(objectness, predictor):
    head = dt.encode_head(BOXES, [True] * 3, [0] * 3, SMALL, predictor=predictor).requires_grad_()
    loss, metrics = _loss(head, BOXES, objectness_target=objectness)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-10)
    assert metrics["iou_sum"] == pytest.approx(3.0) and metrics["num_targets"] == 3
    # and decoding it gives the boxes back
    decoded = decode(head.detach(), SMALL)
    for box, dets in zip(BOXES, decoded):
        assert len(dets) == 1 and np.allclose(dets[0, 1:5], box, atol=1e-6) and dets[0, 5] == pytest.approx(1.0)


def _perfect():
    head = dt.encode_head([BOXES[0]], [True], [0], SMALL)  # centre (0.3, 0.3): cell 0, predictor 0
    return head, dt.split_head(head, SMALL)


@pytest.mark.parametrize("what, change, term, expected", [
    # name, how the perfect head is spoiled, the term that must respond, its value (unweighted)
    ("x offset", lambda p, c, b: b.__setitem__((0, 0, 0, 0), b[0, 0, 0, 0] + 0.1), "coord_sum", 0.01),
    ("sqrt h", lambda p, c, b: b.__setitem__((0, 0, 0, 3), b[0, 0, 0, 3] - 0.2), "coord_sum", 0.04),
    ("responsible confidence", lambda p, c, b: c.__setitem__((0, 0, 0), 0.7), "object_sum", 0.09),
    ("other predictor's confidence", lambda p, c, b: c.__setitem__((0, 0, 1), 0.3), "noobject_sum", 0.09),
    ("empty cell's confidence", lambda p, c, b: c.__setitem__((0, 3, 0), -0.4), "noobject_sum", 0.16),
    ("class probability", lambda p, c, b: p.__setitem__((0, 0, 0), 0.5), "class_sum", 0.25),
    ("empty cell's class probability", lambda p, c, b: p.__setitem__((0, 2, 0), 0.5), None, 0.0),
])
def test_each_term_responds_to_its_own_error(what, change, term, expected):
    head, (probs, conf, coords) = _perfect()
    with torch.no_grad():
        change(probs, conf, coords)
    loss, metrics = _loss(head, [BOXES[0]], objectness_target="one")
    terms = {"coord_sum": 5.0, "object_sum": 1.0, "noobject_sum": 0.5, "class_sum": 1.0}
    for name, weight in terms.items():
        assert metrics[name] == pytest.approx(expected if name == term else 0.0, abs=1e-6), (what, name)
    assert float(loss) == pytest.approx(terms.get(term, 0.0) * expected, abs=1e-6), what


def test_the_responsible_predictor_is_the_one_with_the_highest_iou():
    target = [0.30, 0.30, 0.20, 0.40]  # cell 0, area 0.08; in head coordinates x = y = 0.6
    head = torch.zeros(1, SMALL.head_size)
    _, conf, coords = dt.split_head(head, SMALL)
    coords[0, 0, 0] = torch.tensor([0.6, 0.6, math.sqrt(0.05), math.sqrt(0.10)])  # inside it: IoU 0.005 / 0.08
    coords[0, 0, 1] = torch.tensor([0.6, 0.6, math.sqrt(0.18), math.sqrt(0.36)])  # inside it: IoU 0.0648 / 0.08
    conf[0, 0] = torch.tensor([0.5, 0.5])
    cell, target_coords = dt.target_cells(torch.tensor([target]), 2)
    chosen, iou = dt.responsible_predictor(coords, cell, target_coords, 2)
    assert iou[0].tolist() == pytest.approx([0.0625, 0.81], rel=1e-5) and int(chosen[0]) == 1
    # the loss follows the rule: predictor 1's box and confidence are the object's, predictor 0 is "no object"
    _, metrics = _loss(head, [target], objectness_target="iou")
    assert metrics["iou_sum"] == pytest.approx(0.81, rel=1e-5)
    assert metrics["object_sum"] == pytest.approx((0.5 - 0.81) ** 2, rel=1e-5)
    assert metrics["noobject_sum"] == pytest.approx(0.25, rel=1e-5)
    expected_coord = (math.sqrt(0.18) - math.sqrt(0.2)) ** 2 + (math.sqrt(0.36) - math.sqrt(0.4)) ** 2
    assert metrics["coord_sum"] == pytest.approx(expected_coord, rel=1e-4)


def test_highest_iou_wins_over_the_first_predictor():
    target = torch.tensor([[0.30, 0.30, 0.20, 0.40]])
    cell, tc = dt.target_cells(target, 2)
    coords = torch.zeros(1, 4, 2, 4)
    coords[0, 0, 0] = torch.tensor([0.6, 0.6, math.sqrt(0.1), math.sqrt(0.4)])  # half as wide: IoU 0.5
    coords[0, 0, 1] = tc[0]  # exact: IoU 1
    chosen, iou = dt.responsible_predictor(coords, cell, tc, 2)
    assert int(chosen[0]) == 1 and float(iou[0, 1]) == pytest.approx(1.0) and float(iou[0, 0]) == pytest.approx(0.5)


def test_without_overlap_the_closest_predictor_is_responsible():
    target = torch.tensor([[0.30, 0.30, 0.20, 0.40]])
    cell, tc = dt.target_cells(target, 2)
    coords = torch.zeros(1, 4, 2, 4)  # both zero-size: IoU 0
    coords[0, 0, 0] = torch.tensor([0.0, 0.0, 0.0, 0.0])
    coords[0, 0, 1] = torch.tensor([0.5, 0.5, 0.0, 0.0])  # closer to (0.6, 0.6, 0.45, 0.63)
    chosen, iou = dt.responsible_predictor(coords, cell, tc, 2)
    assert iou.abs().sum() == 0 and int(chosen[0]) == 1


@pytest.mark.parametrize("objectness, expected", [("iou", 0.0), ("one", 0.25)])
def test_objectness_target(objectness, expected):
    # the responsible box overlaps the target by exactly 0.5 and says so: right for "iou", 0.5 short of "one"
    target = [0.30, 0.30, 0.20, 0.40]
    head = dt.encode_head([[0.30, 0.30, 0.20, 0.20]], [True], [0], SMALL)  # half the height, same centre
    _, conf, _ = dt.split_head(head, SMALL)
    conf[0, 0, 0] = 0.5
    _, metrics = _loss(head, [target], objectness_target=objectness)
    assert metrics["object_sum"] == pytest.approx(expected, abs=1e-6)


def test_an_image_without_target_only_has_the_no_object_term():
    head = torch.zeros(2, SMALL.head_size)
    _, conf, _ = dt.split_head(head, SMALL)
    conf[0] = 0.2  # all 8 predictors of image 0 say "object" a bit
    boxes = torch.tensor([[float("nan")] * 4, [0.3, 0.3, 0.2, 0.4]])
    loss, metrics = _loss(head, boxes, present=[False, True])
    assert metrics["num_targets"] == 1 and metrics["num_images"] == 2
    assert metrics["noobject_sum"] == pytest.approx(8 * 0.04)
    assert math.isfinite(float(loss))


def test_classes_and_gradients():
    config = detector_config("yolo-tiny", input_size=64, grid=2, feature_dim=16, num_classes=3)
    head = dt.encode_head([[0.7, 0.7, 0.2, 0.2]], [True], [2], config)
    assert float(_loss(head, [[0.7, 0.7, 0.2, 0.2]], classes=[2], config=config)[0]) == pytest.approx(0.0, abs=1e-9)
    _, metrics = _loss(head, [[0.7, 0.7, 0.2, 0.2]], classes=[0], config=config)
    assert metrics["class_sum"] == pytest.approx(2.0)  # (1 - 0)^2 for class 0 and (0 - 1)^2 for class 2
    raw = torch.zeros(3, SMALL.head_size, requires_grad=True)
    loss, _ = _loss(raw, BOXES)
    loss.backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0


# --- augmentation ----------------------------------------------------------------------------------------

GEOMETRY_ONLY = dt.AugmentConfig(brightness=0, contrast=0, saturation=0, hue=0, scale=0.3, translate=0.25, fill=60)


def _blob(width=120, height=90, box=(0.4, 0.55, 0.3, 0.4)):
    image = np.zeros((height, width, 3), np.uint8)
    cx, cy, w, h = box
    x0, x1 = round((cx - w / 2) * width), round((cx + w / 2) * width)
    y0, y1 = round((cy - h / 2) * height), round((cy + h / 2) * height)
    image[y0:y1, x0:x1] = 255
    edges = np.array([x0 / width, y0 / height, x1 / width, y1 / height])
    return image, np.array([(edges[0] + edges[2]) / 2, (edges[1] + edges[3]) / 2, edges[2] - edges[0],
                            edges[3] - edges[1]])


def _extent(image, threshold=180):
    """The blob's extent in normalised edge coordinates, as cxcywh (None when no pixel is bright)."""
    ys, xs = np.nonzero(image[..., 1] > threshold)
    if not len(xs):
        return None
    h, w = image.shape[:2]
    x0, x1, y0, y1 = xs.min() / w, (xs.max() + 1) / w, ys.min() / h, (ys.max() + 1) / h
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])


FAR = dt.AugmentConfig(brightness=0, contrast=0, saturation=0, hue=0, scale=0.3, translate=0.7, fill=60)


@pytest.mark.parametrize("aug, seed", [(GEOMETRY_ONLY, s) for s in range(10)] + [(FAR, s) for s in range(10)])
def test_boxes_follow_the_pixels(aug, seed):
    image, box = _blob()
    out, moved, present = dt.augment(image, box, True, np.random.default_rng(seed), aug)
    assert out.shape == image.shape and out.dtype == np.uint8
    extent = _extent(out)
    mapped = dt.random_affine(np.random.default_rng(seed), aug).apply_box(box)  # augment's first draw
    visible = 0.0 if extent is None else extent[2] * extent[3] / (mapped[2] * mapped[3])
    if not present:  # pushed mostly out of the frame
        assert visible < 0.5 + 0.05, visible
        return
    assert visible > 0.5 - 0.05, visible
    tolerance = np.array([1.5 / 120, 1.5 / 90, 2.5 / 120, 2.5 / 90])  # a pixel of interpolation either side
    assert extent is not None and np.all(np.abs(extent - moved) <= tolerance), (extent, moved)


def test_far_shifts_do_push_targets_out():
    outcomes = [dt.augment(*_blob(), True, np.random.default_rng(seed), FAR)[2] for seed in range(10)]
    assert 0 < sum(outcomes) < 10, "the parametrised cases above should cover both outcomes"


def test_a_flip_mirrors_image_and_box():
    image, box = _blob()
    flip = dt.Affine(sx=-1.0, tx=1.0)
    out = cv2.warpAffine(image, flip.pixel_matrix(120, 90), (120, 90))
    assert np.array_equal(out, image[:, ::-1])
    moved, present = dt.transform_box(box, True, flip, 0.5)
    assert present and np.allclose(moved, [1 - box[0], box[1], box[2], box[3]])


@pytest.mark.parametrize("affine, present, expected", [
    (dt.Affine(), True, [0.4, 0.55, 0.3, 0.4]),  # identity
        (dt.Affine(tx=0.65), True, None),  # x 0.25-0.55 pushed to 0.9-1.2: a third stays, not a target
        (dt.Affine(tx=0.6), True, [0.925, 0.55, 0.15, 0.4]),  # to 0.85-1.15: half stays, clipped, a target
        (dt.Affine(tx=0.55), True, [0.9, 0.55, 0.2, 0.4]),  # to 0.8-1.1: two thirds stay
    (dt.Affine(ty=-0.7), True, None),  # pushed out of the top
    (dt.Affine(sx=2.0, sy=2.0, tx=-0.5, ty=-0.5), True, [0.3, 0.6, 0.6, 0.8]),  # zoom x2 about the centre
    (dt.Affine(), False, None),  # no target stays no target
])
def test_transform_box(affine, present, expected):
    moved, shown = dt.transform_box(np.array([0.4, 0.55, 0.3, 0.4]), present, affine, 0.5)
    if expected is None:
        assert not shown and np.array_equal(moved, np.zeros(4))
    else:
        assert shown and np.allclose(moved, expected), moved


def test_augmentation_is_deterministic_per_seed_and_differs_per_epoch():
    image = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    box = np.array([0.5, 0.5, 0.3, 0.3])
    aug = dt.AugmentConfig()
    a = dt.augment(image, box, True, dt.sample_rng(0, 3, "v", 7), aug)
    b = dt.augment(image, box, True, dt.sample_rng(0, 3, "v", 7), aug)
    c = dt.augment(image, box, True, dt.sample_rng(0, 4, "v", 7), aug)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    off = dt.augment(image, box, True, np.random.default_rng(0), dt.AugmentConfig(strength=0))
    assert off[0] is image and np.allclose(off[1], box) and off[2]


def test_colour_jitter_keeps_hue_and_geometry():
    hsv = np.zeros((32, 32, 3), np.uint8)
    hsv[..., 0], hsv[..., 1], hsv[..., 2] = 60, 200, 160
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    aug = dt.AugmentConfig(scale=0, translate=0, flip=0)
    for seed in range(20):
        out, _, _ = dt.augment(image, np.array([0.5, 0.5, 0.2, 0.2]), True, np.random.default_rng(seed), aug)
        hue = cv2.cvtColor(out, cv2.COLOR_BGR2HSV)[..., 0].astype(int)
        assert np.abs(hue - 60).max() <= aug.hue + 2  # far below the 12-25 units between target and look-alikes


@pytest.mark.parametrize("overrides", [{"strength": -1}, {"flip": 1.5}, {"scale": 0.6, "strength": 2},
                                       {"fill": 300}, {"hue": float("nan")}])
def test_augment_config_rejects(overrides):
    with pytest.raises(ConfigError):
        dt.AugmentConfig(**overrides)


# --- AP@0.5 and mean IoU ---------------------------------------------------------------------------------

def _det(box, conf, cls=0):
    return [cls, *box, conf]


GT = np.array([0.5, 0.5, 0.25, 0.25])  # binary fractions: IoUs below are exact
OFF = [0.9, 0.9, 0.1, 0.1]  # IoU 0 with GT


@pytest.mark.parametrize("case, detections, ap, mean_iou", [
    ("perfect", [[_det(GT, 0.9)], [_det(GT, 0.8)]], 1.0, 1.0),
    ("one frame missed", [[_det(GT, 0.9)], []], 0.5, 0.5),
    ("nothing detected", [[], []], 0.0, 0.0),
    # ranks TP, FP (duplicate), TP: P = 1, 1/2, 2/3 at R = 1/2, 1/2, 1 -> 1/2 * 1 + 1/2 * 2/3
    ("duplicate is a false positive", [[_det(GT, 0.9), _det(GT, 0.8)], [_det(GT, 0.7)]], 0.5 + 1 / 3, 1.0),
    # ranks FP, TP, TP: P = 0, 1/2, 2/3 at R = 0, 1/2, 1 -> interpolated 2/3 everywhere
    ("confident miss first", [[_det(OFF, 0.9), _det(GT, 0.5)], [_det(GT, 0.8)]], 2 / 3, 0.5),
    # half the width at the same centre: IoU exactly 0.5 counts
    ("IoU 0.5 is a hit", [[_det([0.5, 0.5, 0.125, 0.25], 0.9)]], 1.0, 0.5),
    ("IoU below 0.5 is not", [[_det([0.5, 0.5, 0.12, 0.25], 0.9)]], 0.0, 0.48),
])
def test_detection_quality_hand_cases(case, detections, ap, mean_iou):
    dets = [np.array(d, np.float32).reshape(-1, 6) for d in detections]
    quality = dt.detection_quality(dets, np.tile(GT, (len(dets), 1)))
    assert quality.ap50 == pytest.approx(ap, abs=1e-6), case
    assert quality.mean_iou == pytest.approx(mean_iou, abs=1e-3), case
    assert quality.frames == len(dets) and quality.detections == sum(len(d) for d in dets)


def test_with_classes_ap_is_the_mean_over_the_targets_classes():
    # frame 0 shows a class-2 target, frame 1 a class-1 target; every detection lies on the target's box
    dets = [np.array([_det(GT, 0.9, cls=1), _det(GT, 0.5, cls=2)], np.float32),
            np.array([_det(GT, 0.8, cls=1)], np.float32)]
    gt = np.tile(GT, (2, 1))
    # class 2: its one detection is right (AP 1); class 1: ranks FP (0.9, frame 0), TP (0.8): AP 1/2
    assert dt.detection_quality(dets, gt, gt_class=np.array([2, 1])).ap50 == pytest.approx(0.75)
    assert dt.detection_quality(dets, gt).ap50 == pytest.approx(1.0 * 1 / 2 + 1.0 * 1 / 2)  # class-agnostic
    assert dt.detection_quality(dets, gt, gt_class=np.array([0, 0])).ap50 == 0.0


def _reference_quality(detections, gts, threshold=0.5):
    """A straightforward re-computation: plain Python IoU, a global ranking, VOC matching, and AP as the sum
    over recall steps of the recall gained times the best precision at that recall or beyond."""
    def iou(a, b):
        ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
        bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
        inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
        union = a[2] * a[3] + b[2] * b[3] - inter
        return inter / union if union > 0 else 0.0

    ranked = sorted(((float(d[5]), f, list(map(float, d[1:5]))) for f, ds in enumerate(detections) for d in ds),
                    key=lambda t: -t[0])
    matched, tp_flags = set(), []
    for _, frame, box in ranked:
        hit = iou(box, gts[frame]) >= threshold and frame not in matched
        if hit:
            matched.add(frame)
        tp_flags.append(hit)
    points, tp = [], 0
    for k, hit in enumerate(tp_flags, start=1):
        tp += hit
        points.append((tp / len(gts), tp / k))
    ap, previous = 0.0, 0.0
    for recall in sorted({r for r, _ in points}):
        if recall > previous:
            ap += (recall - previous) * max(p for r, p in points if r >= recall)
            previous = recall
    best = [iou(list(map(float, max(ds, key=lambda d: d[5])[1:5])), gts[f]) if len(ds) else 0.0
            for f, ds in enumerate(detections)]
    return ap, sum(best) / len(gts)


@pytest.mark.parametrize("seed", range(8))
def test_detection_quality_matches_an_independent_computation(seed):
    rng = np.random.default_rng(seed)
    frames = int(rng.integers(1, 30))
    gts = np.column_stack([rng.uniform(0.2, 0.8, (frames, 2)), rng.uniform(0.05, 0.4, (frames, 2))])
    detections = []
    for gt in gts:
        k = int(rng.integers(0, 4))
        boxes = gt + rng.normal(0, rng.choice([0.01, 0.05, 0.2]), (k, 4)) * [1, 1, 0.3, 0.3]
        boxes[:, 2:] = np.abs(boxes[:, 2:]) + 0.01
        conf = rng.choice(np.linspace(0.1, 1.0, 7), k)  # ties across frames too
        detections.append(np.column_stack([np.zeros(k), boxes, conf]).astype(np.float32))
    quality = dt.detection_quality(detections, gts)
    ap, mean_iou = _reference_quality(detections, gts)
    # tied confidences are ranked in input order (frame, then detection) by both
    assert quality.ap50 == pytest.approx(ap, abs=1e-9)
    assert quality.mean_iou == pytest.approx(mean_iou, abs=1e-6)


# --- what trains and what is held out -------------------------------------------------------------------

def _index(name, n, valid=None, width=320, height=240):
    boxes = np.tile([100.0, 80.0, 40.0, 60.0], (n, 1))
    return dt.VideoIndex(VideoRef(name, "otb", f"/data/{name}", f"/data/{name}/groundtruth_rect.txt"),
                         np.arange(1, n + 1), boxes, np.ones(n, bool) if valid is None else valid, width, height)


def test_exp2_trains_on_the_first_third_with_valid_ground_truth_and_holds_out_the_rest():
    valid = np.ones(30, bool)
    valid[[2, 20]] = False
    index = [_index("a", 30, valid), _index("b", 150)]
    config = dt.DetectorTrainConfig("data", "out", first_part="third")
    split = config.split_config()
    train = dt.plan_samples(index, split, config, "train")
    test = dt.plan_samples(index, split, config, "test")
    train_frames = {(i["name"], f) for i in train.items for f in i["frames"]}
    test_frames = {(i["name"], f) for i in test.items for f in i["frames"]}
    assert train_frames == {("a", f) for f in range(1, 11) if f != 3} | {("b", f) for f in range(1, 51)}
    assert test_frames == {("a", f) for f in range(11, 31) if f != 21} | {("b", f) for f in range(51, 151)}
    assert train.frames == 59 and test.frames == 119 and train.videos == test.videos == 2
    assert all(len(i["indices"]) <= 64 for i in train.items + test.items)
    item = train.items[0]
    assert np.allclose(item["boxes"][0], [120 / 320, 110 / 240, 40 / 320, 60 / 240]) and item["class_id"] == 0


def test_exp1_trains_on_the_training_videos_only():
    index = [_index("a", 20), _index("b", 20), _index("c", 20)]
    config = dt.DetectorTrainConfig("data", "out", split="exp1", video_classes=None)
    split = get_split("exp1", train_videos=["a", "b"], test_videos=["c"])
    train = dt.plan_samples(index, split, config, "train")
    test = dt.plan_samples(index, split, config, "test")
    assert {i["name"] for i in train.items} == {"a", "b"} and train.frames == 40
    assert {i["name"] for i in test.items} == {"c"} and test.frames == 20


def test_classes_come_from_video_classes():
    config = dt.DetectorTrainConfig("data", "out", first_part="third",
                                    video_classes=(("a", "person"), ("b", "car")))
    assert config.class_names == ("car", "person") and config.class_id("a") == 1
    assert config.detector_config().num_classes == 2 and config.detector_config().class_names == ("car", "person")
    with pytest.raises(ConfigError, match="no class"):
        dt.plan_samples([_index("z", 9)], config.split_config(), config, "train")


@pytest.mark.parametrize("overrides, message", [
    ({"epochs": 0}, "epochs"),
    ({"gpu": "maybe"}, "gpu"),
    ({"run": "a/b"}, "run name"),
    ({"split": "exp9"}, "unknown split"),
    ({"overrides": {"num_classes": 3}}, "video_classes"),
    ({"overrides": {"input_size": 100, "grid": 5}}, "grid"),
    ({"overrides": {"colour": "red"}}, "unknown detector setting"),
    ({"detector": "yolo-huge"}, "unknown detector"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"video_classes": (("a", "x"), ("a", "y"))}, "one non-empty class per video"),
])
def test_config_is_validated_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        dt.DetectorTrainConfig("data", "out", **{"first_part": "third", **overrides})


# --- initialisation and the step, no Ray -----------------------------------------------------------------

def test_the_head_prior_predicts_the_mean_box_everywhere():
    from rolo_batch.detector import YoloNet, init_weights

    net = init_weights(YoloNet(SMALL), 0)
    dt.init_head_bias(net, [0.5, 0.5, 0.16, 0.25])
    with torch.no_grad():
        net.head.weight.zero_()
        _, head = net(torch.rand(1, 3, 64, 64))
    probs, conf, coords = dt.split_head(head, SMALL)
    assert torch.allclose(probs, torch.ones_like(probs)) and torch.all(conf == 0)
    boxes = dt.head_boxes_to_cxcywh(coords[0], torch.arange(4)[:, None], 2)
    assert torch.allclose(boxes[..., 2:], torch.tensor([0.16, 0.25]), atol=1e-6)
    assert torch.allclose(boxes[0, 0, :2], torch.tensor([0.25, 0.25]))  # cell centres


def test_initial_weights_are_copied_where_they_fit():
    from rolo_batch.detector import YoloNet, init_weights

    source = init_weights(YoloNet(SMALL), 1)
    three = detector_config("yolo-tiny", input_size=64, grid=2, feature_dim=16, num_classes=3)
    target = init_weights(YoloNet(three), 2)
    fresh = dt.transfer_weights(source, target)
    assert fresh == ["head.weight", "head.bias"]
    assert torch.equal(target.fc[1].weight, source.fc[1].weight)
    assert target.head.weight.shape != source.head.weight.shape  # left as initialised
    with pytest.raises(ConfigError, match="do not fit"):
        dt.transfer_weights(source, YoloNet(detector_config("yolo-tiny", input_size=64, grid=2, feature_dim=8)))


def test_learning_rate_warms_up_then_decays():
    schedule = {"learning_rate": 1.0, "warmup_epochs": 2.0, "lr_schedule": "cosine", "min_lr_fraction": 0.1,
                "epochs": 10}
    assert dt.learning_rate_at(schedule, 1.0) == pytest.approx(0.5)
    assert dt.learning_rate_at(schedule, 2.0) == pytest.approx(1.0)
    assert dt.learning_rate_at(schedule, 6.0) == pytest.approx(0.55)
    assert dt.learning_rate_at(schedule, 10.0) == pytest.approx(0.1)
    assert dt.learning_rate_at({**schedule, "lr_schedule": "constant"}, 9.0) == pytest.approx(1.0)


def test_training_steps_fit_a_batch():
    from rolo_batch.detector import YoloNet, init_weights

    torch.manual_seed(0)
    net = init_weights(YoloNet(dataclasses.replace(SMALL, dropout=0.0)), 0)
    dt.init_head_bias(net, [0.5, 0.5, 0.3, 0.3])
    images = (np.random.default_rng(0).random((4, 64, 64, 3)) * 255).astype(np.uint8)
    batch = dt.make_batch(images, [[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.3], [0.5, 0.5, 0.4, 0.2],
                                   [0.2, 0.8, 0.2, 0.2]], [True, True, True, False], [0, 0, 0, 0])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    first = dt.train_step(net, optimizer, batch)
    for _ in range(40):
        last = dt.train_step(net, optimizer, batch)
    assert last["loss_sum"] < 0.3 * first["loss_sum"] and last["iou_sum"] > first["iou_sum"]
    metrics, matches = dt.evaluate_batch(net, batch)
    assert len(matches) == 4 and metrics["num_images"] == 4 and not net.training


# --- the Ray Train run -----------------------------------------------------------------------------------

def tiny_config(data: str, out: str, **overrides) -> dt.DetectorTrainConfig:
    defaults = dict(overrides={"input_size": 64, "grid": 2, "feature_dim": 32}, first_part="third", epochs=2,
                    batch_size=4, gpu="off", threads_per_worker=1, learning_rate=1e-3)
    return dt.DetectorTrainConfig(data, out, **{**defaults, **overrides})


def test_train_detector_on_s3_resumes_with_two_workers_and_extraction_loads_it(ray_local, bucket, tmp_path):
    from rolo_batch.datasets.synthetic import SynthConfig, synthesize
    from rolo_batch.extract import ExtractOptions, extract_video

    data, out = f"s3://{bucket}/data", f"s3://{bucket}/out"
    synthesize(data, SynthConfig(videos=2, frames=12, width=96, height=72, seed=3))
    first = dt.run_detector_training(tiny_config(data, out, epochs=1), log=None)
    assert [h["epoch"] for h in first.history] == [1] and first.resumed_from_epoch == 0
    run = f"{out}/detectors/detector"
    assert first.run_uri == run and first.detector_uri == f"{run}/detector.pt"

    # a re-run of the same run continues after the last checkpoint, here on two data-parallel workers
    second = dt.run_detector_training(tiny_config(data, out, epochs=2, workers=2), log=None)
    assert second.resumed_from_epoch == 1, "the re-run did not continue after the checkpoint of epoch 1"
    assert [h["epoch"] for h in second.history] == [1, 2]
    sessions = [h["session"] for h in second.history]
    assert sessions[0] != sessions[1], "epoch 1 ran again"
    final = second.final
    assert final["workers"] == 2 and final["train_frames"] == 8 and final["test_frames"] == 16  # 2 x 4, 2 x 8
    assert 0.0 <= final["ap50"] <= 1.0 and 0.0 <= final["mean_iou"] <= 1.0
    for name in ("detector.pt", "metrics.json", "metrics.csv", "training.png", "split.json", "config.json"):
        assert storage.is_file(f"{run}/{name}"), name
    assert [m["epoch"] for m in json.loads(storage.read_text(f"{run}/metrics.json"))["epochs"]] == [1, 2]
    assert "ap50" in storage.read_text(f"{run}/metrics.csv").splitlines()[0]
    manifest = json.loads(storage.read_text(f"{run}/split.json"))
    assert manifest["videos"]["synth-000"]["train"] == [[1, 4]] and manifest["videos"]["synth-000"]["test"] == [[5, 12]]

    # a run that already finished is not trained again (the settings that only change how it runs may differ)
    third = dt.run_detector_training(tiny_config(data, out, epochs=2, workers=1), log=None)
    assert third.history == second.history and third.detector_id == second.detector_id
    assert third.resumed_from_epoch == 2

    detector = build_detector(None, second.detector_uri)
    assert detector.detector_id == second.detector_id and detector.config.input_size == 64
    assert detector.config.class_names == ("target",)
    ref = discover(data).videos[0]
    table = str(tmp_path / "features" / detector.detector_id)
    result = extract_video(detector, ref, table, ExtractOptions(batch_size=4))
    assert result.status == "done" and result.frames == 12
    assert tables.FeaturesTable.open(table).detector_id == detector.detector_id


def test_a_video_with_an_unreadable_training_frame_fails_alone(ray_local, tmp_path):
    from rolo_batch.datasets.synthetic import SynthConfig, synthesize

    data = str(tmp_path / "data")
    synthesize(data, SynthConfig(videos=2, frames=12, width=96, height=72, seed=3))
    bad_frame = tmp_path / "data" / "synth-001" / "img" / "0002.jpg"  # in the training part; indexing reads frame 1
    bad_frame.write_bytes(b"not a jpeg")
    result = dt.run_detector_training(tiny_config(data, str(tmp_path / "out"), epochs=1), log=None)
    assert list(result.skipped_videos) == ["synth-001"]
    assert "0002.jpg" in result.skipped_videos["synth-001"]
    assert storage.is_file(result.detector_uri) and result.final["train_frames"] == 4  # synth-000's 4 only


def test_a_seeded_detector_run_repeats_exactly(ray_local, tmp_path):
    # without Ray Data keeping block order, the second epoch of two identical runs already differed
    from rolo_batch.datasets.synthetic import SynthConfig, synthesize

    data = str(tmp_path / "data")
    synthesize(data, SynthConfig(videos=3, frames=30, width=96, height=72, seed=3))
    runs = [dt.run_detector_training(tiny_config(data, str(tmp_path / "out"), run=name, epochs=3), log=None)
            for name in ("a", "b")]
    losses = [[(h["train_loss"], h["train_iou"]) for h in r.history] for r in runs]
    assert losses[0] == losses[1]
    assert (runs[0].ap50, runs[0].mean_iou) == (runs[1].ap50, runs[1].mean_iou)
    assert runs[0].detector_id == runs[1].detector_id  # the id hashes the weights: the same detector
