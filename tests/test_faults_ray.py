"""Faults in the middle of a job: the driver interrupted, a Ray Train worker killed mid-epoch, a tracking actor
killed mid-video. Each job still completes (or, interrupted, completes on a re-run) with every row once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rolo_batch import contracts, storage, tables
from rolo_batch.datasets.synthetic import SynthConfig, synthesize
from rolo_batch.detector import build_detector, save_detector
from rolo_batch.extract import DetectorSpec, run_extraction
from rolo_batch.rolo import RoloConfig, build_model, export_model
from rolo_batch.track import TrackConfig, run_tracking
from rolo_batch.train import TrainConfig, run_training
from rolo_batch.windows import WindowConfig
from tests.helpers import write_synthetic_features
from tests.processes import own_pids_titled


def visible_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]


def feature_rows(table_root: str) -> dict[str, list[int]]:
    return {video: sorted(pq.read_table(uri).column("frame").to_pylist())
            for video, uri in tables.done_units(table_root).items()}


@pytest.mark.timeout(600)
def test_an_interrupted_extraction_resumes_to_the_same_result(tmp_path, s3_env):
    data, out, reference = tmp_path / "data", tmp_path / "out", tmp_path / "reference"
    synthesize(str(data), SynthConfig(videos=3, frames=40, width=96, height=72, seed=12))
    weights = str(tmp_path / "tiny.pt")
    save_detector(build_detector("yolo-tiny", random_init=True, seed=4), weights)
    command = [sys.executable, "-m", "rolo_batch.cli", "extract", str(data), str(out), "--weights", weights,
               "--frames-per-batch", "4", "--actors", "1"]
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(out.glob("features/*/*/_done.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(out.glob("features/*/*/_done.json")), "no video finished"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "run the same command again" in err
    done_before = {p.parent.name: p.read_text() for p in out.glob("features/*/*/_done.json")}
    assert 1 <= len(done_before) < 3, "the interruption came too late to leave work undone"
    for path in visible_files(out):  # nothing partial is visible: every visible Parquet file is complete
        if path.suffix == ".parquet":
            assert (path.parent / "_done.json").exists() or pq.read_table(path).num_rows == 40

    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    statuses = {line.split()[0]: line.split()[1] for line in rerun.stdout.splitlines() if line.startswith("synth-")}
    for unit in done_before:
        assert statuses[unit.removeprefix("video=")] == "skipped", "a finished video was redone"
    for unit, marker in done_before.items():
        assert next(out.glob(f"features/*/{unit}/_done.json")).read_text() == marker
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "temporary files left behind"

    uninterrupted = subprocess.run([*command[:5], str(reference), *command[6:]], env=env, capture_output=True,
                                   text=True, timeout=300)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    resumed_root = str(next(out.glob("features/*")))
    reference_root = str(next(reference.glob("features/*")))
    assert feature_rows(resumed_root) == feature_rows(reference_root) == {
        f"synth-00{i}": list(range(1, 41)) for i in range(3)}
    for video in ("synth-000", "synth-002"):
        a = tables.FeatureFrames.from_arrow(pq.read_table(tables.done_units(resumed_root)[video]))
        b = tables.FeatureFrames.from_arrow(pq.read_table(tables.done_units(reference_root)[video]))
        np.testing.assert_array_equal(a.feature, b.feature)


@pytest.mark.timeout(600)
def test_a_training_worker_killed_mid_epoch_is_restarted_from_the_last_checkpoint(ray_local, tmp_path):
    features = str(tmp_path / "features" / "synthetic-0000")
    write_synthetic_features(features, videos=4, frames=60, dim=16)
    config = TrainConfig(features_uri=features, out_uri=str(tmp_path), split="exp2",
                         model=RoloConfig(feature_dim=16, steps=3, hidden_size=16, projection_size=16),
                         window=WindowConfig(steps=3), epochs=6, batch_size=8, gpu="off", max_failures=2)
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("result", run_training(config)))
    runner.start()
    snapshot = tmp_path / "models" / "rolo" / "ray" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 240
    while not snapshot.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = own_pids_titled(b"ray::RayTrainWorker")
    assert snapshot.exists() and killed, "training never reached its first checkpoint"
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    runner.join(timeout=400)
    result = outcome["result"]
    assert [h["epoch"] for h in result.history] == list(range(1, 7)), "epochs lost or repeated"
    assert len({h["session"] for h in result.history}) == 1  # restarted inside the same run, not by a re-run
    assert storage.is_file(result.model_uri)


@pytest.mark.timeout(600)
def test_a_tracking_actor_killed_mid_video_leaves_every_row_exactly_once(ray_local, tmp_path):
    synthesize(str(tmp_path / "data"), SynthConfig(videos=2, frames=120, width=160, height=120, seed=13))
    weights = str(tmp_path / "tiny.pt")
    save_detector(build_detector("yolo-tiny", random_init=True, seed=5), weights)
    extracted = run_extraction(str(tmp_path / "data"), str(tmp_path / "out"), DetectorSpec(weights=weights))
    table = tables.FeaturesTable.open(extracted.table_root)
    export_model(build_model(RoloConfig(feature_dim=table.feature_dim, steps=3, hidden_size=8, projection_size=8,
                                        detector_id=table.detector_id)), str(tmp_path / "model.pt"), split="exp2")
    config = TrackConfig(extracted.table_root, str(tmp_path / "model.pt"), str(tmp_path / "out"),
                         methods=("rolo", "yolo", "csrt", "mil"), videos_per_batch=1, actors=1, gpu="off")
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.setdefault("summary", run_tracking(config)))
    runner.start()
    deadline = time.monotonic() + 240
    victims = []
    while not victims and time.monotonic() < deadline:
        victims = own_pids_titled(b"TrackBatch")
        time.sleep(0.1)
    assert victims, "no tracking actor appeared"
    time.sleep(3)  # into its first video (CSRT and MIL take a while per frame)
    done_at_kill = list((tmp_path / "out" / "tracks" / "rolo").glob("*/_done.json"))
    for pid in own_pids_titled(b"TrackBatch"):
        os.kill(pid, signal.SIGKILL)
    runner.join(timeout=500)
    summary = outcome["summary"]
    assert len(done_at_kill) < 2, "the actor was killed after the work was done"
    assert {r["status"] for r in summary.rows} <= {"done", "skipped"}
    units = tables.done_units(summary.run_uri)
    assert sorted(units) == ["synth-000", "synth-001"]
    for video, uri in units.items():
        rows = tables.read_parquet(uri, contracts.load("tracks"))
        keys = list(zip(rows.column("method").to_pylist(), rows.column("frame").to_pylist()))
        assert len(keys) == len(set(keys)) == 4 * 120, f"{video}: rows lost or duplicated"
    assert not [p for p in (tmp_path / "out" / "tracks").rglob("*") if ".tmp-" in p.name]
