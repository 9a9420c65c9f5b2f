"""The pipeline's reuse of finished stages: a model is reused only for the features it was trained on, and
each run keeps its own overlay videos."""

from __future__ import annotations

import pytest

from rolo_batch import storage
from rolo_batch.datasets.synthetic import SynthConfig, synthesize
from rolo_batch.detector import build_detector, save_detector
from rolo_batch.errors import ConfigError
from rolo_batch.extract import DetectorSpec, ExtractOptions
from rolo_batch.pipeline import PipelineConfig, run_pipeline
from rolo_batch.render import overlay_suffix
from rolo_batch.rolo import RoloConfig, build_model, export_model
from rolo_batch.track import TrackConfig
from rolo_batch.train import TrainConfig
from rolo_batch.windows import WindowConfig


def test_a_model_trained_on_other_features_is_not_reused(ray_local, tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    synthesize(data, SynthConfig(videos=2, frames=8, width=96, height=72, seed=3))
    weights = str(tmp_path / "tiny.pt")
    save_detector(build_detector("yolo-tiny", random_init=True, seed=2), weights)
    stale = storage.join(out, "models", "rolo", "model.pt")  # as a run on the fully-connected features left it
    export_model(build_model(RoloConfig(feature_dim=256, steps=3)), stale, split="exp2",
                 metadata={"features": storage.join(out, "features", "yolo-tiny-0123456789ab")})
    config = PipelineConfig(data_uri=data, out_uri=out, detector=DetectorSpec(weights=weights),
                            extract=ExtractOptions(feature="map7"))
    with pytest.raises(ConfigError, match=r"was trained on the features .*yolo-tiny-0123456789ab.*-map7: delete"):
        run_pipeline(config, log=lambda line: None)
    assert storage.is_file(stale)  # nothing of the earlier run is thrown away


def test_each_run_renders_its_own_overlay_and_keeps_the_others(ray_local, tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    synthesize(data, SynthConfig(videos=2, frames=8, width=96, height=72, seed=4))
    weights = str(tmp_path / "tiny.pt")
    save_detector(build_detector("yolo-tiny", random_init=True, seed=2), weights)
    model = RoloConfig(feature_dim=1, steps=3, hidden_size=8, projection_size=8)

    def run(name: str, seed: int):
        train = TrainConfig(features_uri="", out_uri="", run=name, model=model, window=WindowConfig(steps=3),
                            epochs=1, batch_size=4, gpu="off", seed=seed)
        track = TrackConfig(features_uri="", model_uri="", out_uri="", methods=("rolo", "yolo"), gpu="off")
        config = PipelineConfig(data_uri=data, out_uri=out, detector=DetectorSpec(weights=weights), train=train,
                                track=track, render=("synth-001",))
        return run_pipeline(config, log=lambda line: None)

    first = run("a", seed=1)
    assert first.overlays == [storage.join(out, "overlays", "a", f"synth-001{overlay_suffix()}")]
    written = storage.read_bytes(first.overlays[0])
    second = run("b", seed=2)
    assert second.overlays == [storage.join(out, "overlays", "b", f"synth-001{overlay_suffix()}")]
    assert storage.read_bytes(first.overlays[0]) == written  # the other run's overlay is left as it was
    again = run("a", seed=1)
    assert not again.trained and {r["status"] for r in again.track.rows} == {"skipped"}
    assert again.overlays == first.overlays and storage.read_bytes(first.overlays[0]) == written


def test_a_re_run_with_nothing_to_do_neither_starts_nor_joins_ray(ray_local, tmp_path):
    import json
    import subprocess
    import sys

    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    synthesize(data, SynthConfig(videos=2, frames=12, width=96, height=72, seed=5))
    weights = str(tmp_path / "tiny.pt")
    save_detector(build_detector("yolo-tiny", random_init=True, seed=2), weights)
    train = TrainConfig(features_uri="", out_uri="", run="a", model=RoloConfig(feature_dim=1, steps=3, hidden_size=8,
                        projection_size=8), window=WindowConfig(steps=3), epochs=1, batch_size=4, gpu="off")
    track = TrackConfig(features_uri="", model_uri="", out_uri="", methods=("rolo", "yolo"), gpu="off")
    first = run_pipeline(PipelineConfig(data_uri=data, out_uri=out, detector=DetectorSpec(weights=weights),
                                        train=train, track=track), log=lambda line: None)

    commands = [
        ["extract", data, out, "--weights", weights],
        ["track", first.extract.table_root, first.model_uri, out, "--run", "a"],
        ["score", first.track.run_uri, data, out],
        ["pipeline", data, out, "--weights", weights, "--run", "a"],
    ]
    # A dead cluster address: joining it, or starting a local Ray in its place, would fail the command.
    script = ("import json, sys, ray; from rolo_batch import cli\n"
              "codes = [cli.main(c) for c in json.loads(sys.argv[1])]\n"
              "print('codes', codes, 'ray', ray.is_initialized())")
    env = {**__import__("os").environ, "RAY_ADDRESS": "127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(commands)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert "codes [0, 0, 0, 0] ray False" in done.stdout, done.stdout + done.stderr
    assert done.stdout.count("nothing to do") == 3, done.stdout
    assert "already extracted" in done.stdout and "already tracked" in done.stdout
    assert "reusing the scores" in done.stdout
