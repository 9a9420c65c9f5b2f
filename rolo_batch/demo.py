"""The demo: the whole pipeline on data it generates, on an embedded local Ray, nothing downloaded.

synthesise videos -> train the detector (first third of every video) -> extract features (16 x 16 conv maps,
which ROLO pools inside each frame's detection box) -> train ROLO (exp2) -> track (ROLO, YOLO only,
YOLO + Kalman, CSRT, KCF, MIL) -> score -> report, plots, an overlay video.
Every stage reuses what an earlier run finished, so a re-run is quick.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from rolo_batch import storage
from rolo_batch.datasets.synthetic import SynthConfig, synthesize
from rolo_batch.detector import PRESETS
from rolo_batch.detector_train import (FAST_CPU_OVERRIDES, TRAINING_DEFAULTS, AugmentConfig, DetectorTrainConfig,
                                       finished_run, run_detector_training)
from rolo_batch.extract import DetectorSpec, ExtractOptions
from rolo_batch.pipeline import PipelineConfig, PipelineResult, run_pipeline
from rolo_batch.rolo import RoloConfig
from rolo_batch.track import TrackConfig
from rolo_batch.train import TrainConfig
from rolo_batch.windows import WindowConfig

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


@dataclass
class DemoResult:
    detector_uri: str
    detector_ap50: float
    detector_mean_iou: float
    pipeline: PipelineResult
    seconds: dict[str, float]


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
    return DemoResult(detector.detector_uri, detector.ap50, detector.mean_iou, result, seconds)


def summary(result: DemoResult) -> dict[str, float]:
    """The figures the README states: detector AP@0.5, and ROLO's and YOLO-only's success AUC."""
    overall = {s.method: s for s in result.pipeline.score.scores if s.video is None}
    return {"detector AP@0.5": result.detector_ap50, "rolo success AUC": overall["rolo"].success_auc,
            "yolo success AUC": overall["yolo"].success_auc}

