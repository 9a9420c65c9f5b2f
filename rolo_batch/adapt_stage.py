"""The adaptation stage: videos + their first box -> a features table of target-adapted detections, on Ray Data.

For a video nothing was trained on (the archive case), each actor holds the pretrained backbone and, for every
video of its batch, a target model fitted on that video's first frame and box and updated while it tracks
(``rolo_batch.adaptive``). All videos of a batch advance in lockstep, one backbone call per frame index for
all of them (on the actor's GPU when it has one). Each frame's row holds the adapted model's box as the
detection (class 0, its confidence) and as the feature its response map, or the backbone's whole-frame map
(``FeatureKind``), in the features table contract, so
the existing stages read it unchanged: ROLO trains on and tracks these features, and YOLO-only follows the
same adapted detections.

Only the first box of a video's ground truth reaches the target model; the rest is copied into the table for
training and scoring only. Each video's unit is published atomically and marked done, so a re-run skips it,
and a video that fails (a bad frame) fails alone while the others of its batch go on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from rolo_batch import boxes, contracts, datasets, storage, tables
from rolo_batch.adaptive import (FEATURE_CHANNELS, FRAME_MAP_STRIDE, RESPONSE_SIDE, AdaptConfig, AdaptiveModel,
                                 frame_maps, summary_feature)
from rolo_batch.console import Progress
from rolo_batch.datasets import VideoRef
from rolo_batch.errors import ConfigError, InputError, RoloBatchError
from rolo_batch.extract import ExtractSummary, VideoResult

CHUNK_FRAMES = 64  # rows kept per video before they are written
FEATURES = ("response", "map16")


@dataclass(frozen=True)
class FeatureKind:
    """What the table stores per frame: ``response``, the target model's 8 x 8 response map (64 values), or
    ``map16``, the backbone's whole-frame 112 x 16 x 16 map, which ROLO pools inside each frame's box (so a
    jittered training box sees the image where it lies: what lets ROLO learn corrections)."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in FEATURES:
            raise ConfigError(f"adaptation feature must be one of {', '.join(FEATURES)}, got {self.name!r}")

    @property
    def shape(self) -> tuple[int, int, int] | None:
        return None if self.name == "response" else (FEATURE_CHANNELS[FRAME_MAP_STRIDE], 16, 16)

    @property
    def dim(self) -> int:
        return RESPONSE_SIDE ** 2 if self.shape is None else int(np.prod(self.shape))

    def suffix(self) -> str:
        return "" if self.name == "response" else f"-{self.name}"


def adaptive_detector_id(config: AdaptConfig, weights_digest: str) -> str:
    """``adaptive-<hash>``: names the settings and backbone weights, so tables of different ones never mix."""
    text = json.dumps({"config": dataclasses.asdict(config), "weights": weights_digest}, sort_keys=True)
    return f"adaptive-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def backbone_digest(weights: str | None) -> str:
    """The sha256 of the backbone weights file. The package's default file (``weights`` None) is not read:
    loading it checks it against ``WEIGHTS_SHA256``, so that is its digest."""
    from rolo_batch.efficientnet_weights import WEIGHTS_SHA256

    return hashlib.sha256(storage.read_bytes(weights)).hexdigest() if weights else WEIGHTS_SHA256


@dataclass
class _Running:
    """One video in the lockstep: its source, ground truth (for the table only) and open writer."""

    ref: VideoRef
    video: datasets.VideoSource
    unit: str
    frames: Any
    writer: tables.ParquetUnitWriter
    stack: contextlib.ExitStack
    kind: FeatureKind
    rows: list[dict] = dataclasses.field(default_factory=list)
    started: float = 0.0


def _first_box(video: datasets.VideoSource) -> np.ndarray:
    box = video.first_box_xywh_px
    if box is None:
        raise InputError("no valid box in the first frame: the archive mode starts from the target's first box "
                         "(OTB groundtruth_rect.txt, or a video file's .groundtruth.txt sidecar, one line is "
                         "enough)", video=video.name)
    return box


