"""Tracking: the tracker contract, ROLO in lockstep across videos, one-pass evaluation, and the Ray Data layer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rolo_batch import boxes, cli, contracts, storage, tables, trackers
from rolo_batch.datasets.synthetic import SynthConfig, synthesize
from rolo_batch.detector import build_detector, save_detector
from rolo_batch.errors import ConfigError
from rolo_batch.extract import DetectorSpec, ExtractOptions, run_extraction
from rolo_batch.rolo import RoloConfig, build_model, export_model, heatmap_to_box
from rolo_batch.track import METHODS, TrackConfig, load_heatmaps, observations, run_tracking, track_rolo
from tests.helpers import synthetic_feature_frames

IMAGE_WH = (320, 240)


def observation(index: int, detections: list[list[float]], feature=None) -> trackers.Observation:
    return trackers.Observation(index=index, frame=index + 1, image_wh=IMAGE_WH,
                                detections=np.array(detections, np.float32).reshape(-1, 6), feature=feature)


# --- the contract and the baselines ----------------------------------------------------------------------

def test_yolo_follows_the_detection_that_continues_the_track_not_the_most_confident():
    # target at the left, a more confident look-alike at the right
    frames = [observation(i, [[0, 0.2 + 0.01 * i, 0.5, 0.1, 0.2, 0.6], [0, 0.8, 0.5, 0.1, 0.2, 0.9]])
              for i in range(5)]
    first = np.array([0.15 * 320, 0.4 * 240, 32, 48])
    rows = trackers.run_tracker(trackers.YoloTracker(), frames, first, "v")
    centres_x = rows.boxes_xywh_px[1:, 0] + rows.boxes_xywh_px[1:, 2] / 2
    np.testing.assert_allclose(centres_x, [(0.2 + 0.01 * i) * 320 for i in range(1, 5)], atol=1e-3)
    np.testing.assert_array_equal(rows.boxes_xywh_px[0], first)


def test_no_detection_keeps_the_last_box_with_zero_confidence():
    frames = [observation(0, [[0, 0.5, 0.5, 0.1, 0.1, 0.9]]), observation(1, [[0, 0.5, 0.5, 0.1, 0.1, 0.9]]),
              observation(2, [])]
    rows = trackers.run_tracker(trackers.YoloTracker(), frames, np.array([144, 108, 32, 24]), "v")
    np.testing.assert_array_equal(rows.boxes_xywh_px[2], rows.boxes_xywh_px[1])
    assert rows.confidence[2] == 0.0 and rows.confidence[1] == pytest.approx(0.9)


def reference_choice(detections, reference, image_wh, gate=1.5):
    """The association rule written plainly with the boxes module: best IoU, ties by confidence; else the
    nearest centre within ``gate`` diagonals."""
    candidates = trackers.detection_boxes_px(detections, image_wh)
    overlap = boxes.iou_xywh(np.repeat(reference[None], len(candidates), axis=0), candidates)
    if overlap.max() > 0:
        best = overlap.max()
        tied = [i for i in range(len(candidates)) if overlap[i] == best]
        return max(tied, key=lambda i: (detections[i, 5], -i))
    distance = np.linalg.norm(boxes.centers_xywh(candidates) - boxes.centers_xywh(reference), axis=1)
    nearest = int(np.argmin(distance))
    return nearest if distance[nearest] <= gate * np.hypot(*reference[2:]) else None


def test_the_fast_association_agrees_with_the_plain_rule_on_random_frames():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        k = int(rng.integers(1, 6))
        detections = np.zeros((k, 6), np.float32)
        detections[:, 1:3] = rng.uniform(0, 1, (k, 2))
        detections[:, 3:5] = rng.uniform(0, 0.3, (k, 2)) * (rng.uniform(size=(k, 1)) > 0.1)  # some empty
        detections[:, 5] = rng.choice([0.5, 0.9], k)  # ties in confidence too
        if k > 1 and rng.uniform() < 0.3:  # the same box twice: a tie in IoU, broken by confidence
            detections[1, 1:5] = detections[0, 1:5]
        reference = np.array([*rng.uniform(0, 300, 2), *rng.uniform(5, 80, 2)])
        expected = reference_choice(detections, reference, IMAGE_WH)
        assert trackers.choose_detection(detections, reference, IMAGE_WH) == expected
        feed = trackers.DetectionFeed(reference)  # what ROLO reads: the same detection, and the track moves
        read = feed.step_input(observation(1, detections.tolist(), np.zeros(2, np.float32)))[2:]
        if expected is None:
            assert read[5] == 0.0 and np.allclose(feed.track_box, reference)
        else:
            np.testing.assert_array_equal(read, detections[expected])
            np.testing.assert_allclose(feed.track_box, trackers.detection_boxes_px(detections, IMAGE_WH)[expected])


def test_kalman_coasts_on_constant_velocity_through_missed_detections():
    frames = []
    for i in range(12):
        cx = 0.2 + 0.02 * i
        frames.append(observation(i, [] if i >= 9 else [[0, cx, 0.5, 0.1, 0.1, 0.9]]))
    rows = trackers.run_tracker(trackers.KalmanTracker(), frames, np.array([0.15 * 320, 0.45 * 240, 32, 24]), "v")
    centres = rows.boxes_xywh_px[:, 0] + rows.boxes_xywh_px[:, 2] / 2
    assert np.all(np.diff(centres[8:]) > 3), "the filter stopped when the detections did"
    assert abs(centres[11] - (0.2 + 0.02 * 11) * 320) < 8


def test_identity_and_the_first_frame_box_is_the_given_one():
    frames = [observation(i, [[0, 0.9, 0.9, 0.1, 0.1, 1.0]]) for i in range(3)]
    first = np.array([10.0, 20.0, 30.0, 40.0])
    for tracker in (trackers.IdentityTracker(), trackers.YoloTracker(), trackers.KalmanTracker()):
        rows = trackers.run_tracker(tracker, frames, first, "v")
        np.testing.assert_array_equal(rows.boxes_xywh_px[0], first)
        assert rows.confidence[0] == 1.0 and np.isfinite(rows.time_ms).all()


# --- ROLO ------------------------------------------------------------------------------------------------

def small_model(form: str = "compact", steps: int = 3, dim: int = 16):
    torch.manual_seed(0)
    return build_model(RoloConfig(form=form, feature_dim=dim, steps=steps, hidden_size=8, projection_size=8)).eval()


def stateful_model(form: str = "compact"):
    """A small model whose outputs depend on its LSTM state (an untrained residual head would output each
    frame's detection whatever its state)."""
    torch.manual_seed(0)
    model = build_model(RoloConfig(form=form, feature_dim=16, steps=3, hidden_size=8, projection_size=8,
                                   box_head="absolute")).eval()
    torch.nn.init.normal_(model.head.weight, std=1.0)
    torch.nn.init.zeros_(model.head.bias)
    return model


@pytest.mark.parametrize("stream", [False, True])
def test_batching_gives_what_one_video_and_one_frame_at_a_time_give(stream):
    model = stateful_model()
    videos = [synthetic_feature_frames(f"v{i}", n, 16, seed=i) for i, n in enumerate((9, 5, 12))]
    together, _ = track_rolo(model, 3, videos, stream=stream)
    one_frame_per_call, _ = track_rolo(model, 3, videos, stream=stream, chunk_values=1)
    for video, rows, small in zip(videos, together, one_frame_per_call):
        np.testing.assert_allclose(rows.boxes_xywh_px, small.boxes_xywh_px, atol=1e-5)
        alone, _ = track_rolo(model, 3, [video], stream=stream)
        np.testing.assert_allclose(rows.boxes_xywh_px, alone[0].boxes_xywh_px, atol=1e-5)
        assert len(rows) == len(video) and rows.method == "rolo"


@pytest.mark.parametrize("stream", [False, True])
def test_one_pass_tracking_reads_no_ground_truth_after_the_first_frame(stream):
    model = stateful_model()
    video = synthetic_feature_frames("v", 10, 16, seed=3)
    hidden = tables.FeatureFrames(**{**video.__dict__, "gt_boxes_xywh_px": video.gt_boxes_xywh_px.copy()})
    hidden.gt_boxes_xywh_px[1:] = np.nan
    hidden.gt_valid[1:] = False
    (seen,), _ = track_rolo(model, 3, [video], stream=stream)
    (blind,), _ = track_rolo(model, 3, [hidden], stream=stream)
    np.testing.assert_array_equal(seen.boxes_xywh_px, blind.boxes_xywh_px)
    (oracle,), _ = track_rolo(model, 3, [video], oracle=True)
    assert oracle.boxes_xywh_px.shape == seen.boxes_xywh_px.shape


def test_rolo_rides_out_missed_detections_and_picks_the_target_up_again():
    """A missed frame enters as the track's last box with confidence 0 (not a zero box): the estimate holds,
    and the detection that comes back continues the track (an untrained residual model is YOLO-only)."""
    model = small_model()
    feature = np.zeros(16, np.float32)
    frames = [observation(i, [] if i in (3, 4) else [[0, 0.3 + 0.01 * i, 0.5, 0.1, 0.2, 0.9]], feature)
              for i in range(6)]
    first = np.array([(0.3 - 0.05) * 320, (0.5 - 0.1) * 240, 32, 48])
    tracker = trackers.RoloTracker(model, 3)
    rows = trackers.run_tracker(tracker, frames, first, "v")
    yolo = trackers.run_tracker(trackers.YoloTracker(), frames, first, "v")
    np.testing.assert_allclose(rows.boxes_xywh_px, yolo.boxes_xywh_px, atol=1e-3)
    centres_x = rows.boxes_xywh_px[:, 0] + rows.boxes_xywh_px[:, 2] / 2
    assert centres_x[5] == pytest.approx(0.35 * 320, abs=0.1)  # picked up again
    for missed in tracker.window[:2]:  # the window holds frames 4, 5 (the misses) and 6
        assert missed[-1] == 0.0 and missed[-5:-1] == pytest.approx([0.32, 0.5, 0.1, 0.2], abs=1e-4)
    assert tracker.window[2][-1] == pytest.approx(0.9)


def test_the_lstm_estimate_does_not_steer_which_detection_it_reads():
    """However wrong the LSTM's box, the detection fed to it continues the detection track (as YOLO-only),
    so a bad estimate cannot lead ROLO onto a distractor. Here the model always answers the distractor's box."""
    model = build_model(RoloConfig(form="compact", feature_dim=16, steps=3, hidden_size=8, projection_size=8,
                                   box_head="absolute")).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.logit(torch.tensor([0.8, 0.5, 0.1, 0.2])))
    feature = np.zeros(16, np.float32)
    frames = [observation(i, [[0, 0.2 + 0.01 * i, 0.5, 0.1, 0.2, 0.6], [0, 0.8, 0.5, 0.1, 0.2, 0.9]], feature)
              for i in range(6)]
    tracker = trackers.RoloTracker(model, 3)
    rows = trackers.run_tracker(tracker, frames, np.array([0.15 * 320, 0.4 * 240, 32, 48]), "v")
    centres_x = rows.boxes_xywh_px[1:, 0] + rows.boxes_xywh_px[1:, 2] / 2
    np.testing.assert_allclose(centres_x, 0.8 * 320, atol=0.5)  # the estimate sits on the distractor ...
    read = np.array([step[16 + 1] for step in tracker.window])
    np.testing.assert_allclose(read, [0.23, 0.24, 0.25], atol=1e-5)  # ... yet the window reads the target


