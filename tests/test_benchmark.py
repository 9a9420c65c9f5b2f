"""The benchmark keeps working (it runs and reports every figure); how fast is not asserted here."""

from __future__ import annotations

import json

import pytest

from rolo_batch import cli
from rolo_batch.benchmark import BenchmarkConfig, Figure, Ratio
from rolo_batch.errors import ConfigError


@pytest.mark.timeout(900)
def test_benchmark_runs_every_stage_and_reports_ratios(ray_local, tmp_path, capsys):
    code = cli.main(["benchmark", str(tmp_path), "--frames", "8", "--width", "96", "--height", "72",
                     "--batch-size", "4", "--threads", "1", "--runs", "1", "--warmup", "0", "--videos-per-batch", "2",
                     "--train-epochs", "1", "--gpu", "off"])
    assert code == 0
    printed = capsys.readouterr().out
    ratios = ["track window / bare LSTM window", "track stream / bare LSTM step", "track stream / track window",
              "track stream / bare LSTM over whole videos",
              "train: per-worker throughput, 2 workers / 1"]
    for name in ("yolo-tiny", "efficientnet-yolo"):  # both detectors by default
        ratios += [f"extract {name}: pipeline / bare detector", f"extract {name}: pipeline / naive loop",
                   f"memory {name}: 4x longer video / video", f"train-detector {name}: epoch / bare steps"]
    for ratio in ratios:
        assert ratio in printed
    report = json.loads((tmp_path / "benchmark.json").read_text())
    assert sorted(r["ratio"] for r in report["ratios"]) == sorted(ratios)
    assert all(r["value"] > 0 for r in report["ratios"])
    assert all(len(f["values"]) == 1 and f["median"] > 0 for f in report["figures"])
    assert "device" in report["environment"] and (tmp_path / "benchmark.md").read_text().startswith("- ")


def test_figures_and_ratios():
    fast, slow = Figure("a", "frames/s", [10, 30, 20]), Figure("b", "frames/s", [40, 40, 40])
    assert fast.median == 20 and fast.row()["min"] == 10 and fast.row()["max"] == 30
    ratio = Ratio("a/b", fast, slow, target=0.85)
    assert ratio.value == 0.5 and ratio.row()["met"] == "NO"
    assert Ratio("b/a", slow, fast, target=0.85).row()["met"] == "yes"
    with pytest.raises(ConfigError):
        BenchmarkConfig(out_uri="x", stages=("nope",))
    with pytest.raises(ConfigError, match="detectors must be presets"):
        BenchmarkConfig(out_uri="x", detectors=("resnet",))