def adapt_videos(model: AdaptiveModel, refs: list[VideoRef], table_root: str, detector_id: str,
                 on_frames: Callable[[int], None] | None = None, feature: str = "response") -> list[VideoResult]:
    """Track ``refs`` in lockstep with target models adapted from their first boxes; write each one's unit
    under ``table_root`` and mark it done. A video that fails is reported and the others continue.
    ``feature``: what each row stores (see ``FeatureKind``)."""
    kind = FeatureKind(feature)
    contract = contracts.load("features")
    metadata = tables.features_metadata(detector_id, kind.dim, kind.shape)
    results: dict[str, VideoResult] = {}
    running: list[_Running] = []
    firsts: list[tuple[np.ndarray, np.ndarray]] = []
    for ref in refs:
        started = time.perf_counter()
        stack = contextlib.ExitStack()
        try:
            video = datasets.open_video(ref)
            box = _first_box(video)
            frames = video.iter_frames()
            first = next(frames)
            unit = tables.unit_uri(table_root, ref.name)
            storage.remove_temporaries(unit)
            writer = stack.enter_context(tables.ParquetUnitWriter(
                storage.join(unit, tables.PART_FILE), contract, metadata, feature_dim=kind.dim))
        except (RoloBatchError, StopIteration) as exc:
            stack.close()
            results[ref.name] = VideoResult(ref.name, "failed", error=_message(exc, ref.name))
            continue
        running.append(_Running(ref, video, unit, frames, writer, stack, kind, started=started))
        firsts.append((first.image, box))
    states = model.init_many([image for image, _ in firsts], [box for _, box in firsts])
    maps = _maps(model, kind, [image for image, _ in firsts])
    for k, (item, state, (image, _)) in enumerate(zip(running, states, firsts)):
        _record(item, 0, image, state, maps[k] if maps is not None else None)
    if on_frames and running:
        on_frames(len(running))
    active = list(zip(running, states))
    while active:
        advanced, images = [], []
        for item, state in active:
            try:
                frame = next(item.frames, None)
            except RoloBatchError as exc:
                _fail(item, exc, results)
                continue
            if frame is None:
                _finish(item, detector_id, results)
                continue
            advanced.append((item, state, frame))
            images.append(frame.image)
        model.step_many(images, [state for _, state, _ in advanced])
        maps = _maps(model, kind, images)
        for k, (item, state, frame) in enumerate(advanced):
            try:
                _record(item, frame.index, frame.image, state, maps[k] if maps is not None else None)
            except RoloBatchError as exc:
                _fail(item, exc, results)
        active = [(item, state) for item, state, _ in advanced if item.ref.name not in results]
        if on_frames and advanced:
            on_frames(len(advanced))
    return [results[ref.name] for ref in refs]


def _maps(model: AdaptiveModel, kind: FeatureKind, images: list[np.ndarray]) -> np.ndarray | None:
    return frame_maps(model.backbone, images) if kind.shape is not None and images else None


def _record(item: _Running, index: int, image: np.ndarray, state, frame_map: np.ndarray | None) -> None:
    """Keep this frame's row; write the kept rows every ``CHUNK_FRAMES`` frames."""
    width, height = item.video.image_size
    if image.shape[1] != width or image.shape[0] != height:
        raise InputError(f"frame {index + 1} is {image.shape[1]}x{image.shape[0]}, the video's first frame is "
                         f"{width}x{height}", video=item.ref.name)
    box = boxes.xywh_px_to_cxcywh_norm(state.box_xywh_px[None], (width, height))[0]
    detection = np.concatenate([[0.0], box, [state.confidence]]).astype(np.float32)
    feature = summary_feature(state) if frame_map is None else frame_map.reshape(-1)
    item.rows.append({"index": index, "feature": feature, "detection": detection})
    if len(item.rows) >= CHUNK_FRAMES:
        _flush(item)


def _flush(item: _Running) -> None:
    if not item.rows:
        return
    alignment = item.video.groundtruth  # copied into the table for training and scoring; never tracked from
    indices = np.array([r["index"] for r in item.rows])
    width, height = item.video.image_size
    detection = np.stack([r["detection"] for r in item.rows])
    frames = tables.FeatureFrames(
        video=item.ref.name, frame=item.video.frame_numbers[indices],
        image_wh=np.tile([width, height], (len(indices), 1)), feature=np.stack([r["feature"] for r in item.rows]),
        detection=detection, detections=[d[None] for d in detection],
        gt_boxes_xywh_px=alignment.boxes_xywh_px[indices], gt_valid=alignment.valid[indices])
    item.writer.write(frames.to_arrow())
    item.rows = []


def _finish(item: _Running, detector_id: str, results: dict[str, VideoResult]) -> None:
    try:
        _flush(item)
        item.stack.close()
    except RoloBatchError as exc:
        _fail(item, exc, results)
        return
    seconds = time.perf_counter() - item.started
    storage.mark_done(item.unit, tables.features_marker(
        item.ref.name, item.video.frame_numbers, detector_id, item.kind.dim, item.video.image_size,
        feature_shape=item.kind.shape,
        source=dataclasses.asdict(item.ref), seconds=round(seconds, 3), groundtruth_notes=item.video.groundtruth.notes))
    results[item.ref.name] = VideoResult(item.ref.name, "done", len(item.video), seconds)


def _fail(item: _Running, exc: BaseException, results: dict[str, VideoResult]) -> None:
    """Drop a failed video: its half-written file is discarded, nothing is published."""
    with contextlib.suppress(Exception):
        item.stack.__exit__(type(exc), exc, exc.__traceback__)
    results[item.ref.name] = VideoResult(item.ref.name, "failed", error=_message(exc, item.ref.name),
                                         seconds=time.perf_counter() - item.started)


def _message(exc: BaseException, video: str) -> str:
    text = str(exc) or type(exc).__name__
    return text if video in text else f"{video}: {text}"


