"""Overlay videos: one video's frames with the ground truth and each method's boxes drawn on, as in the ROLO
paper (ground truth red, YOLO blue, ROLO green; other methods in other distinct colours), a small legend, the
frame number, and optionally the heatmap model's location map blended over the frame.

The video is written in a format browsers play in a ``<video>`` element: the first of ``BROWSER_FORMATS`` that
OpenCV's bundled FFmpeg writes on this machine, probed once per process (``overlay_format``; the name of an
overlay file ends with ``overlay_suffix()``). The PyPI OpenCV wheel has no H.264 or AV1 encoder but has
libvpx, so VP8 in WebM comes first: VP9 plays in the same browsers and its files are hardly smaller, because
OpenCV sets the bit rate from fps x width x height and passes FFmpeg no quality setting (the writer refuses
``VIDEOWRITER_PROP_QUALITY``; an overlay costs about 1.2-1.4 bits per pixel and frame, some 14 MB for 300
frames of 640x480), but it encodes four to six times slower. Where neither is available, overlays fall back to MPEG-4
Part 2 in mp4 (``mp4v``: VLC plays it, browsers do not) with a warning. Every file is checked (container,
codec, frame count, size) before it is published, atomically, at any ``storage`` URI (local or ``s3://``).
"""

from __future__ import annotations

import functools
import os
import shutil
import struct
import tempfile
import warnings
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, Mapping, Sequence

import cv2
import numpy as np

from rolo_batch import storage
from rolo_batch.datasets import VideoSource
from rolo_batch.errors import ConfigError, InputError
from rolo_batch.tables import TrackRows

Colour = tuple[int, int, int]  # BGR, as OpenCV draws

GROUND_TRUTH_LABEL = "GT"
GROUND_TRUTH_COLOUR: Colour = (0, 0, 255)  # red
PAPER_COLOURS: Mapping[str, Colour] = MappingProxyType({"yolo": (255, 0, 0), "rolo": (0, 255, 0)})  # blue, green
OTHER_COLOURS: tuple[Colour, ...] = (
    (0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 140, 255), (255, 255, 255),
    (180, 105, 255), (0, 0, 128), (128, 128, 0), (140, 180, 210), (128, 0, 128),
)  # yellow, magenta, cyan, orange, white, pink, maroon, teal, tan, purple

Heatmaps = Mapping[int, np.ndarray] | np.ndarray


def method_colours(methods: Sequence[str]) -> dict[str, Colour]:
    """BGR colour of each method: ``yolo`` blue, ``rolo`` green (the paper's), the others from
    ``OTHER_COLOURS`` in method-name order (cycling when there are more than ten)."""
    others = sorted(m for m in set(methods) if m not in PAPER_COLOURS)
    colours = {m: OTHER_COLOURS[i % len(OTHER_COLOURS)] for i, m in enumerate(others)}
    colours.update({m: PAPER_COLOURS[m] for m in methods if m in PAPER_COLOURS})
    return colours


def _tracks_by_method(video: VideoSource, tracks: Mapping[str, TrackRows] | Sequence[TrackRows]
                      ) -> dict[str, dict[int, np.ndarray]]:
    """Method -> {frame number: xywh px box}, checking every track belongs to ``video``."""
    items = list(tracks.items()) if isinstance(tracks, Mapping) else [(t.method, t) for t in tracks]
    out: dict[str, dict[int, np.ndarray]] = {}
    for method, track in items:
        if track.video != video.name:
            raise InputError(f"track of method {method!r} is for video {track.video!r}", video=video.name)
        if method in out:
            raise InputError(f"two tracks for method {method!r}", video=video.name)
        out[method] = {int(f): b for f, b in zip(track.frame, track.boxes_xywh_px)}
    return out


def _heatmap_lookup(video: VideoSource, heatmaps: Heatmaps | None) -> Mapping[int, np.ndarray]:
    """Frame number -> 2-D heat map (any size, values 0-1)."""
    if heatmaps is None:
        return {}
    if isinstance(heatmaps, Mapping):
        maps = {int(k): np.asarray(v, dtype=np.float32) for k, v in heatmaps.items()}
    else:
        array = np.asarray(heatmaps, dtype=np.float32)
        if array.ndim != 3 or len(array) != len(video):
            raise InputError(f"heatmaps has shape {array.shape}, expected ({len(video)}, H, W): one map per "
                             f"frame of the video", video=video.name)
        maps = dict(zip(video.frame_numbers.tolist(), array))
    for frame, heat in maps.items():
        if heat.ndim != 2 or heat.size == 0:
            raise InputError(f"heatmap of frame {frame} has shape {heat.shape}, expected (H, W)", video=video.name)
    return maps