@pytest.mark.parametrize("stream", [False, True])
def test_the_heatmap_model_keeps_its_maps(stream):
    model = small_model("heatmap")
    video = synthetic_feature_frames("v", 6, 16, seed=4)
    (rows,), (maps,) = track_rolo(model, 3, [video], stream=stream)
    assert maps.shape == (6, 32, 32) and np.isfinite(rows.boxes_xywh_px).all()
    read = heatmap_to_box(torch.as_tensor(maps[1:]).float()).numpy()  # each frame's box is read off its map
    expected = boxes.cxcywh_norm_to_xywh_px(read, (int(video.image_wh[0, 0]), int(video.image_wh[0, 1])))
    np.testing.assert_allclose(rows.boxes_xywh_px[1:], expected, atol=0.1)


@pytest.mark.parametrize("form", ["compact", "heatmap", "faithful"])
def test_streaming_runs_the_lstm_once_over_the_whole_video(form):
    """Streaming carries the state from the first frame to the last: its boxes are those of one LSTM pass over
    the video's inputs (the window form forgets all but the last 3 frames, and differs)."""
    model = stateful_model(form) if form != "faithful" else small_model("faithful")
    video = synthetic_feature_frames("v", 12, 16, seed=6)
    inputs = []
    recorder = trackers.RoloTracker(model, 1)  # its one-frame window is each frame's input
    frames = list(observations(video, None))
    recorder.init(frames[0], video.gt_boxes_xywh_px[0])
    inputs.append(recorder.window[-1])
    for frame in frames[1:]:
        recorder.update(frame)
        inputs.append(recorder.window[-1])
    with torch.no_grad():
        whole = model.sequence_outputs(torch.as_tensor(np.stack(inputs))[None])[0].numpy()
    (streamed,), (streamed_maps,) = track_rolo(model, 3, [video], stream=True)
    (windowed,), (windowed_maps,) = track_rolo(model, 3, [video])
    if form == "heatmap":  # (the boxes of an untrained map model are the whole frame)
        np.testing.assert_allclose(streamed_maps[1:], whole[1:], atol=1e-3)
        assert not np.allclose(windowed_maps[4:], whole[4:], atol=1e-2)
        return
    expected = np.stack([boxes.cxcywh_norm_to_xywh_px(np.clip(b[None], 0, 1), f.image_wh)[0]
                         for b, f in zip(whole, frames)])
    np.testing.assert_allclose(streamed.boxes_xywh_px[1:], expected[1:], atol=1e-3)
    assert not np.allclose(windowed.boxes_xywh_px[4:], expected[4:], atol=1e-2)


