"""Benchmarks: how close each stage gets to its own limit, as ratios measured in one run on one machine.

Every figure is the median of ``runs`` measurements after ``warmup`` unmeasured ones, with min and max.

- extract: the pipeline's frames/s (decode + detector + Parquet write, in a Ray actor, actor start-up
  excluded, over the 4x longer video) / the bare detector's frames/s on frames already in memory (same device,
  batch size and threads).
  Target >= 0.85. Also against a naive loop like the original code (one frame at a time, one file per frame).
- track: ROLO tracking frames/s (detection choice, windows, model, in lockstep over ``videos_per_batch``
  videos) / the bare LSTM's forward frames/s on in-memory windows of the same batch. Target >= 0.7.
- train: samples/s per worker with 1 and with 2 workers (data-parallel efficiency = their ratio).
- train-detector: frames/s of a ``train-detector`` epoch (Ray Train, Ray Data decoding and augmenting in its
  prefetch threads) / frames/s of bare training steps on a batch already in memory (same network, device, batch
  size and threads). Target >= 0.85.
- memory: peak resident memory of a fresh extraction actor for a video and for one 4x longer (ratio near 1).

The extract, memory and train-detector stages run for each of ``detectors`` (by default the CPU-sized
``yolo-tiny`` and the ImageNet-pretrained ``efficientnet-yolo``).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from rolo_batch import datasets, storage
from rolo_batch.console import format_markdown_table, format_table
from rolo_batch.errors import ConfigError


STAGES = ("extract", "track", "train", "train-detector", "memory")


@dataclass(frozen=True)
class BenchmarkConfig:
    """What to measure with. ``threads``: torch threads of the detector in every extract measurement (the
    actor gets as many CPUs). ``stages``: any of ``STAGES``. ``detectors``: presets measured by the extract,
    memory and train-detector stages."""

    out_uri: str
    detectors: tuple[str, ...] = ("yolo-tiny", "efficientnet-yolo")
    frames: int = 128
    width: int = 320
    height: int = 240
    batch_size: int = 16
    threads: int = 2
    runs: int = 3
    warmup: int = 1
    videos_per_batch: int = 8
    steps: int = 6
    train_epochs: int = 4
    stages: tuple[str, ...] = STAGES
    gpu: str = "auto"

    def __post_init__(self) -> None:
        from rolo_batch.detector import PRESETS

        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise ConfigError(f"unknown benchmark stage(s) {sorted(unknown)}; choose from {list(STAGES)}")
        object.__setattr__(self, "detectors", tuple(self.detectors))
        if not self.detectors or set(self.detectors) - set(PRESETS):
            raise ConfigError(f"detectors must be presets of {sorted(PRESETS)}, got {list(self.detectors)}")
        for name in ("frames", "batch_size", "threads", "runs", "videos_per_batch", "steps", "train_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.warmup < 0:
            raise ConfigError("warmup must be >= 0")


@dataclass
class Figure:
    """One measured quantity: the value of every run, and its unit."""

    name: str
    unit: str
    values: list[float]

    @property
    def median(self) -> float:
        return float(statistics.median(self.values))

    def row(self) -> dict:
        return {"measure": self.name, "median": self.median, "min": min(self.values), "max": max(self.values),
                "unit": self.unit, "runs": len(self.values)}


@dataclass
class Ratio:
    """A figure divided by its limit (or baseline), with the target it should reach, if any."""

    name: str
    numerator: Figure
    denominator: Figure
    target: float | None = None
    note: str = ""

    @property
    def value(self) -> float:
        return self.numerator.median / self.denominator.median if self.denominator.median else float("nan")

    def row(self) -> dict:
        met = "" if self.target is None else ("yes" if self.value >= self.target else "NO")
        return {"ratio": self.name, "value": self.value, "target": self.target, "met": met, "note": self.note}


@dataclass
class BenchmarkReport:
    """Everything measured, and on what."""

    environment: dict
    figures: list[Figure] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)

    def text(self) -> str:
        head = "\n".join(f"{k}: {v}" for k, v in self.environment.items())
        return (f"{head}\n\n{format_table([r.row() for r in self.ratios], floatfmt='.3f')}\n\n"
                f"{format_table([f.row() for f in self.figures], floatfmt='.2f')}")

    def markdown(self) -> str:
        head = "\n".join(f"- {k}: {v}" for k, v in self.environment.items())
        return (f"{head}\n\n{format_markdown_table([r.row() for r in self.ratios], floatfmt='.3f')}\n\n"
                f"{format_markdown_table([f.row() for f in self.figures], floatfmt='.2f')}\n")

    def to_json(self) -> str:
        return json.dumps({"environment": self.environment, "figures": [f.row() | {"values": f.values}
                                                                        for f in self.figures],
                           "ratios": [r.row() for r in self.ratios]}, indent=2, default=str)


def repeat(measure: Callable[[], float], runs: int, warmup: int) -> list[float]:
    """``measure()`` ``warmup`` times unrecorded, then ``runs`` times recorded."""
    for _ in range(warmup):
        measure()
    return [measure() for _ in range(runs)]


# --- extract ---------------------------------------------------------------------------------------------

def bare_detector_fps(detector, images: list[np.ndarray], batch_size: int) -> float:
    """Frames/s of preprocess + network + decode on frames already in memory."""
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        detector.run(detector.preprocess(images[start:start + batch_size]))
    return len(images) / (time.perf_counter() - started)


def naive_loop_fps(detector, video: datasets.VideoSource, out_dir: str) -> float:
    """Frames/s of a loop like the original code: read a frame, run the detector on it alone, save its
    outputs to a file of its own."""
    started = time.perf_counter()
    for frame in video.iter_frames():
        output = detector.run(detector.preprocess([frame.image]))
        np.save(os.path.join(out_dir, f"{frame.number:06d}.npy"), np.concatenate(
            [output.features[0], output.detections[0][0] if len(output.detections[0]) else np.zeros(6)]))
    return len(video) / (time.perf_counter() - started)


def pipeline_fps(data_uri: str, out_uri: str, spec, config: BenchmarkConfig, videos: list[str]) -> tuple[float, dict]:
    """Frames/s of ``run_extraction`` with one actor of ``config.threads`` CPUs (time inside the actor, so
    Ray's actor start-up is excluded); also the actor's info (peak memory)."""
    from rolo_batch.extract import ExtractOptions, run_extraction

    summary = run_extraction(data_uri, out_uri, spec, ExtractOptions(batch_size=config.batch_size, overwrite=True),
                             videos=videos, actors=1, cpus_per_actor=config.threads, gpus_per_actor=1.0)
    done = [r for r in summary.results if r.status == "done"]
    if len(done) != len(videos):
        raise RuntimeError(f"benchmark extraction failed: {summary.table()}")
    return sum(r.frames for r in done) / sum(r.seconds for r in done), summary.workers[0]


def _synthesize_extract_videos(config: BenchmarkConfig, data: str) -> None:
    from rolo_batch.datasets.synthetic import SynthConfig, synthesize

    synthesize(data, SynthConfig(videos=1, frames=config.frames, width=config.width, height=config.height, seed=0,
                                 prefix="short"))
    synthesize(data, SynthConfig(videos=1, frames=4 * config.frames, width=config.width, height=config.height,
                                 seed=1, prefix="long"))


def _device(config: BenchmarkConfig) -> str:
    """Where this process runs the bare measurements: ``cuda`` when ``config.gpu`` and the cluster and torch
    allow it, else ``cpu`` (the same device the stage's Ray workers get)."""
    import torch

    from rolo_batch.runtime import cluster_resources

    use_gpu = config.gpu == "on" or (config.gpu == "auto" and cluster_resources().gpus > 0)
    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def _extract_and_memory(config: BenchmarkConfig, work: str, report: BenchmarkReport, name: str) -> None:
    import torch

    from rolo_batch.detector import build_detector, save_detector
    from rolo_batch.extract import DetectorSpec

    data = os.path.join(work, "data")
    if not os.path.isdir(data):
        _synthesize_extract_videos(config, data)
    weights = os.path.join(work, f"{name}.pt")
    device = _device(config)
    save_detector(build_detector(name, random_init=True), weights)  # the speed does not depend on the weights
    spec = DetectorSpec(weights=weights)
    short = datasets.open_video(datasets.discover(data, names=["short-000"]).videos[0])
    report.environment.update(device=device,
                              detectors=", ".join(config.detectors), batch_size=config.batch_size,
                              threads=config.threads, frames=f"{config.frames} at {config.width}x{config.height}")
    if "extract" in config.stages:
        torch.set_num_threads(config.threads)
        detector = build_detector(None, weights, device=device)
        images = [f.image for f in short.iter_frames()]
        bare = Figure(f"extract {name}: bare detector (frames in memory)", "frames/s",
                      repeat(lambda: bare_detector_fps(detector, images, config.batch_size), config.runs,
                             config.warmup))
        del images
        # The pipeline and the naive loop run over the 4x longer video, so that a fresh actor's one-off costs
        # (its first JPEG read and Parquet write) weigh as little as they do over an archive.
        long = datasets.open_video(datasets.discover(data, names=["long-000"]).videos[0])
        naive_dir = tempfile.mkdtemp(dir=work)
        naive = Figure(f"extract {name}: naive loop (1 frame at a time, 1 file per frame)", "frames/s",
                       repeat(lambda: naive_loop_fps(detector, long, naive_dir), config.runs, config.warmup))
        pipeline = Figure(f"extract {name}: pipeline (decode + detector + Parquet, Ray actor)", "frames/s",
                          repeat(lambda: pipeline_fps(data, os.path.join(work, f"out-{name}"), spec, config,
                                                      ["long-000"])[0], config.runs, config.warmup))
        report.figures += [bare, naive, pipeline]
        report.ratios += [Ratio(f"extract {name}: pipeline / bare detector", pipeline, bare, 0.85),
                          Ratio(f"extract {name}: pipeline / naive loop", pipeline, naive)]
    if "memory" in config.stages:
        peaks = {}
        for video in ("short-000", "long-000"):
            peaks[video] = Figure(f"memory {name}: extraction actor peak RSS, {video.split('-')[0]} video", "MiB",
                                  [pipeline_fps(data, os.path.join(work, f"memory-{name}-{video}"), spec, config,
                                                [video])[1]["peak_rss_mb"] for _ in range(config.runs)])
        report.figures += list(peaks.values())
        report.ratios.append(Ratio(f"memory {name}: 4x longer video / video", peaks["long-000"], peaks["short-000"],
                                   note="near 1: memory follows the batch, not the video"))


# --- track -----------------------------------------------------------------------------------------------

def bare_lstm_fps(model, windows, repeats: int = 1) -> float:
    """Frames/s of the model's forward on in-memory windows ``(B, steps, D + 6)`` (one frame per window)."""
    import torch

    x = torch.as_tensor(windows)
    with torch.inference_mode():
        started = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return len(windows) * repeats / (time.perf_counter() - started)


def bare_lstm_step_fps(model, steps_input, frames: int) -> float:
    """Frames/s of ``frames`` stateful model steps on in-memory inputs ``(B, D + 6)``, the state carried."""
    import torch

    x = torch.as_tensor(steps_input)
    carry = None
    with torch.inference_mode():
        started = time.perf_counter()
        for _ in range(frames):
            outputs, carry = model.stream(x, carry)
            model.outputs_to_boxes(outputs)
    return len(steps_input) * frames / (time.perf_counter() - started)


def _track(config: BenchmarkConfig, report: BenchmarkReport) -> None:
    from rolo_batch.rolo import RoloConfig, build_model
    from rolo_batch.synthetic_features import synthetic_feature_frames
    from rolo_batch.track import CHUNK_VALUES, VideoInputs, stream_outputs, track_rolo

    dim = 256
    videos = [synthetic_feature_frames(f"video-{i}", config.frames, dim, seed=i)
              for i in range(config.videos_per_batch)]
    model = build_model(RoloConfig(feature_dim=dim, steps=config.steps)).eval()
    windows = np.random.default_rng(0).normal(size=(config.videos_per_batch, config.steps, dim + 6))
    windows = windows.astype(np.float32)

    def tracking(stream: bool) -> float:
        started = time.perf_counter()
        track_rolo(model, config.steps, videos, stream=stream)
        return sum(len(v) for v in videos) / (time.perf_counter() - started)

    bare = Figure(f"track: bare LSTM forward on windows (batch {config.videos_per_batch})", "frames/s",
                  repeat(lambda: bare_lstm_fps(model, windows, config.frames), config.runs, config.warmup))
    tracked = Figure(f"track: ROLO tracking, window ({config.videos_per_batch} videos in lockstep)", "frames/s",
                     repeat(lambda: tracking(False), config.runs, config.warmup))
    bare_step = Figure(f"track: bare LSTM step, state carried (batch {config.videos_per_batch})", "frames/s",
                       repeat(lambda: bare_lstm_step_fps(model, windows[:, -1], config.frames), config.runs,
                              config.warmup))
    streamed = Figure(f"track: ROLO tracking, stream ({config.videos_per_batch} videos in lockstep)", "frames/s",
                      repeat(lambda: tracking(True), config.runs, config.warmup))
    inputs = [VideoInputs(v.feature, np.random.default_rng(i).normal(size=(len(v), 6)).astype(np.float32))
              for i, v in enumerate(videos)]

    def whole_pass() -> float:
        started = time.perf_counter()
        stream_outputs(model, inputs, config.steps, CHUNK_VALUES)
        return sum(len(x) for x in inputs) / (time.perf_counter() - started)

    bare_pass = Figure(f"track: bare LSTM over whole videos, state carried ({config.videos_per_batch} videos)",
                       "frames/s", repeat(whole_pass, config.runs, config.warmup))
    report.figures += [bare, tracked, bare_step, streamed, bare_pass]
    report.ratios.append(Ratio("track window / bare LSTM window", tracked, bare, 0.7))
    report.ratios.append(Ratio("track stream / bare LSTM step", streamed, bare_step, 0.9))
    report.ratios.append(Ratio("track stream / bare LSTM over whole videos", streamed, bare_pass,
                               note="the rest is choosing each frame's detection, in Python"))
    report.ratios.append(Ratio("track stream / track window", streamed, tracked,
                               note=f"the window form does {config.steps} LSTM steps per frame"))


# --- train -----------------------------------------------------------------------------------------------

def _train(config: BenchmarkConfig, work: str, report: BenchmarkReport) -> None:
    from rolo_batch.rolo import RoloConfig
    from rolo_batch.synthetic_features import write_synthetic_features
    from rolo_batch.train import TrainConfig, run_training
    from rolo_batch.windows import WindowConfig

    features = storage.join(work, "train-features", "features", "synthetic")
    write_synthetic_features(features, videos=4, frames=3 * config.frames, dim=256)
    per_worker = {}
    for workers in (1, 2):
        samples = []
        for run in range(config.runs):
            result = run_training(TrainConfig(
                features_uri=features, out_uri=storage.join(work, "train-out"), run=f"w{workers}-r{run}",
                split="exp2", model=RoloConfig(feature_dim=256, steps=config.steps),
                window=WindowConfig(steps=config.steps), epochs=config.train_epochs, batch_size=32,
                workers=workers, gpu=config.gpu, checkpoint_every=config.train_epochs))
            steady = result.history[min(config.warmup, len(result.history) - 1):]  # after the first epoch(s)
            samples.append(statistics.median(h["samples_per_s_per_worker"] for h in steady))
        per_worker[workers] = Figure(f"train: samples/s per worker, {workers} worker(s)", "samples/s", samples)
    report.figures += list(per_worker.values())
    report.ratios.append(Ratio("train: per-worker throughput, 2 workers / 1", per_worker[2], per_worker[1],
                               note="data-parallel efficiency (1.0 = perfect scaling)"))


# --- train-detector --------------------------------------------------------------------------------------

def bare_detector_train_fps(net, batch_size: int, steps: int) -> float:
    """Frames/s of ``train_step`` on one in-memory batch of random frames and boxes, ``steps`` times."""
    import torch

    from rolo_batch import detector_train as dt

    size = net.config.input_size
    rng = np.random.default_rng(0)
    images = (rng.random((batch_size, size, size, 3)) * 255).astype(np.uint8)
    boxes = np.column_stack([rng.uniform(0.3, 0.7, (batch_size, 2)), rng.uniform(0.1, 0.4, (batch_size, 2))])
    batch = dt.make_batch(images, boxes, np.ones(batch_size, bool), np.zeros(batch_size, np.int64))
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    started = time.perf_counter()
    for _ in range(steps):
        dt.train_step(net, optimizer, batch)
    return batch_size * steps / (time.perf_counter() - started)


def _train_detector(config: BenchmarkConfig, work: str, report: BenchmarkReport, name: str) -> None:
    import torch

    from rolo_batch import detector as det
    from rolo_batch import detector_train as dt
    from rolo_batch.datasets.synthetic import SynthConfig, synthesize

    data = os.path.join(work, "detector-data")
    if not os.path.isdir(data):
        synthesize(data, SynthConfig(videos=2, frames=3 * config.frames, width=config.width, height=config.height,
                                     seed=2))
    epochs = config.warmup + config.runs
    result = dt.run_detector_training(dt.DetectorTrainConfig(
        data, os.path.join(work, "detector-out"), run=name, detector=name, split="exp2", first_part="third",
        epochs=epochs, eval_every=epochs, checkpoint_every=epochs, batch_size=config.batch_size, gpu=config.gpu,
        threads_per_worker=config.threads), log=None)
    trained = Figure(f"train-detector {name}: epoch frames/s (Ray Train + Ray Data)", "frames/s",
                     [h["frames_per_s_per_worker"] for h in result.history[config.warmup:]])
    torch.set_num_threads(config.threads)
    device = _device(config)
    # channels-last on a CPU, as the training loop does (oneDNN's fast layout)
    net = det.new_net(det.detector_config(name), 0).to(
        device, memory_format=torch.channels_last if device == "cpu" else torch.contiguous_format)
    steps = max(1, (2 * config.frames) // config.batch_size)  # as many frames as an epoch trains on
    bare = Figure(f"train-detector {name}: bare train steps (batch in memory)", "frames/s",
                  repeat(lambda: bare_detector_train_fps(net, config.batch_size, steps), config.runs, config.warmup))
    report.figures += [trained, bare]
    report.ratios.append(Ratio(f"train-detector {name}: epoch / bare steps", trained, bare, 0.85,
                               note="decoding and augmentation hidden behind the steps"))


# --- all -------------------------------------------------------------------------------------------------

def run_benchmark(config: BenchmarkConfig) -> BenchmarkReport:
    """Measure the configured stages on the connected Ray cluster; write ``benchmark.json`` and
    ``benchmark.md`` under ``config.out_uri``."""
    import platform

    import ray
    import torch

    from rolo_batch.runtime import cluster_resources

    resources = cluster_resources()
    report = BenchmarkReport({
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs here; cluster {resources.cpus:g} CPUs, "
                   f"{resources.gpus:g} GPUs", "torch": torch.__version__, "ray": ray.__version__,
        "runs": f"median of {config.runs} after {config.warmup} warm-up"})
    work = tempfile.mkdtemp(prefix="rolo-bench-")
    for name in config.detectors:
        if {"extract", "memory"} & set(config.stages):
            _extract_and_memory(config, work, report, name)
    if "track" in config.stages:
        _track(config, report)
    if "train" in config.stages:
        _train(config, work, report)
    if "train-detector" in config.stages:
        for name in config.detectors:
            _train_detector(config, work, report, name)
    storage.write_text(storage.join(config.out_uri, "benchmark.json"), report.to_json())
    storage.write_text(storage.join(config.out_uri, "benchmark.md"), report.markdown())
    return report
