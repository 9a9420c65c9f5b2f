"""What every video source offers, whatever it is stored as: frames in order, and ground truth aligned to them.

The frame contract: every ``VideoSource`` yields each frame as an ``(H, W, 3)`` uint8 array in BGR order (what
OpenCV draws on and what the detector, the trackers and the overlays take), whatever the file holds: grey
(OTB's Car4 and Suv are single-channel JPEGs), grey + alpha, BGRA, 16-bit PNG, or a grey video stream. Where
frames are decoded (``images.decode_image`` for image files, ``VideoFile.read_frame`` for video files), they go
through ``images.to_bgr``, which converts those and raises ``InputError`` naming the video and the file (and
frame) for a frame that cannot be made BGR. Stages downstream rely on the contract and do not convert again.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np

from rolo_batch.datasets.groundtruth import GroundTruth
from rolo_batch.errors import InputError

_VIDEO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def check_video_name(name: str, *, where: str | None = None) -> str:
    """Return ``name`` if it is safe as one path component of an output URI, else raise ``InputError``.

    Allowed: letters, digits, ``. _ + -``, starting with a letter or digit, at most 128 characters, no ``..``.
    Names come from bucket listings, so this is what keeps outputs inside the output root.
    """
    if not _VIDEO_NAME.match(name) or ".." in name:
        raise InputError(f"video name {name!r} is not allowed: use letters, digits and . _ + - "
                         f"(starting with a letter or digit, no '..', at most 128 characters); rename it",
                         path=where)
    return name


@dataclass(frozen=True)
class VideoRef:
    """A picklable pointer to one video: what Ray shards. ``open_video`` turns it into a ``VideoSource``.

    ``kind`` is ``"otb"`` (``uri`` is the sequence folder) or ``"file"`` (``uri`` is an mp4/avi file);
    ``groundtruth_uri`` is the box file, if any.
    """

    name: str
    kind: Literal["otb", "file"]
    uri: str
    groundtruth_uri: str | None = None


@dataclass(frozen=True)
class Frame:
    """One decoded frame: ``index`` is its 0-based position, ``number`` its 1-based OTB frame number;
    ``image`` is ``(H, W, 3)`` uint8 BGR (the frame contract, see the module docstring)."""

    index: int
    number: int
    image: np.ndarray


@dataclass
class Alignment:
    """Ground truth aligned to a video's frames: one row per frame, NaN and invalid where the file has no box."""

    boxes_xywh_px: np.ndarray
    valid: np.ndarray
    notes: list[str] = field(default_factory=list)


class VideoSource(abc.ABC):
    """A video: ``len()`` frames with OTB frame numbers, random access and streaming, and aligned ground truth.

    Frames keep the frame contract of this module: ``(H, W, 3)`` uint8 BGR whatever the file holds."""

    ref: VideoRef

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    @abc.abstractmethod
    def frame_numbers(self) -> np.ndarray:
        """``(N,)`` int32, the 1-based OTB number of each frame, in order."""

    @property
    @abc.abstractmethod
    def groundtruth(self) -> Alignment:
        """Boxes aligned to ``frame_numbers``."""

    @property
    @abc.abstractmethod
    def image_size(self) -> tuple[int, int]:
        """(width, height) in pixels."""

    @abc.abstractmethod
    def read_frame(self, index: int) -> np.ndarray:
        """The frame at 0-based position ``index`` as ``(H, W, 3)`` uint8 BGR (through ``images.to_bgr``);
        ``InputError`` if it cannot be decoded or made BGR."""

    def __len__(self) -> int:
        return len(self.frame_numbers)

    def iter_frames(self, start: int = 0, stop: int | None = None) -> Iterator[Frame]:
        """Frames ``start`` (inclusive) to ``stop`` (exclusive) in order, decoded one at a time."""
        stop = len(self) if stop is None else min(stop, len(self))
        numbers = self.frame_numbers
        for index in range(start, stop):
            yield Frame(index, int(numbers[index]), self.read_frame(index))

    @property
    def first_box_xywh_px(self) -> np.ndarray | None:
        """The box given in the first frame (what one-pass evaluation starts from), if valid."""
        gt = self.groundtruth
        return gt.boxes_xywh_px[0].copy() if len(gt.valid) and gt.valid[0] else None


def align_groundtruth(name: str, frame_numbers: np.ndarray, gt: GroundTruth,
                      known_start: int | None = None) -> Alignment:
    """Align the boxes of ``gt`` to the frames of a video.

    Same count: one box per frame. Fewer boxes than frames: the boxes belong to the frames from
    ``known_start`` (a known OTB sub-range) or from the first frame; frames without a box get NaN and are
    invalid, and a note says so. More boxes than frames: ``InputError`` (frames are missing).
    """
    n = len(frame_numbers)
    out = np.full((n, 4), np.nan)
    valid = np.zeros(n, bool)
    notes: list[str] = []
    if len(gt) == 0:
        return Alignment(out, valid, ["no ground truth"] if n else [])
    if len(gt) > n:
        raise InputError(f"the ground truth has {len(gt)} boxes but the video has only {n} frames; "
                         f"frames are missing", video=name, path=gt.source)
    offset = 0
    if len(gt) < n:
        if known_start is not None and known_start in set(frame_numbers.tolist()):
            offset = int(np.flatnonzero(frame_numbers == known_start)[0])
            if offset + len(gt) > n:
                offset = 0
        notes.append(f"{len(gt)} boxes for {n} frames: boxes belong to frames "
                     f"{int(frame_numbers[offset])}-{int(frame_numbers[offset + len(gt) - 1])}")
    out[offset:offset + len(gt)] = gt.boxes_xywh_px
    valid[offset:offset + len(gt)] = gt.valid
    return Alignment(out, valid, notes)
