"""The target model adapted online from the first box (``rolo_batch.adaptive``) and the adaptation stage that
writes its detections as a features table (``rolo_batch.adapt_stage``), with the real ImageNet backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rolo_batch import boxes, contracts, datasets, storage, tables
from rolo_batch.adapt_stage import adapt_videos
from rolo_batch.adaptive import AdaptConfig, AdaptiveModel, Backbone
from rolo_batch.datasets.groundtruth import format_groundtruth
from rolo_batch.datasets.images import encode_jpeg

SMALL = AdaptConfig(input_size=128, augment=2)
WIDTH, HEIGHT, SIDE = 192, 144, 32


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return Backbone(SMALL)


def moving_target(frames: int = 30, seed: int = 0, occluded: range = range(0)) -> tuple[list[np.ndarray], np.ndarray]:
    """Colour frames of a blocky square moving diagonally over a smooth, mottled background (hidden by the
    background itself in the ``occluded`` frames), and its true ``(frames, 4)`` xywh boxes."""
    import cv2

    rng = np.random.default_rng(seed)
    background = cv2.GaussianBlur(rng.integers(0, 256, (HEIGHT, WIDTH, 3)).astype(np.uint8), (0, 0), 3)
    background = cv2.normalize(background, None, 40, 215, cv2.NORM_MINMAX)
    target = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((SIDE // 4, SIDE // 4, 1))).astype(np.uint8)
    images, truth = [], []
    for i in range(frames):
        x, y = 20 + 3 * i, 16 + 2 * i
        image = background.copy()
        if i not in occluded:
            image[y:y + SIDE, x:x + SIDE] = target
        images.append(image)
        truth.append([x, y, SIDE, SIDE])
    return images, np.array(truth, float)


def track(model: AdaptiveModel, images: list[np.ndarray], first_box: np.ndarray) -> tuple[np.ndarray, list]:
    states = model.init_many([images[0]], [first_box])
    found, kept = [first_box], []
    for image in images[1:]:
        model.step_many([image], states)
        found.append(states[0].box_xywh_px.copy())
        kept.append((states[0].confidence, states[0].model.updates))
    return np.array(found), kept


HIDDEN = range(10, 14)  # the frames where moving_target's target is hidden
FRAMES_HIDDEN = [i - 1 for i in HIDDEN]  # their places in what track() keeps (kept[i - 1] is frame i)


def track_hidden(backbone, config: AdaptConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A target hidden in ``HIDDEN`` tracked from its first box: the truth, the boxes found, and per frame
    after the first the response peak's confidence and the number of updates so far."""
    images, truth = moving_target(occluded=HIDDEN)
    found, kept = track(AdaptiveModel(config, backbone), images, truth[0])
    return truth, found, np.array([c for c, _ in kept]), np.array([u for _, u in kept])


def test_the_adapted_model_follows_a_moving_target_from_its_first_box_alone(backbone):
    images, truth = moving_target()
    found, _ = track(AdaptiveModel(SMALL, backbone), images, truth[0])
    iou = boxes.iou_xywh(truth, found)
    standing_still = boxes.iou_xywh(truth, np.repeat(truth[:1], len(truth), axis=0))
    assert standing_still[1:].mean() < 0.3  # the target really moves away from its first box
    assert iou[1:].mean() > 0.7 and iou[-1] > 0.6


def test_a_hidden_target_holds_its_box_teaches_nothing_and_is_found_again(backbone):
    """Without the hold, the filter walked to where the target stood in the first frame (the background
    there matches the first frame's margin) and stayed there."""
    config = AdaptConfig(input_size=128, augment=2, lost=0.3)
    truth, found, confidence, updates = track_hidden(backbone, config)
    assert confidence[FRAMES_HIDDEN].max() < config.lost < config.guard < confidence[:8].min()
    assert updates[FRAMES_HIDDEN[-1]] == updates[FRAMES_HIDDEN[0] - 1]  # nothing learned from the background
    assert updates[8] == 9  # ...but from every visible frame before
    np.testing.assert_array_equal(found[list(HIDDEN)], np.repeat(found[HIDDEN[0] - 1:HIDDEN[0]], 4, axis=0))
    assert boxes.iou_xywh(truth[-10:], found[-10:]).mean() > 0.6


def test_the_guard_learns_nothing_from_a_frame_below_it(backbone):
    """With the hold off, hidden frames are still tracked, but their peak is below the guard: no update."""
    config = AdaptConfig(input_size=128, augment=2, lost=0.0)
    _, _, confidence, updates = track_hidden(backbone, config)
    assert confidence[FRAMES_HIDDEN].max() < config.guard
    assert updates[FRAMES_HIDDEN[-1]] == updates[FRAMES_HIDDEN[0] - 1] == 9


