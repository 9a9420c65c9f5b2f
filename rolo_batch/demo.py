"""The demo: the whole pipeline on data it generates, on an embedded local Ray, nothing downloaded.

synthesise videos -> train the detector (first third of every video) -> extract features (16 x 16 conv maps,
which ROLO pools inside each frame's detection box) -> train ROLO (exp2) -> track (ROLO, YOLO only,
YOLO + Kalman, CSRT, KCF, MIL) -> score -> report, plots, an overlay video.

Then the archive case: the same labelled videos are tracked from their first box by target models adapted
online (``rolo_batch.adapt_stage``) and ROLO is trained on those adapted features (run ``demo-adaptive``,
scored like the first part); then an "archive" of other videos, mp4 files whose sidecars hold only the first
box, is tracked with that model as ``rolo-batch track-archive`` does (run ``demo-archive``, an overlay per
video), and scored against the generator's full ground truth, kept aside in ``archive-truth/``.
Every stage reuses what an earlier run finished, so a re-run is quick.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

from rolo_batch import storage
from rolo_batch.adapt_stage import AdaptJob
from rolo_batch.datasets.synthetic import SynthConfig, synthesize
from rolo_batch.datasets.videofile import sidecar_name
from rolo_batch.detector import PRESETS
from rolo_batch.detector_train import (FAST_CPU_OVERRIDES, TRAINING_DEFAULTS, AugmentConfig, DetectorTrainConfig,
                                       finished_run, run_detector_training)
from rolo_batch.extract import DetectorSpec, ExtractOptions
from rolo_batch.pipeline import PipelineConfig, PipelineResult, run_pipeline
from rolo_batch.score import ScoreConfig, ScoreSummary, finished_scoring, run_scoring
from rolo_batch.rolo import RoloConfig
from rolo_batch.track import TrackConfig
from rolo_batch.train import TrainConfig
from rolo_batch.windows import WindowConfig

ARCHIVE_FEATURE = "map16"  # what the archive case's ROLO reads of the adapted target model

Log = Callable[[str], None]


@dataclass(frozen=True)
class DemoConfig:
    """The demo's data and training budget (sized for a 2-core CPU: about 6 minutes in all). ``detector_name``:
    ``yolo-tiny`` (its ``--fast-cpu`` variant, trained from scratch, 60 epochs by default) or
    ``efficientnet-yolo`` (ImageNet backbone; ``TRAINING_DEFAULTS``: 10 epochs). ``feature``: what extraction
    stores per frame (see ``rolo_batch.detector.feature_spec``)."""

    out_uri: str = "demo-output"
    videos: int = 8
    frames: int = 150
    seed: int = 0
    detector_name: str = "yolo-tiny"
    detector_epochs: int | None = None
    rolo_epochs: int = 30
    steps: int = 6
    feature: str = "map16"
    render: str = "synth-000"
    archive_videos: int = 4

    @property
    def run(self) -> str:
        """The name of the detector, ROLO model, tracks and scores runs: ``demo`` (``demo-<detector>`` for a
        detector other than yolo-tiny, so that both can live in one output root)."""
        return "demo" if self.detector_name == "yolo-tiny" else f"demo-{self.detector_name}"

    @property
    def data_uri(self) -> str:
        return storage.join(self.out_uri, "data")

    def synth(self) -> SynthConfig:
        return SynthConfig(videos=self.videos, frames=self.frames, seed=self.seed)

    @property
    def archive_uri(self) -> str:
        """The archive: mp4 files with one-line sidecars (the first box only)."""
        return storage.join(self.out_uri, "archive")

    @property
    def archive_truth_uri(self) -> str:
        """The same files with the full ground truth, read by scoring only."""
        return storage.join(self.out_uri, "archive-truth")

    def archive_synth(self) -> SynthConfig:
        return SynthConfig(videos=self.archive_videos, frames=self.frames, seed=self.seed + 1, video_files=True,
                           prefix="clip")

    def detector(self) -> DetectorTrainConfig:
        pretrained = PRESETS[self.detector_name].pretrained
        defaults = TRAINING_DEFAULTS[self.detector_name]
        every = 5 if pretrained else 10
        return DetectorTrainConfig(data_uri=self.data_uri, out_uri=self.out_uri, run=self.run,
                                   detector=self.detector_name,
                                   overrides={} if pretrained else dict(FAST_CPU_OVERRIDES), split="exp2",
                                   first_part="third", epochs=self.detector_epochs or defaults.epochs,
                                   learning_rate=defaults.learning_rate,
                                   augment=AugmentConfig(strength=defaults.augment), eval_every=every,
                                   checkpoint_every=every, max_failures=2, seed=self.seed)

    def pipeline(self, detector_uri: str) -> PipelineConfig:
        model = RoloConfig(form="compact", feature_dim=1, steps=self.steps, hidden_size=128, projection_size=128)
        train = TrainConfig(features_uri="", out_uri=self.out_uri, run=self.run, split="exp2", first_part="third",
                            model=model,
                            window=WindowConfig(steps=self.steps), epochs=self.rolo_epochs, batch_size=16,
                            learning_rate=2e-3, detection_jitter=0.1, detection_drop=0.1,
                            checkpoint_every=10, max_failures=2, seed=self.seed)
        track = TrackConfig(features_uri="", model_uri="", out_uri=self.out_uri, run=self.run)
        return PipelineConfig(data_uri=self.data_uri, out_uri=self.out_uri, detector=DetectorSpec(weights=detector_uri),
                              extract=ExtractOptions(batch_size=16, feature=self.feature), train=train, track=track,
                              render=(self.render,))

    def adaptive_pipeline(self) -> PipelineConfig:
        """ROLO on the adapted target models' features of the labelled videos (exp2, as the first part)."""
        base = self.pipeline("")
        run = "demo-adaptive"
        # the form chosen on the real fold A (README, "Archive"): the backbone's map, corrections in box units,
        # motion instead of position
        model = dataclasses.replace(base.train.model, box_head="relative", box_input="motion")
        return dataclasses.replace(
            base, detector=None, adapt=AdaptJob(self.data_uri, self.out_uri, feature=ARCHIVE_FEATURE),
            train=dataclasses.replace(base.train, run=run, model=model, detection_jitter=0.0, detection_drop=0.0),
            track=dataclasses.replace(base.track, run=run, methods=("rolo", "yolo", "csrt")), render=())

    def archive_pipeline(self, model_uri: str) -> PipelineConfig:
        """``rolo-batch track-archive``: the archive tracked with the adaptive run's model, nothing trained."""
        run = "demo-archive"
        names = tuple(self.archive_synth().video_name(i) for i in range(self.archive_videos))
        return PipelineConfig(data_uri=self.archive_uri, out_uri=self.out_uri, detector=None,
                              adapt=AdaptJob(self.archive_uri, self.out_uri, feature=ARCHIVE_FEATURE),
                              model_uri=model_uri, score=False,
                              train=TrainConfig(features_uri="", out_uri=self.out_uri, run=run),
                              track=TrackConfig(features_uri="", model_uri="", out_uri=self.out_uri, run=run,
                                                methods=("rolo", "yolo", "csrt")),
                              render=names)