# --- the Ray layer ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdaptJob:
    """An adaptation run. ``videos_per_batch``: videos an actor tracks in lockstep (one backbone call per
    frame for all of them); ``weights``: the backbone's ImageNet weights (default: the installed package's)."""

    data_uri: str
    out_uri: str
    config: AdaptConfig = AdaptConfig()
    weights: str | None = None
    videos: tuple[str, ...] | None = None
    videos_per_batch: int = 4
    actors: int | None = None
    gpu: str = "auto"
    overwrite: bool = False
    feature: str = "response"

    def __post_init__(self) -> None:
        FeatureKind(self.feature)
        if self.videos_per_batch < 1:
            raise ConfigError("videos_per_batch must be >= 1")
        if self.gpu not in ("auto", "on", "off"):
            raise ConfigError(f"gpu must be auto, on or off, got {self.gpu!r}")

    @functools.cached_property
    def detector_id(self) -> str:
        """Names the settings and the backbone weights (a weights URI is read once per job)."""
        return adaptive_detector_id(self.config, backbone_digest(self.weights))

    @property
    def table_root(self) -> str:
        return tables.features_root(self.out_uri, self.detector_id + FeatureKind(self.feature).suffix())


class AdaptBatch:
    """Ray Data UDF holding the backbone: adapts and tracks each batch of videos, writing their units."""

    def __init__(self, job: AdaptJob, table_root: str, detector_id: str) -> None:
        import ray
        import torch

        from rolo_batch.runtime import torch_device_for_actor

        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.job, self.table_root, self.detector_id = job, table_root, detector_id
        device = torch_device_for_actor()
        self.model = AdaptiveModel(job.config, weights=job.weights, device=device)
        self.worker = json.dumps({"gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": device,
                                  "pid": os.getpid()})

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        refs = [VideoRef(**json.loads(str(text))) for text in batch["ref"]]
        todo = [r for r in refs if self.job.overwrite or not storage.is_done(tables.unit_uri(self.table_root, r.name))]
        results = {r.video: r for r in adapt_videos(self.model, todo, self.table_root, self.detector_id,
                                                    feature=self.job.feature)}
        rows = [results.get(r.name) or VideoResult(r.name, "skipped") for r in refs]
        return {"video": np.array([r.video for r in rows]), "status": np.array([r.status for r in rows]),
                "frames": np.array([r.frames for r in rows]), "seconds": np.array([r.seconds for r in rows]),
                "error": np.array([r.error or "" for r in rows]), "worker": np.array([self.worker] * len(rows))}


def finished_adaptation(job: AdaptJob) -> ExtractSummary | None:
    """The summary of a run with nothing left to do, found without Ray; else None."""
    started = time.perf_counter()
    if job.overwrite:
        return None
    found = datasets.discover(job.data_uri, names=list(job.videos) if job.videos else None)
    if found.rejected or not found.videos:
        return None
    root = job.table_root
    done = tables.done_units(root)
    if any(ref.name not in done for ref in found.videos):
        return None
    return ExtractSummary(root, job.detector_id, [VideoResult(r.name, "skipped") for r in found.videos],
                          time.perf_counter() - started, [])


def run_adaptation(job: AdaptJob, *, num_cpus_per_actor: float = 1.0) -> ExtractSummary:
    """Adapt and track every video under ``job.data_uri`` on the connected Ray cluster into the features
    table ``OUT/features/adaptive-<hash>/`` (see the module docstring)."""
    import ray

    from rolo_batch.runtime import plan_video_pool

    started = time.perf_counter()
    found = datasets.discover(job.data_uri, names=list(job.videos) if job.videos else None)
    if not found.rejected:
        found.require_videos()
    detector_id = job.detector_id
    root = job.table_root
    storage.write_text(storage.join(root, tables.DETECTOR_MANIFEST),
                       json.dumps({"adaptive": dataclasses.asdict(job.config), "weights": job.weights,
                                   "feature": job.feature, "detector_id": detector_id}, indent=2, sort_keys=True))
    results = [VideoResult(e.video or storage.basename(e.path or "?"), "failed", error=str(e)) for e in found.rejected]
    todo = [{"ref": json.dumps(dataclasses.asdict(ref))} for ref in found.videos]
    if not todo:
        return ExtractSummary(root, detector_id, results, time.perf_counter() - started, [])
    plan = plan_video_pool(job.gpu, len(todo), job.videos_per_batch, job.actors, num_cpus_per_actor)
    dataset = ray.data.from_items(todo, override_num_blocks=plan.batches)
    outcome = dataset.map_batches(
        AdaptBatch, fn_constructor_args=(job, root, detector_id), batch_size=job.videos_per_batch,
        compute=ray.data.ActorPoolStrategy(size=plan.actors), num_gpus=1 if plan.use_gpu else 0,
        num_cpus=num_cpus_per_actor)
    progress = Progress("adapt", len(todo), unit="videos", interval_s=5.0)
    for row in outcome.iter_rows():
        row = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
        results.append(VideoResult(row["video"], row["status"], row["frames"], row["seconds"], row["error"] or None,
                                   worker=json.loads(row["worker"])))
        progress.update(1, extra=f"{sum(r.status == 'failed' for r in results)} failed")
    progress.close()
    results.sort(key=lambda r: r.video)
    workers = list({r.worker["pid"]: r.worker for r in results if r.worker}.values())
    return ExtractSummary(root, detector_id, results, time.perf_counter() - started, workers)
