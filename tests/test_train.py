"""ROLO training on Ray Train: real data parallelism, learning, checkpoints and resume, S3, the CLI."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest
import torch

from rolo_batch import boxes, cli, contracts, storage, tables
from rolo_batch.rolo import RoloConfig, build_model, load_model
from rolo_batch.train import TrainConfig, run_training, train_step
from rolo_batch.windows import WindowConfig
from rolo_batch.splits import get_split
from tests.helpers import IMAGE_WH, write_synthetic_features
from tests.processes import own_pids_titled


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("features") / "features" / "synthetic-0000")
    write_synthetic_features(root, videos=6, frames=90, dim=16)
    return root


def config(features: str, out: str, **overrides) -> TrainConfig:
    steps = overrides.pop("steps", 3)
    form = overrides.pop("form", "compact")
    model = RoloConfig(form=form, feature_dim=16, steps=steps, hidden_size=32, projection_size=32)
    defaults = dict(features_uri=features, out_uri=out, split="exp2", model=model, window=WindowConfig(steps=steps),
                    epochs=12, batch_size=8, learning_rate=1e-2, gpu="off")
    return TrainConfig(**{**defaults, **overrides})


# --- data parallelism is real ----------------------------------------------------------------------------

def _fixed_batch(seed: int, n: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    return {"inputs": torch.tensor(rng.normal(size=(n, 3, 22)), dtype=torch.float32),
            "targets": torch.tensor(rng.uniform(0.2, 0.8, (n, 4)), dtype=torch.float32),
            "weights": torch.ones(n)}


def _ddp_one_step(loop: dict) -> None:
    import ray.train
    import ray.train.torch

    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(build_model(RoloConfig(**loop["model"])), move_to_device=torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    rank = ray.train.get_context().get_world_rank()
    train_step(model, optimizer, _fixed_batch(100 + rank))
    inner = getattr(model, "module", model)
    flat = torch.cat([p.detach().flatten() for p in inner.parameters()])
    torch.save(flat, f"{loop['out']}/params-{rank}.pt")  # same machine: a file is the simplest channel


def test_one_step_on_two_workers_equals_one_step_on_the_union(ray_local, tmp_path):
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import the tests

    model_config = RoloConfig(form="compact", feature_dim=16, steps=3, hidden_size=8, projection_size=8)
    trainer = TorchTrainer(
        _ddp_one_step, train_loop_config={"model": model_config.__dict__, "out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
        run_config=ray.train.RunConfig(name="ddp", storage_path=str(tmp_path)))
    assert trainer.fit().error is None
    distributed = torch.load(tmp_path / "params-0.pt")
    assert torch.equal(distributed, torch.load(tmp_path / "params-1.pt")), "the replicas diverged"

    torch.manual_seed(0)
    model = build_model(model_config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    a, b = _fixed_batch(100), _fixed_batch(101)
    train_step(model, optimizer, {k: torch.cat([a[k], b[k]]) for k in a})
    union = torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.manual_seed(0)
    single = build_model(model_config)
    optimizer = torch.optim.SGD(single.parameters(), lr=0.5)
    train_step(single, optimizer, a)
    one_half = torch.cat([p.detach().flatten() for p in single.parameters()])

    assert torch.allclose(distributed, union, atol=1e-5)
    assert not torch.allclose(distributed, one_half, atol=1e-4), "the workers did not exchange gradients"


# --- learning, per model form ----------------------------------------------------------------------------

def assert_learned(result) -> None:
    final = result.final
    assert final["val_windows"] > 0 and final["train_windows"] > 0
    assert final["val_loss"] < 0.5 * final["val_baseline_loss"], final
    assert result.history[0]["val_loss"] > final["val_loss"]


def test_cli_train_learns_and_writes_the_run(ray_local, tmp_path, features, capsys):
    code = cli.main(["train", features, str(tmp_path), "--split", "exp2", "--steps", "3", "--epochs", "12",
                     "--batch-size", "8", "--lr", "0.01", "--hidden", "32", "--projection", "32", "--gpu", "off",
                     "--run", "cli-run"])
    assert code == 0
    out = capsys.readouterr().out
    assert "model written to" in out and "cli-run/model.pt" in out and "val_loss" in out
    run = storage.join(str(tmp_path), "models", "cli-run")
    for name in ("model.pt", "metrics.json", "metrics.csv", "loss.png", "split.json", "config.json"):
        assert storage.is_file(storage.join(run, name)), name
    history = json.loads(storage.read_text(storage.join(run, "metrics.json")))["epochs"]
    assert len(history) == 12 and history[-1]["val_loss"] < 0.5 * history[-1]["val_baseline_loss"], history[-1]
    model, info = load_model(storage.join(run, "model.pt"))
    assert info.config.form == "compact" and info.detector_id == "synthetic-0000" and info.feature_dim == 16
    assert info.steps == 3 and info.split == "exp2"


@pytest.mark.parametrize("form, epochs", [("faithful", 15), ("heatmap", 20)])
def test_other_model_forms_learn_too(ray_local, tmp_path, features, form, epochs):
    result = run_training(config(features, str(tmp_path), form=form, epochs=epochs, checkpoint_every=100))
    assert_learned(result)
    model, info = load_model(result.model_uri)
    assert info.config.form == form


def test_feature_maps_train_a_model_that_corrects_the_detections(ray_local, tmp_path):
    root = str(tmp_path / "features" / "synthetic-maps")
    write_synthetic_features(root, videos=6, frames=90, map_shape=(2, 16, 16))
    table = tables.FeaturesTable.open(root)
    model = RoloConfig(form="compact", feature_dim=1, steps=3, hidden_size=32, projection_size=32)
    result = run_training(config(root, str(tmp_path), model=model, epochs=20, detection_jitter=0.15,
                                 learning_rate=3e-3, checkpoint_every=100))
    _, info = load_model(result.model_uri)
    assert info.config.feature_shape == (2, 16, 16) and info.feature_dim == 2 * 16 * 16
    # held-out windows: frames after the first third, scored against the detection they start from
    split = get_split("exp2", first_part="third")
    detection_ious = []
    for unit in table.units.values():
        frames = tables.FeatureFrames.from_arrow(tables.read_parquet(unit.part_uri, contracts.load("features")))
        test = split.test_mask(frames.video, frames.frame)[2:]  # windows of 3 end at the third frame or later
        detected = boxes.cxcywh_norm_to_xywh_px(frames.detection[2:, 1:5], IMAGE_WH)
        detection_ious.append(boxes.iou_xywh(detected, frames.gt_boxes_xywh_px[2:])[test])
    detection_iou = float(np.concatenate(detection_ious).mean())
    assert result.final["val_iou"] > detection_iou + 0.05, (result.final, detection_iou)


def test_two_workers_on_s3(ray_local, bucket):
    root = f"s3://{bucket}/work/features/synthetic-0000"
    write_synthetic_features(root, videos=6, frames=90, dim=16)
    result = run_training(config(f"s3://{bucket}/work", f"s3://{bucket}/work", workers=2, epochs=12))
    assert result.final["workers"] == 2 and result.final["samples_per_s_per_worker"] > 0
    assert_learned(result)
    assert result.model_uri == f"s3://{bucket}/work/models/rolo/model.pt" and storage.is_file(result.model_uri)
    assert any(e.name.startswith("checkpoint_") for e in storage.list_dir(f"s3://{bucket}/work/models/rolo/ray"))


# --- checkpoints and resume ------------------------------------------------------------------------------

def test_an_interrupted_run_resumes_from_its_last_checkpoint(ray_local, tmp_path, features):
    out = str(tmp_path)
    cfg = config(features, out, epochs=12)
    checkpoints = tmp_path / "models" / "rolo" / "ray"
    failure = {}

    def train() -> None:
        try:
            run_training(cfg)
        except Exception as exc:  # noqa: BLE001 - the interruption we cause
            failure["error"] = exc

    runner = threading.Thread(target=train)
    runner.start()
    deadline = time.monotonic() + 240
    snapshot = checkpoints / "checkpoint_manager_snapshot.json"  # written once a checkpoint is registered
    while not snapshot.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert snapshot.exists(), "no checkpoint was registered"
    workers = own_pids_titled(b"ray::RayTrainWorker")
    assert workers, "no training worker found"
    for pid in workers:  # a crash, as when a node dies
        os.kill(pid, signal.SIGKILL)
    runner.join(timeout=240)
    assert "error" in failure, "the run was not interrupted"

    resumed = run_training(config(features, out, epochs=12))
    assert resumed.resumed_from_epoch >= 1, "training restarted at epoch 0"
    epochs = [h["epoch"] for h in resumed.history]
    assert epochs == list(range(1, 13)), "epochs lost or repeated across the interruption"




def _write_unit(root: str, name: str, frames: int, seed: int) -> None:
    from tests.helpers import synthetic_feature_frames

    rows = synthetic_feature_frames(name, frames, 16, seed=seed)
    unit = tables.unit_uri(root, name)
    tables.write_parquet(storage.join(unit, tables.PART_FILE), rows.to_arrow(), contracts.load("features"),
                         tables.features_metadata("synthetic-0000", 16))
    storage.mark_done(unit, tables.features_marker(name, rows.frame, "synthetic-0000", 16, IMAGE_WH))


def test_a_bad_video_and_another_length_than_otb30_do_not_stop_training(ray_local, tmp_path, capsys):
    # OTB-100's Diving has 215 frames where OTB30 lists 214; "broken" is a finished unit whose file is garbage
    root = str(tmp_path / "features" / "synthetic-0000")
    for seed, (name, frames) in enumerate([("Diving", 215), ("good-1", 60), ("broken", 60)]):
        _write_unit(root, name, frames, seed)
    storage.write_bytes(storage.join(tables.unit_uri(root, "broken"), tables.PART_FILE), b"not parquet")
    code = cli.main(["train", root, str(tmp_path), "--split", "exp2", "--steps", "3", "--epochs", "1",
                     "--batch-size", "8", "--hidden", "8", "--projection", "8", "--gpu", "off", "--run", "r"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "model written to" in captured.out
    assert "warning: Diving: 215 frames, but otb30.csv lists 214 (71 train frames)" in captured.err
    failed = [line for line in captured.err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and failed[0].startswith("failed: broken: ") and "part-0.parquet" in failed[0], failed
    manifest = json.loads(storage.read_text(storage.join(str(tmp_path), "models", "r", "split.json")))
    assert manifest["videos"]["Diving"]["first_part_rule"] == "third"
    assert manifest["videos"]["Diving"]["train"] == [[1, 71]]


def test_training_with_every_video_bad_says_so(ray_local, tmp_path):
    from rolo_batch.errors import InputError

    root = str(tmp_path / "features" / "synthetic-0000")
    _write_unit(root, "only", 60, 0)
    storage.write_bytes(storage.join(tables.unit_uri(root, "only"), tables.PART_FILE), b"not parquet")
    with pytest.raises(InputError, match=r"no training windows: every video .* \(only: .*not a readable Parquet"):
        run_training(config(root, str(tmp_path), epochs=1))


def test_a_seeded_run_repeats_exactly(ray_local, tmp_path, features):
    # two runs, same seed and workers, augmentation on: the same losses every epoch and the same weights
    runs = [run_training(config(features, str(tmp_path), run=name, epochs=2, detection_jitter=0.1,
                                detection_drop=0.1, checkpoint_every=100)) for name in ("a", "b")]
    learned = [[(h["loss"], h["val_loss"], h["val_iou"]) for h in r.history] for r in runs]
    assert learned[0] == learned[1]
    weights = [load_model(r.model_uri)[0].state_dict() for r in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
