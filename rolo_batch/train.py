"""Data-parallel ROLO training on Ray Train, reading the features table through Ray Data.

Layers, from the inside out:

- ``train_step`` / ``evaluate_batch``: one optimisation step / one evaluation on a batch of windows
  (``rolo_batch.rolo.objective``), no Ray.
- ``windows_dataset``: a Ray Data dataset of training (or test) windows, built per video on the cluster
  from the features table (local or S3); the driver never loads the features.
- ``train_loop_per_worker``: the Ray Train loop (DDP via ``prepare_model``): iterates its shard, reports
  per-epoch metrics (loss, validation loss, the validation loss of always predicting the mean training box,
  mean IoU, samples/s) and checkpoints model + optimizer + history every ``checkpoint_every`` epochs.
  Restarted workers (``max_failures``) and re-runs with the same output and run name resume from the last
  checkpoint.
- ``run_training``: the driver. Writes under ``<out>/models/<run>/``: ``split.json`` (which frames train and
  which test, for scoring), Ray Train's checkpoints (``ray/``), and at the end ``model.pt`` (what tracking
  loads), ``metrics.json``/``metrics.csv`` and ``loss.png``.

The Ray Train plumbing (all-reduce, checkpoint state, the trainer, metrics files) is shared with detector
training, in ``rolo_batch.raytrain``.

The exported model is the one after the last epoch: validation windows are the split's test frames, so
choosing the "best" epoch on them would tune on the test set.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from rolo_batch import raytrain, splits, storage, tables
from rolo_batch.console import Progress, warn
from rolo_batch.errors import ConfigError, InputError, StorageError
from rolo_batch.rolo import RoloConfig
from rolo_batch.windows import WindowConfig

MODELS_DIR = "models"
MODEL_FILE = "model.pt"
SPLIT_FILE = "split.json"
FAILED_DIR = raytrain.FAILED_DIR
STATE_FILE = raytrain.STATE_FILE
RAY_DIR = raytrain.RAY_DIR


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; built once from CLI flags and passed explicitly.

    ``batch_size`` is per worker (the global batch is ``batch_size * workers``). ``gpu``: ``"auto"`` uses GPUs
    when the cluster has them. ``checkpoint_every``: epochs between checkpoints (the last epoch always
    checkpoints). ``max_failures``: worker-group restarts (from the last checkpoint) before giving up.
    ``cache_windows``: build the windows once and keep them in Ray's object store (spilling to disk) for every
    epoch; off, every epoch re-reads the features table (for window sets larger than the cluster's disk).
    ``detection_jitter``/``detection_drop``: augmentation of the training windows' detection input, drawn anew
    every epoch (``rolo.perturb_detections``); 0 leaves it as the table has it.
    """

    features_uri: str
    out_uri: str
    run: str = "rolo"
    split: str = "exp2"
    first_part: str = "otb30"
    train_list: str | None = None
    test_list: str | None = None
    model: RoloConfig = field(default_factory=lambda: RoloConfig(feature_dim=1))
    window: WindowConfig = field(default_factory=WindowConfig)
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    detection_jitter: float = 0.0
    detection_drop: float = 0.0
    workers: int = 1
    gpu: str = "auto"
    checkpoint_every: int = 1
    max_failures: int = 0
    seed: int = 0
    shuffle_buffer: int = 1024
    cache_windows: bool = True
    videos: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "workers", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.detection_jitter < 0 or not 0 <= self.detection_drop < 1:
            raise ConfigError(f"detection_jitter must be >= 0 and detection_drop in [0, 1), got "
                              f"{self.detection_jitter}, {self.detection_drop}")
        if self.gpu not in ("auto", "on", "off"):
            raise ConfigError(f"gpu must be auto, on or off, got {self.gpu!r}")
        if self.first_part not in ("otb30", "third"):
            raise ConfigError(f"first_part must be 'otb30' or 'third', got {self.first_part!r}")
        if self.model.steps != self.window.steps:
            raise ConfigError(f"the model's steps ({self.model.steps}) and the windows' ({self.window.steps}) differ")
        if not self.run or "/" in self.run or self.run.startswith("."):
            raise ConfigError(f"run name {self.run!r} must be a plain name")

    @property
    def run_uri(self) -> str:
        return storage.join(self.out_uri, MODELS_DIR, self.run)


# --- one step, no Ray ------------------------------------------------------------------------------------

def train_step(model, optimizer, batch: Mapping[str, Any], grad_clip: float = 0.0) -> dict[str, float]:
    """One optimisation step on one batch of windows; returns ``objective``'s metrics."""
    import torch

    from rolo_batch.rolo import objective

    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss, metrics = objective(model, batch)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return metrics


