"""Scoring a tracking run against the ground truth, as Ray Data work, into the scores table and a report.

``score_video_tracks`` (plain) scores every method of one video's tracks unit. ``run_scoring`` fans the videos
out with Ray Data, gathers the per-video rows, averages them per method (``metrics.summarise``) and writes
``scores/<run>/scores.parquet`` (validated), ``report.md``, ``success.png`` and ``precision.png``.

Frames used for training are excluded: the tracks run records the model's split manifest, and only each
video's test frames are scored (``include_training_frames`` turns this off).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from rolo_batch import contracts, datasets, metrics, report, splits, storage, tables
from rolo_batch.errors import ConfigError, InputError
from rolo_batch.track import RUN_INFO

SCORES_DIR = "scores"
SCORES_FILE = "scores.parquet"
INPUTS_FILE = "_inputs.json"  # what the scores were computed from: a re-run with the same inputs does nothing


@dataclass(frozen=True)
class ScoreConfig:
    """A scoring run. ``protocol``: ``otb`` (got10k/pysot conventions) or ``rolo`` (the paper's, which skips
    the first ``steps`` frames; ``steps`` defaults to the tracked model's). ``split_manifest``: which frames
    are test frames (default: the one the tracks run recorded)."""

    tracks_uri: str
    data_uri: str
    out_uri: str
    run: str | None = None
    protocol: str = "otb"
    steps: int | None = None
    split_manifest: str | None = None
    include_training_frames: bool = False
    methods: tuple[str, ...] | None = None
    videos_per_task: int = 4
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.protocol not in metrics.PROTOCOL_NAMES:
            raise ConfigError(f"protocol must be one of {', '.join(metrics.PROTOCOL_NAMES)}, got {self.protocol!r}")
        if self.videos_per_task < 1:
            raise ConfigError("videos_per_task must be >= 1")

    @property
    def run_name(self) -> str:
        return self.run or storage.basename(self.tracks_uri)

    @property
    def run_uri(self) -> str:
        return storage.join(self.out_uri, SCORES_DIR, self.run_name)


def score_video_tracks(part_uri: str, source: Mapping[str, Any], protocol: metrics.Protocol,
                       allowed_frames: np.ndarray | None, methods: tuple[str, ...] | None = None
                       ) -> list[metrics.VideoScore]:
    """Score every method in one video's tracks file against the video's ground truth (``source`` is its
    ``VideoRef`` as a dict); ``allowed_frames`` limits scoring to those frame numbers."""
    video = datasets.open_video(datasets.VideoRef(**source))
    truth = video.groundtruth
    tracks = tables.TrackRows.from_arrow(tables.read_parquet(part_uri, contracts.load("tracks")))
    return [metrics.score_track(track, video.frame_numbers, truth.boxes_xywh_px, truth.valid, protocol,
                                allowed_frames)
            for track in tracks if methods is None or track.method in methods]


def _score_batch(batch: Mapping[str, np.ndarray], protocol_tag: str, methods: tuple[str, ...] | None) -> pa.Table:
    """Ray Data UDF: the per-video scores of a batch of videos, as rows of the scores table."""
    protocol = metrics.Protocol.from_tag(protocol_tag)
    results: list[metrics.VideoScore] = []
    for part_uri, source, allowed in zip(batch["part_uri"], batch["source"], batch["allowed"]):
        allowed = str(allowed)
        allowed_frames = None if not allowed else splits.ranges_to_frames(json.loads(allowed))
        results.extend(score_video_tracks(str(part_uri), json.loads(str(source)), protocol, allowed_frames,
                                          methods))
    if not results:
        return contracts.load("scores").arrow_schema().empty_table()
    return metrics.scores_table(results)


@dataclass
class ScoreSummary:
    """What scoring produced: the per-video and overall rows, the files written, and skipped videos."""

    run_uri: str
    scores: list[metrics.VideoScore]
    files: report.ReportFiles
    scores_uri: str
    problems: list[str]
    seconds: float

    def table(self) -> str:
        return report.summary_text(self.scores)


def _run_info(tracks_uri: str) -> dict:
    uri = storage.join(tracks_uri, RUN_INFO)
    return json.loads(storage.read_text(uri)) if storage.is_file(uri) else {}


def _protocol(config: ScoreConfig, info: dict) -> metrics.Protocol:
    if config.protocol == "otb":
        return metrics.Protocol.otb()
    steps = config.steps or info.get("steps")
    if not steps:
        raise ConfigError("the rolo protocol needs --steps (the tracks run does not record a model's steps)")
    return metrics.Protocol.rolo(int(steps))


def _manifest(config: ScoreConfig, info: dict) -> dict | None:
    """The split manifest whose test frames are scored, or None to score every frame."""
    uri = config.split_manifest or info.get("split_manifest")
    if config.include_training_frames or not uri:
        return None
    return splits.read_manifest(uri)


def _allowed(manifest: dict | None, video: str) -> str:
    """The video's test frames as JSON ranges, or "" for every frame."""
    if manifest is None:
        return ""
    try:
        return json.dumps(splits.frames_to_ranges(splits.test_frames_from_manifest(manifest, video)))
    except InputError:
        return ""  # a video the model never saw: all its frames are test frames


def _inputs(config: ScoreConfig, info: dict, videos: list[str]) -> dict:
    """What a scoring run reads: its settings, the tracks run's record (which changes whenever tracking ran
    again) and the finished videos."""
    return {"tracks": config.tracks_uri, "data": config.data_uri, "protocol": config.protocol, "steps": config.steps,
            "split_manifest": config.split_manifest, "include_training_frames": config.include_training_frames,
            "methods": None if config.methods is None else list(config.methods), "tracks_run": info,
            "videos": sorted(videos)}


def finished_scoring(config: ScoreConfig) -> ScoreSummary | None:
    """The summary of the last scoring of ``config.run_uri`` when it was computed from the same inputs
    (``_inputs``), read back without Ray; else None."""
    started = time.perf_counter()
    inputs_uri = storage.join(config.run_uri, INPUTS_FILE)
    scores_uri = storage.join(config.run_uri, SCORES_FILE)
    if config.overwrite or not storage.is_file(inputs_uri) or not storage.is_file(scores_uri):
        return None
    recorded = json.loads(storage.read_text(inputs_uri))
    current = _inputs(config, _run_info(config.tracks_uri), list(tables.done_units(config.tracks_uri)))
    if recorded.get("inputs") != current:
        return None
    files = report.report_files(config.run_uri)
    if not all(storage.is_file(uri) for uri in (files.markdown, files.success_png, files.precision_png)):
        return None
    every = metrics.scores_from_table(tables.read_parquet(scores_uri, contracts.load("scores")))
    return ScoreSummary(config.run_uri, every, files, scores_uri, list(recorded.get("problems", [])),
                        time.perf_counter() - started)


def run_scoring(config: ScoreConfig) -> ScoreSummary:
    """Score a tracks run (see the module docstring) on the connected Ray cluster."""
    import ray

    started = time.perf_counter()
    info = _run_info(config.tracks_uri)
    protocol = _protocol(config, info)
    units = tables.done_units(config.tracks_uri)
    if not units:
        raise InputError("no finished videos in this tracks run (run rolo-batch track first)", path=config.tracks_uri)
    manifest = _manifest(config, info)
    refs = {ref.name: ref for ref in datasets.discover(config.data_uri).videos}
    problems = [f"{name}: not found under {config.data_uri}" for name in sorted(units) if name not in refs]
    items = [{"video": name, "part_uri": uri, "source": json.dumps(dataclasses.asdict(refs[name])),
              "allowed": _allowed(manifest, name)} for name, uri in sorted(units.items()) if name in refs]
    if not items:
        raise InputError(f"none of the tracked videos is under {config.data_uri}", path=config.tracks_uri)
    dataset = ray.data.from_items(items, override_num_blocks=-(-len(items) // config.videos_per_task))
    scored = dataset.map_batches(_score_batch, batch_size=config.videos_per_task, batch_format="numpy",
                                 fn_kwargs={"protocol_tag": protocol.tag, "methods": config.methods})
    per_video = metrics.scores_from_table(_with_protocol(pa.concat_tables(
        [ray.get(ref) for ref in scored.to_arrow_refs()]), protocol))
    if not per_video:
        raise InputError("nothing to score: no tracks of the selected methods", path=config.tracks_uri)
    every = per_video + metrics.summarise(per_video)
    table = metrics.scores_table(every)
    scores_uri = storage.join(config.run_uri, SCORES_FILE)
    tables.write_parquet(scores_uri, table, contracts.load("scores"), metrics.protocol_metadata(protocol))
    files = report.write_report(every, config.run_uri, title=f"Tracking report: {config.run_name}")
    storage.write_text(storage.join(config.run_uri, INPUTS_FILE), json.dumps(
        {"inputs": _inputs(config, info, list(units)), "problems": problems}, indent=1, sort_keys=True))
    return ScoreSummary(config.run_uri, every, files, scores_uri, problems, time.perf_counter() - started)


def _with_protocol(table: pa.Table, protocol: metrics.Protocol) -> pa.Table:
    metadata = {**(table.schema.metadata or {}),
                **{k.encode(): v.encode() for k, v in metrics.protocol_metadata(protocol).items()}}
    return table.replace_schema_metadata(metadata)
