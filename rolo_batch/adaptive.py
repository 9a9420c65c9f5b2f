"""A target model adapted online from the first frame's box: a correlation filter on pretrained features.

This is what lets rolo-batch track a video that nothing was trained on (the archive case, exp1): the ImageNet
backbone (EfficientNet-Lite0, ``rolo_batch.efficientnet``) gives feature maps of a search window around the
target's last position, and a target-specific linear layer on them (a multi-channel discriminative correlation
filter, solved in closed form in the Fourier domain) says where the target is. It is fitted on the first frame
(the window's every shift of the target is a negative, so its background teaches it what the target is not;
a few augmented copies of the first window make it robust to small scale and photometric change) and updated
from frames it is confident in. Drift guards: the first frame's solution keeps a fixed share of the filter,
and a frame whose response peak falls below ``guard`` times the running peak is not learned from.

Plain functions and classes, no Ray; ``AdaptiveTracker`` follows the ``trackers.Tracker`` contract, and
``track_many`` runs many videos in lockstep with one backbone call per frame for all of them.
Boxes are ``xywh_px``; images ``(H, W, 3)`` uint8 BGR.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from rolo_batch.errors import ConfigError

FEATURE_CHANNELS = {4: 24, 8: 40, 16: 112}
RESPONSE_SIDE = 8  # the response map ROLO reads is 8 x 8 (64 values)


@dataclass(frozen=True)
class AdaptConfig:
    """How the target model is built and adapted.

    ``strides``: backbone maps used (8: stage 3, 40 channels; 16: stage 5, 112 channels, upsampled to the
    finest stride). ``window``: side of the square search window over the square root of the target's area.
    ``input_size``: the window's side in network pixels. ``label_sigma``: the desired response's width as a
    fraction of the target's size. ``reg``: ridge weight relative to the mean feature energy.
    ``update``: adapt during tracking (the first frame's fit is always made); ``learning_rate`` per update,
    every ``interval`` frames; ``first_weight``: the share of the filter kept from the first frame;
    ``guard``: skip an update when the peak is below this fraction of the running peak; ``lost``: below this
    fraction the target is taken as hidden and its box holds where it was.
    ``scales``: window scale factors tried each frame, ``scale_penalty`` on the ones that are not 1,
    ``scale_rate``: how fast the size follows. ``augment``: augmented copies of the first window.
    ``margin``: the target region learned from, beyond the box, as a fraction of its size each side;
    ``context``: the weight of the background beyond it (0: the target alone, 1: the whole window).
    """

    strides: tuple[int, ...] = (8,)
    window: float = 5.0
    input_size: int = 256
    label_sigma: float = 0.1
    reg: float = 0.01
    update: bool = True
    learning_rate: float = 0.02
    interval: int = 1
    first_weight: float = 0.2
    guard: float = 0.5
    lost: float = 0.15
    scales: tuple[float, ...] = (0.96, 1.0, 1.04)
    scale_penalty: float = 0.98
    scale_rate: float = 0.6
    augment: int = 4
    margin: float = 0.0
    context: float = 0.0

    def __post_init__(self) -> None:
        if not self.strides or any(s not in FEATURE_CHANNELS for s in self.strides):
            raise ConfigError(f"adaptation strides must be among {sorted(FEATURE_CHANNELS)}, got {self.strides}")
        if self.input_size % max(self.strides):
            raise ConfigError(f"input_size {self.input_size} must be a multiple of the stride {max(self.strides)}")
        if not (0 <= self.first_weight <= 1 and 0 < self.learning_rate <= 1 and self.interval >= 1):
            raise ConfigError("first_weight in 0-1, learning_rate in (0, 1] and interval >= 1 are required")
        if 1.0 not in self.scales:
            raise ConfigError("scales must include 1.0")

    @property
    def cells(self) -> int:
        return self.input_size // min(self.strides)


class Backbone:
    """The pretrained feature extractor: windows ``(N, S, S, 3)`` uint8 BGR -> ``(N, C, S/s, S/s)`` maps."""

    def __init__(self, config: AdaptConfig, weights: str | None = None, device: str = "cpu") -> None:
        from rolo_batch.efficientnet import EfficientNetLite0
        from rolo_batch.efficientnet_weights import load_weights

        self.config = config
        self.device = torch.device(device)
        self.net = load_weights(EfficientNetLite0(), weights).eval().to(self.device)

    @torch.inference_mode()
    def __call__(self, windows: np.ndarray) -> np.ndarray:
        from rolo_batch.efficientnet import preprocess_bgr

        x = preprocess_bgr(windows).to(self.device)
        maps = self.net.forward_features(x, self.config.strides)
        finest = min(self.config.strides)
        size = self.config.cells
        parts = []
        for stride in self.config.strides:
            m = maps[stride]
            if stride != finest:
                m = torch.nn.functional.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
            parts.append(m / (m.flatten(1).norm(dim=1).clamp_min(1e-6)[:, None, None, None] / np.sqrt(m[0].numel())))
        return torch.cat(parts, dim=1).float().cpu().numpy()


FRAME_MAP_INPUT = 256  # frames are resized to this square for the whole-frame map (as efficientnet-yolo's input)
FRAME_MAP_STRIDE = 16  # map16: stage 5, 112 x 16 x 16 at 256 px


def frame_maps(backbone: Backbone, images: list[np.ndarray]) -> np.ndarray:
    """Whole-frame backbone maps ``(N, 112, 16, 16)`` float16 (stage 5 of frames resized to 256 x 256): the
    feature ROLO pools inside each frame's box (``--feature map16`` of the detectors), computed by the same
    backbone in the same call pattern as the search windows."""
    from rolo_batch.efficientnet import preprocess_bgr

    if not images:
        return np.zeros((0, FEATURE_CHANNELS[FRAME_MAP_STRIDE], 16, 16), np.float16)
    size = FRAME_MAP_INPUT
    batch = np.stack([cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA) for image in images])
    with torch.inference_mode():
        x = preprocess_bgr(batch).to(backbone.device)
        maps = backbone.net.forward_features(x, (FRAME_MAP_STRIDE,))[FRAME_MAP_STRIDE]
    return maps.to(torch.float16).cpu().numpy()


def crop_window(image: np.ndarray, center_xy: np.ndarray, side_px: float, out_size: int) -> np.ndarray:
    """The square window of ``side_px`` image pixels centred on ``center_xy``, resized to ``out_size``; the
    image's edge pixels fill what lies outside it."""
    scale = out_size / side_px
    matrix = np.array([[scale, 0, out_size / 2 - scale * center_xy[0]],
                       [0, scale, out_size / 2 - scale * center_xy[1]]], np.float64)
    return cv2.warpAffine(image, matrix, (out_size, out_size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def _hann(n: int) -> np.ndarray:
    w = np.hanning(n + 2)[1:-1]
    return np.outer(w, w).astype(np.float32)


def _label(n: int, sigma_cells: np.ndarray) -> np.ndarray:
    """The desired response: a Gaussian peaked at shift (0, 0) (circularly), in the Fourier domain."""
    offsets = (np.arange(n) + n // 2) % n - n // 2
    gy = np.exp(-0.5 * (offsets / sigma_cells[1]) ** 2)
    gx = np.exp(-0.5 * (offsets / sigma_cells[0]) ** 2)
    return np.fft.fft2(np.outer(gy, gx))


def _peak(response: np.ndarray) -> tuple[float, float, float]:
    """(dy, dx, value) of the response's maximum, shifts in cells with sub-cell (parabolic) refinement."""
    n = response.shape[0]
    index = int(np.argmax(response))
    y, x = divmod(index, response.shape[1])
    value = float(response[y, x])

    def refine(minus: float, centre: float, plus: float) -> float:
        denominator = minus - 2 * centre + plus
        return 0.0 if denominator >= 0 else 0.5 * (minus - plus) / denominator

    dy = refine(response[(y - 1) % n, x], value, response[(y + 1) % n, x])
    dx = refine(response[y, (x - 1) % n], value, response[y, (x + 1) % n])
    wrap = lambda v: (v + n // 2) % n - n // 2  # noqa: E731
    return wrap(y) + dy, wrap(x) + dx, value


@dataclass
class TargetModel:
    """The filter's running numerator and denominator, and the first frame's."""

    numerator: np.ndarray
    denominator: np.ndarray
    first_numerator: np.ndarray
    first_denominator: np.ndarray
    reference_peak: float = float("nan")
    frames_seen: int = 0
    updates: int = 0

    def filter(self, first_weight: float, reg: float) -> np.ndarray:
        numerator = first_weight * self.first_numerator + (1 - first_weight) * self.numerator
        denominator = first_weight * self.first_denominator + (1 - first_weight) * self.denominator
        return numerator / (denominator + reg * float(np.mean(denominator)))[None]


@dataclass
class TrackState:
    """One target: its box, its model and the window geometry (fixed aspect, scaled with the target)."""

    box_xywh_px: np.ndarray
    model: TargetModel | None = None
    label: np.ndarray | None = None
    base_wh: np.ndarray = field(default_factory=lambda: np.zeros(2))
    scale: float = 1.0
    confidence: float = 1.0
    response: np.ndarray | None = None


def summary_feature(state: TrackState, side: int = RESPONSE_SIDE) -> np.ndarray:
    """What ROLO reads of a frame's target model: its response map over the search window (centred on the
    last position, relative to the running peak), area-resized to ``side x side``, flattened."""
    assert state.response is not None
    small = cv2.resize(state.response.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA)
    return small.reshape(-1)


class AdaptiveModel:
    """Fits, applies and updates target models (one per video) with one shared backbone."""

    def __init__(self, config: AdaptConfig = AdaptConfig(), backbone: Backbone | None = None,
                 weights: str | None = None, device: str = "cpu") -> None:
        self.config = config
        self.backbone = backbone or Backbone(config, weights, device)
        self.window_weights = _hann(config.cells)

    def _side(self, state: TrackState, factor: float = 1.0) -> float:
        wh = state.base_wh * state.scale
        return max(float(np.sqrt(wh[0] * wh[1])) * self.config.window * factor, 8.0)

    def _spectra(self, windows: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
        """The windows' feature maps (zero-mean, cosine-windowed) in the Fourier domain; ``masks`` (N, n, n)
        weight the training samples' cells (the target's region, see ``_target_mask``)."""
        maps = self.backbone(windows)
        maps = maps - maps.mean(axis=(2, 3), keepdims=True)
        weights = self.window_weights[None, None] if masks is None else masks[:, None]
        return np.fft.fft2(maps * weights, axes=(2, 3))

    def _target_mask(self, state: TrackState) -> np.ndarray:
        """Cell weights of a training window: 1 on the target's box (plus ``margin`` of its size each side),
        ``context`` on the background around it. Learning from the target's region alone keeps a static
        background (a fixed camera) from being what the filter finds."""
        n = self.config.cells
        half = state.base_wh * state.scale * n / self._side(state) * (0.5 + self.config.margin)
        offsets = np.arange(n) - (n - 1) / 2
        inside_x = np.clip(half[0] + 0.5 - np.abs(offsets), 0, 1)
        inside_y = np.clip(half[1] + 0.5 - np.abs(offsets), 0, 1)
        context = self.config.context
        return (context + (1 - context) * np.outer(inside_y, inside_x)).astype(np.float32) * self.window_weights

    def _first_windows(self, image: np.ndarray, state: TrackState, seed: int) -> np.ndarray:
        """The first frame's window and ``augment`` copies: slight scale change, blur, brightness, flip.
        ``seed`` comes from the frame itself, so a video is fitted alike in any batch."""
        centre = state.box_xywh_px[:2] + state.box_xywh_px[2:] / 2
        side = self._side(state)
        size = self.config.input_size
        windows = [crop_window(image, centre, side, size)]
        rng = np.random.default_rng(seed)
        for k in range(self.config.augment):
            window = crop_window(image, centre, side * rng.uniform(0.93, 1.07), size)
            kind = k % 3
            if kind == 0:
                window = cv2.GaussianBlur(window, (5, 5), rng.uniform(0.5, 1.5))
            elif kind == 1:
                window = np.clip(window.astype(np.float32) * rng.uniform(0.7, 1.3), 0, 255).astype(np.uint8)
            else:
                window = window[:, ::-1].copy()  # a mirrored target: symmetric under the centred label
            windows.append(window)
        return np.stack(windows)

    def init_many(self, images: list[np.ndarray], first_boxes: list[np.ndarray]) -> list[TrackState]:
        """Fit one target model per video from its first frame and box (one backbone call for all)."""
        states, windows = [], []
        for image, box in zip(images, first_boxes):
            box = np.asarray(box, float)
            state = TrackState(box.copy(), base_wh=np.maximum(box[2:], 2.0))
            states.append(state)
            windows.append(self._first_windows(image, state, seed=zlib.crc32(image[::8, ::8].tobytes())))
        if not states:
            return states
        per = 1 + self.config.augment
        masks = np.concatenate([np.repeat(self._target_mask(state)[None], per, axis=0) for state in states])
        spectra = self._spectra(np.concatenate(windows), masks)
        cells = self.config.cells
        for i, state in enumerate(states):
            x = spectra[i * per:(i + 1) * per]
            target_cells = state.base_wh * cells / self._side(state)
            state.label = _label(cells, np.maximum(target_cells * self.config.label_sigma, 0.5))
            numerator = (state.label[None, None] * np.conj(x)).mean(axis=0)
            denominator = (np.abs(x) ** 2).sum(axis=1).mean(axis=0)
            state.model = TargetModel(numerator, denominator, numerator.copy(), denominator.copy())
            state.response = np.fft.fftshift(np.real(np.fft.ifft2(state.label)))
        return states

    def step_many(self, images: list[np.ndarray], states: list[TrackState]) -> list[TrackState]:
        """Locate each target in its next frame (several scales, one backbone call for all videos), then
        update the models that are confident enough. Returns the same states, moved on."""
        if not states:
            return states
        config = self.config
        scales = config.scales
        windows = []
        for image, state in zip(images, states):
            centre = state.box_xywh_px[:2] + state.box_xywh_px[2:] / 2
            for factor in scales:
                windows.append(crop_window(image, centre, self._side(state, factor), config.input_size))
        spectra = self._spectra(np.stack(windows))
        cells = config.cells
        learn: list[tuple[TrackState, np.ndarray]] = []
        for i, (image, state) in enumerate(zip(images, states)):
            model = state.model
            assert model is not None and state.label is not None
            filt = model.filter(config.first_weight, config.reg)
            z = spectra[i * len(scales):(i + 1) * len(scales)]
            responses = np.real(np.fft.ifft2((filt[None] * z).sum(axis=1), axes=(1, 2)))
            peaks = [_peak(r) for r in responses]
            scored = [p[2] * (1.0 if f == 1.0 else config.scale_penalty) for p, f in zip(peaks, scales)]
            best = int(np.argmax(scored))
            dy, dx, value = peaks[best]
            factor = scales[best]
            model.frames_seen += 1
            reference = model.reference_peak if np.isfinite(model.reference_peak) else value
            state.confidence = float(np.clip(value / max(reference, 1e-9), 0, 1))
            state.response = np.fft.fftshift(responses[best]) / max(reference, 1e-9)
            if value < config.lost * reference:  # lost (hidden, or out of view): hold, do not follow the noise
                continue
            side = self._side(state, factor)
            centre = state.box_xywh_px[:2] + state.box_xywh_px[2:] / 2
            centre = centre + np.array([dx, dy]) * side / cells
            state.scale *= 1 + config.scale_rate * (factor - 1)
            wh = state.base_wh * state.scale
            state.box_xywh_px = np.concatenate([centre - wh / 2, wh])
            if value >= config.guard * reference:
                model.reference_peak = 0.9 * reference + 0.1 * value
                if config.update and model.frames_seen % config.interval == 0:
                    learn.append((state, crop_window(image, centre, self._side(state), config.input_size)))
        if learn:
            spectra = self._spectra(np.stack([w for _, w in learn]), np.stack([self._target_mask(s) for s, _ in learn]))
            rate = config.learning_rate
            for (state, _), x in zip(learn, spectra):
                model = state.model
                model.numerator = (1 - rate) * model.numerator + rate * state.label[None] * np.conj(x)
                model.denominator = (1 - rate) * model.denominator + rate * (np.abs(x) ** 2).sum(axis=0)
                model.updates += 1
        return states