def evaluate_batch(model, batch: Mapping[str, Any], mean_target) -> dict[str, float]:
    """Validation metrics of one batch, as sums so that batches and workers add up: ``loss_sum``,
    ``baseline_sum`` (the loss of predicting the ``mean_target`` box (4,) ``cxcywh_norm`` for every window;
    for the heatmap model, that box's map), ``iou_sum``, ``count``."""
    import torch

    from rolo_batch.rolo import box_to_heatmap, mean_prediction_loss, objective

    model.eval()
    inner = getattr(model, "module", model)
    with torch.no_grad():
        loss, metrics = objective(model, batch)
    count = metrics["num_targets"]
    if inner.config.form == "heatmap" and mean_target is not None:  # the baseline predicts the mean box's map
        mean_target = box_to_heatmap(torch.as_tensor(mean_target, dtype=torch.float32)[None],
                                     inner.config.heatmap_size)[0]
    baseline = mean_prediction_loss(inner.config, batch, mean_target) if count else 0.0
    return {"loss_sum": float(loss) * count, "baseline_sum": baseline * count, "iou_sum": metrics["iou_sum"],
            "count": count}


# --- data through Ray Data -------------------------------------------------------------------------------

def video_windows(batch: Mapping[str, np.ndarray], split: splits.Split, window: WindowConfig, purpose: str,
                  failures_uri: str | None = None, chunk: int = 256) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: the windows of each video in a batch of ``{video, part_uri}`` rows, in bounded chunks.

    A video whose unit cannot be read or windowed (a bad file, repeated frames, ...) fails alone: with
    ``failures_uri`` its error is recorded there (``raytrain.record_failure``) and it gives no windows; without,
    it raises.
    """
    from rolo_batch import contracts
    from rolo_batch.windows import iter_windows

    for video, part_uri in zip(batch["video"], batch["part_uri"]):
        try:
            frames = tables.FeatureFrames.from_arrow(tables.read_parquet(str(part_uri), contracts.load("features")))
            chunks = iter_windows(frames, split, window, purpose=purpose, batch_size=chunk)
            first = next(chunks, None)  # a video's checks all run before its first window
        except (InputError, StorageError, ValueError) as exc:
            if failures_uri is None:
                raise
            raytrain.record_failure(failures_uri, str(video), purpose, exc)
            continue
        for windows in itertools.chain([] if first is None else [first], chunks):
            columns = windows.to_batch()
            columns.pop("video")  # strings do not become tensors; last_frame keeps the key
            yield columns


def windows_dataset(table: tables.FeaturesTable, split: splits.Split, window: WindowConfig, purpose: str,
                    failures_uri: str | None = None):
    """A Ray Data dataset of the windows of every video of ``table`` that the split uses for ``purpose``
    (``failures_uri``: where a video that fails records its error instead of failing the dataset)."""
    import ray

    wanted = []
    for name, unit in table.units.items():
        frames = unit.frame_numbers
        mask = split.test_mask(name, frames) if purpose == "test" else split.input_mask(name, frames)
        if mask.any():
            wanted.append({"video": name, "part_uri": unit.part_uri})
    if not wanted:
        raise ConfigError(f"split {split.name} leaves no {purpose} videos among {sorted(table.units)}")
    items = ray.data.from_items(wanted, override_num_blocks=len(wanted))
    return items.map_batches(video_windows, fn_kwargs={"split": split, "window": window, "purpose": purpose,
                                                       "failures_uri": failures_uri},
                             batch_size=1, num_cpus=0.5)


# --- the Ray Train loop ----------------------------------------------------------------------------------

def _batches(shard, batch_size: int, shuffle_buffer: int, seed: int | None) -> Iterable[dict]:
    import torch

    return shard.iter_torch_batches(batch_size=batch_size, dtypes=torch.float32, device="cpu",
                                    local_shuffle_buffer_size=shuffle_buffer or None, local_shuffle_seed=seed)


def train_loop_per_worker(loop: dict) -> None:
    """The Ray Train worker loop (see the module docstring). ``loop`` is ``_loop_config``'s dict."""
    import torch
    import ray.train
    import ray.train.torch

    from rolo_batch.rolo import build_model, perturb_detections

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(loop["seed"])
    device = ray.train.torch.get_device() if loop["use_gpu"] else torch.device("cpu")
    config = RoloConfig(**loop["model"])
    model = ray.train.torch.prepare_model(build_model(config), move_to_device=device)
    inner = getattr(model, "module", model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=loop["learning_rate"], weight_decay=loop["weight_decay"])

    start_epoch, history, mean_target = 0, [], None
    state = raytrain.load_checkpoint_state()
    if state is not None:
        inner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history, mean_target = state["epoch"] + 1, state["history"], state["mean_target"]
        if rank == 0:
            print(f"train: resuming from the checkpoint of epoch {state['epoch'] + 1}", flush=True)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, loop["epochs"]):
        started = time.perf_counter()
        augment = torch.Generator().manual_seed(loop["seed"] * 1_000_003 + epoch * 1009 + rank)
        totals = {"loss_sum": 0.0, "iou_sum": 0.0, "count": 0.0, "target_sum_0": 0.0, "target_sum_1": 0.0,
                  "target_sum_2": 0.0, "target_sum_3": 0.0, "samples": 0.0}
        for batch in _batches(train_shard, loop["batch_size"], loop["shuffle_buffer"], loop["seed"] + epoch):
            if loop["detection_jitter"] or loop["detection_drop"]:
                batch["inputs"] = perturb_detections(batch["inputs"], config.feature_dim, generator=augment,
                                                     jitter=loop["detection_jitter"], drop=loop["detection_drop"])
            batch = {k: v.to(device) for k, v in batch.items()}
            metrics = train_step(model, optimizer, batch, loop["grad_clip"])
            count = metrics["num_targets"]
            totals["loss_sum"] += metrics["loss"] * count
            totals["iou_sum"] += metrics["iou_sum"]
            totals["count"] += count
            totals["samples"] += len(batch["inputs"])
            supervised = batch["weights"] > 0
            for i in range(4):
                totals[f"target_sum_{i}"] += float(batch["targets"][supervised, i].sum())
        seconds = time.perf_counter() - started
        local_samples = totals["samples"]
        totals = raytrain.all_reduce_sums(totals)
        if mean_target is None and totals["count"] > 0:
            mean_target = torch.tensor([totals[f"target_sum_{i}"] / totals["count"] for i in range(4)])
        val = {"loss_sum": 0.0, "baseline_sum": 0.0, "iou_sum": 0.0, "count": 0.0}
        for batch in _batches(val_shard, loop["batch_size"], 0, None):
            batch = {k: v.to(device) for k, v in batch.items()}
            for key, value in evaluate_batch(model, batch, mean_target).items():
                val[key] += value
        val = raytrain.all_reduce_sums(val)
        record = {
            "epoch": epoch + 1,
            "session": loop["session"],
            "loss": totals["loss_sum"] / max(totals["count"], 1),
            "train_iou": totals["iou_sum"] / max(totals["count"], 1),
            "val_loss": val["loss_sum"] / val["count"] if val["count"] else float("nan"),
            "val_baseline_loss": val["baseline_sum"] / val["count"] if val["count"] else float("nan"),
            "val_iou": val["iou_sum"] / val["count"] if val["count"] else float("nan"),
            "train_windows": int(totals["count"]),
            "val_windows": int(val["count"]),
            "samples_per_s_per_worker": local_samples / seconds if seconds > 0 else 0.0,
            "workers": world,
            "epoch_seconds": seconds,
        }
        history.append(record)
        if rank == 0:
            print(f"train: epoch {record['epoch']}/{loop['epochs']}  loss {record['loss']:.3f}  "
                  f"val_loss {record['val_loss']:.3f} (mean box {record['val_baseline_loss']:.3f})  "
                  f"val IoU {record['val_iou']:.3f}  {record['samples_per_s_per_worker']:.0f} samples/s/worker",
                  flush=True)
        last = epoch + 1 == loop["epochs"]
        if last or (epoch + 1) % loop["checkpoint_every"] == 0:
            raytrain.report(record, {"epoch": epoch, "model": inner.state_dict(), "optimizer": optimizer.state_dict(),
                                     "history": history, "mean_target": mean_target})
        else:
            raytrain.report(record)


