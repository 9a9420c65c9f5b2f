"""Experiments as data: the ROLO paper's train/test splits as named, frozen configs.

A ``Split`` says, for one video and its frame numbers, which frames may be training targets (their ground truth
enters the loss), which frames training windows may read as input, and which frames are test frames (scored).
Three named splits reproduce the paper (arXiv:1607.05781, OTB30 in ``rolo_batch/data/otb30.csv``):

- ``exp1``: a video-level split. Training videos give every frame as input and target; test videos give every
  frame as a test frame and nothing to training. OTB30's 22/8 split by default, or any train/test lists.
- ``exp2``: a frame-level split of every video. The first part (OTB30's ``train_frames`` for an OTB30 video
  of the listed length, else ``floor(N/3)``) trains, the rest tests. Training windows lie entirely inside the
  first part; the loss is on the last step.
- ``exp3``: like exp2 for targets and test frames, but every frame may be input: training windows slide over the
  whole video (so they may cross from the first part into the test part), and the loss is taken on every step
  whose frame is a first-part frame with valid ground truth (a per-step mask); steps on test frames carry no loss.

exp3 versus exp2, precisely. The paper says exp3 trains "with full frames but using only 1/3 ground truths"; its
training script walks every frame of the video and reads the window's ground truth from the full annotation
file, which would use test ground truth. We keep the stated intent and never read a test frame's ground truth:
what exp3 adds over exp2 is (a) supervision on every step of a window, not only the last, and (b) windows that
cross the boundary. Note what (b) can and cannot do: the LSTMs here are causal, so a step's output depends only on
that step and earlier ones; the test-part steps of a crossing window carry no loss and therefore contribute no
gradient. The learning signal of exp3 is thus exp2's first-part ground truth, seen at every window position
(including short-context early steps, as a tracker sees at the start of a video). We accept this: any scheme that
made test frames matter (pseudo-labels from the detector, reversed time) would be a different experiment.

``split_manifest`` records, per video, the frames of each role as compact ranges, so the scorer can exclude the
frames a model was trained on (the paper's README asks for that for exp2 and exp3).
"""

from __future__ import annotations

import csv
import functools
import io
import json
from dataclasses import dataclass
from importlib import resources
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np

from rolo_batch import storage
from rolo_batch.errors import ConfigError, InputError

SPLIT_NAMES = ("exp1", "exp2", "exp3")
MANIFEST_FORMAT = "rolo-batch-split-manifest"
MANIFEST_VERSION = 1

FrameSplit = Literal["none", "first_part"]
InputFrames = Literal["train_frames", "all_frames"]
LossSteps = Literal["last", "all"]
FirstPart = Literal["otb30", "third"]


# --- OTB30 -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Otb30Video:
    """One row of ``otb30.csv``: frame size in pixels, frames evaluated, first-part length, exp1 role."""

    name: str
    width: int
    height: int
    frames: int
    train_frames: int
    exp1: Literal["train", "test"]


@functools.lru_cache(maxsize=1)
def otb30() -> tuple[Otb30Video, ...]:
    """The 30 videos of the paper, in the order its code lists them (read from the package data)."""
    text = resources.files("rolo_batch").joinpath("data", "otb30.csv").read_text("utf-8")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return tuple(Otb30Video(r["name"], int(r["width"]), int(r["height"]), int(r["frames"]),
                            int(r["train_frames"]), r["exp1"])  # type: ignore[arg-type]
                 for r in csv.DictReader(io.StringIO("\n".join(lines))))


def read_video_list(uri: str) -> list[str]:
    """Video names from a text file (local path or URI): one per line; blank lines and ``#`` comments skipped."""
    names = []
    for line in storage.read_text(uri).splitlines():
        name = line.split("#", 1)[0].strip()
        if name and name not in names:
            names.append(name)
    if not names:
        raise ConfigError(f"video list {uri} names no videos")
    return names


