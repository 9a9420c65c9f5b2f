"""Video files (mp4, avi, … anything OpenCV's FFmpeg decodes), with an optional ground-truth sidecar.

The sidecar ``<stem>.groundtruth.txt`` beside ``<stem>.mp4`` holds boxes in the ground-truth format; one
line gives only the first frame's box (all one-pass tracking needs), more lines give one box per frame.
Frames are numbered 1…N. Files on S3 are copied to a local temporary file first (OpenCV reads local files).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref

import cv2
import numpy as np

from rolo_batch import storage
from rolo_batch.datasets.base import Alignment, VideoRef, VideoSource, align_groundtruth
from rolo_batch.datasets.groundtruth import GroundTruth, parse_groundtruth
from rolo_batch.datasets.images import to_bgr
from rolo_batch.errors import InputError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v")
SIDECAR_SUFFIX = ".groundtruth.txt"


class VideoFile(VideoSource):
    """One video file. ``read_frame`` is frame-accurate; ``iter_frames`` streams without seeking."""

    def __init__(self, ref: VideoRef) -> None:
        self.ref = ref
        self._path: str | None = None
        self._tmpdir: str | None = None
        self._capture: cv2.VideoCapture | None = None
        self._next_index = 0
        self._count: int | None = None
        self._size: tuple[int, int] | None = None
        self._alignment: Alignment | None = None

    def _local_path(self) -> str:
        if self._path is None:
            location = storage.resolve(self.ref.uri)
            if location.is_local:
                if not os.path.isfile(location.path):
                    raise InputError("video file not found", video=self.name, path=self.ref.uri)
                self._path = location.path
            else:
                self._tmpdir = tempfile.mkdtemp(prefix="rolo-video-")
                weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
                path = os.path.join(self._tmpdir, os.path.basename(location.path))
                with storage.open_input_file(self.ref.uri) as src, open(path, "wb") as dst:
                    while chunk := src.read(8 << 20):
                        dst.write(chunk)
                self._path = path
        return self._path

    def _open(self) -> cv2.VideoCapture:
        capture = cv2.VideoCapture(self._local_path(), cv2.CAP_FFMPEG)
        if not capture.isOpened():
            raise InputError("cannot open the video file (not a video OpenCV/FFmpeg can decode)",
                             video=self.name, path=self.ref.uri)
        return capture

    def _capture_at(self, index: int) -> cv2.VideoCapture:
        if self._capture is None:
            self._capture = self._open()
            self._next_index = 0
        if index != self._next_index:
            self._capture.set(cv2.CAP_PROP_POS_FRAMES, index)
            self._next_index = index
        return self._capture

    @property
    def frame_numbers(self) -> np.ndarray:
        if self._count is None:
            capture = self._open()
            try:
                count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
                if count <= 0:  # the container does not say: count by demuxing
                    count = 0
                    while capture.grab():
                        count += 1
            finally:
                capture.release()
            if count == 0:
                raise InputError("the video file has no frames", video=self.name, path=self.ref.uri)
            self._count = count
        return np.arange(1, self._count + 1, dtype=np.int32)

    @property
    def groundtruth(self) -> Alignment:
        if self._alignment is None:
            gt = GroundTruth.empty()
            if self.ref.groundtruth_uri:
                try:
                    gt = parse_groundtruth(storage.read_text(self.ref.groundtruth_uri), self.ref.groundtruth_uri)
                except InputError as exc:
                    raise exc.with_video(self.name) from None
            self._alignment = align_groundtruth(self.name, self.frame_numbers, gt)
        return self._alignment

    @property
    def image_size(self) -> tuple[int, int]:
        if self._size is None:
            capture = self._open()
            try:
                self._size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
            finally:
                capture.release()
        return self._size

    def read_frame(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"frame index {index} out of range for {self.name} ({len(self)} frames)")
        capture = self._capture_at(index)
        ok, image = capture.read()
        if not ok or image is None:
            self.close()
            raise InputError(f"frame {index + 1} cannot be decoded", video=self.name, path=self.ref.uri)
        self._next_index = index + 1
        return to_bgr(image, video=self.name, path=self.ref.uri, frame=index + 1)

    def close(self) -> None:
        """Release the decoder (a later read reopens it)."""
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def __del__(self) -> None:
        self.close()


def sidecar_name(video_file_name: str) -> str:
    """``clip.mp4`` -> ``clip.groundtruth.txt``."""
    return os.path.splitext(video_file_name)[0] + SIDECAR_SUFFIX
