"""Overlay videos: one video's frames with the ground truth and each method's boxes drawn on, as in the ROLO
paper (ground truth red, YOLO blue, ROLO green; other methods in other distinct colours), a small legend, the
frame number, and optionally the heatmap model's location map blended over the frame.

Writes an mp4 (OpenCV, fourcc ``mp4v``) to a local temporary file, then publishes it atomically at any
``storage`` URI (local or ``s3://``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from types import MappingProxyType
from typing import Mapping, Sequence

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
FOURCC = "mp4v"

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


def render_overlay(video: VideoSource, tracks: Mapping[str, TrackRows] | Sequence[TrackRows], out_uri: str,
                   heatmaps: Heatmaps | None = None, *, fps: float = 30.0, thickness: int | None = None,
                   heatmap_alpha: float = 0.5, legend: bool = True, start: int = 0,
                   stop: int | None = None) -> int:
    """Write an mp4 of ``video`` frames ``start`` to ``stop`` (0-based positions) with boxes drawn on; return
    the number of frames written.

    ``tracks``: method -> ``TrackRows`` (or a list of them, keyed by their ``method``), boxes in xywh pixels,
    drawn on the frames whose number they carry. The ground truth (valid boxes only) is drawn last, on top.
    ``heatmaps``: frame number -> (h, w) map in 0-1, or an array (len(video), h, w) aligned to the frames;
    blended under the boxes with opacity ``heatmap_alpha * heat``. ``thickness``: box line width in pixels
    (default scales with the frame size, at least 2). ``out_uri``: any storage URI; published atomically.
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
    with tempfile.TemporaryDirectory(prefix="rolo-render-") as tmp:
        path = os.path.join(tmp, "overlay.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*FOURCC), float(fps), (width, height))
        if not writer.isOpened():
            raise RuntimeError(f"OpenCV cannot write mp4 ({FOURCC}) here")
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
                writer.write(image)
                written += 1
        finally:
            writer.release()
        _publish(path, out_uri)
    return written


def _publish(local_path: str, out_uri: str) -> None:
    """Copy a local file to ``out_uri`` atomically, retrying transient storage failures."""
    def copy() -> None:
        with open(local_path, "rb") as source, storage.atomic_output(out_uri) as target:
            shutil.copyfileobj(source, target, length=1 << 20)

    storage.retrying(copy, what=f"writing {out_uri}")
