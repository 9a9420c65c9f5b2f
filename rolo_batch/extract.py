"""Bulk feature extraction: videos -> the features table, one atomic unit per video.

The plain function ``extract_video`` runs one detector over one video (decoding in a background thread so
that decoding overlaps inference, memory bounded by ``batch_size * prefetch_batches`` frames) and streams
its rows into ``features/<detector-id>/<video>/part-0.parquet``, then marks the unit done.

``run_extraction`` is the thin Ray layer: it shards videos across actors that each hold one detector
replica pinned to one GPU (``num_gpus`` per actor; CPU actors on a cluster without GPUs), hands each actor
one video at a time, skips videos already done, replaces an actor that dies and redoes its video from
scratch (the unit's file name is deterministic and published atomically, so a redo never duplicates rows),
and reports progress and a per-video summary.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from rolo_batch import contracts, datasets, storage, tables
from rolo_batch.console import Progress, format_table
from rolo_batch.datasets import Frame, VideoRef
from rolo_batch.errors import ConfigError, InputError, RoloBatchError



@dataclass(frozen=True)
class DetectorSpec:
    """Which detector to build in each worker: a preset name and/or its weights URI.

    ``weights`` is a local path or URI: a rolo-batch checkpoint (which names its own configuration, so
    ``name`` may be left out) or a Darknet ``.weights`` file (``name`` says which network it is for).
    ``random_init`` must be asked for explicitly (smoke tests and benchmarks: its features mean nothing);
    without a name it builds ``yolo-tiny``.
    """

    name: str | None = None
    weights: str | None = None
    random_init: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.weights is None and not self.random_init:
            raise ConfigError("no detector weights: pass --weights URI (a Darknet .weights file or a "
                              "rolo-batch detector checkpoint, e.g. from 'rolo-batch train-detector'), or "
                              "--random-init to use random weights on purpose")


@dataclass(frozen=True)
class ExtractOptions:
    """How to extract. ``batch_size`` frames go through the detector at once; ``prefetch_batches`` decoded
    batches wait in memory ahead of it (more overlaps decoding better, at the cost of memory). ``feature``:
    which activation is stored as the visual feature, ``"fc"`` (the paper's fully-connected vector) or
    ``"map<N>"`` (a conv activation map at least N x N, which ROLO pools inside each frame's detection box;
    ``C * H * W`` float16 values per frame, e.g. 48 KB for ``map16`` of the fast CPU detector); see
    ``rolo_batch.detector.feature_spec``. Maps go to their own table, ``features/<detector-id>-map<N>/``."""

    batch_size: int = 16
    prefetch_batches: int = 2
    overwrite: bool = False
    feature: str = "fc"

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.prefetch_batches < 1:
            raise ConfigError("batch_size and prefetch_batches must be >= 1")
        from rolo_batch.detector import map_side

        map_side(self.feature)  # the side itself is checked against the network when the detector is built


@dataclass
class VideoResult:
    """What happened to one video: ``status`` is done, skipped (already done) or failed (with ``error``)."""

    video: str
    status: str
    frames: int = 0
    seconds: float = 0.0
    error: str | None = None
    worker: dict = field(default_factory=dict)
    attempt: int = 1

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


# --- one video, no Ray -----------------------------------------------------------------------------------

def prefetched_batches(video: datasets.VideoSource, batch_size: int, prepare: Callable[[list[np.ndarray]], object],
                       depth: int) -> Iterator[tuple[list[Frame], object]]:
    """Decode frames and ``prepare`` them (e.g. resize to a tensor) in a background thread.

    Yields ``(frames, prepared)`` per batch; at most ``depth`` prepared batches wait in memory. An exception
    in the thread is raised here; stopping early stops the thread.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            batch: list[Frame] = []
            for frame in video.iter_frames():
                batch.append(frame)
                if len(batch) == batch_size:
                    if not put((batch, prepare([f.image for f in batch]))):
                        return
                    batch = []
            if batch and not put((batch, prepare([f.image for f in batch]))):
                return
            put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(exc)

    thread = threading.Thread(target=produce, name=f"decode-{video.name}", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            batch_frames, prepared = item
            # Drop the decoded images: only their numbers are needed downstream.
            yield [Frame(f.index, f.number, np.empty(0, np.uint8)) for f in batch_frames], prepared
    finally:
        stop.set()
        thread.join(timeout=10)


def extract_video(detector, ref: VideoRef, table_root: str, options: ExtractOptions,
                  on_batch: Callable[[int], None] | None = None) -> VideoResult:
    """Extract one video's features into its unit under ``table_root`` and mark it done.

    ``detector`` is a ``rolo_batch.detector.Detector``. ``on_batch(n)`` is called after each batch of
    ``n`` frames. Bad input raises ``InputError`` naming the video; nothing is published for it then.
    """
    started = time.perf_counter()
    video = datasets.open_video(ref)
    alignment = video.groundtruth
    width, height = video.image_size
    unit = tables.unit_uri(table_root, ref.name)
    storage.remove_temporaries(unit)  # left by a worker that died on this video before
    contract = contracts.load("features")
    feature = detector.feature
    metadata = tables.features_metadata(detector.detector_id, feature.size, feature.shape)
    with tables.ParquetUnitWriter(storage.join(unit, tables.PART_FILE), contract, metadata,
                                  feature_dim=feature.size) as writer:
        for frames, prepared in prefetched_batches(video, options.batch_size, detector.preprocess,
                                                   options.prefetch_batches):
            output = detector.run(prepared)
            indices = np.array([f.index for f in frames])
            best = np.stack([d[0] if len(d) else np.zeros(6, np.float32) for d in output.detections])
            rows = tables.FeatureFrames(
                video=ref.name, frame=np.array([f.number for f in frames]),
                image_wh=np.tile([width, height], (len(frames), 1)), feature=output.features,
                detection=best, detections=output.detections,
                gt_boxes_xywh_px=alignment.boxes_xywh_px[indices], gt_valid=alignment.valid[indices])
            writer.write(rows.to_arrow())
            if on_batch is not None:
                on_batch(len(frames))
    if writer.rows != len(video):
        raise InputError(f"wrote {writer.rows} rows for {len(video)} frames", video=ref.name)
    seconds = time.perf_counter() - started
    storage.mark_done(unit, tables.features_marker(
        ref.name, video.frame_numbers, detector.detector_id, feature.size, (width, height),
        feature_shape=feature.shape, source=dataclasses.asdict(ref), seconds=round(seconds, 3),
        groundtruth_notes=alignment.notes))
    return VideoResult(ref.name, "done", writer.rows, seconds)


# --- the Ray layer ---------------------------------------------------------------------------------------

class ExtractWorker:
    """One detector replica (in a Ray actor: pinned to the GPU Ray assigned it)."""

    def __init__(self, spec: DetectorSpec, out_uri: str, options: ExtractOptions, progress=None,
                 threads: int | None = None) -> None:
        import torch

        from rolo_batch.detector import build_detector
        from rolo_batch.runtime import torch_device_for_actor

        if threads:
            torch.set_num_threads(threads)
        self.device = torch_device_for_actor()
        self.options = options
        self.progress = progress
        self.frames_processed = 0
        self.setup_error: RoloBatchError | None = None
        name = spec.name or (None if spec.weights else "yolo-tiny")
        try:
            self.detector = build_detector(name, spec.weights, random_init=spec.random_init, seed=spec.seed,
                                           device=self.device, feature=options.feature)
        except RoloBatchError as exc:  # raised again by info(), whose caller gets the error itself
            self.setup_error = exc
            return
        self.detector.warm_up(options.batch_size)
        self.table_root = tables.features_root(out_uri, self.detector.features_id)

    def info(self) -> dict:
        """Where this replica runs and what it computes; raises the error that kept it from building its
        detector (bad weights, a feature map the network does not have)."""
        import os
        import resource

        import ray

        if self.setup_error is not None:
            raise self.setup_error

        return {"gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": self.device, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id()[:12], "detector_id": self.detector.detector_id,
                "detector_config": dataclasses.asdict(self.detector.config),
                "feature": dataclasses.asdict(self.detector.feature), "table_root": self.table_root,
                "frames_processed": self.frames_processed,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def extract(self, ref: VideoRef) -> VideoResult:
        """Extract one video; bad input becomes a failed result naming the video, not an actor crash."""
        def counted(n: int) -> None:
            self.frames_processed += n
            if self.progress is not None:
                self.progress.add.remote(n)

        try:
            result = extract_video(self.detector, ref, self.table_root, self.options, on_batch=counted)
        except RoloBatchError as exc:
            message = str(exc.with_video(ref.name)) if isinstance(exc, InputError) and exc.video is None else str(exc)
            return VideoResult(ref.name, "failed", error=message, worker={"device": self.device})
        result.worker = {"device": self.device, "gpu_ids": self.info()["gpu_ids"]}
        return result


class ProgressCounter:
    """Frames done across all workers (a tiny Ray actor the workers report to)."""

    def __init__(self) -> None:
        self.frames = 0

    def add(self, n: int) -> None:
        self.frames += n

    def total(self) -> int:
        return self.frames


@dataclass(frozen=True)
class ClusterPlan:
    """How many extraction actors, and what each one reserves."""

    actors: int
    num_gpus: float
    num_cpus: float


def plan_actors(resources, videos: int, actors: int | None, gpus_per_actor: float,
                cpus_per_actor: float) -> ClusterPlan:
    """One actor per GPU share (``gpus_per_actor``, e.g. 0.5 puts two replicas on a GPU) when the cluster
    has GPUs, else CPU actors of ``cpus_per_actor``; ``actors`` overrides the count; never more than videos."""
    if gpus_per_actor <= 0:
        raise ConfigError(f"gpus_per_actor must be > 0, got {gpus_per_actor}")
    if resources.gpus > 0:
        default = int(resources.gpus // gpus_per_actor)
        plan = ClusterPlan(actors or default, gpus_per_actor, min(1.0, cpus_per_actor))
    else:
        default = max(1, int(resources.cpus // cpus_per_actor))
        plan = ClusterPlan(actors or default, 0.0, cpus_per_actor)
    return dataclasses.replace(plan, actors=max(1, min(plan.actors, videos)))


@dataclass
class ExtractSummary:
    """The outcome of a whole extraction job."""

    table_root: str
    detector_id: str
    results: list[VideoResult]
    seconds: float
    workers: list[dict]

    @property
    def failed(self) -> list[VideoResult]:
        return [r for r in self.results if r.status == "failed"]

    def table(self) -> str:
        rows = [{"video": r.video, "status": r.status, "frames": r.frames, "seconds": round(r.seconds, 2),
                 "frames/s": round(r.fps, 1), "error": r.error or ""} for r in self.results]
        done = [r for r in self.results if r.status == "done"]
        frames = sum(r.frames for r in done)
        rows.append({"video": "TOTAL", "status": f"{len(done)} done, {len(self.failed)} failed, "
                                                 f"{len(self.results) - len(done) - len(self.failed)} skipped",
                     "frames": frames, "seconds": round(self.seconds, 2),
                     "frames/s": round(frames / self.seconds, 1) if self.seconds > 0 else 0.0, "error": ""})
        return format_table(rows, ["video", "status", "frames", "seconds", "frames/s", "error"], floatfmt=".2f")


def finished_extraction(data_uri: str, out_uri: str, spec: DetectorSpec, options: ExtractOptions = ExtractOptions(),
                        *, videos: list[str] | None = None) -> ExtractSummary | None:
    """The summary of a job with nothing left to do, found without Ray: every video under ``data_uri`` is
    already done in the features table of this detector and feature; else None (there is work, or a video
    is rejected and must be reported by the job).

    Cheap first (the ``_detector.json`` of each table names the spec and feature that wrote it); only when a
    table has every video is the detector built here, on the CPU, to confirm its id (the weights at a URI may
    have changed since).
    """
    started = time.perf_counter()
    if options.overwrite:
        return None
    found = datasets.discover(data_uri, names=videos)
    if found.rejected or not found.videos:
        return None
    names = [ref.name for ref in found.videos]
    for root in _tables_written_by(out_uri, spec, options.feature):
        done = tables.done_units(root)
        if all(name in done for name in names):
            from rolo_batch.detector import build_detector

            detector = build_detector(spec.name or (None if spec.weights else "yolo-tiny"), spec.weights,
                                      random_init=spec.random_init, seed=spec.seed, device="cpu",
                                      feature=options.feature)
            if tables.features_root(out_uri, detector.features_id) == root:
                return ExtractSummary(root, detector.detector_id, [VideoResult(n, "skipped") for n in sorted(names)],
                                      time.perf_counter() - started, [])
    return None


def _tables_written_by(out_uri: str, spec: DetectorSpec, feature: str) -> list[str]:
    """Feature tables under ``out_uri`` whose ``_detector.json`` records ``spec`` and ``feature``."""
    import json

    wanted = dataclasses.asdict(spec)
    out = []
    for entry in storage.list_dir(storage.join(out_uri, tables.FEATURES_DIR), missing_ok=True):
        manifest_uri = storage.join(entry.uri, tables.DETECTOR_MANIFEST)
        if not entry.is_dir or not storage.is_file(manifest_uri):
            continue
        try:
            manifest = json.loads(storage.read_text(manifest_uri))
        except json.JSONDecodeError:
            continue  # the job will rewrite it
        recorded_feature = (manifest.get("feature") or {}).get("name", "fc")
        if manifest.get("spec") == wanted and recorded_feature == feature:
            out.append(entry.uri)
    return out


def run_extraction(data_uri: str, out_uri: str, spec: DetectorSpec, options: ExtractOptions = ExtractOptions(),
                   *, videos: list[str] | None = None, actors: int | None = None, gpus_per_actor: float = 1.0,
                   cpus_per_actor: float = 2.0, max_attempts: int = 3, actor_name_prefix: str | None = None,
                   progress_interval_s: float = 5.0) -> ExtractSummary:
    """Extract features for every video under ``data_uri`` into ``out_uri`` on the connected Ray cluster.

    Skips videos already done (unless ``options.overwrite``); a video whose actor dies is redone on a new
    actor, up to ``max_attempts`` times. ``actor_name_prefix`` names the actors (``<prefix>-<i>``) so that
    operators (and tests) can find them.
    """
    import ray

    from rolo_batch.runtime import cluster_resources

    started = time.perf_counter()
    found = datasets.discover(data_uri, names=videos)
    refs = found.require_videos() if not found.rejected else found.videos
    results: list[VideoResult] = [VideoResult(e.video or storage.basename(e.path or "?"), "failed", error=str(e))
                                  for e in found.rejected]
    storage.ensure_dir(out_uri)
    plan = plan_actors(cluster_resources(), max(1, len(refs)), actors, gpus_per_actor, cpus_per_actor)
    counter = ray.remote(num_cpus=0)(ProgressCounter).remote()
    worker_cls = ray.remote(num_gpus=plan.num_gpus, num_cpus=plan.num_cpus, max_restarts=0)(ExtractWorker)
    spawned = 0

    def spawn():
        nonlocal spawned
        name = f"{actor_name_prefix}-{spawned}" if actor_name_prefix else None
        spawned += 1
        return worker_cls.options(name=name).remote(spec, out_uri, options, counter,
                                                    max(1, int(plan.num_cpus)))

    pool = [spawn() for _ in range(plan.actors)]
    try:
        infos = ray.get([a.info.remote() for a in pool])
    except ray.exceptions.RayTaskError as exc:
        for actor in pool:
            ray.kill(actor)
        ray.kill(counter)
        raise (exc.cause if isinstance(exc.cause, RoloBatchError) else exc) from None
    detector_id, table_root = infos[0]["detector_id"], infos[0]["table_root"]
    storage.write_text(storage.join(table_root, tables.DETECTOR_MANIFEST),
                       _json({"detector_id": detector_id, "config": infos[0]["detector_config"],
                              "feature": infos[0]["feature"], "spec": dataclasses.asdict(spec)}))

    done_units = set() if options.overwrite else set(tables.done_units(table_root))
    todo = []
    for ref in refs:
        if ref.name in done_units:
            results.append(VideoResult(ref.name, "skipped"))
        else:
            todo.append(ref)
    progress = Progress("extract", _count_frames(todo), interval_s=progress_interval_s)
    attempts = {ref.name: 0 for ref in todo}
    pending = list(reversed(todo))
    in_flight: dict = {}
    idle = list(pool)
    last_frames = 0
    while pending or in_flight:
        while pending and idle:
            actor, ref = idle.pop(), pending.pop()
            attempts[ref.name] += 1
            in_flight[actor.extract.remote(ref)] = (actor, ref)
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=progress_interval_s)
        frames_now = ray.get(counter.total.remote())
        finished = sum(r.status != "skipped" for r in results) - len(found.rejected)
        progress.update(frames_now - last_frames, extra=f"{finished}/{len(todo)} videos")
        last_frames = frames_now
        for future in ready:
            actor, ref = in_flight.pop(future)
            try:
                result: VideoResult = ray.get(future)
            except ray.exceptions.RayActorError as exc:
                if attempts[ref.name] < max_attempts:
                    pending.append(ref)  # redone from scratch on a fresh actor
                else:
                    results.append(VideoResult(ref.name, "failed", error=f"worker died {attempts[ref.name]} "
                                                                          f"times; last: {_first_line(exc)}"))
                idle.append(spawn())
                continue
            except ray.exceptions.RayTaskError as exc:  # an unexpected bug or storage error in the worker
                results.append(VideoResult(ref.name, "failed", error=_first_line(exc.cause or exc)))
                idle.append(actor)
                continue
            result.attempt = attempts[ref.name]
            results.append(result)
            idle.append(actor)
    progress.extra = f"{sum(r.status != 'skipped' for r in results) - len(found.rejected)}/{len(todo)} videos"
    progress.close()
    workers = ray.get([a.info.remote() for a in idle])
    for actor in idle:
        ray.kill(actor)
    ray.kill(counter)
    results.sort(key=lambda r: r.video)
    return ExtractSummary(table_root, detector_id, results, time.perf_counter() - started, workers)


def _count_frames(refs: list[VideoRef]) -> int | None:
    """Frames to do, for the ETA; ``None`` when a video's length is not cheap to know (a remote video file)."""
    total = 0
    for ref in refs:
        if ref.kind == "file" and not storage.resolve(ref.uri).is_local:
            return None
        try:
            total += len(datasets.open_video(ref))
        except RoloBatchError:
            pass  # reported when a worker gets to it
    return total


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _json(data: dict) -> str:
    import json

    return json.dumps(data, indent=2, sort_keys=True, default=str)