# --- the split -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    """A named experiment: which videos and frames train, which are input, which are scored.

    ``train_videos`` / ``test_videos``: a video-level split (``None`` for both: every video plays both roles).
    ``frame_split``: ``"none"`` (every frame of a training video trains) or ``"first_part"`` (the first part of
    each video trains, the rest tests). ``inputs``: whether training windows may read only train frames or all
    frames. ``loss_steps``: the loss on the last step of a window only, or on every step with a target.
    ``first_part_counts``: ``(video, frames, train_frames)`` rows fixing the first part of known videos
    (OTB30); other videos, and listed ones of another length, use ``floor(N / 3)``.
    """

    name: str
    description: str
    train_videos: frozenset[str] | None = None
    test_videos: frozenset[str] | None = None
    frame_split: FrameSplit = "none"
    inputs: InputFrames = "train_frames"
    loss_steps: LossSteps = "last"
    first_part_counts: tuple[tuple[str, int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.frame_split not in ("none", "first_part"):
            raise ConfigError(f"split {self.name}: frame_split must be 'none' or 'first_part', "
                              f"got {self.frame_split!r}")
        if self.inputs not in ("train_frames", "all_frames"):
            raise ConfigError(f"split {self.name}: inputs must be 'train_frames' or 'all_frames', got {self.inputs!r}")
        if self.loss_steps not in ("last", "all"):
            raise ConfigError(f"split {self.name}: loss_steps must be 'last' or 'all', got {self.loss_steps!r}")
        if (self.train_videos is None) != (self.test_videos is None):
            raise ConfigError(f"split {self.name}: give both train and test videos, or neither")
        if self.train_videos is not None:
            both = sorted(self.train_videos & self.test_videos)  # type: ignore[operator]
            if both:
                raise ConfigError(f"split {self.name}: videos in both the train and the test list: {both}")
            if not self.train_videos:
                raise ConfigError(f"split {self.name}: the train list is empty")
        elif self.frame_split == "none":
            raise ConfigError(f"split {self.name}: without video lists, frame_split 'none' leaves nothing to test")

    def role(self, video: str) -> Literal["train", "test", "both"]:
        """The video's role; a video in neither list of a video-level split is an ``InputError``."""
        if self.train_videos is None:
            return "both"
        if video in self.train_videos:
            return "train"
        if video in self.test_videos:  # type: ignore[operator]
            return "test"
        raise InputError(f"not in the train or the test videos of split {self.name!r} "
                         f"({len(self.train_videos)} train, {len(self.test_videos or ())} test)", video=video)

    def first_part_length(self, video: str, num_frames: int) -> int:
        """How many of the video's first frames form its training part (``frame_split == "first_part"``)."""
        return self.first_part_rule(video, num_frames)[0]

    def first_part_rule(self, video: str, num_frames: int) -> tuple[int, str]:
        """The first part's length and the rule that gave it: ``"otb30"`` (the paper's count, for a video
        of the list with the list's length) or ``"third"`` (``floor(N / 3)``: every other video, and a video
        of the list whose length differs from the list's, e.g. OTB-100's 215-frame Diving against OTB30's
        214; ``first_part_warnings`` says which)."""
        listed = self.listed_length(video)
        if listed is not None and listed[0] == num_frames:
            return listed[1], "otb30"
        return num_frames // 3, "third"

    def listed_length(self, video: str) -> tuple[int, int] | None:
        """``(frames, train_frames)`` that ``first_part_counts`` fixes for ``video``, or None."""
        for name, frames, train_frames in self.first_part_counts:
            if name == video:
                return frames, train_frames
        return None

    def train_frame_mask(self, video: str, frames: np.ndarray) -> np.ndarray:
        """``(N,)`` bool: frames in the training part, ground truth or not (``frames``: frame numbers, any order)."""
        frames = _frame_numbers(video, frames)
        role = self.role(video)
        if role == "test":
            return np.zeros(len(frames), bool)
        if self.frame_split == "none":
            return np.ones(len(frames), bool)
        return _rank(frames) < self.first_part_length(video, len(frames))

    def target_mask(self, video: str, frames: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """``(N,)`` bool: frames whose ground truth may enter the loss (training part, and ``valid`` if given)."""
        mask = self.train_frame_mask(video, frames)
        if valid is not None:
            valid = np.asarray(valid, bool)
            if valid.shape != mask.shape:
                raise InputError(f"valid mask has shape {valid.shape}, expected {mask.shape}", video=video)
            mask &= valid
        return mask

    def input_mask(self, video: str, frames: np.ndarray) -> np.ndarray:
        """``(N,)`` bool: frames a training window may read as input."""
        if self.inputs == "all_frames" and self.role(video) != "test":
            return np.ones(len(_frame_numbers(video, frames)), bool)
        return self.train_frame_mask(video, frames)

    def test_mask(self, video: str, frames: np.ndarray) -> np.ndarray:
        """``(N,)`` bool: frames to score (never a training-part frame)."""
        frames = _frame_numbers(video, frames)
        role = self.role(video)
        if role == "train":
            return np.zeros(len(frames), bool)
        if role == "test":
            return np.ones(len(frames), bool)
        return ~self.train_frame_mask(video, frames)

    def describe(self) -> dict:
        """The split's settings as JSON-serialisable data (video lists sorted)."""
        return {
            "name": self.name, "description": self.description, "frame_split": self.frame_split,
            "inputs": self.inputs, "loss_steps": self.loss_steps,
            "train_videos": None if self.train_videos is None else sorted(self.train_videos),
            "test_videos": None if self.test_videos is None else sorted(self.test_videos),
        }


def _frame_numbers(video: str, frames: np.ndarray | Sequence[int]) -> np.ndarray:
    arr = np.asarray(frames)
    if arr.ndim != 1:
        raise InputError(f"frame numbers must be one-dimensional, got shape {arr.shape}", video=video)
    if len(np.unique(arr)) != len(arr):
        raise InputError("frame numbers repeat", video=video)
    return arr.astype(np.int64)


def _rank(frames: np.ndarray) -> np.ndarray:
    """``(N,)`` position of each frame number in sorted order."""
    rank = np.empty(len(frames), np.int64)
    rank[np.argsort(frames, kind="stable")] = np.arange(len(frames))
    return rank


# --- the named splits ------------------------------------------------------------------------------------

def get_split(name: str, *, train_videos: Iterable[str] | None = None, test_videos: Iterable[str] | None = None,
              train_list: str | None = None, test_list: str | None = None,
              first_part: FirstPart = "otb30") -> Split:
    """The named split ``exp1`` / ``exp2`` / ``exp3``.

    exp1 takes its videos from ``train_videos``/``test_videos`` or the files ``train_list``/``test_list`` (one
    name a line), else OTB30's 22/8 split. exp2/exp3: ``first_part="otb30"`` fixes the first part of the OTB30
    videos as the paper did (``train_frames``) and uses ``floor(N / 3)`` elsewhere, including a video of the
    list with another length (``first_part_warnings`` names those); ``"third"`` uses ``floor(N / 3)`` everywhere.
    """
    if name not in SPLIT_NAMES:
        raise ConfigError(f"unknown split {name!r}; choose one of {', '.join(SPLIT_NAMES)}")
    lists_given = any(v is not None for v in (train_videos, test_videos, train_list, test_list))
    if name == "exp1":
        train, test = _exp1_videos(train_videos, test_videos, train_list, test_list)
        return Split(name, f"train on {len(train)} videos, test on the other {len(test)}",
                     train_videos=train, test_videos=test, frame_split="none", inputs="train_frames")
    if lists_given:
        raise ConfigError(f"split {name} splits the frames of every video; video lists apply to exp1 only")
    if first_part not in ("otb30", "third"):
        raise ConfigError(f"first_part must be 'otb30' or 'third', got {first_part!r}")
    counts = tuple((v.name, v.frames, v.train_frames) for v in otb30()) if first_part == "otb30" else ()
    if name == "exp2":
        return Split(name, "the first third of every video trains (windows inside it), the rest tests",
                     frame_split="first_part", inputs="train_frames", loss_steps="last", first_part_counts=counts)
    return Split(name, "every frame is input; the loss only on the first third's ground truth (per step); "
                       "the rest tests", frame_split="first_part", inputs="all_frames", loss_steps="all",
                 first_part_counts=counts)


def _exp1_videos(train_videos: Iterable[str] | None, test_videos: Iterable[str] | None,
                 train_list: str | None, test_list: str | None) -> tuple[frozenset[str], frozenset[str]]:
    if train_videos is not None and train_list is not None or test_videos is not None and test_list is not None:
        raise ConfigError("give the exp1 videos either as names or as a list file, not both")
    train = list(train_videos) if train_videos is not None else read_video_list(train_list) if train_list else None
    test = list(test_videos) if test_videos is not None else read_video_list(test_list) if test_list else None
    if train is None and test is None:
        table = otb30()
        return (frozenset(v.name for v in table if v.exp1 == "train"),
                frozenset(v.name for v in table if v.exp1 == "test"))
    if train is None or test is None:
        raise ConfigError("exp1 needs both a train and a test video list")
    return frozenset(train), frozenset(test)


# --- manifest --------------------------------------------------------------------------------------------

def frames_to_ranges(frames: np.ndarray | Sequence[int]) -> list[list[int]]:
    """Sorted frame numbers as inclusive runs ``[[first, last], ...]`` (e.g. 1..42 -> ``[[1, 42]]``)."""
    arr = np.unique(np.asarray(frames, np.int64))
    if len(arr) == 0:
        return []
    breaks = np.flatnonzero(np.diff(arr) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [len(arr) - 1]])
    return [[int(arr[s]), int(arr[e])] for s, e in zip(starts, ends)]


