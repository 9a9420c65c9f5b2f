"""A deterministic generator of tracking videos in OTB layout (or as video files), with exact ground truth.

Each video shows one textured target moving over a textured background (with a slowly panning camera):
smooth random motion with occasional fast moves, smooth scale change, look-alike distractors (the target's
texture with a shifted hue and their own motion, some passing in front of it), occluders placed on the
target's path (full and partial occlusion), motion blur when an object moves fast, and illumination changes
(slow drift, sudden steps and a moving light gradient), plus sensor noise.

Ground truth is the **full extent** of the target (also while it is occluded, as in OTB), in pixels, with
``x = 0`` the left edge of the frame (0-based continuous coordinates); the target always stays inside the
frame. ``attributes.csv`` beside it gives, per frame, the visible fraction of the target, its speed, and
whether it was motion-blurred.

Same configuration and seed, same bytes: all randomness comes from ``numpy.random.default_rng([seed, i])``.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import cv2
import numpy as np

from rolo_batch import storage
from rolo_batch.datasets.groundtruth import format_groundtruth
from rolo_batch.datasets.images import encode_jpeg
from rolo_batch.datasets.videofile import sidecar_name
from rolo_batch.errors import ConfigError

FPS = 30


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Sizes in pixels; ``distractors``/``occluders`` are counts per video."""

    videos: int = 4
    frames: int = 60
    width: int = 320
    height: int = 240
    seed: int = 0
    distractors: int = 2
    occluders: int = 1
    video_files: bool = False
    jpeg_quality: int = 90
    prefix: str = "synth"

    def __post_init__(self) -> None:
        if self.videos < 1 or self.frames < 2:
            raise ConfigError(f"need at least 1 video of 2 frames, got {self.videos} of {self.frames}")
        if self.width < 64 or self.height < 64:
            raise ConfigError(f"frames must be at least 64x64 pixels, got {self.width}x{self.height}")
        if self.distractors < 0 or self.occluders < 0:
            raise ConfigError("distractors and occluders must be >= 0")
        if not 10 <= self.jpeg_quality <= 100:
            raise ConfigError(f"jpeg_quality must be in 10..100, got {self.jpeg_quality}")

    def video_name(self, index: int) -> str:
        return f"{self.prefix}-{index:03d}"


@dataclass(frozen=True)
class SynthFrame:
    """One rendered frame: ``image`` (H, W, 3) uint8 BGR, the target's full-extent box, and attributes.

    ``target_mask`` (H, W) bool, where the target is drawn (occluders ignored), only when asked for.
    """

    image: np.ndarray
    box_xywh_px: np.ndarray
    visible_fraction: float
    speed_px: float
    blurred: bool
    target_mask: np.ndarray | None = None


@dataclass
class _Sprite:
    texture: np.ndarray  # (sh, sw, 3) float32 BGR 0-255
    alpha: np.ndarray  # (sh, sw) float32 0-1
    centres: np.ndarray  # (T, 2) pixel-edge coordinates
    sizes: np.ndarray  # (T, 2) width, height
    depth: float


def _noise_texture(rng: np.random.Generator, height: int, width: int, octaves: int = 4) -> np.ndarray:
    """(H, W) float32 in about 0-1: a sum of upsampled random grids (smooth, multi-scale)."""
    out = np.zeros((height, width), np.float32)
    weight_total = 0.0
    for octave in range(octaves):
        cells = 2 ** (octave + 2)
        grid = rng.random((cells, cells)).astype(np.float32)
        out += cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC) / (2 ** octave)
        weight_total += 1 / (2 ** octave)
    out /= weight_total
    return np.clip((out - out.mean()) * 2.0 + 0.5, 0, 1)


