"""Feature extraction: the plain per-video function, and the Ray layer (GPU pinning, exactly-once, resume,
an actor killed mid-video, bad videos, S3 in and out)."""

from __future__ import annotations

import shutil
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rolo_batch import cli, contracts, datasets, storage, tables
from rolo_batch.datasets.synthetic import SynthConfig, synthesize
from rolo_batch.detector import build_detector, save_detector
from rolo_batch.extract import DetectorSpec, ExtractOptions, extract_video, plan_actors, run_extraction
from rolo_batch.runtime import ClusterResources

SMALL = dict(width=96, height=72)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> str:
    """A yolo-tiny checkpoint (random weights, saved on purpose) with a small feature size."""
    path = str(tmp_path_factory.mktemp("weights") / "tiny.pt")
    save_detector(build_detector("yolo-tiny", random_init=True, seed=3), path)
    return path


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("videos"))
    synthesize(root, SynthConfig(videos=4, frames=12, seed=1, **SMALL))
    return root


def read_unit(table_root: str, video: str):
    return tables.read_parquet(storage.join(tables.unit_uri(table_root, video), tables.PART_FILE),
                               contracts.load("features"))


# --- plain function --------------------------------------------------------------------------------------

def test_extract_video_writes_one_validated_row_per_frame(tmp_path, collection, tiny_weights):
    detector = build_detector(None, tiny_weights)
    ref = datasets.discover(collection).videos[1]
    root = str(tmp_path / "features")
    result = extract_video(detector, ref, root, ExtractOptions(batch_size=5))
    assert result.status == "done" and result.frames == 12
    table = read_unit(root, ref.name)
    frames = tables.FeatureFrames.from_arrow(table)
    np.testing.assert_array_equal(frames.frame, np.arange(1, 13))
    assert frames.feature_dim == detector.config.feature_dim
    video = datasets.open_video(ref)
    np.testing.assert_allclose(frames.gt_boxes_xywh_px, video.groundtruth.boxes_xywh_px, atol=1e-3)
    expected = detector([video.read_frame(i) for i in range(12)])
    np.testing.assert_allclose(frames.feature, expected.features, rtol=1e-2, atol=1e-2)
    assert pq.ParquetFile(storage.join(tables.unit_uri(root, ref.name), tables.PART_FILE)).num_row_groups == 3
    marker = storage.read_done(tables.unit_uri(root, ref.name))
    assert marker["rows"] == 12 and marker["detector_id"] == detector.detector_id
    assert marker["source"]["uri"] == ref.uri


def test_a_feature_map_is_stored_flat_with_its_shape(tmp_path, collection, tiny_weights):
    detector = build_detector(None, tiny_weights, feature="map14")
    ref = datasets.discover(collection).videos[0]
    root = tables.features_root(str(tmp_path), detector.features_id)
    extract_video(detector, ref, root, ExtractOptions(batch_size=5, feature="map14"))
    unit = tables.unit_uri(root, ref.name)
    table = read_unit(root, ref.name)
    frames = tables.FeatureFrames.from_arrow(table)
    assert frames.feature_dim == 256 * 14 * 14
    assert tables.read_schema(storage.join(unit, tables.PART_FILE)).metadata[b"rolo_batch.feature_shape"] == \
        b"256,14,14"
    assert storage.read_done(unit)["feature_shape"] == [256, 14, 14]
    assert tables.FeaturesTable.open(root).feature_shape == (256, 14, 14)
    video = datasets.open_video(ref)
    expected = detector([video.read_frame(i) for i in range(12)])
    np.testing.assert_allclose(frames.feature, expected.features, rtol=1e-2, atol=1e-2)  # stored as float16
    vector = build_detector(None, tiny_weights)([video.read_frame(i) for i in range(12)])
    for stored, plain in zip(frames.detections, vector.detections):
        np.testing.assert_allclose(stored, plain, rtol=1e-5, atol=1e-6)  # same detections as with --feature fc


def test_a_bad_frame_publishes_nothing_for_that_video(tmp_path, tiny_weights):
    synthesize(str(tmp_path / "v"), SynthConfig(videos=1, frames=8, seed=2, **SMALL))
    (tmp_path / "v" / "synth-000" / "img" / "0006.jpg").write_bytes(b"")
    ref = datasets.discover(str(tmp_path / "v")).videos[0]
    with pytest.raises(Exception, match="0006.jpg"):
        extract_video(build_detector(None, tiny_weights), ref, str(tmp_path / "f"), ExtractOptions(batch_size=4))
    unit = tables.unit_uri(str(tmp_path / "f"), ref.name)
    assert not storage.is_done(unit)
    assert not any(e.name == tables.PART_FILE for e in storage.list_dir(unit, missing_ok=True))


