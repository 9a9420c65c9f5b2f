"""OTB-layout sequences: ``<video>/img/0001.jpg …`` and ``<video>/groundtruth_rect.txt``, local or on S3."""

from __future__ import annotations

import csv
import functools
import io
import re
from importlib import resources

import numpy as np

from rolo_batch import storage
from rolo_batch.datasets.base import Alignment, VideoRef, VideoSource, align_groundtruth
from rolo_batch.datasets.groundtruth import GroundTruth, parse_groundtruth
from rolo_batch.datasets.images import decode_image
from rolo_batch.errors import InputError

IMAGE_DIR = "img"
_FRAME_FILE = re.compile(r"^(\d+)\.(jpe?g|png|bmp)$", re.IGNORECASE)
# groundtruth_rect.txt (one target) or groundtruth_rect.<k>.txt (several targets, e.g. Jogging, Skating2).
GROUNDTRUTH_FILE = re.compile(r"^groundtruth_rect(?:\.(\d+))?\.txt$")


@functools.lru_cache(maxsize=1)
def known_ranges() -> dict[str, tuple[int, int]]:
    """OTB-100 sequences evaluated on a sub-range of their frames: name -> (start, end), inclusive."""
    text = resources.files("rolo_batch.datasets").joinpath("otb_ranges.csv").read_text("utf-8")
    rows = csv.DictReader(io.StringIO("\n".join(l for l in text.splitlines() if not l.startswith("#"))))
    return {r["name"]: (int(r["start_frame"]), int(r["end_frame"])) for r in rows}


class OtbSequence(VideoSource):
    """One OTB sequence folder. Frames are numbered by their file names and must be contiguous."""

    def __init__(self, ref: VideoRef) -> None:
        self.ref = ref
        self._frames: list[tuple[int, str]] | None = None
        self._alignment: Alignment | None = None
        self._size: tuple[int, int] | None = None

    def _listing(self) -> list[tuple[int, str]]:
        if self._frames is None:
            img_dir = storage.join(self.ref.uri, IMAGE_DIR)
            frames = []
            for entry in storage.list_dir(img_dir):
                match = _FRAME_FILE.match(entry.name)
                if match and not entry.is_dir:
                    frames.append((int(match.group(1)), entry.uri))
            if not frames:
                raise InputError("no frames (expected img/0001.jpg …)", video=self.name, path=img_dir)
            frames.sort()
            numbers = np.array([n for n, _ in frames])
            gaps = np.flatnonzero(np.diff(numbers) != 1)
            if len(gaps):
                at = gaps[0]
                width = len(frames[at][1].rsplit("/", 1)[1].split(".")[0])
                ext = frames[at][1].rsplit(".", 1)[1]
                if numbers[at + 1] == numbers[at]:
                    reason = f"frame {numbers[at]} appears twice"
                else:
                    reason = (f"frame {numbers[at] + 1:0{width}d}.{ext} is missing (frames {numbers[0]}-"
                              f"{numbers[-1]} expected without gaps)")
                raise InputError(reason, video=self.name, path=img_dir)
            self._frames = frames
        return self._frames

    @property
    def frame_numbers(self) -> np.ndarray:
        return np.array([n for n, _ in self._listing()], dtype=np.int32)

    @property
    def groundtruth(self) -> Alignment:
        if self._alignment is None:
            gt = GroundTruth.empty()
            if self.ref.groundtruth_uri:
                try:
                    gt = parse_groundtruth(storage.read_text(self.ref.groundtruth_uri), self.ref.groundtruth_uri)
                except InputError as exc:
                    raise exc.with_video(self.name) from None
            numbers = self.frame_numbers
            known = known_ranges().get(self.name.split("-")[0])
            start = known[0] if known and known[1] - known[0] + 1 == len(gt) else None
            self._alignment = align_groundtruth(self.name, numbers, gt, known_start=start)
        return self._alignment

    @property
    def image_size(self) -> tuple[int, int]:
        if self._size is None:
            image = self._decode(0)
            self._size = (image.shape[1], image.shape[0])
        return self._size

    def _decode(self, index: int) -> np.ndarray:
        uri = self._listing()[index][1]
        return decode_image(storage.read_bytes(uri), video=self.name, path=uri)

    def read_frame(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"frame index {index} out of range for {self.name} ({len(self)} frames)")
        image = self._decode(index)
        width, height = self.image_size
        if image.shape[:2] != (height, width):
            raise InputError(f"frame is {image.shape[1]}x{image.shape[0]}, the video's first frame is "
                             f"{width}x{height}", video=self.name, path=self._listing()[index][1])
        return image


def otb_refs(folder_uri: str, name: str, entries: list[storage.Entry]) -> list[VideoRef]:
    """The videos of one OTB folder, given its listing: one per ground-truth file (``<name>-<k>`` when the
    folder has several targets), or one without ground truth."""
    gts = sorted((int(m.group(1) or 0), e.uri) for e in entries
                 if not e.is_dir and (m := GROUNDTRUTH_FILE.match(e.name)))
    if not gts:
        return [VideoRef(name, "otb", folder_uri, None)]
    if len(gts) == 1:
        return [VideoRef(name, "otb", folder_uri, gts[0][1])]
    return [VideoRef(f"{name}-{k}", "otb", folder_uri, uri) for k, uri in gts if k > 0] or \
        [VideoRef(name, "otb", folder_uri, gts[0][1])]