# --- the driver ------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What a run produced: the exported model's URI, the per-epoch history (of every session of the run), the
    epoch this session started after (0 for a fresh run, k when it resumed from epoch k's checkpoint), and the
    videos that failed alone (video -> error; the model trained on the others)."""

    run_uri: str
    model_uri: str
    history: list[dict]
    resumed_from_epoch: int
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def final(self) -> dict:
        return self.history[-1]


def _resolve_split(config: TrainConfig) -> splits.Split:
    options: dict[str, Any] = {} if config.split == "exp1" else {"first_part": config.first_part}
    if config.train_list:
        options["train_list"] = config.train_list
    if config.test_list:
        options["test_list"] = config.test_list
    return splits.get_split(config.split, **options)


def run_training(config: TrainConfig) -> TrainResult:
    """Train ROLO on the connected Ray cluster (see the module docstring); resumes an interrupted run. The same
    seed and worker count give the same model (``raytrain.ordered_data``)."""
    with raytrain.ordered_data():
        return _run_training(config)


def _run_training(config: TrainConfig) -> TrainResult:
    table = tables.FeaturesTable.open(config.features_uri, list(config.videos) if config.videos else None)
    model_config = dataclasses.replace(config.model, feature_dim=table.feature_dim, detector_id=table.detector_id,
                                       feature_shape=table.feature_shape)
    split = _resolve_split(config)
    lengths = {name: len(unit.frame_numbers) for name, unit in table.units.items()}
    for line in splits.first_part_warnings(split, lengths):
        warn(line)
    manifest = splits.split_manifest(split, {name: unit.frame_numbers for name, unit in table.units.items()})
    splits.write_manifest(storage.join(config.run_uri, SPLIT_FILE), manifest)
    storage.write_text(storage.join(config.run_uri, "config.json"), _json({
        "train": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("model", "window")},
        "model": dataclasses.asdict(model_config), "window": dataclasses.asdict(config.window),
        "features": table.root, "detector_id": table.detector_id}))

    failures_uri = storage.join(config.run_uri, FAILED_DIR)
    storage.delete(failures_uri)  # failures of an earlier session are not this one's
    train_ds = windows_dataset(table, split, config.window, "train", failures_uri)
    val_ds = windows_dataset(table, split, config.window, "test", failures_uri)
    if config.cache_windows:
        train_ds, val_ds = train_ds.materialize(), val_ds.materialize()
        if train_ds.count() == 0:
            failed = raytrain.read_failures(failures_uri)
            if failed:
                reasons = "; ".join(f"{v}: {e}" for v, e in failed.items())
                raise InputError(f"no training windows: every video with training frames failed ({reasons})",
                                 path=table.root)
            warn(f"split {split.name} leaves no full training window of {config.window.steps} frames in "
                 f"{table.root}: the model stays untrained (use fewer --steps or longer videos)")
    use_gpu = raytrain.use_gpu(config.gpu, config.workers)
    session = raytrain.new_session()
    progress = Progress("train", config.epochs, unit="epochs", interval_s=0)
    state = raytrain.fit(train_loop_per_worker, {**_loop_config(config, model_config, use_gpu), "session": session},
                         config.run_uri, workers=config.workers, gpu=use_gpu, max_failures=config.max_failures,
                         datasets={"train": train_ds, "val": val_ds},
                         on_epoch=lambda r: progress.set_done(int(r["epoch"]), _epoch_summary(r)))
    progress.close()
    history = state["history"]
    model_uri = _export(config, model_config, state, split.name, table)
    raytrain.write_metrics(config.run_uri, history, {"loss.png": _loss_plot(history)})
    return TrainResult(config.run_uri, model_uri, history, raytrain.resumed_from_epoch(history, session),
                       raytrain.read_failures(failures_uri))


def _epoch_summary(record: Mapping[str, Any]) -> str:
    return (f"loss {record['loss']:.3f}, val loss {record['val_loss']:.3f} (mean box "
            f"{record['val_baseline_loss']:.3f}), val IoU {record['val_iou']:.3f}")


def _loop_config(config: TrainConfig, model_config: RoloConfig, use_gpu: bool) -> dict:
    return {"model": dataclasses.asdict(model_config), "epochs": config.epochs, "batch_size": config.batch_size,
            "learning_rate": config.learning_rate, "weight_decay": config.weight_decay,
            "grad_clip": config.grad_clip, "checkpoint_every": config.checkpoint_every, "seed": config.seed,
            "shuffle_buffer": config.shuffle_buffer, "use_gpu": use_gpu,
            "detection_jitter": config.detection_jitter, "detection_drop": config.detection_drop}


def _export(config: TrainConfig, model_config: RoloConfig, state: dict, split_name: str,
            table: tables.FeaturesTable) -> str:
    from rolo_batch.rolo import build_model, export_model

    model = build_model(model_config)
    model.load_state_dict(state["model"])
    uri = storage.join(config.run_uri, MODEL_FILE)
    final = state["history"][-1]
    export_model(model, uri, split=split_name, metadata={
        "detector_id": table.detector_id, "feature_dim": table.feature_dim, "features": table.root,
        "split_manifest": storage.join(config.run_uri, SPLIT_FILE), "epochs": state["epoch"] + 1,
        "window_stride": config.window.stride, "window_detection": config.window.detection,
        "final_val_loss": final["val_loss"], "final_val_iou": final["val_iou"]})
    return uri


def _loss_plot(history: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    left.plot(epochs, [h["loss"] for h in history], label="training loss")
    left.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
    left.plot(epochs, [h["val_baseline_loss"] for h in history], "--", label="validation, mean box")
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.set_yscale("log")
    left.legend()
    right.plot(epochs, [h["train_iou"] for h in history], label="training")
    right.plot(epochs, [h["val_iou"] for h in history], label="validation")
    right.set_xlabel("epoch")
    right.set_ylabel("mean IoU")
    right.set_ylim(0, 1)
    right.legend()
    return raytrain.figure_png(figure)


def _json(data: Any) -> str:
    return raytrain.to_json(data)
