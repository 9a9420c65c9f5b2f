"""Scoring a tracking run as Ray Data work: training frames excluded, both protocols, tables and report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rolo_batch import contracts, datasets, splits, storage, tables
from rolo_batch.datasets.synthetic import SynthConfig, synthesize
from rolo_batch.errors import InputError
from rolo_batch.score import ScoreConfig, run_scoring
from rolo_batch.track import RUN_INFO, write_video_tracks

FRAMES = 12


def make_run(data: str, out: str, with_manifest: bool = True) -> str:
    """A tracks run over the videos under ``data``: a perfect tracker (the ground truth) and the identity
    tracker (the first box forever), plus the exp2 split manifest of a model trained on the first third."""
    found = datasets.discover(data)
    run = storage.join(out, "tracks", "run")
    numbers = {}
    for ref in found.videos:
        video = datasets.open_video(ref)
        gt = video.groundtruth.boxes_xywh_px
        numbers[ref.name] = video.frame_numbers
        perfect = tables.TrackRows(ref.name, "perfect", video.frame_numbers, gt, time_ms=np.full(len(gt), 2.0))
        identity = tables.TrackRows(ref.name, "identity", video.frame_numbers, np.tile(gt[0], (len(gt), 1)))
        write_video_tracks(run, ref.name, [perfect, identity], None, {"model": "test"})
    info = {"steps": 3}
    if with_manifest:
        manifest_uri = storage.join(out, "split.json")
        splits.write_manifest(manifest_uri, splits.split_manifest(splits.get_split("exp2", first_part="third"),
                                                                    numbers))
        info["split_manifest"] = manifest_uri
    storage.write_text(storage.join(run, RUN_INFO), json.dumps(info))
    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("score") / "data")
    synthesize(root, SynthConfig(videos=2, frames=FRAMES, width=96, height=72, seed=9))
    return root


def by_key(summary) -> dict:
    return {(s.video, s.method): s for s in summary.scores}


def test_training_frames_are_excluded_and_the_perfect_tracker_is_perfect(ray_local, data, tmp_path):
    run = make_run(data, str(tmp_path))
    summary = run_scoring(ScoreConfig(run, data, str(tmp_path)))
    scores = by_key(summary)
    test_frames = FRAMES - FRAMES // 3
    assert scores[("synth-000", "perfect")].frames == test_frames
    assert scores[(None, "perfect")].frames == 2 * test_frames
    assert scores[(None, "perfect")].success_auc == pytest.approx(20 / 21)  # success = IoU > t, t up to 1
    assert scores[(None, "perfect")].precision_20px == 1.0
    assert scores[(None, "identity")].success_auc < scores[(None, "perfect")].success_auc
    assert scores[(None, "perfect")].fps == pytest.approx(500.0)
    written = tables.read_parquet(summary.scores_uri, contracts.load("scores"))
    assert written.num_rows == 6 and written.column("video").null_count == 2
    markdown = storage.read_text(summary.files.markdown)
    assert "IoU > threshold" in markdown or "IoU >" in markdown
    assert "synth-001" in markdown and "perfect" in markdown
    assert "perfect" in summary.table() and "identity" in summary.table()


def test_every_frame_when_asked_and_the_rolo_protocol(ray_local, data, tmp_path):
    run = make_run(data, str(tmp_path))
    every = by_key(run_scoring(ScoreConfig(run, data, str(tmp_path), include_training_frames=True)))
    assert every[("synth-000", "perfect")].frames == FRAMES
    rolo = by_key(run_scoring(ScoreConfig(run, data, str(tmp_path), run="paper", protocol="rolo",
                                          include_training_frames=True)))
    assert rolo[("synth-000", "perfect")].frames == FRAMES - 3  # the model's 3 steps are not scored
    assert rolo[(None, "perfect")].success_auc == pytest.approx(1.0)  # IoU >= t over 20 thresholds


def test_scoring_on_s3(ray_local, data, bucket, s3_client):
    run = make_run(data, f"s3://{bucket}/out")
    summary = run_scoring(ScoreConfig(run, data, f"s3://{bucket}/out"))
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="out/scores/")["Contents"]}
    assert {f"out/scores/run/{n}" for n in ("scores.parquet", "report.md", "success.png", "precision.png")} <= keys
    assert by_key(summary)[(None, "perfect")].frames == 2 * (FRAMES - FRAMES // 3)


def test_a_run_with_nothing_finished_is_a_clear_error(ray_local, data, tmp_path):
    with pytest.raises(InputError, match="no finished videos"):
        run_scoring(ScoreConfig(str(tmp_path / "tracks" / "none"), data, str(tmp_path)))