def test_memory_is_bounded_by_the_batch_not_the_video(tmp_path, tiny_weights):
    detector = build_detector(None, tiny_weights)

    def peak_bytes(frames: int) -> int:
        root = tmp_path / f"v{frames}"
        synthesize(str(root), SynthConfig(videos=1, frames=frames, seed=4, **SMALL))
        ref = datasets.discover(str(root)).videos[0]
        tracemalloc.start()
        extract_video(detector, ref, str(tmp_path / f"f{frames}"), ExtractOptions(batch_size=4))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return peak

    short, long = peak_bytes(12), peak_bytes(120)
    assert long < 1.5 * short, f"peak {long} bytes for 10x the frames vs {short}"


def test_plan_follows_the_gpus_and_never_exceeds_the_videos():
    gpus = ClusterResources(cpus=16, gpus=4)
    assert plan_actors(gpus, videos=10, actors=None, gpus_per_actor=1, cpus_per_actor=2).actors == 4
    assert plan_actors(gpus, videos=10, actors=None, gpus_per_actor=0.5, cpus_per_actor=2).actors == 8
    assert plan_actors(gpus, videos=3, actors=None, gpus_per_actor=1, cpus_per_actor=2).actors == 3
    cpu_only = plan_actors(ClusterResources(cpus=8, gpus=0), videos=10, actors=None, gpus_per_actor=1,
                           cpus_per_actor=2)
    assert (cpu_only.actors, cpu_only.num_gpus, cpu_only.num_cpus) == (4, 0.0, 2)


# --- Ray layer -------------------------------------------------------------------------------------------

def test_actors_are_pinned_to_distinct_gpus_and_every_video_is_done_once(ray_local, tmp_path, collection,
                                                                         tiny_weights):
    summary = run_extraction(collection, str(tmp_path), DetectorSpec(weights=tiny_weights),
                             ExtractOptions(batch_size=8))
    assert [r.status for r in summary.results] == ["done"] * 4
    gpu_ids = [tuple(w["gpu_ids"]) for w in summary.workers]
    assert len(gpu_ids) == 2 and all(len(g) == 1 for g in gpu_ids) and gpu_ids[0] != gpu_ids[1]
    used = {tuple(r.worker["gpu_ids"]) for r in summary.results}
    assert used <= set(gpu_ids)
    for video in ("synth-000", "synth-001", "synth-002", "synth-003"):
        frames = read_unit(summary.table_root, video).column("frame").to_pylist()
        assert sorted(frames) == list(range(1, 13))
    assert summary.table_root == tables.features_root(str(tmp_path), summary.detector_id)
    assert "TOTAL" in summary.table() and "4 done" in summary.table()


def test_rerun_skips_done_videos_and_redoes_the_rest(ray_local, tmp_path, collection, tiny_weights):
    spec = DetectorSpec(weights=tiny_weights)
    first = run_extraction(collection, str(tmp_path), spec)
    before = {v: storage.read_done(tables.unit_uri(first.table_root, v)) for v in ("synth-000", "synth-002")}
    again = run_extraction(collection, str(tmp_path), spec)
    assert [r.status for r in again.results] == ["skipped"] * 4
    assert sum(r.frames for r in again.results) == 0
    storage.delete(storage.join(tables.unit_uri(first.table_root, "synth-002"), storage.DONE_MARKER))
    third = run_extraction(collection, str(tmp_path), spec)
    assert {r.video: r.status for r in third.results} == {"synth-000": "skipped", "synth-001": "skipped",
                                                          "synth-002": "done", "synth-003": "skipped"}
    assert storage.read_done(tables.unit_uri(first.table_root, "synth-000")) == before["synth-000"]
    assert read_unit(first.table_root, "synth-002").num_rows == 12


