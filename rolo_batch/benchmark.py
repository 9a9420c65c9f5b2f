"""Benchmarks: how close each stage gets to its own limit, as ratios measured in one run on one machine.

Every figure is the median of ``runs`` measurements after ``warmup`` unmeasured ones, with min and max.

- extract: the pipeline's frames/s (decode + detector + Parquet write, in a Ray actor, actor start-up
  excluded, over the 4x longer video) / the bare detector's frames/s on frames already in memory (same device,
  batch size and threads).
  Target >= 0.85. Also against a naive loop like the original code (one frame at a time, one file per frame).
- track: ROLO tracking frames/s (detection choice, windows, model, in lockstep over ``videos_per_batch``
  videos) / the bare LSTM's forward frames/s on in-memory windows of the same batch. Target >= 0.7.
- train: samples/s per worker with 1 and with 2 workers (data-parallel efficiency = their ratio).
- memory: peak resident memory of a fresh extraction actor for a video and for one 4x longer (ratio near 1).
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


@dataclass(frozen=True)
class BenchmarkConfig:
    """What to measure with. ``threads``: torch threads of the detector in every extract measurement (the
    actor gets as many CPUs). ``stages``: any of extract, track, train, memory."""

    out_uri: str
    detector: str = "yolo-tiny"
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
    stages: tuple[str, ...] = ("extract", "track", "train", "memory")
    gpu: str = "auto"

    def __post_init__(self) -> None:
        unknown = set(self.stages) - {"extract", "track", "train", "memory"}
        if unknown:
            raise ConfigError(f"unknown benchmark stage(s) {sorted(unknown)}")
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


def _extract_and_memory(config: BenchmarkConfig, work: str, report: BenchmarkReport) -> None:
    import torch

    from rolo_batch.datasets.synthetic import SynthConfig, synthesize
    from rolo_batch.detector import build_detector, save_detector
    from rolo_batch.extract import DetectorSpec
    from rolo_batch.runtime import cluster_resources

    data = os.path.join(work, "data")
    synthesize(data, SynthConfig(videos=1, frames=config.frames, width=config.width, height=config.height, seed=0,
                                 prefix="short"))
    synthesize(data, SynthConfig(videos=1, frames=4 * config.frames, width=config.width, height=config.height,
                                 seed=1, prefix="long"))
    weights = os.path.join(work, "detector.pt")
    use_gpu = config.gpu == "on" or (config.gpu == "auto" and cluster_resources().gpus > 0)
    save_detector(build_detector(config.detector, random_init=True), weights)
    spec = DetectorSpec(weights=weights)
    short = datasets.open_video(datasets.discover(data, names=["short-000"]).videos[0])
    report.environment.update(device="cuda" if use_gpu and torch.cuda.is_available() else "cpu",
                              detector=config.detector, batch_size=config.batch_size, threads=config.threads,
                              frames=f"{config.frames} at {config.width}x{config.height}")
    if "extract" in config.stages:
        torch.set_num_threads(config.threads)
        detector = build_detector(None, weights, device="cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        images = [f.image for f in short.iter_frames()]
        bare = Figure("extract: bare detector (frames in memory)", "frames/s",
                      repeat(lambda: bare_detector_fps(detector, images, config.batch_size), config.runs,
                             config.warmup))
        del images
        # The pipeline and the naive loop run over the 4x longer video, so that a fresh actor's one-off costs
        # (its first JPEG read and Parquet write) weigh as little as they do over an archive.
        long = datasets.open_video(datasets.discover(data, names=["long-000"]).videos[0])
        naive_dir = tempfile.mkdtemp(dir=work)
        naive = Figure("extract: naive loop (1 frame at a time, 1 file per frame)", "frames/s",
                       repeat(lambda: naive_loop_fps(detector, long, naive_dir), config.runs, config.warmup))
        pipeline = Figure("extract: pipeline (decode + detector + Parquet, Ray actor)", "frames/s",
                          repeat(lambda: pipeline_fps(data, os.path.join(work, "out"), spec, config,
                                                      ["long-000"])[0], config.runs, config.warmup))
        report.figures += [bare, naive, pipeline]
        report.ratios += [Ratio("extract pipeline / bare detector", pipeline, bare, 0.85),
                          Ratio("extract pipeline / naive loop", pipeline, naive)]
    if "memory" in config.stages:
        peaks = {}
        for name in ("short-000", "long-000"):
            peaks[name] = Figure(f"memory: extraction actor peak RSS, {name.split('-')[0]} video", "MiB",
                                 [pipeline_fps(data, os.path.join(work, f"memory-{name}"), spec, config,
                                               [name])[1]["peak_rss_mb"] for _ in range(config.runs)])
        report.figures += list(peaks.values())
        report.ratios.append(Ratio("memory: 4x longer video / video", peaks["long-000"], peaks["short-000"],
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


def _track(config: BenchmarkConfig, report: BenchmarkReport) -> None:
    from rolo_batch.rolo import RoloConfig, build_model
    from rolo_batch.synthetic_features import synthetic_feature_frames
    from rolo_batch.track import track_rolo

    dim = 256
    videos = [synthetic_feature_frames(f"video-{i}", config.frames, dim, seed=i)
              for i in range(config.videos_per_batch)]
    model = build_model(RoloConfig(feature_dim=dim, steps=config.steps)).eval()
    windows = np.random.default_rng(0).normal(size=(config.videos_per_batch, config.steps, dim + 6))
    windows = windows.astype(np.float32)

    def tracking() -> float:
        started = time.perf_counter()
        track_rolo(model, config.steps, videos)
        return sum(len(v) for v in videos) / (time.perf_counter() - started)

    bare = Figure(f"track: bare LSTM forward (batch {config.videos_per_batch})", "frames/s",
                  repeat(lambda: bare_lstm_fps(model, windows, config.frames), config.runs, config.warmup))
    tracked = Figure(f"track: ROLO tracking ({config.videos_per_batch} videos in lockstep)", "frames/s",
                     repeat(tracking, config.runs, config.warmup))
    report.figures += [bare, tracked]
    report.ratios.append(Ratio("track / bare LSTM", tracked, bare, 0.7))


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
    if {"extract", "memory"} & set(config.stages):
        _extract_and_memory(config, work, report)
    if "track" in config.stages:
        _track(config, report)
    if "train" in config.stages:
        _train(config, work, report)
    storage.write_text(storage.join(config.out_uri, "benchmark.json"), report.to_json())
    storage.write_text(storage.join(config.out_uri, "benchmark.md"), report.markdown())
    return report
