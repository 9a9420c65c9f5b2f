"""OTB scoring: hand-computed examples, the two protocols, exclusions, averaging over videos, and an
independent per-frame re-computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rolo_batch import contracts, metrics
from rolo_batch.errors import ConfigError, InputError
from rolo_batch.metrics import Protocol
from rolo_batch.tables import TrackRows

NAN_BOX = [math.nan] * 4
OTB = Protocol.otb()


def score(gt, pred, protocol=OTB, frames=None, valid=None, **kwargs) -> metrics.VideoScore:
    gt = np.asarray(gt, dtype=float).reshape(-1, 4)
    frames = np.arange(1, len(gt) + 1) if frames is None else np.asarray(frames)
    valid = np.ones(len(gt), bool) if valid is None else np.asarray(valid)
    return metrics.score_video(gt, valid, np.asarray(pred, dtype=float).reshape(-1, 4), frames, protocol,
                               video=kwargs.pop("video", "v"), method=kwargs.pop("method", "m"), **kwargs)


# One scored frame each. Counts are hand-computed: how many of the protocol's thresholds the frame passes.
# otb: 21 IoU thresholds 0..1, success = IoU > t.  rolo: 20 thresholds 0..0.95, success = IoU >= t.
# precision: 51 thresholds 0..50 px, error <= t.  norm: 51 thresholds 0..0.5, normalised error <= t.
CASES = [
    # name,                          gt,              pred,                 otb, rolo, prec, norm
    ("perfect",                      (10, 10, 20, 20), (10, 10, 20, 20),     20,  20,   51,   51),
    ("half the height (IoU 0.5)",    (0, 0, 10, 10),  (0, 0, 10, 5),        10,  11,   48,   26),
    ("half outside the image",       (0, 0, 10, 10),  (-5, 0, 10, 10),      7,   7,    46,   1),
    ("fully outside the image",      (0, 0, 10, 10),  (-100, -100, 10, 10), 0,   1,    0,    0),
    ("gt partly outside the image",  (-4, 2, 8, 8),   (-4, 2, 8, 8),        20,  20,   51,   51),
    ("no prediction (NaN box)",      (0, 0, 10, 10),  NAN_BOX,              0,   1,    0,    0),
    ("zero-size prediction",         (0, 0, 10, 10),  (0, 0, 0, 10),        0,   1,    46,   1),
    ("inside the gt (IoU 0.25)",     (0, 0, 20, 20),  (5, 5, 10, 10),       5,   6,    51,   51),
]
# Why: IoU 0.5 passes 0..0.45 under '>' (10) and 0..0.5 under '>=' (11); centre error 2.5 px passes 3..50
# (48); normalised error 2.5/10 = 0.25 passes 0.25..0.5 (26). Half outside: IoU 50/150 = 1/3 passes 0..0.3
# (7); error 5 px passes 5..50 (46); normalised 5/10 = 0.5 passes only 0.5. IoU 0 passes no '>' threshold but
# passes t = 0 under '>=', so the rolo protocol gives every frame at least 1/20. IoU 1 is not > 1: a perfect
# frame passes 20 of the 21 otb thresholds, so a perfect tracker's otb AUC is exactly 20/21.


@pytest.mark.parametrize("name,gt,pred,otb,rolo,prec,norm", CASES, ids=[c[0] for c in CASES])
def test_hand_computed_single_frames(name, gt, pred, otb, rolo, prec, norm):
    result = score([gt], [pred])
    assert result.frames == 1
    assert result.success_auc == pytest.approx(otb / 21)
    assert result.success_curve.tolist() == [1.0] * otb + [0.0] * (21 - otb)
    assert result.precision_curve.tolist() == [0.0] * (51 - prec) + [1.0] * prec
    assert result.precision_20px == (1.0 if prec >= 31 else 0.0)
    assert result.norm_precision == pytest.approx(norm / 51)
    # rolo protocol, steps=1: a first frame (given box, not scored) then the frame under test.
    given = (0, 0, 10, 10)
    in_rolo = score([given, gt], [given, pred], Protocol.rolo(1))
    assert in_rolo.frames == 1
    assert in_rolo.success_curve.tolist() == [1.0] * rolo + [0.0] * (20 - rolo)
    assert in_rolo.success_auc == pytest.approx(rolo / 20)
    assert in_rolo.precision_curve.tolist() == result.precision_curve.tolist()


def test_perfect_tracker_scores_20_of_21_under_otb_and_1_under_rolo():
    gt = np.tile([5.0, 6.0, 30.0, 20.0], (12, 1))
    assert score(gt, gt).success_auc == pytest.approx(20 / 21)
    assert score(gt, gt, Protocol.rolo(3)).success_auc == 1.0
    assert score(gt, gt).precision_20px == 1.0 and score(gt, gt).norm_precision == 1.0


def test_invalid_ground_truth_is_excluded():
    gt = [(0, 0, 10, 10), NAN_BOX, (0, 0, 0, 10), (0, 0, 10, 10), (0, 0, 10, -3), (20, 20, 10, 10)]
    valid = [True, True, True, False, True, True]  # the 4th is flagged invalid by the reader
    pred = [(0, 0, 10, 10), (0, 0, 10, 10), NAN_BOX, NAN_BOX, NAN_BOX, (20, 20, 10, 10)]
    result = score(gt, pred, valid=valid)
    assert result.frames == 2
    assert result.success_auc == pytest.approx(20 / 21) and result.precision_20px == 1.0


@pytest.mark.parametrize("lost_box", [NAN_BOX, (200, 200, 10, 10)], ids=["reports nothing", "drifts away"])
def test_tracker_that_loses_the_target_halfway(lost_box):
    gt = np.tile([50.0, 50.0, 10.0, 10.0], (10, 1))
    pred = np.vstack([gt[:5], np.tile(lost_box, (5, 1))])
    result = score(gt, pred)
    assert result.frames == 10
    assert result.success_curve.tolist() == [0.5] * 20 + [0.0]
    assert result.success_auc == pytest.approx(10 / 21)
    assert result.precision_curve.tolist() == [0.5] * 51  # the lost half is 212 px (or infinitely) away
    assert result.precision_20px == 0.5 and result.norm_precision == pytest.approx(0.5)


def test_rolo_protocol_skips_the_first_steps_frames_by_frame_number():
    frames = [3, 1, 2, 4, 5]  # rows need not be sorted; "first" means lowest frame numbers
    gt = np.tile([0.0, 0.0, 10.0, 10.0], (5, 1))
    pred = np.array([(0, 0, 10, 5), (0, 0, 10, 10), (0, 0, 10, 10), (0, 0, 10, 5), (0, 0, 10, 5)], float)
    rolo = score(gt, pred, Protocol.rolo(2), frames=frames)
    assert rolo.frames == 3  # frames 1 and 2 not scored
    assert rolo.success_curve.tolist() == [1.0] * 11 + [0.0] * 9  # IoU 0.5 >= 0..0.5
    assert rolo.success_auc == pytest.approx(0.55)
    otb = score(gt, pred, frames=frames)
    assert otb.frames == 5  # the first frame's box is the given one and counts
    assert otb.success_curve.tolist() == pytest.approx([1.0] * 10 + [0.4] * 10 + [0.0])
    assert otb.success_auc == pytest.approx(14 / 21)


@pytest.mark.parametrize("allowed", [{3, 4, 5, 6}, [3, 4, 5, 6], np.arange(3, 7), range(3, 7)],
                         ids=["set", "list", "array", "range"])
def test_only_allowed_frames_are_scored(allowed):
    gt = np.tile([0.0, 0.0, 10.0, 10.0], (6, 1))
    pred = np.vstack([gt[:2], np.full((4, 4), np.nan)])  # perfect on the training frames 1-2, lost after
    assert score(gt, pred).success_auc == pytest.approx(2 / 6 * 20 / 21)
    test_only = score(gt, pred, allowed_frames=allowed)
    assert test_only.frames == 4 and test_only.success_auc == 0.0 and test_only.precision_20px == 0.0


def test_over_videos_curves_are_averaged_not_frames_pooled():
    one_perfect = score([(0, 0, 10, 10)], [(0, 0, 10, 10)], video="short")
    three_lost = score(np.tile([0.0, 0.0, 10.0, 10.0], (3, 1)), np.full((3, 4), np.nan), video="long")
    nothing = score([NAN_BOX], [(0, 0, 10, 10)], video="no-gt")
    assert nothing.frames == 0 and np.isnan(nothing.success_auc)
    (overall,) = metrics.summarise([one_perfect, three_lost, nothing])
    assert overall.video is None and overall.method == "m"
    assert overall.frames == 4 and overall.videos == 2  # the video without scored frames is left out
    # mean of the two curves: 0.5 at every threshold but 1.0; pooling the 4 frames would give 0.25
    assert overall.success_curve.tolist() == [0.5] * 20 + [0.0]
    assert overall.success_auc == pytest.approx(10 / 21)
    assert overall.precision_20px == 0.5
    pooled = score(np.tile([0.0, 0.0, 10.0, 10.0], (4, 1)), np.vstack([[0, 0, 10, 10], np.full((3, 4), np.nan)]))
    assert pooled.precision_20px == 0.25 and pooled.success_auc == pytest.approx(5 / 21)


def test_summarise_groups_by_method_sorted():
    rows = [score([(0, 0, 10, 10)], [(0, 0, 10, 10)], method=m, video=v) for m in ("yolo", "rolo")
            for v in ("a", "b")]
    assert [r.method for r in metrics.summarise(rows)] == ["rolo", "yolo"]
    assert all(r.videos == 2 and r.frames == 2 for r in metrics.summarise(rows))


def test_fps_from_per_frame_times():
    gt = np.tile([0.0, 0.0, 10.0, 10.0], (4, 1))
    a = score(gt, gt, time_ms=[10, 10, np.nan, 20], video="a")
    assert a.fps == pytest.approx(75.0)  # 3 timed frames in 40 ms
    assert score(gt, gt).fps is None
    b = score(gt[:2], gt[:2], time_ms=[40, 40], video="b")
    (overall,) = metrics.summarise([a, b])
    assert overall.fps == pytest.approx(5 / 0.12)


def test_score_track_aligns_by_frame_number():
    gt = np.tile([0.0, 0.0, 10.0, 10.0], (4, 1))
    track = TrackRows("v", "rolo", frame=[4, 1, 2, 9], boxes_xywh_px=np.tile([0.0, 0.0, 10.0, 10.0], (4, 1)),
                      time_ms=[5, 5, 5, 5])
    result = metrics.score_track(track, np.array([1, 2, 3, 4]), gt, np.ones(4, bool), OTB)
    assert (result.video, result.method, result.frames) == ("v", "rolo", 4)
    assert result.precision_20px == 0.75  # frame 3 has no row: reported nothing
    assert result.timed_frames == 3  # frame 9 is not in the video


def test_empty_video_scores_nothing():
    result = metrics.score_video(np.zeros((0, 4)), np.zeros(0, bool), np.zeros((0, 4)),
                                 np.zeros(0, np.int32), OTB, video="e", method="m")
    assert result.frames == 0 and np.isnan(result.success_curve).all()


def own_iou(a, b):
    """Plain-float IoU of two (x, y, w, h) boxes, written independently of rolo_batch.boxes."""
    left, top = max(a[0], b[0]), max(a[1], b[1])
    right, bottom = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0.0, right - left) * max(0.0, bottom - top)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def loop_scores(gt, valid, pred, frames, inclusive, skip, iou_thr, err_thr):
    """Success and precision curves, one frame at a time in plain Python."""
    first = set(sorted(frames)[:skip])
    ious, errors = [], []
    for g, ok, p, f in zip(gt.tolist(), valid.tolist(), pred.tolist(), frames.tolist()):
        if not ok or f in first or any(math.isnan(v) for v in g) or g[2] <= 0 or g[3] <= 0:
            continue
        if any(math.isnan(v) for v in p):
            ious.append(0.0)
            errors.append(math.inf)
            continue
        ious.append(own_iou(g, p))
        errors.append(math.hypot(p[0] + p[2] / 2 - g[0] - g[2] / 2, p[1] + p[3] / 2 - g[1] - g[3] / 2))
    success = [sum((i >= t) if inclusive else (i > t) for i in ious) / len(ious) for t in iou_thr]
    precision = [sum(e <= t for e in errors) / len(errors) for t in err_thr]
    return len(ious), success, precision


@pytest.mark.parametrize("protocol", [Protocol.otb(), Protocol.rolo(6)], ids=["otb", "rolo"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_matches_a_per_frame_loop(protocol, seed):
    rng = np.random.default_rng(seed)
    n = 300
    gt = np.column_stack([rng.uniform(-20, 200, n), rng.uniform(-20, 150, n), rng.uniform(0, 60, (n, 2))])
    pred = gt + rng.normal(0, 12, (n, 4))
    pred[:, 2:] = np.abs(pred[:, 2:])
    gt[rng.random(n) < 0.05] = np.nan
    gt[rng.random(n) < 0.05, 2] = 0.0
    pred[rng.random(n) < 0.1] = np.nan
    valid = rng.random(n) > 0.05
    frames = rng.permutation(n) + 1
    result = metrics.score_video(gt, valid, pred, frames, protocol, video="r", method="m")
    iou_thr = [0.05 * i for i in range(21 if protocol.name == "otb" else 20)]
    count, success, precision = loop_scores(gt, valid, pred, frames, protocol.name == "rolo",
                                            protocol.skip_first, iou_thr, range(51))
    assert result.frames == count
    np.testing.assert_allclose(result.success_curve, success, atol=1e-12)
    np.testing.assert_allclose(result.precision_curve, precision, atol=1e-12)
    assert result.success_auc == pytest.approx(sum(success) / len(success))


def test_scores_table_follows_the_contract_and_reads_back():
    rows = [score([(0, 0, 10, 10)] * 3, [(0, 0, 10, 10), (0, 0, 10, 5), NAN_BOX], method=m, video=v,
                  protocol=Protocol.rolo(1), time_ms=[1, 2, 3]) for m in ("rolo", "yolo") for v in ("a", "b")]
    table = metrics.scores_table(rows + metrics.summarise(rows))
    contract = contracts.load("scores")
    contract.validate(table)
    assert table.schema.names == contract.column_names
    assert table.column("video").to_pylist() == ["a", "b", "a", "b", None, None]
    assert table.schema.metadata[b"rolo_batch.protocol"].decode().startswith("rolo/steps=1\n")
    back = metrics.scores_from_table(table)
    assert back[0].protocol == Protocol.rolo(1) and back[4].videos == 2 and back[4].is_overall
    for original, loaded in zip(rows + metrics.summarise(rows), back):
        assert loaded.success_auc == pytest.approx(original.success_auc)
        assert loaded.precision_20px == pytest.approx(original.precision_20px)
        assert loaded.fps == pytest.approx(original.fps)


def test_conventions_are_stated():
    otb, rolo = metrics.conventions_text(Protocol.otb()), metrics.conventions_text(Protocol.rolo(6))
    assert "IoU > t" in otb and "20/21" in otb and "x + w/2" in otb and "first frame" in otb
    assert "IoU >= t" in rolo and "20 thresholds" in rolo and "first 6 frames" in rolo


def _mixed_protocols():
    metrics.summarise([score([(0, 0, 1, 1)], [(0, 0, 1, 1)]),
                       score([(0, 0, 1, 1)] * 2, [(0, 0, 1, 1)] * 2, Protocol.rolo(1))])


@pytest.mark.parametrize("call,error,match", [
    (lambda: score([(0, 0, 1, 1)] * 2, [(0, 0, 1, 1)]), InputError, "pred_boxes_xywh_px has shape"),
    (lambda: score([(0, 0, 1, 1)] * 2, [(0, 0, 1, 1)] * 2, frames=[1, 1]), InputError, "duplicates"),
    (lambda: score([(0, 0, 1, 1)], [(0, 0, 1, 1)], frames=[1.5]), InputError, "integer"),
    (lambda: score([(0, 0, 1, 1)], [(0, 0, 1, 1)], time_ms=[1, 2]), InputError, "time_ms"),
    (lambda: Protocol.named("vot"), ConfigError, "unknown scoring protocol"),
    (lambda: Protocol.named("rolo"), ConfigError, "needs steps"),
    (lambda: Protocol.rolo(0), ConfigError, "steps >= 1"),
    (_mixed_protocols, InputError, "one protocol"),
    (lambda: metrics.summarise(metrics.summarise([score([(0, 0, 1, 1)], [(0, 0, 1, 1)])])), InputError,
     "per-video"),
], ids=["shape", "duplicate frames", "float frames", "time shape", "unknown protocol", "rolo without steps",
        "zero steps", "mixed protocols", "overall rows"])
def test_bad_inputs_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()