def ranges_to_frames(ranges: Sequence[Sequence[int]]) -> np.ndarray:
    """Inverse of ``frames_to_ranges``: ``(N,)`` int64 sorted frame numbers."""
    parts = [np.arange(int(a), int(b) + 1, dtype=np.int64) for a, b in ranges]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def first_part_warnings(split: Split, lengths: Mapping[str, int]) -> list[str]:
    """One line per video (name -> frame count) whose length differs from the one the split's list fixes:
    it falls back to ``floor(N / 3)``, and the user should know."""
    out = []
    if split.frame_split != "first_part":
        return out
    for video in sorted(lengths):
        listed = split.listed_length(video)
        if listed is not None and listed[0] != lengths[video]:
            length, _ = split.first_part_rule(video, lengths[video])
            out.append(f"{video}: {lengths[video]} frames, but otb30.csv lists {listed[0]} ({listed[1]} train "
                       f"frames); another version of the video, so its first part is floor(N/3) = {length} "
                       f"frames (--first-part third applies that rule to every video)")
    return out


def split_manifest(split: Split, videos: Mapping[str, np.ndarray | Sequence[int]]) -> dict:
    """JSON-serialisable record of a split applied to ``videos`` (name -> frame numbers).

    Per video, as inclusive frame ranges: ``frames`` (all), ``train`` (training part: ground truth may be a
    target), ``input`` (frames training may read), ``test`` (frames to score); for a frame-level split also
    ``first_part_rule``, the rule that sized its training part (``otb30`` or ``third``).
    """
    entries = {}
    for video in sorted(videos):
        frames = _frame_numbers(video, videos[video])
        entries[video] = {
            "frames": frames_to_ranges(frames),
            "train": frames_to_ranges(frames[split.train_frame_mask(video, frames)]),
            "input": frames_to_ranges(frames[split.input_mask(video, frames)]),
            "test": frames_to_ranges(frames[split.test_mask(video, frames)]),
        }
        if split.frame_split == "first_part":
            entries[video]["first_part_rule"] = split.first_part_rule(video, len(frames))[1]
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "split": split.describe(), "videos": entries}