def test_an_actor_killed_mid_video_is_replaced_and_its_video_redone_once(ray_local, tmp_path, tiny_weights):
    import ray

    data = tmp_path / "data"
    synthesize(str(data), SynthConfig(videos=2, frames=160, seed=6, **SMALL))
    out = tmp_path / "out"
    outcome = {}

    def extract() -> None:
        outcome["summary"] = run_extraction(str(data), str(out), DetectorSpec(weights=tiny_weights),
                                            ExtractOptions(batch_size=4), actor_name_prefix="kill-test",
                                            progress_interval_s=0.5)

    worker = threading.Thread(target=extract)
    worker.start()
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline:
        partial = list(out.glob("features/*/*/.part-0.parquet.tmp-*"))
        if partial:  # a video is half written: kill the actors (we cannot tell which one holds it)
            victim = partial[0].parent.name
            for name in ("kill-test-0", "kill-test-1"):
                ray.kill(ray.get_actor(name))
        time.sleep(0.05)
    worker.join(timeout=300)
    assert victim is not None, "never saw a video in progress"
    summary = outcome["summary"]
    assert [r.status for r in summary.results] == ["done", "done"]
    assert max(r.attempt for r in summary.results) == 2
    for video in ("synth-000", "synth-001"):
        frames = read_unit(summary.table_root, video).column("frame").to_pylist()
        assert sorted(frames) == list(range(1, 161)), "rows lost or duplicated"
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") and p.is_file()]
    assert leftovers == [] or all(".tmp-" in p.name for p in leftovers)


def test_a_bad_video_fails_by_name_and_the_others_complete(ray_local, tmp_path, tiny_weights, capsys):
    data = tmp_path / "data"
    synthesize(str(data), SynthConfig(videos=3, frames=6, seed=7, **SMALL))
    (data / "synth-001" / "img" / "0004.jpg").write_bytes(b"\xff\xd8 truncated")
    (data / "synth-002" / "groundtruth_rect.txt").write_text("1,2,3,4\n1,2,3\n")
    code = cli.main(["extract", str(data), str(tmp_path / "out"), "--weights", tiny_weights])
    assert code == 1
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("synth-")}
    assert "done" in lines["synth-000"]
    assert "failed" in lines["synth-001"] and "0004.jpg" in lines["synth-001"] and "truncated" in lines["synth-001"]
    assert "failed" in lines["synth-002"] and "line 2" in lines["synth-002"]
    assert "TOTAL" in out


def test_s3_in_and_out(ray_local, bucket, tiny_weights, s3_client):
    synthesize(f"s3://{bucket}/videos", SynthConfig(videos=2, frames=5, seed=8, **SMALL))
    summary = run_extraction(f"s3://{bucket}/videos", f"s3://{bucket}/out", DetectorSpec(weights=tiny_weights))
    assert [r.status for r in summary.results] == ["done", "done"]
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]]
    prefix = f"out/features/{summary.detector_id}"
    assert f"{prefix}/synth-001/part-0.parquet" in keys and f"{prefix}/synth-001/_done.json" in keys
    assert read_unit(summary.table_root, "synth-000").num_rows == 5


def test_cli_extract_writes_feature_maps_to_their_own_table_and_names_a_bad_one(ray_local, tmp_path, collection,
                                                                               capsys):
    out = str(tmp_path / "o")
    one = ["extract", collection, out, "--random-init", "--videos", "synth-000"]
    assert cli.main(one + ["--feature", "map14"]) == 0
    assert cli.main(one) == 0
    roots = sorted(e.name for e in storage.list_dir(storage.join(out, "features")) if e.is_dir)
    assert len(roots) == 2 and roots[1] == roots[0] + "-map14"
    maps = tables.FeaturesTable.open(storage.join(out, "features", roots[1]))
    vectors = tables.FeaturesTable.open(storage.join(out, "features", roots[0]))
    assert (maps.feature_shape, maps.feature_dim) == ((256, 14, 14), 256 * 14 * 14)
    assert (vectors.feature_shape, vectors.feature_dim) == (None, 256)
    capsys.readouterr()
    assert cli.main(one + ["--feature", "map500"]) == 2  # checked against the network, in the actor
    assert "no convolution of yolo-tiny outputs a map of at least 500 x 500" in capsys.readouterr().err
    assert cli.main(one + ["--feature", "conv5"]) == 2  # checked before any cluster work
    assert "'conv5' is not understood" in capsys.readouterr().err


def test_cli_extract_prints_a_summary_and_refuses_missing_weights(ray_local, tmp_path, collection, capsys):
    assert cli.main(["extract", collection, str(tmp_path / "o")]) == 2
    assert "--random-init" in capsys.readouterr().err
    assert cli.main(["extract", collection, str(tmp_path / "o"), "--random-init", "--videos", "synth-000"]) == 0
    out = capsys.readouterr().out
    assert "synth-000" in out and "features written to" in out