# --- the Ray Data layer ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def extracted(tmp_path_factory, ray_local):
    """Three small synthetic videos, their features (random tiny detector) and an (untrained) exported model."""
    root = tmp_path_factory.mktemp("track")
    synthesize(str(root / "data"), SynthConfig(videos=3, frames=16, width=96, height=72, seed=5))
    weights = str(root / "tiny.pt")
    save_detector(build_detector("yolo-tiny", random_init=True, seed=1), weights)
    summary = run_extraction(str(root / "data"), str(root / "out"), DetectorSpec(weights=weights))
    table = tables.FeaturesTable.open(summary.table_root)
    torch.manual_seed(0)
    model = build_model(RoloConfig(feature_dim=table.feature_dim, steps=3, hidden_size=8, projection_size=8,
                                   detector_id=table.detector_id))
    export_model(model, str(root / "model.pt"), split="exp2")
    return root, summary.table_root


def test_every_method_tracks_every_video_once(extracted):
    root, features = extracted
    summary = run_tracking(TrackConfig(features, str(root / "model.pt"), str(root / "out"), run="all",
                                       videos_per_batch=2, gpu="off"))
    assert [(r["video"], r["status"]) for r in summary.rows] == [(f"synth-00{i}", "done") for i in range(3)]
    for video in ("synth-000", "synth-001", "synth-002"):
        part = storage.join(tables.unit_uri(summary.run_uri, video), tables.PART_FILE)
        table = tables.read_parquet(part, contracts.load("tracks"))
        by_method = {r.method: r for r in tables.TrackRows.from_arrow(table)}
        assert sorted(by_method) == sorted(METHODS)
        for rows in by_method.values():
            np.testing.assert_array_equal(rows.frame, np.arange(1, 17))
            assert np.isfinite(rows.boxes_xywh_px).all() and np.isfinite(rows.time_ms).all()
    again = run_tracking(TrackConfig(features, str(root / "model.pt"), str(root / "out"), run="all", gpu="off"))
    assert {r["status"] for r in again.rows} == {"skipped"}


