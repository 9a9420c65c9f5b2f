"""The whole pipeline in one call: extract -> train -> track -> score -> render, reusing finished stages.

With ``adapt`` (the archive case), the adaptation stage takes the extraction's place: a target model fitted
on each video's first box and adapted while tracking writes the features table (``rolo_batch.adapt_stage``).
With ``model_uri`` a ROLO model trained elsewhere (on other videos) is used and nothing is trained; with
``score`` off (videos with only a first box) nothing is scored.

Each stage is the same library call its own command makes; this module only sequences them and decides what
can be reused on a re-run: extraction and tracking skip videos already done (their own resume), training is
skipped when the run's ``model.pt`` exists (delete it, or use another run name, to retrain), scoring runs
again only when the tracks or its settings changed, and an overlay video (``OUT/overlays/<run>/<video>.webm``)
is rendered again only when its video was tracked again. A re-run with nothing left to do starts no Ray.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

from rolo_batch import datasets, storage, tables
from rolo_batch.adapt_stage import AdaptJob, finished_adaptation, run_adaptation
from rolo_batch.errors import ConfigError
from rolo_batch.extract import DetectorSpec, ExtractOptions, ExtractSummary, finished_extraction, run_extraction
from rolo_batch.score import ScoreConfig, ScoreSummary, finished_scoring, run_scoring
from rolo_batch.track import TrackConfig, TrackSummary, finished_tracking, run_tracking
from rolo_batch.train import MODEL_FILE, TrainConfig, run_training

Log = Callable[[str], None]


@dataclass(frozen=True)
class PipelineConfig:
    """Every stage's configuration. ``train`` and ``track`` carry placeholder URIs that ``run_pipeline``
    fills in (features, model) from the earlier stages. ``render``: videos to write overlay videos of
    (default: the first video)."""

    data_uri: str
    out_uri: str
    detector: DetectorSpec | None
    extract: ExtractOptions = field(default_factory=ExtractOptions)
    train: TrainConfig | None = None
    track: TrackConfig | None = None
    protocol: str = "otb"
    render: tuple[str, ...] | None = None
    adapt: AdaptJob | None = None
    model_uri: str | None = None
    score: bool = True

    def train_config(self, features_uri: str) -> TrainConfig:
        base = self.train or TrainConfig(features_uri="", out_uri="")
        return dataclasses.replace(base, features_uri=features_uri, out_uri=self.out_uri)

    def track_config(self, features_uri: str, model_uri: str, run: str) -> TrackConfig:
        base = self.track or TrackConfig(features_uri="", model_uri="", out_uri="")
        return dataclasses.replace(base, features_uri=features_uri, model_uri=model_uri, out_uri=self.out_uri,
                                   run=run, data_uri=base.data_uri or self.data_uri)


@dataclass
class PipelineResult:
    """What each stage produced, and where."""

    extract: ExtractSummary
    model_uri: str
    trained: bool
    track: TrackSummary
    score: ScoreSummary | None
    overlays: list[str]
    seconds: dict[str, float]
    train_failed: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """Whether any video failed in any stage (the others completed)."""
        return bool(self.extract.failed or self.train_failed or self.track.failed)

    def locations(self) -> dict[str, str]:
        scored = {} if self.score is None else {
            "scores": self.score.scores_uri, "report": self.score.files.markdown,
            "success plot": self.score.files.success_png, "precision plot": self.score.files.precision_png}
        return {"features": self.extract.table_root, "model": self.model_uri, "tracks": self.track.run_uri,
                **scored, **{f"overlay {storage.basename(o)}": o for o in self.overlays}}


def run_pipeline(config: PipelineConfig, log: Log = print, connect: Callable[[], None] = lambda: None
                 ) -> PipelineResult:
    """Run every stage on Ray; ``log`` gets one line per stage and the stage tables. ``connect`` is called
    before the first stage that has work to do (a re-run with nothing left neither starts nor joins Ray)."""
    seconds: dict[str, float] = {}

    def stage(name: str) -> Callable[[], None]:
        started = time.perf_counter()
        log(f"\n== {name} ==")
        return lambda: seconds.__setitem__(name, time.perf_counter() - started)

    extracted = _adapt(config, stage, connect, log) if config.adapt else _extract(config, stage, connect, log)
    if extracted.failed and len(extracted.failed) == len(extracted.results):
        raise ConfigError("every video failed to extract; nothing to train on")

    done = stage("train")
    train = config.train_config(extracted.table_root)
    model_uri = config.model_uri or storage.join(train.run_uri, MODEL_FILE)
    trained = config.model_uri is None and not storage.is_file(model_uri)
    train_failed: dict[str, str] = {}
    if not trained:
        _check_model_features(model_uri, train.run_uri, extracted.table_root)
    if trained:
        connect()
        result = run_training(train)
        model_uri = result.model_uri
        final = result.final
        log(f"trained {len(result.history)} epochs: val loss {final['val_loss']:.3f} (mean box "
            f"{final['val_baseline_loss']:.3f}), val IoU {final['val_iou']:.3f}")
        train_failed = result.failed
        for video, error in train_failed.items():
            log(f"train: {video} failed and was left out: {error}")
    elif config.model_uri:
        log(f"tracking with {model_uri} (trained elsewhere; nothing is trained here)")
    else:
        log(f"reusing {model_uri} (delete it to retrain)")
    done()

    done = stage("track")
    track_config = config.track_config(extracted.table_root, model_uri, train.run)
    tracked = finished_tracking(track_config)
    if tracked is None:
        connect()
        tracked = run_tracking(track_config)
        log(tracked.table())
    else:
        log(f"all {len(tracked.rows)} videos already tracked in {tracked.run_uri}")
    done()

    scored = _score(config, tracked.run_uri, stage, connect, log) if config.score else None

    done = stage("render")
    retracked = {row["video"] for row in tracked.rows if row["status"] == "done"}
    overlays = _render(config, tracked.run_uri, train.run, retracked, log)
    done()
    return PipelineResult(extracted, model_uri, trained, tracked, scored, overlays, seconds, train_failed)


def _extract(config: PipelineConfig, stage: Callable[[str], Callable[[], None]], connect: Callable[[], None],
             log: Log) -> ExtractSummary:
    if config.detector is None:
        raise ConfigError("the pipeline needs a detector, or the adaptation stage (adapt)")
    done = stage("extract")
    extracted = finished_extraction(config.data_uri, config.out_uri, config.detector, config.extract)
    if extracted is None:
        connect()
        extracted = run_extraction(config.data_uri, config.out_uri, config.detector, config.extract)
        log(extracted.table())
    else:
        log(f"all {len(extracted.results)} videos already extracted in {extracted.table_root}")
    done()
    return extracted


def _adapt(config: PipelineConfig, stage: Callable[[str], Callable[[], None]], connect: Callable[[], None],
           log: Log) -> ExtractSummary:
    assert config.adapt is not None
    done = stage("adapt")
    adapted = finished_adaptation(config.adapt)
    if adapted is None:
        connect()
        adapted = run_adaptation(config.adapt)
        log(adapted.table())
    else:
        log(f"all {len(adapted.results)} videos already adapted and tracked in {adapted.table_root}")
    done()
    return adapted


def _score(config: PipelineConfig, tracks_uri: str, stage: Callable[[str], Callable[[], None]],
           connect: Callable[[], None], log: Log) -> ScoreSummary:
    done = stage("score")
    score_config = ScoreConfig(tracks_uri=tracks_uri, data_uri=config.data_uri, out_uri=config.out_uri,
                               protocol=config.protocol)
    scored = finished_scoring(score_config)
    if scored is None:
        connect()
        scored = run_scoring(score_config)
    else:
        log(f"reusing the scores in {scored.run_uri} (same tracks and settings)")
    log(scored.table())
    done()
    return scored


def _check_model_features(model_uri: str, run_uri: str, features_root: str) -> None:
    """A model is reused only for the features it was trained on: the table's folder name (detector id and
    feature kind) must match, wherever the output root was given from."""
    from rolo_batch.rolo import load_model

    _, info = load_model(model_uri)
    trained_on = info.metadata.get("features")
    if trained_on and storage.basename(str(trained_on)) != storage.basename(features_root):
        raise ConfigError(f"{model_uri} was trained on the features {trained_on}, not on {features_root}: "
                          f"delete {run_uri} (and the tracks of the run) to retrain, or choose another --run")


def _render(config: PipelineConfig, tracks_uri: str, run: str, retracked: set[str], log: Log) -> list[str]:
    from rolo_batch import contracts
    from rolo_batch.render import overlay_suffix, render_overlay
    from rolo_batch.track import load_heatmaps

    finished = tables.done_units(tracks_uri)
    names = list(config.render) if config.render else sorted(finished)[:1]
    written = []
    for name in names:
        if name not in finished:
            log(f"render: {name} was not tracked; skipped")
            continue
        out = storage.join(config.out_uri, "overlays", run, f"{name}{overlay_suffix()}")
        if name in retracked or not storage.is_file(out):
            video = datasets.open_video(datasets.discover(config.data_uri, names=[name]).videos[0])
            rows = tables.TrackRows.from_arrow(tables.read_parquet(finished[name], contracts.load("tracks")))
            heatmaps = load_heatmaps(tables.unit_uri(tracks_uri, name))
            render_overlay(video, rows, out, heatmaps)
        log(f"overlay: {out}")
        written.append(out)
    return written