def blend_heatmap(image: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
    """``image`` (H, W, 3) uint8 BGR with ``heat`` (h, w) in 0-1 (resized to the frame) blended over it as a
    JET colour map; each pixel's opacity is ``alpha * heat``, so cold areas stay clear."""
    height, width = image.shape[:2]
    heat = np.clip(np.nan_to_num(heat, nan=0.0), 0.0, 1.0).astype(np.float32)
    heat = cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET).astype(np.float32)
    weight = (alpha * heat)[:, :, None]
    return np.clip(image * (1 - weight) + colour * weight, 0, 255).astype(np.uint8)


def draw_box(image: np.ndarray, box_xywh_px: np.ndarray, colour: Colour, thickness: int) -> None:
    """Draw one xywh pixel box in place (the rectangle covers pixels x .. x+w-1); NaN boxes are skipped."""
    box = np.asarray(box_xywh_px, dtype=float)
    if not np.isfinite(box).all() or box[2] <= 0 or box[3] <= 0:
        return
    x1, y1 = int(round(box[0])), int(round(box[1]))
    x2, y2 = int(round(box[0] + box[2])) - 1, int(round(box[1] + box[3])) - 1
    cv2.rectangle(image, (x1, y1), (max(x1, x2), max(y1, y2)), colour, thickness, lineType=cv2.LINE_8)


def _font_scale(image: np.ndarray) -> float:
    return max(0.25, min(image.shape[:2]) / 720)


def draw_legend(image: np.ndarray, entries: Sequence[tuple[str, Colour]]) -> None:
    """A small legend in the top-left corner, in place: a colour swatch and a white label per entry, on a
    darkened background."""
    scale = _font_scale(image)
    (_, text_h), _ = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    line_h, swatch = text_h + 4, max(6, text_h)
    width = max(cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] for label, _ in entries)
    box_w, box_h = swatch + width + 8, line_h * len(entries) + 4
    region = image[0:box_h, 0:box_w]
    region[:] = (region * 0.4).astype(np.uint8)  # darken behind the text
    for i, (label, colour) in enumerate(entries):
        top = 2 + i * line_h
        cv2.rectangle(image, (2, top + 1), (1 + swatch, top + text_h), colour, -1)
        cv2.putText(image, label, (swatch + 5, top + text_h), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    1, cv2.LINE_AA)