def test_a_video_without_a_first_box_fails_by_name_and_the_others_complete(extracted, tmp_path):
    root, features = extracted
    # a copy of the features where one video's ground truth is gone
    copy = tmp_path / "features"
    for video in ("synth-000", "synth-001"):
        source = tables.unit_uri(features, video)
        frames = tables.FeatureFrames.from_arrow(tables.read_parquet(storage.join(source, tables.PART_FILE),
                                                                     contracts.load("features")))
        if video == "synth-001":
            frames.gt_valid[:] = False
            frames.gt_boxes_xywh_px[:] = np.nan
        unit = tables.unit_uri(str(copy), video)
        tables.write_parquet(storage.join(unit, tables.PART_FILE), frames.to_arrow(), contracts.load("features"))
        storage.mark_done(unit, storage.read_done(source))
    summary = run_tracking(TrackConfig(str(copy), str(root / "model.pt"), str(tmp_path / "out"),
                                       methods=("rolo", "yolo"), gpu="off"))
    status = {r["video"]: r for r in summary.rows}
    assert status["synth-000"]["status"] == "done"
    assert status["synth-001"]["status"] == "failed" and "first frame" in status["synth-001"]["error"]
    assert "synth-001" in summary.table()


def test_a_model_for_other_features_is_refused(extracted, tmp_path):
    root, features = extracted
    export_model(small_model(dim=16), str(tmp_path / "other.pt"), split="exp2")
    with pytest.raises(Exception, match="feature_dim"):
        run_tracking(TrackConfig(features, str(tmp_path / "other.pt"), str(tmp_path), gpu="off"))