def test_without_updates_the_first_frames_model_is_all_there_is(backbone):
    images, truth = moving_target(frames=12)
    _, kept = track(AdaptiveModel(AdaptConfig(input_size=128, augment=2, update=False), backbone), images, truth[0])
    assert all(updates == 0 for _, updates in kept)


def test_tracking_changes_no_weight_of_the_shared_backbone(backbone):
    before = {k: v.clone() for k, v in backbone.net.state_dict().items()}
    images, truth = moving_target(frames=8)
    track(AdaptiveModel(SMALL, backbone), images, truth[0])
    after = backbone.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_videos_in_lockstep_track_as_they_do_alone(backbone):
    model = AdaptiveModel(SMALL, backbone)
    a, truth_a = moving_target(frames=10, seed=1)
    b, truth_b = moving_target(frames=10, seed=2)
    alone = [track(model, images, truth[0])[0] for images, truth in ((a, truth_a), (b, truth_b))]
    states = model.init_many([a[0], b[0]], [truth_a[0], truth_b[0]])
    together = [[truth_a[0]], [truth_b[0]]]
    for image_a, image_b in zip(a[1:], b[1:]):
        model.step_many([image_a, image_b], states)
        for k in range(2):
            together[k].append(states[k].box_xywh_px.copy())
    for k in range(2):
        np.testing.assert_allclose(np.array(together[k]), alone[k], atol=0.05)


# --- the stage -------------------------------------------------------------------------------------------

def write_otb(root, name: str, images: list[np.ndarray], truth: np.ndarray) -> datasets.VideoRef:
    folder = root / name
    (folder / "img").mkdir(parents=True)
    for i, image in enumerate(images):
        (folder / "img" / f"{i + 1:04d}.jpg").write_bytes(encode_jpeg(image, 95))
    (folder / "groundtruth_rect.txt").write_text(format_groundtruth(truth))
    return datasets.discover(str(root), names=[name]).videos[0]


def read_unit(table_root: str, video: str) -> tables.FeatureFrames:
    return tables.FeatureFrames.from_arrow(tables.read_parquet(
        tables.done_units(table_root)[video], contracts.load("features"), feature_dim=64))


def test_the_stage_reads_no_ground_truth_but_the_first_box(tmp_path, backbone):
    images, truth = moving_target(frames=12)
    misleading = truth.copy()
    misleading[1:, :2] += 40  # every later box is wrong: a tracker that reads them would follow them
    full = write_otb(tmp_path / "full", "clip", images, truth)
    lied = write_otb(tmp_path / "lied", "clip", images, misleading)
    alone = write_otb(tmp_path / "alone", "clip", images, truth[:1])
    model = AdaptiveModel(SMALL, backbone)
    units = {}
    for ref, where in ((full, "full"), (lied, "lied"), (alone, "alone")):
        root = str(tmp_path / "out" / where)
        assert [r.status for r in adapt_videos(model, [ref], root, "adaptive-test")] == ["done"]
        units[where] = read_unit(root, "clip")
    for where in ("lied", "alone"):
        np.testing.assert_array_equal(units[where].detection, units["full"].detection)
        np.testing.assert_array_equal(units[where].feature, units["full"].feature)
    assert units["alone"].gt_valid.tolist() == [True] + [False] * 11  # the table keeps what the file had
    found = boxes.cxcywh_norm_to_xywh_px(units["full"].detection[:, 1:5], (WIDTH, HEIGHT))
    assert boxes.iou_xywh(truth, found)[1:].mean() > 0.6


def test_the_whole_frame_map_feature_is_a_map_table_rolo_pools_in(tmp_path, backbone):
    images, truth = moving_target(frames=6)
    ref = write_otb(tmp_path / "data", "clip", images, truth[:1])
    root = str(tmp_path / "out")
    model = AdaptiveModel(SMALL, backbone)
    assert adapt_videos(model, [ref], root, "adaptive-test", feature="map16")[0].status == "done"
    table = tables.FeaturesTable.open(root)
    assert table.feature_shape == (112, 16, 16) and table.feature_dim == 112 * 16 * 16
    frames = tables.FeatureFrames.from_arrow(tables.read_parquet(
        table.units["clip"].part_uri, contracts.load("features"), feature_dim=table.feature_dim))
    assert frames.feature.shape == (6, 112 * 16 * 16) and np.abs(frames.feature).max() > 0
    adapt_videos(model, [ref], str(tmp_path / "response"), "adaptive-test")
    responses = read_unit(str(tmp_path / "response"), "clip")
    np.testing.assert_array_equal(frames.detection, responses.detection)  # the feature does not change tracking