def _palette_image(rng: np.random.Generator, values: np.ndarray) -> np.ndarray:
    """Colour a (H, W) 0-1 field by interpolating between two random colours: (H, W, 3) float32 BGR."""
    low, high = rng.uniform(20, 235, size=(2, 3)).astype(np.float32)
    return low + values[..., None] * (high - low)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    image = _palette_image(rng, _noise_texture(rng, height, width, octaves=5))
    for _ in range(int(rng.integers(6, 14))):  # clutter: rectangles and bars
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(4, width // 4)), y0 + int(rng.integers(4, height // 4))
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        cv2.rectangle(image, (x0, y0), (x1, y1), colour, thickness=int(rng.choice([-1, 2, 3])))
    return image


def _target_texture(rng: np.random.Generator, size: int, aspect: float) -> tuple[np.ndarray, np.ndarray]:
    """A distinctive textured object: (texture BGR float32, alpha) at ``size`` wide, ``size * aspect`` tall."""
    sw, sh = size, max(8, int(round(size * aspect)))
    hue = rng.uniform(0, 180)
    base = np.zeros((sh, sw, 3), np.float32)
    base[..., 0] = hue
    base[..., 1] = rng.uniform(150, 255)
    base[..., 2] = 110 + 120 * _noise_texture(rng, sh, sw, octaves=3)
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(5, 12)
    stripes = (np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period) > 0)
    base[..., 2] = np.where(stripes, base[..., 2], base[..., 2] * 0.45)
    # a contrasting marking (e.g. a face or a logo) near the top
    cv2.ellipse(base, (sw // 2, sh // 4), (max(2, sw // 5), max(2, sh // 8)), 0, 0, 360,
                ((hue + 90) % 180, 255, 240), -1)
    bgr = cv2.cvtColor(np.clip(base, 0, 255).astype(np.uint8), cv2.COLOR_HSV2BGR).astype(np.float32)
    alpha = np.zeros((sh, sw), np.float32)
    if rng.random() < 0.5:
        cv2.ellipse(alpha, (sw // 2, sh // 2), (sw // 2, sh // 2), 0, 0, 360, 1.0, -1)
    else:
        radius = max(2, min(sw, sh) // 5)
        cv2.rectangle(alpha, (0, radius), (sw - 1, sh - 1 - radius), 1.0, -1)
        cv2.rectangle(alpha, (radius, 0), (sw - 1 - radius, sh - 1), 1.0, -1)
        for cx, cy in ((radius, radius), (sw - 1 - radius, radius), (radius, sh - 1 - radius),
                       (sw - 1 - radius, sh - 1 - radius)):
            cv2.circle(alpha, (cx, cy), radius, 1.0, -1)
    return bgr, alpha


def _hue_shift(texture: np.ndarray, shift: float) -> np.ndarray:
    hsv = cv2.cvtColor(np.clip(texture, 0, 255).astype(np.uint8), cv2.COLOR_BGR2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + shift) % 180
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR).astype(np.float32)


def _trajectory(rng: np.random.Generator, frames: int, width: int, height: int, base_wh: np.ndarray,
                fast_move_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Centres (T, 2) and sizes (T, 2): damped random velocity, occasional fast moves, smooth scale change,
    bouncing so that the whole box stays inside the frame."""
    period = rng.uniform(40, 120)
    phase = rng.uniform(0, 2 * math.pi)
    amplitude = rng.uniform(0.08, 0.25)
    scales = np.exp(amplitude * np.sin(2 * math.pi * np.arange(frames) / period + phase))
    sizes = base_wh[None, :] * scales[:, None]
    sizes = np.minimum(sizes, [width * 0.45, height * 0.6])
    centres = np.zeros((frames, 2))
    half = sizes[0] / 2
    centres[0] = rng.uniform(half + 2, [width - half[0] - 2, height - half[1] - 2])
    velocity = rng.normal(0, 1.5, 2)
    for t in range(1, frames):
        velocity = 0.9 * velocity + rng.normal(0, 0.8, 2)
        if rng.random() < fast_move_rate:
            angle = rng.uniform(0, 2 * math.pi)
            velocity += rng.uniform(8, 14) * np.array([math.cos(angle), math.sin(angle)])
        speed = np.linalg.norm(velocity)
        if speed > 16:
            velocity *= 16 / speed
        position = centres[t - 1] + velocity
        half = sizes[t] / 2
        low, high = half + 1, np.array([width, height]) - half - 1
        for axis in range(2):
            if position[axis] < low[axis] or position[axis] > high[axis]:
                velocity[axis] = -velocity[axis]
                position[axis] = np.clip(position[axis], low[axis], high[axis])
        centres[t] = position
    return centres, sizes


def _warp(sprite: _Sprite, t: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Place the sprite at frame ``t``: premultiplied colour (H, W, 3) and alpha (H, W), sub-pixel exact.

    The sprite's extent [-0.5, sw - 0.5] (pixel-centre coordinates) maps onto the box's
    [x - 0.5, x + w - 0.5], i.e. onto [x, x + w] in pixel-edge coordinates.
    """
    sh, sw = sprite.alpha.shape
    (cx, cy), (w, h) = sprite.centres[t], sprite.sizes[t]
    x, y = cx - w / 2, cy - h / 2
    sx, sy = w / sw, h / sh
    matrix = np.array([[sx, 0, x - 0.5 + 0.5 * sx], [0, sy, y - 0.5 + 0.5 * sy]], np.float64)
    premultiplied = sprite.texture * sprite.alpha[..., None]
    colour = cv2.warpAffine(premultiplied, matrix, (width, height), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    alpha = cv2.warpAffine(sprite.alpha, matrix, (width, height), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return colour, alpha


def _motion_blur(colour: np.ndarray, alpha: np.ndarray, velocity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    length = int(min(15, max(3, round(float(np.linalg.norm(velocity))))))
    kernel = np.zeros((length, length), np.float32)
    angle = math.atan2(velocity[1], velocity[0])
    c = (length - 1) / 2
    dx, dy = math.cos(angle) * c, math.sin(angle) * c
    cv2.line(kernel, (int(round(c - dx)), int(round(c - dy))), (int(round(c + dx)), int(round(c + dy))), 1.0, 1)
    kernel /= kernel.sum()
    return cv2.filter2D(colour, -1, kernel), cv2.filter2D(alpha, -1, kernel)


def render_video(config: SynthConfig, index: int, with_masks: bool = False) -> Iterator[SynthFrame]:
    """Render video ``index`` of ``config`` frame by frame (deterministic); ``with_masks`` adds the target's
    mask to each frame."""
    rng = np.random.default_rng([config.seed, index])
    width, height, frames = config.width, config.height, config.frames
    margin = 16
    background = _background(rng, height + 2 * margin, width + 2 * margin)
    pan = np.cumsum(rng.normal(0, 0.3, (frames, 2)), axis=0)
    pan = np.clip(pan, -margin + 1, margin - 1)

    base_w = rng.uniform(0.12, 0.2) * width
    aspect = float(rng.choice([rng.uniform(0.7, 1.1), rng.uniform(1.5, 2.3)]))
    texture, alpha = _target_texture(rng, int(round(base_w)), aspect)
    base_wh = np.array([base_w, base_w * aspect])
    base_wh = np.minimum(base_wh, [width * 0.4, height * 0.5])
    centres, sizes = _trajectory(rng, frames, width, height, base_wh, fast_move_rate=0.04)
    target = _Sprite(texture, alpha, centres, sizes, depth=0.5)

    others: list[_Sprite] = []
    for _ in range(config.distractors):
        look_alike = _hue_shift(texture, float(rng.choice([-1, 1]) * rng.uniform(12, 25)))
        d_wh = base_wh * rng.uniform(0.85, 1.15)
        d_centres, d_sizes = _trajectory(rng, frames, width, height, d_wh, fast_move_rate=0.02)
        others.append(_Sprite(look_alike, alpha, d_centres, d_sizes, depth=float(rng.choice([0.3, 0.7]))))
    for _ in range(config.occluders):
        # Crosses the target's path at a random time, moving steadily: the target passes behind it (partly
        # or, when the occluder is wider than the target, fully) for a limited number of frames.
        t_meet = int(rng.integers(frames // 5, max(frames // 5 + 1, frames - frames // 5)))
        o_w = float(base_wh[0] * rng.uniform(0.4, 1.3))
        o_h = float(min(height * 0.9, base_wh[1] * rng.uniform(1.2, 2.5)))
        # mostly horizontal, against the target's own horizontal motion so that the crossing is brief
        target_vx = centres[min(t_meet + 1, frames - 1), 0] - centres[max(t_meet - 1, 0), 0]
        angle = rng.uniform(-0.3, 0.3) + (0.0 if target_vx < 0 else math.pi)
        drift = rng.uniform(2.5, 4.5) * np.array([math.cos(angle), math.sin(angle)])
        o_centres = centres[t_meet] + (np.arange(frames) - t_meet)[:, None] * drift[None, :]
        o_texture = _palette_image(rng, _noise_texture(rng, 32, 32, octaves=2))
        o_alpha = np.ones((32, 32), np.float32)
        others.append(_Sprite(o_texture, o_alpha, o_centres, np.tile([o_w, o_h], (frames, 1)), depth=1.0))

    light_level = 1.0
    light_target = 1.0
    light_angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    xx, yy = xx / width - 0.5, yy / height - 0.5
    sprites = sorted([target, *others], key=lambda s: s.depth)
    for t in range(frames):
        ox, oy = (margin + pan[t]).astype(int)
        frame = background[oy:oy + height, ox:ox + width].copy()
        target_alpha = None
        cover = np.zeros((height, width), np.float32)
        blurred = False
        for sprite in sprites:
            colour, a = _warp(sprite, t, width, height)
            velocity = sprite.centres[t] - sprite.centres[max(t - 1, 0)]
            if np.linalg.norm(velocity) > 4:
                colour, a = _motion_blur(colour, a, velocity)
                blurred = blurred or sprite is target
            frame = frame * (1 - a[..., None]) + colour
            if sprite is target:
                target_alpha = a
            elif sprite.depth > target.depth:
                cover = np.maximum(cover, a)
        # illumination: slow drift, occasional sudden steps (eased over a few frames), a moving light gradient
        if rng.random() < 0.03:
            light_target = float(rng.uniform(0.55, 1.35))
        light_level += 0.35 * (light_target - light_level)
        light_angle += 0.02
        gradient = 1 + 0.25 * (xx * math.cos(light_angle) + yy * math.sin(light_angle))
        drift = 1 + 0.1 * math.sin(2 * math.pi * t / 90)
        frame = frame * (light_level * drift * gradient)[..., None]
        frame += rng.normal(0, 3.0, frame.shape).astype(np.float32)
        image = np.clip(frame, 0, 255).astype(np.uint8)
        assert target_alpha is not None
        visible = float((target_alpha * (1 - cover)).sum() / max(target_alpha.sum(), 1e-6))
        (cx, cy), (w, h) = target.centres[t], target.sizes[t]
        box = np.array([cx - w / 2, cy - h / 2, w, h])
        speed = float(np.linalg.norm(target.centres[t] - target.centres[max(t - 1, 0)]))
        yield SynthFrame(image, box, visible, speed, blurred, target_alpha > 0.5 if with_masks else None)


def _attributes_csv(rows: list[SynthFrame]) -> str:
    lines = ["frame,visible_fraction,speed_px,blurred"]
    for number, row in enumerate(rows, start=1):
        lines.append(f"{number},{row.visible_fraction:.3f},{row.speed_px:.2f},{int(row.blurred)}")
    return "\n".join(lines) + "\n"


def _write_otb(out_uri: str, name: str, frames: Iterator[SynthFrame], quality: int) -> None:
    folder = storage.join(out_uri, name)
    rows = []
    for number, frame in enumerate(frames, start=1):
        storage.write_bytes(storage.join(folder, "img", f"{number:04d}.jpg"), encode_jpeg(frame.image, quality))
        rows.append(SynthFrame(np.empty(0), frame.box_xywh_px, frame.visible_fraction, frame.speed_px,
                               frame.blurred))
    storage.write_text(storage.join(folder, "attributes.csv"), _attributes_csv(rows))
    storage.write_text(storage.join(folder, "groundtruth_rect.txt"),
                       format_groundtruth(np.stack([r.box_xywh_px for r in rows])))


def _write_video_file(out_uri: str, name: str, frames: Iterator[SynthFrame], config: SynthConfig) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="rolo-synth-") as tmp:
        path = os.path.join(tmp, f"{name}.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), FPS, (config.width, config.height))
        if not writer.isOpened():
            raise RuntimeError("OpenCV cannot write mp4 (mp4v) here")
        try:
            for frame in frames:
                writer.write(frame.image)
                rows.append(SynthFrame(np.empty(0), frame.box_xywh_px, frame.visible_fraction, frame.speed_px,
                                       frame.blurred))
        finally:
            writer.release()
        with open(path, "rb") as handle:
            storage.write_bytes(storage.join(out_uri, f"{name}.mp4"), handle.read())
    storage.write_text(storage.join(out_uri, f"{name}.attributes.csv"), _attributes_csv(rows))
    storage.write_text(storage.join(out_uri, sidecar_name(f"{name}.mp4")),
                       format_groundtruth(np.stack([r.box_xywh_px for r in rows])))


def synthesize(out_uri: str, config: SynthConfig,
               on_video: Callable[[str, int, int], None] | None = None) -> list[str]:
    """Write ``config.videos`` videos under ``out_uri`` (local or S3); return their names.

    OTB layout (``<name>/img/0001.jpg``, ``groundtruth_rect.txt``, ``attributes.csv``), or with
    ``config.video_files`` ``<name>.mp4`` + ``<name>.groundtruth.txt``. ``on_video(name, done, total)`` is
    called after each video. The ground truth is written last, so a video whose box file exists is complete.
    """
    storage.ensure_dir(out_uri)
    names = []
    for index in range(config.videos):
        name = config.video_name(index)
        frames = render_video(config, index)
        if config.video_files:
            _write_video_file(out_uri, name, frames, config)
        else:
            _write_otb(out_uri, name, frames, config.jpeg_quality)
        names.append(name)
        if on_video is not None:
            on_video(name, index + 1, config.videos)
    return names


def describe(config: SynthConfig) -> dict:
    """The configuration as a plain dict (for logs and manifests)."""
    return asdict(config)
