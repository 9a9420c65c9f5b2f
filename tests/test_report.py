"""Reports: the files land locally and on S3, the plots are real images, the markdown says everything."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from rolo_batch import metrics, report, storage
from rolo_batch.errors import InputError
from rolo_batch.metrics import Protocol

VIDEOS = ("synth-000", "synth-001", "Basketball")
# method -> how far (px) its boxes sit from the ground truth: the smaller, the better it scores.
METHODS = {"rolo": 2.0, "yolo": 6.0, "kcf": 14.0, "csrt": 30.0}


def make_scores(protocol: Protocol = Protocol.otb()) -> list[metrics.VideoScore]:
    rng = np.random.default_rng(0)
    rows = []
    for video in VIDEOS:
        gt = np.column_stack([rng.uniform(0, 200, (40, 2)), rng.uniform(20, 60, (40, 2))])
        for method, spread in METHODS.items():
            pred = gt + rng.normal(0, spread, gt.shape)
            rows.append(metrics.score_video(gt, np.ones(40, bool), pred, np.arange(1, 41), protocol,
                                            time_ms=np.full(40, 5.0), video=video, method=method))
    return rows


def decode_png(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a decodable image"
    return image


def test_report_files_land_locally(tmp_path):
    rows = make_scores()
    out = str(tmp_path / "scores" / "run1")
    files = report.write_report(rows + metrics.summarise(rows), out)
    assert sorted(p.name for p in (tmp_path / "scores" / "run1").iterdir()) == \
        ["precision.png", "report.md", "success.png"]  # no temporary files left behind
    for uri in (files.success_png, files.precision_png):
        image = decode_png(storage.read_bytes(uri))
        height, width = image.shape[:2]
        assert 300 <= width <= 2000 and 300 <= height <= 2000
        assert image.std() > 10  # something is drawn


def test_report_files_land_on_s3(bucket, s3_client):
    out = f"s3://{bucket}/scores/run1"
    files = report.write_report(make_scores(), out)  # per-video rows only: averaged by the report
    listed = s3_client.list_objects_v2(Bucket=bucket)["Contents"]
    keys = sorted(o["Key"] for o in listed if not o["Key"].endswith("/"))  # pyarrow may add a directory marker
    assert keys == ["scores/run1/precision.png", "scores/run1/report.md", "scores/run1/success.png"]
    body = s3_client.get_object(Bucket=bucket, Key="scores/run1/success.png")["Body"].read()
    assert decode_png(body).shape[1] >= 300
    assert "rolo" in storage.read_text(files.markdown)


def test_markdown_has_every_method_video_and_the_conventions():
    rows = make_scores(Protocol.rolo(3))
    text = report.report_markdown(rows)
    for name in (*METHODS, *VIDEOS):
        assert name in text
    for line in metrics.conventions_text(Protocol.rolo(3)).splitlines():
        assert line in text
    assert "](success.png)" in text and "](precision.png)" in text
    assert "| method | videos | frames | success AUC | precision@20 | norm. precision | fps |" in text
    # one row per (video, method) in the per-video table
    per_video = text.split("## Per video", 1)[1]
    assert sum(line.startswith("| synth-") or line.startswith("| Basketball") for line in per_video.splitlines()) \
        == len(VIDEOS) * len(METHODS)


def test_legend_order_follows_the_scores():
    rows = make_scores()
    overall = {s.method: s for s in metrics.summarise(rows)}
    by_auc = sorted(overall, key=lambda m: -overall[m].success_auc)
    by_precision = sorted(overall, key=lambda m: -overall[m].precision_20px)
    assert report.legend_order(rows, "success") == by_auc
    assert report.legend_order(rows, "precision") == by_precision
    assert by_auc[0] == "rolo" and by_auc[-1] == "csrt"
    assert [r["method"] for r in report.summary_rows(rows)] == by_auc


def test_plots_label_methods_with_their_scores(monkeypatch):
    labels = []
    original = report._plot_png

    def spy(curves, *args, **kwargs):
        labels.append([curve[0] for curve in curves])
        return original(curves, *args, **kwargs)

    monkeypatch.setattr(report, "_plot_png", spy)
    rows = make_scores()
    report.success_plot_png(rows)
    report.precision_plot_png(rows)
    overall = {s.method: s for s in metrics.summarise(rows)}
    assert labels[0][0] == f"rolo [{overall['rolo'].success_auc:.3f}]"
    assert labels[1] == [f"{m} [{overall[m].precision_20px:.3f}]" for m in report.legend_order(rows, "precision")]


def test_reads_a_scores_table_and_prints_a_summary():
    rows = make_scores()
    table = metrics.scores_table(rows + metrics.summarise(rows))
    text = report.summary_text(table)
    lines = text.splitlines()
    assert lines[0] == "protocol otb"
    assert lines[1].split() == ["method", "videos", "frames", "success", "AUC", "precision@20", "norm.",
                                "precision", "fps"]
    assert [line.split()[0] for line in lines[3:]] == report.legend_order(rows, "success")
    assert all(line.split()[1:3] == ["3", "120"] for line in lines[3:])  # 3 videos, 120 frames
    assert "200.000" in text  # 5 ms a frame


def test_nothing_to_report_is_an_error():
    with pytest.raises(InputError, match="no scores"):
        report.report_markdown([])