def _manifest_entry(manifest: Mapping, video: str) -> Mapping:
    found = manifest.get("format") if isinstance(manifest, Mapping) else type(manifest).__name__
    if found != MANIFEST_FORMAT:
        raise InputError(f"not a split manifest (format {found!r}, expected {MANIFEST_FORMAT!r})")
    if manifest.get("version") != MANIFEST_VERSION:
        raise InputError(f"split manifest version {manifest.get('version')!r} is not supported "
                         f"(this code reads {MANIFEST_VERSION})")
    entry = manifest.get("videos", {}).get(video)
    if entry is None:
        raise InputError(f"not in the manifest of split {manifest.get('split', {}).get('name')!r}", video=video)
    return entry


def test_frames_from_manifest(manifest: Mapping, video: str) -> np.ndarray:
    """``(N,)`` int64 sorted frame numbers of ``video`` to score, as the manifest recorded them."""
    return ranges_to_frames(_manifest_entry(manifest, video)["test"])


def train_frames_from_manifest(manifest: Mapping, video: str) -> np.ndarray:
    """``(N,)`` int64 sorted frame numbers of ``video`` whose ground truth training could use."""
    return ranges_to_frames(_manifest_entry(manifest, video)["train"])


def write_manifest(uri: str, manifest: Mapping) -> None:
    """Write the manifest as JSON to ``uri`` (atomically)."""
    storage.write_text(uri, json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(uri: str) -> dict:
    """Read a manifest written by ``write_manifest``."""
    try:
        manifest = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as exc:
        raise InputError(f"not a JSON split manifest: {exc}", path=uri) from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(f"not a split manifest (expected format {MANIFEST_FORMAT!r})", path=uri)
    return manifest