def draw_frame_number(image: np.ndarray, number: int) -> None:
    """``#<number>`` in the bottom-left corner, in place."""
    scale = _font_scale(image)
    cv2.putText(image, f"#{number}", (2, image.shape[0] - 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1,
                cv2.LINE_AA)


# --- video formats ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VideoFormat:
    """A codec in a container that OpenCV's FFmpeg writer may produce.

    ``fourcc`` is what ``cv2.VideoWriter`` is asked for; ``suffix`` names the file (FFmpeg picks the muxer by
    it); ``container`` is what the file's first bytes must say (``"webm"``: an EBML header with DocType webm;
    ``"mp4"``: an ``ftyp`` box); ``read_fourccs`` are the codec tags ``cv2.VideoCapture`` may report reading it
    back; ``browser``: Chromium-based browsers and Firefox play it in a ``<video>`` element.
    """

    name: str
    fourcc: str
    suffix: str
    container: Literal["webm", "mp4"]
    read_fourccs: tuple[str, ...]
    browser: bool


VP8_WEBM = VideoFormat("VP8 in WebM", "VP80", ".webm", "webm", ("VP80",), browser=True)
VP9_WEBM = VideoFormat("VP9 in WebM", "VP90", ".webm", "webm", ("VP90",), browser=True)
MPEG4_MP4 = VideoFormat("MPEG-4 Part 2 in mp4", "mp4v", ".mp4", "mp4", ("FMP4", "mp4v"), browser=False)
# In order of preference; H.264 ('avc1') and AV1 would come first, but the PyPI wheel has no encoder for them.
BROWSER_FORMATS: tuple[VideoFormat, ...] = (VP8_WEBM, VP9_WEBM)
VIDEO_SUFFIXES = (".webm", ".mp4", ".m4v", ".mkv", ".avi", ".mov")
_PROBE_WH, _PROBE_FRAMES = (64, 48), 6
_EBML_MAGIC, _EBML_DOCTYPE = b"\x1a\x45\xdf\xa3", b"\x42\x82"


def container_of(head: bytes) -> str | None:
    """The container the first bytes of a file announce: ``"webm"`` or ``"matroska"`` (the EBML DocType),
    ``"mp4"`` (an ``ftyp`` box at byte 4), or None."""
    if head.startswith(_EBML_MAGIC):
        at = head.find(_EBML_DOCTYPE, 4)
        if at < 0 or at + 3 > len(head) or not head[at + 2] & 0x80:
            return None
        size = head[at + 2] & 0x7F  # a one-byte element size, as every muxer writes for the DocType
        return head[at + 3:at + 3 + size].decode("ascii", "replace")
    if head[4:8] == b"ftyp":
        return "mp4"
    return None


def check_video_file(path: str, video_format: VideoFormat, frames: int, size_wh: tuple[int, int]) -> list[str]:
    """What is wrong with the video file at the local ``path``, which should hold ``frames`` frames of
    ``size_wh`` (width, height) pixels in ``video_format``: its first bytes name another container, or
    ``cv2.VideoCapture`` reads back another codec, frame count or size. An empty list when nothing is."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return ["no file was written"]
    with open(path, "rb") as handle:
        container = container_of(handle.read(64))
    problems = [] if container == video_format.container else [
        f"the file is {container or 'no known container'}, expected {video_format.container}"]
    capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    try:
        if not capture.isOpened():
            return problems + ["OpenCV cannot open it again"]
        fourcc = struct.pack("<I", int(capture.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF).decode("latin-1")
        if fourcc not in video_format.read_fourccs:
            problems.append(f"it reads back as codec {fourcc!r}, expected {' or '.join(video_format.read_fourccs)}")
        read_wh = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        if read_wh != tuple(size_wh):
            problems.append(f"it reads back as {read_wh[0]}x{read_wh[1]}, expected {size_wh[0]}x{size_wh[1]}")
        count = 0
        while capture.grab():
            count += 1
    finally:
        capture.release()
    if count != frames:
        problems.append(f"it reads back {count} frames, expected {frames}")
    return problems


def _open_writer(path: str, video_format: VideoFormat, fps: float, size_wh: tuple[int, int]) -> cv2.VideoWriter:
    return cv2.VideoWriter(path, cv2.CAP_FFMPEG, cv2.VideoWriter_fourcc(*video_format.fourcc), float(fps),
                           tuple(size_wh))


def probe_format(video_format: VideoFormat) -> list[str]:
    """Write a tiny clip in ``video_format`` and check it (``check_video_file``): what went wrong, or an
    empty list when this machine's OpenCV writes the format."""
    width, height = _PROBE_WH
    with tempfile.TemporaryDirectory(prefix="rolo-probe-") as tmp:
        path = os.path.join(tmp, f"probe{video_format.suffix}")
        writer = _open_writer(path, video_format, 30.0, _PROBE_WH)
        if not writer.isOpened():
            return [f"OpenCV's FFmpeg has no writer for {video_format.fourcc!r} in {video_format.suffix}"]
        try:
            for i in range(_PROBE_FRAMES):
                image = np.zeros((height, width, 3), np.uint8)
                cv2.rectangle(image, (4 + 6 * i, 8), (24 + 6 * i, 36), (0, 0, 255), -1)
                writer.write(image)
        finally:
            writer.release()
        return check_video_file(path, video_format, _PROBE_FRAMES, _PROBE_WH)


@functools.cache
def overlay_format() -> VideoFormat:
    """The format overlays are written in by this process: the first of ``BROWSER_FORMATS`` that
    ``probe_format`` accepts (decided once, on the first call). Without any, ``MPEG4_MP4`` with a
    ``RuntimeWarning`` (the overlay still plays in VLC, not in a browser); ``RuntimeError`` if even that fails."""
    tried = []
    for candidate in BROWSER_FORMATS:
        problems = probe_format(candidate)
        if not problems:
            return candidate
        tried.append(f"{candidate.name}: {'; '.join(problems)}")
    problems = probe_format(MPEG4_MP4)
    if problems:
        raise RuntimeError(f"OpenCV cannot write any overlay video format here ({'; '.join(tried)}; "
                           f"{MPEG4_MP4.name}: {'; '.join(problems)})")
    warnings.warn(f"overlays are written as {MPEG4_MP4.name}, which browsers do not play: OpenCV cannot write a "
                  f"browser format here ({'; '.join(tried)})", RuntimeWarning, stacklevel=2)
    return MPEG4_MP4


def overlay_suffix() -> str:
    """The file name suffix of the overlays this process writes (``".webm"`` where VP8 or VP9 is available)."""
    return overlay_format().suffix


def render_overlay(video: VideoSource, tracks: Mapping[str, TrackRows] | Sequence[TrackRows], out_uri: str,
                   heatmaps: Heatmaps | None = None, *, fps: float = 30.0, thickness: int | None = None,
                   heatmap_alpha: float = 0.5, legend: bool = True, start: int = 0,
                   stop: int | None = None, video_format: VideoFormat | None = None) -> int:
    """Write a video of ``video`` frames ``start`` to ``stop`` (0-based positions) with boxes drawn on; return
    the number of frames written.

    ``tracks``: method -> ``TrackRows`` (or a list of them, keyed by their ``method``), boxes in xywh pixels,
    drawn on the frames whose number they carry. The ground truth (valid boxes only) is drawn last, on top.
    ``heatmaps``: frame number -> (h, w) map in 0-1, or an array (len(video), h, w) aligned to the frames;
    blended under the boxes with opacity ``heatmap_alpha * heat``. ``thickness``: box line width in pixels
    (default scales with the frame size, at least 2). ``video_format``: default ``overlay_format()``, a format
    browsers play; name ``out_uri`` with its suffix (``overlay_suffix()``), as the format does not follow the
    name (a warning says so when the name has another video suffix). ``out_uri``: any storage URI, published
    atomically once the file is checked (``check_video_file``). A frame of odd width or height gets one black
    column or row more (OpenCV's FFmpeg writer needs even sizes).
    """
    if fps <= 0 or not 0 <= heatmap_alpha <= 1:
        raise ConfigError(f"render_overlay needs fps > 0 and 0 <= heatmap_alpha <= 1, got {fps}, {heatmap_alpha}")
    boxes = _tracks_by_method(video, tracks)
    heat = _heatmap_lookup(video, heatmaps)
    colours = method_colours(list(boxes))
    order = sorted(boxes, key=lambda m: (m in PAPER_COLOURS, m))  # the paper's methods on top of the others
    entries = [(GROUND_TRUTH_LABEL, GROUND_TRUTH_COLOUR)] + [(m, colours[m]) for m in order]
    gt = video.groundtruth
    width, height = video.image_size
    line = thickness or max(2, round(min(width, height) / 150))
    stop = len(video) if stop is None else min(stop, len(video))
    if not 0 <= start < stop:
        raise InputError(f"no frames to render in positions {start}..{stop} of {len(video)}", video=video.name)
    video_format = video_format or overlay_format()
    suffix = os.path.splitext(storage.basename(out_uri))[1].lower()
    if suffix in VIDEO_SUFFIXES and suffix != video_format.suffix:
        warnings.warn(f"{out_uri}: the overlay is {video_format.name}; name it *{video_format.suffix}",
                      RuntimeWarning, stacklevel=2)
    padded_wh = (width + width % 2, height + height % 2)
    with tempfile.TemporaryDirectory(prefix="rolo-render-") as tmp:
        path = os.path.join(tmp, f"overlay{video_format.suffix}")
        writer = _open_writer(path, video_format, fps, padded_wh)
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV cannot write {video_format.name} ({video_format.fourcc}) here")
        written = 0
        try:
            for frame in video.iter_frames(start, stop):
                image = frame.image.copy()
                if image.shape[:2] != (height, width):
                    raise InputError(f"frame {frame.number} is {image.shape[1]}x{image.shape[0]}, the video is "
                                     f"{width}x{height}", video=video.name)
                if frame.number in heat:
                    image = blend_heatmap(image, heat[frame.number], heatmap_alpha)
                if legend:
                    draw_legend(image, entries)
                draw_frame_number(image, frame.number)
                for method in order:
                    if frame.number in boxes[method]:
                        draw_box(image, boxes[method][frame.number], colours[method], line)
                if gt.valid[frame.index]:
                    draw_box(image, gt.boxes_xywh_px[frame.index], GROUND_TRUTH_COLOUR, line)
                if padded_wh != (width, height):
                    image = cv2.copyMakeBorder(image, 0, padded_wh[1] - height, 0, padded_wh[0] - width,
                                               cv2.BORDER_CONSTANT, value=(0, 0, 0))
                writer.write(image)
                written += 1
        finally:
            writer.release()
        problems = check_video_file(path, video_format, written, padded_wh)
        if problems:
            raise RuntimeError(f"the overlay of {video.name} written as {video_format.name} is broken: "
                               f"{'; '.join(problems)}")
        _publish(path, out_uri)
    return written


def _publish(local_path: str, out_uri: str) -> None:
    """Copy a local file to ``out_uri`` atomically, retrying transient storage failures."""
    def copy() -> None:
        with open(local_path, "rb") as source, storage.atomic_output(out_uri) as target:
            shutil.copyfileobj(source, target, length=1 << 20)

    storage.retrying(copy, what=f"writing {out_uri}")