@dataclass
class DemoResult:
    detector_uri: str
    detector_ap50: float
    detector_mean_iou: float
    pipeline: PipelineResult
    seconds: dict[str, float]
    adaptive: PipelineResult | None = None
    archive: PipelineResult | None = None
    archive_score: ScoreSummary | None = None


def _synthesise(config: DemoConfig, log: Log) -> None:
    """Write the videos unless a previous run did (the ground truth is written last, so it marks a video done)."""
    synth = config.synth()
    missing = [synth.video_name(i) for i in range(synth.videos)
               if not storage.is_file(storage.join(config.data_uri, synth.video_name(i), "groundtruth_rect.txt"))]
    if not missing:
        log(f"reusing {synth.videos} videos in {config.data_uri}")
        return
    synthesize(config.data_uri, synth,
               on_video=lambda name, done, total: log(f"synth: {done}/{total} videos ({name})"))


def run_demo(config: DemoConfig = DemoConfig(), log: Log = print, connect: Callable[[], None] = lambda: None
             ) -> DemoResult:
    """Run the demo on Ray (see the module docstring); ``connect`` is called before the first stage with work
    to do, so a re-run of a finished demo returns without Ray."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    log("== synthesise ==")
    _synthesise(config, log)
    seconds["synthesise"] = time.perf_counter() - started

    started = time.perf_counter()
    log("\n== train the detector ==")
    detector = finished_run(config.detector())
    if detector is None:
        connect()
        detector = run_detector_training(config.detector(), log=log)
    else:
        log(f"reusing {detector.detector_uri}")
    log(f"held-out AP@0.5 {detector.ap50:.3f}, mean IoU of the best detection {detector.mean_iou:.3f}")
    seconds["train detector"] = time.perf_counter() - started

    result = run_pipeline(config.pipeline(detector.detector_uri), log=log, connect=connect)
    seconds.update(result.seconds)
    demo = DemoResult(detector.detector_uri, detector.ap50, detector.mean_iou, result, seconds)
    if config.archive_videos:
        _run_archive(config, demo, log, connect)
    return demo


def _run_archive(config: DemoConfig, demo: DemoResult, log: Log, connect: Callable[[], None]) -> None:
    """The archive case (see the module docstring); adds its results and stage times to ``demo``."""
    log("\n==== the archive case: target models adapted from the first box ====")
    demo.adaptive = run_pipeline(config.adaptive_pipeline(), log=log, connect=connect)
    demo.seconds.update({f"adaptive {k}": v for k, v in demo.adaptive.seconds.items()})
    started = time.perf_counter()
    log("\n== synthesise the archive (mp4 files, first box only) ==")
    _synthesise_archive(config, log)
    demo.seconds["synthesise archive"] = time.perf_counter() - started
    demo.archive = run_pipeline(config.archive_pipeline(demo.adaptive.model_uri), log=log, connect=connect)
    demo.seconds.update({f"archive {k}": v for k, v in demo.archive.seconds.items()})
    started = time.perf_counter()
    log("\n== score the archive against the ground truth kept aside ==")
    score = ScoreConfig(tracks_uri=demo.archive.track.run_uri, data_uri=config.archive_truth_uri,
                        out_uri=config.out_uri, include_training_frames=True)
    demo.archive_score = finished_scoring(score)
    if demo.archive_score is None:
        connect()
        demo.archive_score = run_scoring(score)
    log(demo.archive_score.table())
    demo.seconds["archive score"] = time.perf_counter() - started


def _synthesise_archive(config: DemoConfig, log: Log) -> None:
    """The archive videos with their full ground truth in ``archive-truth/``, and the same mp4 files with
    one-line sidecars in ``archive/``."""
    synth = config.archive_synth()
    names = [synth.video_name(i) for i in range(synth.videos)]
    if all(storage.is_file(storage.join(config.archive_uri, sidecar_name(f"{n}.mp4"))) for n in names):
        log(f"reusing {synth.videos} archive videos in {config.archive_uri}")
        return
    synthesize(config.archive_truth_uri, synth,
               on_video=lambda name, done, total: log(f"synth: {done}/{total} archive videos ({name})"))
    for name in names:
        storage.write_bytes(storage.join(config.archive_uri, f"{name}.mp4"),
                            storage.read_bytes(storage.join(config.archive_truth_uri, f"{name}.mp4")))
        first = storage.read_text(storage.join(config.archive_truth_uri, sidecar_name(f"{name}.mp4"))).splitlines()[0]
        storage.write_text(storage.join(config.archive_uri, sidecar_name(f"{name}.mp4")), first + "\n")


def summary(result: DemoResult) -> dict[str, float]:
    """The figures the README states: detector AP@0.5, ROLO's and YOLO-only's success AUC; and for the
    archive case the success AUC of ROLO, the adapted model alone and CSRT, on the labelled videos' held-out
    frames and on the archive."""
    overall = {s.method: s for s in result.pipeline.score.scores if s.video is None}
    figures = {"detector AP@0.5": result.detector_ap50, "rolo success AUC": overall["rolo"].success_auc,
               "yolo success AUC": overall["yolo"].success_auc}
    named = {"rolo": "rolo", "yolo": "adapted model alone", "csrt": "csrt"}
    for label, scored in (("adaptive", result.adaptive and result.adaptive.score), ("archive", result.archive_score)):
        if scored is None:
            continue
        for s in scored.scores:
            if s.video is None and s.method in named:
                figures[f"{label}: {named[s.method]} success AUC"] = s.success_auc
    return figures

