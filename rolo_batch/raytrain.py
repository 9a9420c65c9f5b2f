"""Ray Train plumbing shared by the training runs (ROLO in ``train``, the detector in ``detector_train``).

Worker side (inside ``train_loop_per_worker``): ``all_reduce_sums`` / ``all_gather`` over the workers,
``load_checkpoint_state`` (the state dict of the checkpoint a restarted or re-run training resumes from, or
None) and ``report`` (per-epoch metrics, with a checkpoint of a state dict written by rank 0 when given).

Driver side: ``use_gpu`` (the ``auto``/``on``/``off`` choice), ``fit`` (a ``TorchTrainer`` whose checkpoints
live under ``<run_uri>/ray``, local or S3, so that re-running with the same run URI resumes; returns the final
checkpoint's state dict), ``resumed_from_epoch``, and ``write_metrics`` (``metrics.json``, ``metrics.csv`` and
a plot beside them).

Both sides: ``record_failure`` (a data task's record of a video that failed alone, so that one bad video
does not stop a training job) and ``read_failures`` (the driver's report of them).

A checkpoint is one ``torch.save`` file (``state.pt``) holding whatever the loop puts in its state dict (model,
optimizer, epoch, history, ...), only ever loaded with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import uuid
from typing import Any, Callable, Iterator, Mapping

from rolo_batch import storage

STATE_FILE = "state.pt"
# Ray Train's controller polls its workers every 2 s by default and sees each phase of a fit end (group
# started, training done) only at its next poll: about 5 s of every fit on the 2-core build machine was this
# waiting (a tiny fit took 15-23 s, 10-17 s polling every 0.1 s). A quarter of a second costs the controller
# 4 small calls a second per worker. An interval set in the environment wins; Ray Train passes the driver's
# value on to its controller, on a cluster too.
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_INTERVAL_S = "0.25"
RAY_DIR = "ray"
FAILED_DIR = "failed"  # <run>/failed/<purpose>-<video>.json: the videos this session could not read


# --- worker side -----------------------------------------------------------------------------------------

def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sums(values: Mapping[str, float]) -> dict[str, float]:
    """Sum a dict of floats over the workers (identity with one worker)."""
    import torch
    import torch.distributed as dist

    if not _distributed():
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist()))


def all_gather(obj: Any) -> list[Any]:
    """Every worker's ``obj`` (picklable), in rank order (``[obj]`` with one worker)."""
    import torch.distributed as dist

    if not _distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def load_checkpoint_state() -> dict | None:
    """The state dict of the checkpoint this training resumes from (after a worker failure, or a re-run with
    the same storage and name), or None for a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return load_state(os.path.join(directory, STATE_FILE))


def load_state(path: str) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def report(record: Mapping[str, Any], state: Mapping[str, Any] | None = None) -> None:
    """Report one epoch's ``record``; with ``state`` (every worker passes it, or None on every worker), rank 0
    also saves it as this epoch's checkpoint. Rank 0 also passes the record to the driver's progress line
    (``fit(on_epoch=...)``) when the record names the driver's ``session``."""
    import ray.train
    import torch

    if ray.train.get_context().get_world_rank() == 0 and "session" in record:
        _send_progress(str(record["session"]), dict(record))
    if state is None:
        ray.train.report(dict(record))
        return
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            torch.save(dict(state), os.path.join(directory, STATE_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(dict(record), checkpoint=checkpoint)


class EpochLog:
    """A tiny Ray actor between the training workers and the driver: the epoch records rank 0 reported."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def add(self, record: dict) -> None:
        self.records.append(record)

    def since(self, count: int) -> list[dict]:
        return self.records[count:]


def _progress_actor_name(session: str) -> str:
    return f"rolo-batch-epochs-{session}"


def _send_progress(session: str, record: dict) -> None:
    import ray

    try:
        actor = ray.get_actor(_progress_actor_name(session))
    except ValueError:  # no driver listening (a run started without on_epoch)
        return
    actor.add.remote(record)


# --- driver side -----------------------------------------------------------------------------------------

def use_gpu(gpu: str, workers: int) -> bool:
    """``"on"``/``"off"`` as asked; ``"auto"``: when the connected cluster has a GPU per worker."""
    from rolo_batch.runtime import cluster_resources

    if gpu == "auto":
        return cluster_resources().gpus >= workers
    return gpu == "on"


@contextlib.contextmanager
def ordered_data() -> Iterator[None]:
    """Ray Data keeps block order while the datasets of a training run are built and iterated
    (``preserve_order``): the shuffle buffer then sees the same rows in the same order every time, so that a
    seeded run repeats exactly for the same seed and worker count (without it, blocks arrive in whatever order
    the tasks finish, and epoch 2 of two identical runs already differs)."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    previous = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = previous


def new_session() -> str:
    """An id for this driver session, recorded in each epoch's record (so a resumed run shows which epochs
    ran when)."""
    return uuid.uuid4().hex[:8]


def fit(train_loop: Callable[[dict], None], loop_config: Mapping[str, Any], run_uri: str, *, workers: int,
        gpu: bool, max_failures: int, datasets: Mapping[str, Any],
        resources_per_worker: Mapping[str, float] | None = None, num_to_keep: int = 2,
        on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Run ``train_loop`` on ``workers`` Ray Train workers (DDP; GPUs when ``gpu``) with Ray Data
    ``datasets`` split over them, checkpoints under ``<run_uri>/ray`` (a re-run with the same ``run_uri``
    resumes from the last one; ``max_failures`` worker-group restarts, each from the last checkpoint).
    ``on_epoch`` gets each epoch's record in the driver as rank 0 reports it (``loop_config["session"]``
    names the run). Returns the state dict of the final checkpoint; raises the training's error if it failed."""
    import ray

    if on_epoch is None or "session" not in loop_config:
        return _fit(train_loop, loop_config, run_uri, workers=workers, gpu=gpu, max_failures=max_failures,
                    datasets=datasets, resources_per_worker=resources_per_worker, num_to_keep=num_to_keep)
    log = ray.remote(num_cpus=0)(EpochLog).options(name=_progress_actor_name(str(loop_config["session"]))).remote()
    stop = threading.Event()
    seen = 0

    def relay() -> None:
        nonlocal seen
        while True:
            stopping = stop.wait(1.0)
            try:
                records = ray.get(log.since.remote(seen), timeout=30)
            except Exception:  # noqa: BLE001  (progress is best effort; the fit reports real failures)
                records = []
            seen += len(records)
            for record in records:
                on_epoch(record)
            if stopping:
                return

    thread = threading.Thread(target=relay, name="rolo-batch-epochs", daemon=True)
    thread.start()
    try:
        return _fit(train_loop, loop_config, run_uri, workers=workers, gpu=gpu, max_failures=max_failures,
                    datasets=datasets, resources_per_worker=resources_per_worker, num_to_keep=num_to_keep)
    finally:
        stop.set()
        thread.join(timeout=35)
        ray.kill(log)


def _fit(train_loop: Callable[[dict], None], loop_config: Mapping[str, Any], run_uri: str, *, workers: int,
         gpu: bool, max_failures: int, datasets: Mapping[str, Any],
         resources_per_worker: Mapping[str, float] | None, num_to_keep: int) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_INTERVAL_S)
    location = storage.resolve(run_uri)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=dict(loop_config),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu,
                                               resources_per_worker=dict(resources_per_worker or {}) or None),
        run_config=ray.train.RunConfig(
            name=RAY_DIR, storage_path=location.path, storage_filesystem=location.fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=max_failures)),
        datasets=dict(datasets),
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as directory:
        return load_state(os.path.join(directory, STATE_FILE))


