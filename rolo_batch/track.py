"""Batch tracking: features (+ frames) -> the tracks table, one atomic unit per video, with Ray Data.

``track_rolo`` and ``track_baselines`` are the plain functions. For a group of videos ROLO runs on all of
them at once (their detection tracks first, then the model over chunks of frames of every video: batched
across videos and frames for the accelerator); then, one pass over each video, the baselines (YOLO only,
YOLO + Kalman, OpenCV's CSRT / KCF / MIL on the frames).
One-pass evaluation: every tracker gets the first frame's box and nothing else of the ground truth (except
in the named ``oracle`` detection mode, which reproduces the paper's choice of detection by ground truth).

``run_tracking`` is the Ray layer: a Ray Data dataset of videos, ``map_batches`` over an actor pool that
holds the model (on a GPU when the cluster has them); each actor writes its videos'
``tracks/<run>/<video>/part-0.parquet`` atomically and marks them done, so a retried task (an actor that
died) rewrites the same files and a re-run skips finished videos. The heatmap model's maps are kept beside
the rows (``_heatmaps.npy``, float16 (N, 32, 32)) for overlay videos.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from rolo_batch import boxes, contracts, datasets, storage, tables, trackers
from rolo_batch.console import Progress, format_table
from rolo_batch.errors import ConfigError, InputError, RoloBatchError

TRACKS_DIR = "tracks"
RUN_INFO = "_run.json"
HEATMAPS_FILE = "_heatmaps.npy"  # "_": table readers (pyarrow, Spark, DuckDB globs) skip it
METHODS = ("rolo", "yolo", "yolo-kalman", "csrt", "kcf", "mil")
IMAGE_METHODS = ("csrt", "kcf", "mil")
INPUT_KEYS = ("model", "features", "rolo_mode")  # what the videos of one run must share
CHUNK_VALUES = 1 << 23  # input values per model call in batch tracking (32 MiB in float32)


@dataclass(frozen=True)
class TrackConfig:
    """A tracking run. ``detection``: ``ope`` picks each frame's detection by the detection track (one-pass
    evaluation); ``oracle`` by the ground truth (the paper's code; leaks the answer, for comparison only).
    ``videos_per_batch``: videos tracked in lockstep per model call (more fills an accelerator better).
    ``data_uri``: where the frames are (default: the sources recorded when the features were extracted).
    ``rolo_mode``: ``window`` re-reads the last ``steps`` frames every frame; ``stream`` carries the LSTM's
    state from frame to frame (see ``trackers.RoloTracker``)."""

    features_uri: str
    model_uri: str
    out_uri: str
    run: str = "rolo"
    methods: tuple[str, ...] = METHODS
    detection: str = "ope"
    data_uri: str | None = None
    videos: tuple[str, ...] | None = None
    videos_per_batch: int = 8
    actors: int | None = None
    gpu: str = "auto"
    overwrite: bool = False
    rolo_mode: str = "window"

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS + ("identity",)]
        if unknown or not self.methods:
            raise ConfigError(f"unknown tracking method(s) {unknown}; choose from {', '.join(METHODS)}, identity")
        if self.detection not in ("ope", "oracle"):
            raise ConfigError(f"detection must be ope or oracle, got {self.detection!r}")
        if self.videos_per_batch < 1:
            raise ConfigError("videos_per_batch must be >= 1")
        if self.rolo_mode not in ("window", "stream"):
            raise ConfigError(f"rolo_mode must be window or stream, got {self.rolo_mode!r}")
        if self.gpu not in ("auto", "on", "off"):
            raise ConfigError(f"gpu must be auto, on or off, got {self.gpu!r}")

    @property
    def run_uri(self) -> str:
        return storage.join(self.out_uri, TRACKS_DIR, self.run)


@dataclass
class VideoToTrack:
    """One video's inputs: its features file, and where its frames are (for the OpenCV trackers)."""

    video: str
    part_uri: str
    source: dict | None


# --- plain functions -------------------------------------------------------------------------------------

def observations(frames: tables.FeatureFrames, video: datasets.VideoSource | None) -> Iterator[trackers.Observation]:
    """The observations of a video, frame by frame; images decoded only when ``video`` is given."""
    images = video.iter_frames() if video is not None else None
    for index in range(len(frames)):
        image = None
        if images is not None:
            frame = next(images)
            if frame.number != frames.frame[index]:
                raise InputError(f"frame {frame.number} of the video does not match features row "
                                 f"{frames.frame[index]}", video=frames.video)
            image = frame.image
        yield trackers.Observation(index=index, frame=int(frames.frame[index]),
                                   image_wh=(int(frames.image_wh[index, 0]), int(frames.image_wh[index, 1])),
                                   detections=frames.detections[index], feature=frames.feature[index], image=image)


def first_box(frames: tables.FeatureFrames) -> np.ndarray:
    """The box given in the first frame (one-pass evaluation starts from it)."""
    if not len(frames) or not frames.gt_valid[0]:
        raise InputError("no valid ground-truth box in the first frame: one-pass tracking needs the target's "
                         "first box (OTB groundtruth_rect.txt, or a video file's .groundtruth.txt sidecar)",
                         video=frames.video)
    return frames.gt_boxes_xywh_px[0].astype(float)


def track_rolo(model, steps: int, videos: list[tables.FeatureFrames], oracle: bool = False, stream: bool = False,
               chunk_values: int = CHUNK_VALUES) -> tuple[list[tables.TrackRows], list[np.ndarray | None]]:
    """ROLO over several videos together. The detection track does not depend on the model's estimates
    (``trackers.DetectionFeed``), so each video's detections are chosen first, in one pass; then the model
    runs over all videos at once, a chunk of frames per call (about ``chunk_values`` input values, so memory
    follows the chunk, not the videos' length): with ``stream`` the LSTM carries its state through the video
    (one step per frame), else each frame's window of the last ``steps`` frames (the first frame repeated
    before the start) is read anew. The first frame's box is the given one. Returns the rows per video and,
    for the heatmap model, its (N, 32, 32) maps per video."""
    started = time.perf_counter()
    inputs = [VideoInputs(f.feature, trackers.feed_detections(observations(f, None), first_box(f), oracle,
                                                              f.gt_boxes_xywh_px.astype(float)))
              for f in videos]
    run = stream_outputs if stream else window_outputs
    outputs = run(model, inputs, steps, chunk_values)
    elapsed_ms = (time.perf_counter() - started) * 1000 / max(1, sum(len(f) for f in videos))
    heatmap_model = getattr(model, "config", None) is not None and model.config.form == "heatmap"
    rows, heatmaps = [], []
    for frames, output in zip(videos, outputs):
        boxes_norm = model.outputs_to_boxes(output).float().cpu().numpy()
        boxes_px = boxes.cxcywh_norm_to_xywh_px(boxes_norm, frames.image_wh.astype(float))
        boxes_px[0] = first_box(frames)
        rows.append(tables.TrackRows(video=frames.video, method="rolo", frame=frames.frame, boxes_xywh_px=boxes_px,
                                     confidence=np.full(len(frames), np.nan),
                                     time_ms=np.full(len(frames), elapsed_ms)))
        heatmaps.append(output.float().cpu().numpy().astype(np.float16) if heatmap_model else None)
    return rows, heatmaps


@dataclass
class VideoInputs:
    """One video's ROLO inputs, kept apart until a chunk is built: ``feature`` (N, D) as the table holds it,
    ``detection`` (N, 6) as ``trackers.DetectionFeed`` chose it."""

    feature: np.ndarray
    detection: np.ndarray

    def __len__(self) -> int:
        return len(self.detection)

    @property
    def width(self) -> int:
        return self.feature.shape[1] + self.detection.shape[1]

    def rows(self, index: np.ndarray) -> np.ndarray:
        """``feature ++ detection`` of the frames at ``index`` (any shape), float32: ``index.shape + (D + 6,)``."""
        return np.concatenate([self.feature[index].astype(np.float32, copy=False), self.detection[index]], axis=-1)


def _model_input(model, array: np.ndarray):
    import torch

    parameter = next(model.parameters())
    return torch.as_tensor(array, dtype=parameter.dtype, device=parameter.device)


def stream_outputs(model, inputs: list[VideoInputs], steps: int, chunk_values: int) -> list:
    """Per video, the model's outputs at every frame with the LSTM state carried from the first frame on;
    about ``chunk_values`` input values per model call."""
    import torch

    longest = max(len(x) for x in inputs)
    chunk = max(1, chunk_values // (len(inputs) * inputs[0].width))
    carry, parts = None, []
    with torch.inference_mode():
        for start in range(0, longest, chunk):
            block = np.zeros((len(inputs), min(chunk, longest - start), inputs[0].width), np.float32)
            for index, x in enumerate(inputs):  # zeros after a video's end: their outputs are never read
                frames = np.arange(start, min(start + chunk, len(x)))
                block[index, :len(frames)] = x.rows(frames)
            outputs, carry = model.run(_model_input(model, block), carry)
            parts.append(outputs)
    outputs = torch.cat(parts, dim=1)
    return [outputs[index, :len(x)] for index, x in enumerate(inputs)]


def window_outputs(model, inputs: list[VideoInputs], steps: int, chunk_values: int) -> list:
    """Per video, the model's last-step output of each frame's window of ``steps`` frames (the first frame
    repeated before it); windows of several videos share a call of about ``chunk_values`` input values."""
    import torch

    chunk = max(1, chunk_values // (steps * inputs[0].width))
    offsets = np.arange(steps) - (steps - 1)
    parts, pending = [], []

    def flush() -> None:
        parts.append(model.sequence_outputs(_model_input(model, np.concatenate(pending)))[:, -1])
        pending.clear()

    with torch.inference_mode():
        for x in inputs:
            for start in range(0, len(x), chunk):
                frames = np.arange(start, min(start + chunk, len(x)))
                pending.append(x.rows(np.maximum(frames[:, None] + offsets[None], 0)))  # (frames, steps, D + 6)
                if sum(len(p) for p in pending) >= chunk:
                    flush()
        if pending:
            flush()
    outputs = torch.cat(parts)
    ends = np.cumsum([len(x) for x in inputs])
    return [outputs[end - len(x):end] for x, end in zip(inputs, ends)]


def track_baselines(frames: tables.FeatureFrames, methods: tuple[str, ...], video: datasets.VideoSource | None
                    ) -> list[tables.TrackRows]:
    """The baseline methods over one video, in one pass (frames decoded once, only if a method needs them)."""
    chosen = [trackers.make_baseline(m) for m in methods]
    if not chosen:
        return []
    needs_images = any(t.needs_images for t in chosen)
    if needs_images and video is None:
        raise InputError(f"{', '.join(m for m in methods if m in IMAGE_METHODS)} need the frames, but the video "
                         f"was not found (pass --data)", video=frames.video)
    return trackers.run_trackers(chosen, observations(frames, video if needs_images else None), first_box(frames),
                                 frames.video)


def write_video_tracks(run_uri: str, video: str, rows: list[tables.TrackRows], heatmaps: np.ndarray | None,
                       info: dict) -> None:
    """Publish one video's unit: the rows (all methods), the heatmaps if any, then the done marker."""
    import pyarrow as pa

    unit = tables.unit_uri(run_uri, video)
    storage.remove_temporaries(unit)  # left by a worker that died on this video before
    table = pa.concat_tables([r.to_arrow() for r in rows])
    tables.write_parquet(storage.join(unit, tables.PART_FILE), table, contracts.load("tracks"),
                         {"rolo_batch.model": info.get("model", "")})
    if heatmaps is not None:
        buffer = io.BytesIO()
        np.save(buffer, heatmaps, allow_pickle=False)
        storage.write_bytes(storage.join(unit, HEATMAPS_FILE), buffer.getvalue())
    storage.mark_done(unit, {**info, "video": video, "rows": table.num_rows,
                             "methods": sorted({r.method for r in rows})})


def load_heatmaps(unit_uri: str) -> np.ndarray | None:
    """The heatmap model's maps of one tracked video, (N, 32, 32), if the run kept them."""
    uri = storage.join(unit_uri, HEATMAPS_FILE)
    if not storage.is_file(uri):
        return None
    return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False).astype(np.float32)


# --- the Ray layer ---------------------------------------------------------------------------------------

class TrackBatch:
    """Ray Data UDF holding the model: tracks each batch of videos and writes their units."""

    def __init__(self, config: TrackConfig, run_info: dict) -> None:
        import torch

        from rolo_batch.rolo import load_model
        from rolo_batch.runtime import torch_device_for_actor

        self.config = config
        self.run_info = run_info
        self.device = torch_device_for_actor()
        self.model, self.info = load_model(config.model_uri, device=self.device)
        torch.set_num_threads(max(1, torch.get_num_threads()))

    def _open_source(self, item: VideoToTrack) -> datasets.VideoSource | None:
        if not item.source:
            return None
        return datasets.open_video(datasets.VideoRef(**item.source))

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [VideoToTrack(str(v), str(p), json.loads(str(s)) if s else None)
                 for v, p, s in zip(batch["video"], batch["part_uri"], batch["source"])]
        outcome = {item.video: {"status": "failed", "frames": 0, "seconds": 0.0, "error": ""} for item in items}
        loaded = []
        for item in items:
            if not self.config.overwrite and storage.is_done(tables.unit_uri(self.config.run_uri, item.video)):
                outcome[item.video].update(status="skipped")  # finished by an earlier attempt of this task
                continue
            try:
                frames = tables.FeatureFrames.from_arrow(
                    tables.read_parquet(item.part_uri, contracts.load("features"), feature_dim=self.info.feature_dim))
                first_box(frames)
                loaded.append((item, frames))
            except RoloBatchError as exc:
                outcome[item.video]["error"] = str(exc)
        started = time.perf_counter()
        rolo_rows, heatmaps = ([], [])
        if loaded and "rolo" in self.config.methods:
            rolo_rows, heatmaps = track_rolo(self.model, self.info.steps, [f for _, f in loaded],
                                             oracle=self.config.detection == "oracle",
                                             stream=self.config.rolo_mode == "stream")
        rolo_seconds = time.perf_counter() - started
        baselines = tuple(m for m in self.config.methods if m != "rolo")
        for index, (item, frames) in enumerate(loaded):
            video_started = time.perf_counter()
            try:
                rows = list(rolo_rows[index:index + 1]) + track_baselines(frames, baselines, self._open_source(item))
                write_video_tracks(self.config.run_uri, item.video, rows, heatmaps[index] if heatmaps else None,
                                   self.run_info)
                outcome[item.video].update(status="done", frames=len(frames),
                                           seconds=time.perf_counter() - video_started + rolo_seconds / len(loaded))
            except RoloBatchError as exc:
                outcome[item.video]["error"] = str(exc)
        videos = list(outcome)
        return {"video": np.array(videos), "status": np.array([outcome[v]["status"] for v in videos]),
                "frames": np.array([outcome[v]["frames"] for v in videos]),
                "seconds": np.array([outcome[v]["seconds"] for v in videos]),
                "error": np.array([outcome[v]["error"] for v in videos])}


@dataclass
class TrackSummary:
    """The outcome of a tracking run: one row per video (status, frames, seconds, error)."""

    run_uri: str
    rows: list[dict[str, Any]]
    seconds: float

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "failed"]

    def table(self) -> str:
        return format_table(self.rows, ["video", "status", "frames", "seconds", "error"], floatfmt=".2f")


def _sources(config: TrackConfig, table: tables.FeaturesTable) -> dict[str, dict | None]:
    """Where each video's frames are: ``--data`` if given, else the source recorded at extraction."""
    if config.data_uri is None:
        return {name: unit.info.get("source") for name, unit in table.units.items()}
    found = {ref.name: dataclasses.asdict(ref) for ref in datasets.discover(config.data_uri).videos}
    return {name: found.get(name) for name in table.units}


def _recorded_inputs(run_uri: str) -> dict:
    """The ``INPUT_KEYS`` a run's record holds (none for a new run; ``rolo_mode`` window for runs recorded
    before streaming)."""
    info_uri = storage.join(run_uri, RUN_INFO)
    if not storage.is_file(info_uri):
        return {}
    previous = json.loads(storage.read_text(info_uri))
    previous.setdefault("rolo_mode", "window")
    return {key: previous[key] for key in INPUT_KEYS if key in previous}


def _check_same_inputs(run_uri: str, run_info: dict) -> None:
    """A run that already holds finished videos continues only with the model and features they came from,
    so that one run never mixes tracks of two models (or of one model run two ways)."""
    previous = _recorded_inputs(run_uri)
    changed = [key for key in previous if previous[key] != run_info[key]]
    if changed:
        what = "; ".join(f"{key} was {previous[key]}, now {run_info[key]}" for key in changed)
        raise ConfigError(f"tracking run {run_uri} already holds videos tracked with other inputs ({what}): "
                          f"pass --overwrite to redo them, or choose another --run")


def _feature_kind(shape: tuple[int, ...] | None) -> str:
    return "a feature vector" if shape is None else f"feature maps of shape {list(shape)}"


def finished_tracking(config: TrackConfig) -> TrackSummary | None:
    """The summary of a run with nothing left to do, found without Ray: every video of the features table is
    already tracked in this run, with this model, these features and this rolo_mode; else None."""
    started = time.perf_counter()
    if config.overwrite:
        return None
    table = tables.FeaturesTable.open(config.features_uri, list(config.videos) if config.videos else None)
    done = tables.done_units(config.run_uri)
    if any(name not in done for name in table.units):
        return None
    if _recorded_inputs(config.run_uri) != {"model": config.model_uri, "features": table.root,
                                            "rolo_mode": config.rolo_mode}:
        return None  # run_tracking says what differs
    rows = [{"video": v, "status": "skipped", "frames": 0, "seconds": 0.0, "error": ""} for v in sorted(table.units)]
    return TrackSummary(config.run_uri, rows, time.perf_counter() - started)


def run_tracking(config: TrackConfig, *, num_cpus_per_actor: float = 1.0) -> TrackSummary:
    """Track every video of the features table on the connected Ray cluster (see the module docstring)."""
    import ray

    from rolo_batch.rolo import load_model
    from rolo_batch.runtime import plan_video_pool

    started = time.perf_counter()
    table = tables.FeaturesTable.open(config.features_uri, list(config.videos) if config.videos else None)
    _, info = load_model(config.model_uri, feature_dim=table.feature_dim)
    if info.detector_id and info.detector_id != table.detector_id:
        raise ConfigError(f"the model was trained on features of detector {info.detector_id}, but "
                          f"{table.root} holds {table.detector_id}")
    if info.config.feature_shape != table.feature_shape:
        raise ConfigError(f"the model reads {_feature_kind(info.config.feature_shape)}, but {table.root} holds "
                          f"{_feature_kind(table.feature_shape)}; track with the features it was trained on")
    run_info = {"model": config.model_uri, "features": table.root, "detector_id": table.detector_id,
                "steps": info.steps, "split": info.split, "detection": config.detection,
                "split_manifest": info.metadata.get("split_manifest"), "methods": list(config.methods),
                "rolo_mode": config.rolo_mode,
                "session": uuid.uuid4().hex}  # new whenever tracking runs: scoring knows to score again
    done = set() if config.overwrite else set(tables.done_units(config.run_uri))
    if done:
        _check_same_inputs(config.run_uri, run_info)
    rows = [{"video": v, "status": "skipped", "frames": 0, "seconds": 0.0, "error": ""}
            for v in sorted(table.units) if v in done]
    pending = [name for name in sorted(table.units) if name not in done]
    if pending:  # the run's record changes only when tracking writes something
        storage.write_text(storage.join(config.run_uri, RUN_INFO), json.dumps(run_info, indent=2, sort_keys=True))
    sources = _sources(config, table) if pending else {}
    todo = [{"video": name, "part_uri": table.units[name].part_uri,
             "source": json.dumps(sources[name]) if sources[name] else ""} for name in pending]
    if todo:
        plan = plan_video_pool(config.gpu, len(todo), config.videos_per_batch, config.actors, num_cpus_per_actor)
        dataset = ray.data.from_items(todo, override_num_blocks=plan.batches)
        results = dataset.map_batches(
            TrackBatch, fn_constructor_args=(config, run_info), batch_size=config.videos_per_batch,
            compute=ray.data.ActorPoolStrategy(size=plan.actors), num_gpus=1 if plan.use_gpu else 0,
            num_cpus=num_cpus_per_actor)
        progress = Progress("track", len(todo), unit="videos", interval_s=5.0)
        for row in results.iter_rows():
            rows.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
            progress.update(1, extra=f"{sum(r['status'] == 'failed' for r in rows)} failed")
        progress.close()
    rows.sort(key=lambda r: r["video"])
    return TrackSummary(config.run_uri, rows, time.perf_counter() - started)