def test_rolo_reads_feature_maps_and_a_vector_model_is_refused_on_them(extracted, tmp_path):
    root, _ = extracted
    weights = str(root / "tiny.pt")
    summary = run_extraction(str(root / "data"), str(tmp_path / "out"), DetectorSpec(weights=weights),
                             ExtractOptions(feature="map7"))
    table = tables.FeaturesTable.open(summary.table_root)
    assert table.feature_shape == (64, 7, 7)
    untrained = build_model(RoloConfig(feature_dim=table.feature_dim, feature_shape=table.feature_shape, steps=3,
                                       hidden_size=8, projection_size=8, detector_id=table.detector_id))
    export_model(untrained, str(tmp_path / "maps.pt"), split="exp2")
    tracked = run_tracking(TrackConfig(summary.table_root, str(tmp_path / "maps.pt"), str(tmp_path / "out"),
                                       methods=("rolo", "yolo"), gpu="off"))
    assert {r["status"] for r in tracked.rows} == {"done"}
    part = storage.join(tables.unit_uri(tracked.run_uri, "synth-001"), tables.PART_FILE)
    by_method = {r.method: r for r in tables.TrackRows.from_arrow(tables.read_parquet(part, contracts.load("tracks")))}
    # an untrained residual model places each frame's detection box: YOLO-only, now read through the maps
    np.testing.assert_allclose(by_method["rolo"].boxes_xywh_px, by_method["yolo"].boxes_xywh_px, atol=1e-3)
    vector = build_model(RoloConfig(feature_dim=table.feature_dim, steps=3, hidden_size=8, projection_size=8,
                                    detector_id=table.detector_id))
    export_model(vector, str(tmp_path / "vector.pt"), split="exp2")
    with pytest.raises(ConfigError, match=r"reads a feature vector, but .* holds feature maps of shape \[64, 7, 7\]"):
        run_tracking(TrackConfig(summary.table_root, str(tmp_path / "vector.pt"), str(tmp_path / "out2"), gpu="off"))


def test_a_tracking_run_continues_only_with_the_model_it_began_with(extracted, tmp_path):
    root, features = extracted
    table = tables.FeaturesTable.open(features)
    first = TrackConfig(features, str(root / "model.pt"), str(tmp_path), run="r", methods=("rolo",), gpu="off")
    run_tracking(first)
    torch.manual_seed(5)
    export_model(build_model(RoloConfig(feature_dim=table.feature_dim, steps=3, hidden_size=8, projection_size=8,
                                        detector_id=table.detector_id)), str(tmp_path / "other.pt"), split="exp2")
    other = TrackConfig(features, str(tmp_path / "other.pt"), str(tmp_path), run="r", methods=("rolo",), gpu="off")
    with pytest.raises(ConfigError, match="already holds videos tracked with other inputs.*--overwrite"):
        run_tracking(other)
    with pytest.raises(ConfigError, match="rolo_mode was window, now stream"):
        run_tracking(dataclasses.replace(first, rolo_mode="stream"))
    assert {r["status"] for r in run_tracking(first).rows} == {"skipped"}  # the same inputs continue
    redone = run_tracking(dataclasses.replace(other, overwrite=True))
    assert {r["status"] for r in redone.rows} == {"done"}


def test_tracking_on_s3_with_the_heatmap_model(extracted, bucket):
    root, features = extracted
    table = tables.FeaturesTable.open(features)
    torch.manual_seed(0)
    model = build_model(RoloConfig(form="heatmap", feature_dim=table.feature_dim, steps=3, hidden_size=8,
                                   projection_size=8, detector_id=table.detector_id))
    export_model(model, f"s3://{bucket}/model.pt", split="exp2")
    summary = run_tracking(TrackConfig(features, f"s3://{bucket}/model.pt", f"s3://{bucket}/out",
                                       methods=("rolo", "yolo-kalman"), gpu="off"))
    assert {r["status"] for r in summary.rows} == {"done"}
    maps = load_heatmaps(tables.unit_uri(summary.run_uri, "synth-002"))
    assert maps is not None and maps.shape == (16, 32, 32)


def test_cli_track_score_render(extracted, capsys):
    root, features = extracted
    out = str(root / "cli")
    assert cli.main(["track", features, str(root / "model.pt"), out, "--methods", "rolo", "yolo", "kcf",
                     "--gpu", "off"]) == 0
    assert "tracks written to" in capsys.readouterr().out
    assert cli.main(["score", f"{out}/tracks/rolo", str(root / "data"), out]) == 0
    printed = capsys.readouterr().out
    for method in ("rolo", "yolo", "kcf"):
        assert method in printed
    for name in ("scores.parquet", "report.md", "success.png", "precision.png"):
        assert storage.is_file(f"{out}/scores/rolo/{name}"), name
    assert cli.main(["render", str(root / "data"), f"{out}/tracks/rolo", "synth-001", f"{out}/overlay.mp4"]) == 0
    import cv2
    capture = cv2.VideoCapture(f"{out}/overlay.mp4")
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 16