def resumed_from_epoch(history: list[dict], session: str) -> int:
    """The epoch this session started after: 0 for a fresh run, k when it resumed from epoch k's checkpoint
    (the whole history when this session ran no epoch)."""
    this_session = [h["epoch"] for h in history if h.get("session") == session]
    return min(this_session) - 1 if this_session else len(history)


def metrics_csv(history: list[dict]) -> str:
    """The history as CSV, one row per epoch, columns in the first record's order (floats with 6 digits)."""
    columns = list(dict.fromkeys(k for row in history for k in row))
    lines = [",".join(columns)]
    for row in history:
        lines.append(",".join("" if row.get(c) is None else f"{row[c]:.6g}" if isinstance(row[c], float)
                              else str(row[c]) for c in columns))
    return "\n".join(lines) + "\n"


def write_metrics(run_uri: str, history: list[dict], plots: Mapping[str, bytes]) -> None:
    """``metrics.json`` (``{"epochs": history}``), ``metrics.csv`` and the ``plots`` (name -> PNG bytes)
    under ``run_uri``."""
    storage.write_text(storage.join(run_uri, "metrics.json"), to_json({"epochs": history}))
    storage.write_text(storage.join(run_uri, "metrics.csv"), metrics_csv(history))
    for name, png in plots.items():
        storage.write_bytes(storage.join(run_uri, name), png)


def figure_png(figure) -> bytes:
    """A matplotlib figure as PNG bytes (and closed)."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str)


# --- videos that fail alone ------------------------------------------------------------------------------

def record_failure(failures_uri: str, video: str, purpose: str, error: BaseException) -> None:
    """Write ``<failures_uri>/<purpose>-<video>.json``: the video, what it was read for, and the error (named
    after the video when the error did not know it)."""
    from rolo_batch.errors import InputError

    message = str(error.with_video(video) if isinstance(error, InputError) and error.video is None else error)
    storage.write_text(storage.join(failures_uri, f"{purpose}-{video}.json"),
                       json.dumps({"video": video, "purpose": purpose, "error": message}))


def read_failures(failures_uri: str) -> dict[str, str]:
    """Video -> error of every failure recorded under ``failures_uri`` (one per video, sorted by video)."""
    out: dict[str, str] = {}
    for entry in sorted(storage.list_dir(failures_uri, missing_ok=True), key=lambda e: e.name, reverse=True):
        if entry.name.endswith(".json") and not entry.is_dir:
            record = json.loads(storage.read_text(entry.uri))
            out[record["video"]] = record["error"]
    return dict(sorted(out.items()))