def test_a_bad_frame_fails_its_video_alone_and_publishes_nothing_of_it(tmp_path, backbone):
    images, truth = moving_target(frames=10)
    good = write_otb(tmp_path / "data", "good", images, truth)
    bad = write_otb(tmp_path / "data", "bad", images, truth)
    (tmp_path / "data" / "bad" / "img" / "0006.jpg").write_bytes(b"not a jpeg")
    root = str(tmp_path / "out")
    results = {r.video: r for r in adapt_videos(AdaptiveModel(SMALL, backbone), [bad, good], root, "adaptive-test")}
    assert results["good"].status == "done" and results["good"].frames == 10
    assert results["bad"].status == "failed"
    assert "bad" in results["bad"].error and "0006.jpg" in results["bad"].error
    assert sorted(tables.done_units(root)) == ["good"]
    assert not any(e.path.endswith(".parquet") for e in storage.list_dir(tables.unit_uri(root, "bad"),
                                                                         recursive=True, missing_ok=True))
    assert len(read_unit(root, "good")) == 10


# --- on Ray: the archive command -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def archive(tmp_path_factory, ray_local):
    """Two mp4 files whose sidecars hold only the first box, and an (untrained) ROLO model for the adapted
    features of the default settings: its residual box head starts as the adapted boxes themselves."""
    from rolo_batch.adapt_stage import AdaptJob
    from rolo_batch.datasets.synthetic import SynthConfig, synthesize
    from rolo_batch.rolo import RoloConfig, build_model, export_model

    root = tmp_path_factory.mktemp("archive")
    data = root / "clips"
    synthesize(str(data), SynthConfig(videos=2, frames=12, width=128, height=96, seed=4, video_files=True))
    for sidecar in data.glob("*.groundtruth.txt"):
        sidecar.write_text(sidecar.read_text().splitlines()[0] + "\n")
    torch.manual_seed(0)
    detector_id = AdaptJob(str(data), str(root / "out")).detector_id
    model = build_model(RoloConfig(feature_dim=64, steps=3, hidden_size=8, projection_size=8, detector_id=detector_id))
    export_model(model, str(root / "model.pt"), split="exp1")
    return root


def test_track_archive_tracks_videos_with_only_a_first_box_and_writes_overlays(archive, capsys):
    from rolo_batch import cli

    out = str(archive / "out")
    assert cli.main(["track-archive", str(archive / "clips"), out, str(archive / "model.pt"), "--methods", "rolo",
                     "yolo", "csrt", "--gpu", "off"]) == 0
    printed = capsys.readouterr().out
    assert "adapt" in printed and "tracking with" in printed
    finished = tables.done_units(f"{out}/tracks/archive")
    assert sorted(finished) == ["synth-000", "synth-001"]
    for video, part in finished.items():
        rows = {r.method: r for r in tables.TrackRows.from_arrow(tables.read_parquet(part, contracts.load("tracks")))}
        assert sorted(rows) == ["csrt", "rolo", "yolo"]
        assert all(len(r) == 12 and np.isfinite(r.boxes_xywh_px).all() for r in rows.values())
        assert storage.is_file(f"{out}/overlays/archive/{video}.webm")
    assert cli.main(["track-archive", str(archive / "clips"), out, str(archive / "model.pt"), "--gpu", "off"]) == 0
    assert "already adapted" in capsys.readouterr().out  # a re-run redoes nothing


def test_adaptation_actors_hold_one_gpu_each_and_every_video_is_done_once(archive):
    """With GPUs in the cluster (2 logical ones here) the pool has one actor per GPU, each holding one of its
    own (Ray Data may hand both videos to the actor that is ready first); torch stays on the CPU because the
    GPUs are only logical."""
    from rolo_batch.adapt_stage import AdaptJob, run_adaptation
    from rolo_batch.runtime import plan_video_pool

    plan = plan_video_pool("auto", videos=2, videos_per_batch=1, actors=None, cpus_per_actor=1)
    assert (plan.use_gpu, plan.actors) == (True, 2)
    summary = run_adaptation(AdaptJob(str(archive / "clips"), str(archive / "pinned"), videos_per_batch=1,
                                      gpu="auto"))
    assert sorted((r.video, r.status) for r in summary.results) == [("synth-000", "done"), ("synth-001", "done")]
    gpu_ids = [tuple(w["gpu_ids"]) for w in summary.workers]
    assert gpu_ids and all(len(g) == 1 for g in gpu_ids) and len(set(gpu_ids)) == len(gpu_ids)
    assert {w["device"] for w in summary.workers} == {"cpu"}
    assert all(r.worker["gpu_ids"] for r in summary.results)
