"""The detector: ROLO's YOLO v1 network in torch, its weights I/O, and the decoding of its output.

A ``YoloNet`` maps a batch of ``(N, 3, input_size, input_size)`` RGB images (float, 0-1) to two outputs:

- ``features`` ``(N, feature_dim)``: the activation of the last hidden fully-connected layer, after its leaky
  ReLU. For YOLO v1 small this is the 4096-d vector ROLO feeds its LSTM.
- ``head`` ``(N, S*S*(C + B*5))``: the raw detection output in darknet's YOLO v1 layout (``S`` = grid,
  ``B`` = boxes per cell, ``C`` = classes; cell ``i = row * S + col``, row-major from the top-left):

  1. ``head[:, :S*S*C]``, as ``(S*S, C)``: P(class | object) of each cell;
  2. ``head[:, S*S*C:S*S*(C+B)]``, as ``(S*S, B)``: the confidence of each of the cell's boxes;
  3. ``head[:, S*S*(C+B):]``, as ``(S*S, B, 4)``: ``x, y``, the box centre's offset within its cell (0-1 of a
     cell), and ``sqrt(w), sqrt(h)``, the square roots of the box size as fractions of the image size

  (the layout of darknet's ``[detection]`` layer with ``sqrt=1`` and of the YOLO_small TensorFlow port that
  ROLO used). ``decode`` turns it into boxes.

Which activation a ``Detector`` hands out as the frame's visual feature is its ``feature`` (``FeatureSpec``):
``"fc"``, that fully-connected vector (the paper's), or ``"map<N>"``, the activation map of the deepest
backbone convolution whose output is at least ``N`` x ``N``, flattened in (C, H, W) order. A map keeps where
things are in the frame, so ROLO can pool it inside each frame's detection box (``rolo_batch.rolo.roi_pool``);
the fully-connected vector mixes the whole frame together.

Input scaling is darknet's (0-1), the scaling Darknet weights were trained with. (The YOLO_small TensorFlow
port, whose features ROLO published, fed its converted weights -1 to 1 instead.)

Weights come from a file or URI in one of two formats, both read by ``build_detector``, which tells them apart
by content (a torch zip or pickle is a checkpoint; anything else is read as Darknet):

- the original Darknet ``.weights`` layout (header, then per conv layer biases and ``(out, in, k, k)``
  weights, per connected layer biases and ``(out, in)`` weights, all float32 little-endian);
- the project's checkpoint: ``torch.save`` of ``{"format": "rolo-batch-detector", "version": 1,
  "config": {...}, "state_dict": {...}}``, only ever read with ``torch.load(weights_only=True)``.

Nothing is downloaded. Random weights are given only to a caller that asks for them (``random_init=True``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import pickle
import re
import struct
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from rolo_batch import storage
from rolo_batch.errors import ConfigError, InputError

__all__ = [
    "CHECKPOINT_FORMAT", "FC_FEATURE", "PRESETS", "VOC_CLASSES", "ConvSpec", "Detector", "DetectorConfig",
    "DetectorOutput", "FeatureSpec", "PoolSpec", "YoloNet", "build_detector", "checkpoint_bytes", "decode",
    "detector_config", "detector_id", "feature_spec", "map_side",
    "init_weights", "load_darknet_weights", "looks_like_checkpoint", "make_net", "new_net", "nms_xyxy", "parse_layer",
    "resolve_device", "save_darknet_weights", "save_detector", "weighted_layers",
]

LEAKY_SLOPE = 0.1
CHECKPOINT_FORMAT = "rolo-batch-detector"
CHECKPOINT_VERSION = 1

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# --- layer specs -----------------------------------------------------------------------------------------

_LAYER_SPEC = re.compile(r"^(?P<filters>[1-9]\d*)x(?P<size>[1-9]\d*)(?:/(?P<stride>[1-9]\d*))?$")
MAXPOOL = "M"


@dataclass(frozen=True)
class ConvSpec:
    """A convolution with ``filters`` output channels, a ``size`` x ``size`` kernel, ``stride``, padding
    ``size // 2`` and a leaky ReLU (slope 0.1) after it, as darknet's ``pad=1``."""

    filters: int
    size: int
    stride: int = 1


@dataclass(frozen=True)
class PoolSpec:
    """A 2x2 max-pool, stride 2 (an odd input rounds up, as darknet and TensorFlow's ``SAME`` do)."""

    size: int = 2
    stride: int = 2


def parse_layer(spec: str) -> ConvSpec | PoolSpec:
    """``"64x7/2"`` -> 64 filters, 7x7 kernel, stride 2; ``"128x1"`` -> stride 1; ``"M"`` -> 2x2 max-pool."""
    if spec == MAXPOOL:
        return PoolSpec()
    match = _LAYER_SPEC.match(spec) if isinstance(spec, str) else None
    if not match:
        raise ConfigError(f"backbone layer {spec!r} is not understood: write '<filters>x<size>[/<stride>]' "
                          f"(e.g. '64x7/2', '128x1') or '{MAXPOOL}' for a 2x2 max-pool")
    return ConvSpec(int(match["filters"]), int(match["size"]), int(match["stride"] or 1))


def _output_side(side: int, layer: ConvSpec | PoolSpec) -> int:
    """The side of the square map ``layer`` makes from a ``side`` x ``side`` input."""
    if isinstance(layer, ConvSpec):
        pad = layer.size // 2
        return (side + 2 * pad - layer.size) // layer.stride + 1
    if side < layer.size:
        return 0
    return math.ceil((side - layer.size) / layer.stride) + 1


# --- which activation is the visual feature -------------------------------------------------------------

FC_FEATURE = "fc"
DARKNET = "darknet"
EFFICIENTNET = "efficientnet-lite0"
_MAP_FEATURE = re.compile(r"^map(?P<side>[1-9]\d*)$")


@dataclass(frozen=True)
class FeatureSpec:
    """Which activation of a detector is the frame's visual feature (see the module docstring).

    ``layer``: index into ``YoloNet.backbone`` of the chosen convolution's leaky ReLU (for an EfficientNet
    detector: the output stride of the chosen stage), None for the fully-connected feature. ``shape``:
    ``(C, H, W)`` of the map, None for the vector. ``size``: the length of the flattened feature
    (``feature_dim`` for ``"fc"``).
    """

    name: str
    size: int
    layer: int | None = None
    shape: tuple[int, int, int] | None = None

    @property
    def is_map(self) -> bool:
        return self.shape is not None


def map_side(feature: str) -> int | None:
    """The ``N`` of ``"map<N>"``, None for ``"fc"``; anything else is a ``ConfigError`` (checkable before
    the detector's config is known)."""
    if feature == FC_FEATURE:
        return None
    match = _MAP_FEATURE.match(feature) if isinstance(feature, str) else None
    if not match:
        raise ConfigError(f"feature {feature!r} is not understood: use 'fc' (the fully-connected feature) or "
                          f"'map<N>' (the deepest conv activation at least N x N, e.g. 'map16')")
    return int(match["side"])


def feature_spec(config: "DetectorConfig", feature: str = FC_FEATURE) -> FeatureSpec:
    """Resolve ``"fc"`` or ``"map<N>"`` for ``config``: the deepest backbone convolution whose output side is
    at least ``N`` (e.g. ``map16`` on a 128 px input whose 96-filter conv runs at 16 x 16 picks that conv).
    Larger ``N`` keeps finer positions and costs more storage (``C * H * W`` values per frame)."""
    wanted = map_side(feature)
    if wanted is None:
        return FeatureSpec(FC_FEATURE, config.feature_dim)
    if config.architecture == EFFICIENTNET:
        return _efficientnet_map_spec(config, feature, wanted)
    side, index, chosen = config.input_size, 0, None
    for layer in config.layers():
        side = _output_side(side, layer)
        if isinstance(layer, ConvSpec):
            if side >= wanted:
                chosen = FeatureSpec(feature, layer.filters * side * side, index + 1, (layer.filters, side, side))
            index += 2  # the conv and its leaky ReLU
        else:
            index += 1
    if chosen is None:
        raise ConfigError(f"feature {feature!r}: no convolution of {config.name} outputs a map of at least "
                          f"{wanted} x {wanted} (its {config.input_size} px input); ask for a smaller side")
    return chosen


def _efficientnet_map_spec(config: "DetectorConfig", feature: str, wanted: int) -> FeatureSpec:
    """``map<N>`` of an EfficientNet detector: the deepest stage output (``layer`` = its stride) at least N x N."""
    from rolo_batch import detector_efficientnet as effdet
    from rolo_batch.efficientnet import FEATURE_CHANNELS

    fitting = [(stride, side) for stride, side in effdet.map_sides(config.input_size).items() if side >= wanted]
    if not fitting:
        raise ConfigError(f"feature {feature!r}: {config.name} at {config.input_size} px has no map of at least "
                          f"{wanted} x {wanted}; ask for a smaller side")
    stride, side = max(fitting)
    channels = FEATURE_CHANNELS[stride]
    return FeatureSpec(feature, channels * side * side, stride, (channels, side, side))


# --- configuration ---------------------------------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


@dataclass(frozen=True)
class DetectorConfig:
    """A YOLO v1-family detector: architecture, and the thresholds its decoding uses.

    - ``input_size``: side of the square network input, pixels; frames are resized to it.
    - ``grid`` (S), ``boxes_per_cell`` (B), ``num_classes`` (C): the head has S*S*(C + B*5) outputs.
    - ``feature_dim`` (D): width of the last hidden fully-connected layer, the visual feature.
    - ``backbone``: the conv stack in order, ``"<filters>x<size>[/<stride>]"`` or ``"M"`` (2x2 max-pool);
      it must take ``input_size`` down to ``grid``.
    - ``fc_hidden``: widths of fully-connected layers between the flattened map and the feature layer.
    - ``dropout``: probability of the dropout before the head (training only).
    - ``conf_threshold``: a detection is kept when class prob * box confidence exceeds it; lower keeps more
      (and noisier) boxes. ``nms_iou``: a box overlapping a more confident one of its class by more than
      this IoU is dropped; higher keeps more overlapping boxes.
    - ``class_names``: one per class, or empty for ``class0, class1, ...``.
    - ``architecture``: ``"darknet"`` (the conv stack of ``backbone`` and fully-connected layers, YOLO v1's
      own) or ``"efficientnet-lite0"`` (``rolo_batch.detector_efficientnet``: the ImageNet-pretrained
      backbone under a convolutional head; ``backbone`` and ``fc_hidden`` are then empty, ``grid`` is
      ``ceil(input_size / 32)``, ``feature_dim`` is the head's hidden width). ``frozen_stages``: for
      ``efficientnet-lite0``, how many leading backbone parts (stem, stages 1-7, head conv) keep their
      ImageNet weights while training (0 for ``darknet``).

    The name appears in the detector id, which names an output folder: letters, digits and ``. _ + -``.
    """

    name: str
    input_size: int
    grid: int
    boxes_per_cell: int
    num_classes: int
    feature_dim: int
    backbone: tuple[str, ...]
    fc_hidden: tuple[int, ...] = ()
    dropout: float = 0.5
    conf_threshold: float = 0.2
    nms_iou: float = 0.5
    class_names: tuple[str, ...] = ()
    architecture: str = DARKNET
    frozen_stages: int = 0

    def __post_init__(self) -> None:
        for name in ("backbone", "fc_hidden", "class_names"):  # lists from JSON become tuples
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._check_name()
        for name in ("input_size", "grid", "boxes_per_cell", "num_classes", "feature_dim"):
            self._check_positive_int(name, getattr(self, name))
        if not isinstance(self.fc_hidden, tuple):
            self._fail(f"fc_hidden must be a list of layer widths, got {self.fc_hidden!r}")
        for width in self.fc_hidden:
            self._check_positive_int("fc_hidden", width)
        self._check_fraction("dropout", self.dropout, upper_open=True)
        self._check_fraction("conf_threshold", self.conf_threshold)
        self._check_fraction("nms_iou", self.nms_iou)
        if self.architecture == EFFICIENTNET:
            self._check_efficientnet()
        elif self.architecture == DARKNET:
            if self.frozen_stages != 0:
                self._fail(f"frozen_stages is for the {EFFICIENTNET} architecture; it must be 0 for {DARKNET}")
            self._check_backbone()
        else:
            self._fail(f"architecture must be {DARKNET!r} or {EFFICIENTNET!r}, got {self.architecture!r}")
        self._check_class_names()

    def _fail(self, message: str) -> None:
        raise ConfigError(f"detector config {self.name!r}: {message}")

    def _check_name(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"detector name {self.name!r} is not allowed: use letters, digits and . _ + - "
                              f"(starting with a letter or digit, at most 64 characters)")

    def _check_positive_int(self, name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self._fail(f"{name} must be a positive integer, got {value!r}")

    def _check_fraction(self, name: str, value: Any, *, upper_open: bool = False) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
        if not ok or (upper_open and value == 1.0):
            self._fail(f"{name} must be a number in [0, 1{')' if upper_open else ']'}, got {value!r}")

    def _check_backbone(self) -> None:
        if not isinstance(self.backbone, tuple) or not self.backbone:
            self._fail("backbone must be a non-empty list of layers such as ('64x7/2', 'M', ...)")
        layers = self.layers()
        if not any(isinstance(layer, ConvSpec) for layer in layers):
            self._fail("backbone needs at least one convolution")
        side = self.input_size
        for layer in layers:
            side = _output_side(side, layer)
            if side < 1:
                self._fail(f"backbone shrinks a {self.input_size} px input to nothing; use fewer "
                           f"stride-2 layers or a larger input_size")
        if side != self.grid:
            self._fail(f"backbone takes a {self.input_size} px input to a {side}x{side} map but grid is "
                       f"{self.grid}; change input_size, grid or the strided layers")

    def _check_efficientnet(self) -> None:
        from rolo_batch import detector_efficientnet as effdet

        if self.backbone or self.fc_hidden:
            self._fail(f"the {EFFICIENTNET} architecture has its own backbone: backbone and fc_hidden must be empty")
        if self.input_size < 32:
            self._fail(f"input_size must be at least 32 for {EFFICIENTNET}, got {self.input_size}")
        if self.grid != effdet.grid_for(self.input_size):
            self._fail(f"grid must be ceil(input_size / 32) = {effdet.grid_for(self.input_size)} for "
                       f"{EFFICIENTNET} at {self.input_size} px, got {self.grid}")
        parts = len(effdet.BACKBONE_PARTS)
        if isinstance(self.frozen_stages, bool) or not isinstance(self.frozen_stages, int) \
                or not 0 <= self.frozen_stages <= parts:
            self._fail(f"frozen_stages must be an integer from 0 (train all) to {parts} (freeze the whole "
                       f"backbone), got {self.frozen_stages!r}")

    def _check_class_names(self) -> None:
        names = self.class_names
        if names and (len(names) != self.num_classes or len(set(names)) != len(names)
                      or not all(isinstance(n, str) and n for n in names)):
            self._fail(f"class_names must be {self.num_classes} distinct non-empty names (or none), "
                       f"got {list(names)!r}")

    @property
    def pretrained(self) -> bool:
        """Whether the backbone starts from ImageNet weights (``efficientnet-lite0``)."""
        return self.architecture == EFFICIENTNET

    def layers(self) -> list[ConvSpec | PoolSpec]:
        """The backbone parsed, in order (empty for ``efficientnet-lite0``)."""
        return [parse_layer(spec) for spec in self.backbone]

    @property
    def head_size(self) -> int:
        """S*S*(C + B*5): length of the head output per image."""
        return self.grid * self.grid * (self.num_classes + self.boxes_per_cell * 5)

    @property
    def labels(self) -> tuple[str, ...]:
        """The class names, or ``class0, class1, ...`` when the config has none."""
        return self.class_names or tuple(f"class{i}" for i in range(self.num_classes))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): what the detector id hashes. Fields added after the first
        release are left out at their defaults, so a detector's id does not change with the code."""
        data = self.to_dict()
        for name, default in _LATER_FIELDS.items():
            if data[name] == default:
                del data[name]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DetectorConfig":
        """The inverse of ``to_dict``; unknown or missing keys are a ``ConfigError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown detector config keys {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"incomplete detector config: {exc}") from None


_LATER_FIELDS = {"architecture": DARKNET, "frozen_stages": 0}

# The network of ROLO: YOLO v1 "small" (darknet's yolo-small.cfg, ported to TensorFlow as YOLO_small, which
# ROLO used), layer for layer. Issue 3 says "24 conv + 2 max-pool stages"; the real network has 24
# convolutions and 4 max-pools (448 -> 224 by the first conv, four pools to 14, the stride-2 conv to 7), so
# this follows the real network.
_YOLO_V1_SMALL = DetectorConfig(
    name="yolo-v1-small",
    input_size=448,
    grid=7,
    boxes_per_cell=2,
    num_classes=20,
    feature_dim=4096,
    backbone=(
        "64x7/2", MAXPOOL,
        "192x3", MAXPOOL,
        "128x1", "256x3", "256x1", "512x3", MAXPOOL,
        *("256x1", "512x3") * 4, "512x1", "1024x3", MAXPOOL,
        *("512x1", "1024x3") * 2, "1024x3", "1024x3/2",
        "1024x3", "1024x3",
    ),
    fc_hidden=(512,),
    class_names=VOC_CLASSES,
)

# A small member of the same family for CPUs: 224 px; a stride-2 first conv (half the cost of conv + max-pool at
# full resolution), four narrow 3x3 convs with max-pools down to 7x7, a 1x1 conv to shrink the flattened map,
# one feature layer. Class-agnostic ("target") unless configured otherwise.
_YOLO_TINY = DetectorConfig(
    name="yolo-tiny",
    input_size=224,
    grid=7,
    boxes_per_cell=2,
    num_classes=1,
    feature_dim=256,
    backbone=("16x3/2", "32x3", MAXPOOL, "64x3", MAXPOOL, "128x3", MAXPOOL, "256x3", MAXPOOL, "64x1"),
    class_names=("target",),
)

# The pretrained detector (issue 16): EfficientNet-Lite0 with its ImageNet weights under a convolutional YOLO
# head, 256 px (an 8x8 grid), class-agnostic. Stem and stages 1-3 stay at their ImageNet weights; stages 4-7,
# the head conv and the YOLO head train. Feature maps: map16 is stage 5's 112 x 16 x 16 (stride 16).
# frozen_stages was chosen on real video without reading test frames (train on the first ninth of 14 sequences,
# AP@0.5 on the rest of their first third, 10 epochs): 9 (head only) 0.203, 6 0.504, 4 0.529; with augmentation
# strength 2: 6 0.544, 4 0.560.
_EFFICIENTNET_YOLO = DetectorConfig(
    name="efficientnet-yolo",
    input_size=256,
    grid=8,
    boxes_per_cell=2,
    num_classes=1,
    feature_dim=128,
    backbone=(),
    dropout=0.1,
    class_names=("target",),
    architecture=EFFICIENTNET,
    frozen_stages=4,
)

PRESETS: Mapping[str, DetectorConfig] = MappingProxyType(
    {c.name: c for c in (_YOLO_V1_SMALL, _YOLO_TINY, _EFFICIENTNET_YOLO)})


def detector_config(name: str, /, **overrides: Any) -> DetectorConfig:
    """The preset ``name`` with ``overrides`` applied (validated), e.g. ``detector_config("yolo-tiny",
    feature_dim=128)``; ``name=`` renames the variant. Changing ``num_classes`` without ``class_names`` drops
    the preset's class names."""
    if name not in PRESETS:
        raise ConfigError(f"unknown detector {name!r}; choose one of {sorted(PRESETS)}")
    known = {f.name for f in dataclasses.fields(DetectorConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown detector setting(s) {unknown}; known: {sorted(known)}")
    base = PRESETS[name]
    if "num_classes" in overrides and "class_names" not in overrides and overrides["num_classes"] != base.num_classes:
        overrides["class_names"] = ()
    return dataclasses.replace(base, **overrides)


# --- the network -----------------------------------------------------------------------------------------

class YoloNet(nn.Module):
    """YOLO v1-family network: ``backbone`` convs -> flatten (C, H, W order) -> ``fc_hidden`` -> feature
    layer -> dropout -> linear head.

    ``forward(x)``: ``x`` ``(N, 3, input_size, input_size)`` float RGB in 0-1; returns ``(features, head)``,
    ``(N, feature_dim)`` and ``(N, S*S*(C + B*5))`` in the layout the module docstring gives. Leaky ReLU 0.1
    after every conv and hidden FC, none after the head; no batch norm (YOLO v1 had none).
    Weights start with torch's default initialisation; ``init_weights`` gives a seeded one.
    """

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone, channels = _build_backbone(config)
        self.fc = _build_fc(channels * config.grid * config.grid, config)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, config.head_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.config.input_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise InputError(f"{self.config.name} expects a (N, 3, {size}, {size}) batch, got {tuple(x.shape)}")
        features = self.fc(self.backbone(x))
        return features, self.head(self.dropout(features))

    def forward_map(self, x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``forward``, but returns the activation after ``backbone[layer]`` ``(N, C, H, W)`` in place of
        the fully-connected feature (see ``feature_spec``): ``(map, head)``, one pass through the network."""
        size = self.config.input_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise InputError(f"{self.config.name} expects a (N, 3, {size}, {size}) batch, got {tuple(x.shape)}")
        if not 0 <= layer < len(self.backbone):
            raise ConfigError(f"backbone layer {layer} does not exist ({len(self.backbone)} layers)")
        activation = x
        for index, module in enumerate(self.backbone):
            x = module(x)
            if index == layer:
                activation = x
        return activation, self.head(self.dropout(self.fc(x)))


def _build_backbone(config: DetectorConfig) -> tuple[nn.Sequential, int]:
    """The conv stack and its number of output channels."""
    layers: list[nn.Module] = []
    channels = 3
    for spec in config.layers():
        if isinstance(spec, ConvSpec):
            layers.append(nn.Conv2d(channels, spec.filters, spec.size, spec.stride, padding=spec.size // 2))
            layers.append(nn.LeakyReLU(LEAKY_SLOPE))
            channels = spec.filters
        else:
            layers.append(nn.MaxPool2d(spec.size, spec.stride, ceil_mode=True))
    return nn.Sequential(*layers), channels


def _build_fc(flat: int, config: DetectorConfig) -> nn.Sequential:
    """Flatten, then each hidden FC and the feature FC, each with a leaky ReLU."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = flat
    for out in (*config.fc_hidden, config.feature_dim):
        layers += [nn.Linear(width, out), nn.LeakyReLU(LEAKY_SLOPE)]
        width = out
    return nn.Sequential(*layers)


def weighted_layers(net: YoloNet) -> list[nn.Conv2d | nn.Linear]:
    """The conv and fully-connected layers in network order: the order of a Darknet weights file."""
    return [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def init_weights(net: YoloNet, seed: int = 0) -> YoloNet:
    """Seeded random initialisation, without touching torch's global RNG: He-normal weights for the leaky
    layers, small normal weights for the head, zero biases. Returns ``net``. (An ``EfficientYoloNet`` gets
    He-normal convolutions and fresh BatchNorm everywhere: random, not ImageNet; see ``new_net``.)"""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if net.config.architecture == EFFICIENTNET:
        with torch.no_grad():
            for module in net.backbone.modules():
                if isinstance(module, nn.Conv2d):
                    values = torch.empty(module.weight.shape)
                    module.weight.copy_(nn.init.kaiming_normal_(values, mode="fan_out", generator=generator))
                elif isinstance(module, nn.BatchNorm2d):
                    module.reset_parameters()
        return net.init_head(seed)
    with torch.no_grad():
        for layer in weighted_layers(net):
            values = torch.empty(layer.weight.shape, dtype=torch.float32)
            if layer is net.head:
                nn.init.normal_(values, std=0.01, generator=generator)
            else:
                nn.init.kaiming_normal_(values, a=LEAKY_SLOPE, nonlinearity="leaky_relu", generator=generator)
            layer.weight.copy_(values)
            layer.bias.zero_()
    return net


def make_net(config: DetectorConfig) -> YoloNet:
    """The network ``config`` describes (``YoloNet`` or ``EfficientYoloNet``), with torch's default init."""
    if config.architecture == EFFICIENTNET:
        from rolo_batch.detector_efficientnet import EfficientYoloNet

        return EfficientYoloNet(config)
    return YoloNet(config)


def new_net(config: DetectorConfig, seed: int = 0, *, backbone_weights: str | None = None) -> YoloNet:
    """A network to train from: seeded random weights (``init_weights``), and for a pretrained architecture the
    ImageNet backbone (``backbone_weights``: None, the pinned package's file; or a state-dict URI) under a
    seeded fresh head."""
    if config.pretrained:
        return make_net(config).init_head(seed).load_backbone(backbone_weights)
    if backbone_weights is not None:
        raise ConfigError(f"backbone weights ({backbone_weights}) are for a pretrained architecture; "
                          f"{config.name} is {config.architecture}")
    return init_weights(_empty_net(config), seed)


def _empty_net(config: DetectorConfig) -> YoloNet:
    """A net with allocated but uninitialised CPU weights (no time spent on an init about to be overwritten)."""
    with torch.device("meta"):
        net = make_net(config)
    return net.to_empty(device="cpu")


# --- decoding --------------------------------------------------------------------------------------------

def decode(head: np.ndarray | torch.Tensor, config: DetectorConfig) -> list[np.ndarray]:
    """Detections from raw head outputs.

    ``head``: ``(N, S*S*(C + B*5))`` (or one image's ``(S*S*(C + B*5),)``) in darknet's YOLO v1 layout.
    Returns one float32 array per image, ``(K, 6)``: ``class_id, cx, cy, w, h, confidence``, the box as
    centre and size normalised to 0-1 of the image and clipped to it, confidence = class prob * box
    confidence. Kept: confidence > ``conf_threshold``, finite, non-empty after clipping, and not overlapping
    a more confident box of the same class by IoU > ``nms_iou``. Sorted by confidence, highest first.
    """
    arr = _as_head_array(head, config)
    n, s, b, c = arr.shape[0], config.grid, config.boxes_per_cell, config.num_classes
    cells = s * s
    class_probs = arr[:, :cells * c].reshape(n, cells, 1, c)
    box_conf = arr[:, cells * c:cells * (c + b)].reshape(n, cells, b, 1)
    raw = arr[:, cells * (c + b):].reshape(n, cells, b, 4)
    col = (np.arange(cells) % s).reshape(1, cells, 1)
    row = (np.arange(cells) // s).reshape(1, cells, 1)
    cx, cy = (raw[..., 0] + col) / s, (raw[..., 1] + row) / s
    w, h = raw[..., 2] ** 2, raw[..., 3] ** 2
    corners = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1).clip(0.0, 1.0)
    scores = class_probs * box_conf  # (N, cells, B, C)
    return [_select(corners[i], scores[i], config) for i in range(n)]


def _as_head_array(head: np.ndarray | torch.Tensor, config: DetectorConfig) -> np.ndarray:
    """``head`` as a float32 ``(N, head_size)`` numpy array, checked against ``config``."""
    if isinstance(head, torch.Tensor):
        head = head.detach().to("cpu", torch.float32).numpy()
    arr = np.asarray(head, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != config.head_size:
        raise ConfigError(f"a {config.name} head has {config.head_size} values per image "
                          f"(S={config.grid}, B={config.boxes_per_cell}, C={config.num_classes}), "
                          f"got an array of shape {arr.shape}")
    return arr


def _select(corners: np.ndarray, scores: np.ndarray, config: DetectorConfig) -> np.ndarray:
    """One image: ``corners`` ``(cells, B, 4)`` xyxy normalised, ``scores`` ``(cells, B, C)`` -> ``(K, 6)``."""
    area = (corners[..., 2] - corners[..., 0]) * (corners[..., 3] - corners[..., 1])
    usable = np.isfinite(corners).all(axis=-1) & (area > 0)
    keep = (scores > config.conf_threshold) & usable[..., None]
    cell, box, cls = np.nonzero(keep)
    if cell.size == 0:
        return np.zeros((0, 6), dtype=np.float32)
    xyxy = corners[cell, box].astype(np.float64)
    conf = scores[cell, box, cls].astype(np.float64)
    # Per-class NMS in one pass: shifting each class to its own region means boxes of different classes
    # never overlap (corners are within 0-1).
    kept = nms_xyxy(xyxy + 2.0 * cls[:, None], conf, config.nms_iou)
    xyxy, conf, cls = xyxy[kept], conf[kept], cls[kept]
    centre, size = (xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]
    return np.column_stack([cls, centre, size, conf]).astype(np.float32)


def nms_xyxy(boxes_xyxy: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression, class-agnostic.

    ``boxes_xyxy`` ``(K, 4)`` corners, ``scores`` ``(K,)``. Returns the indices kept, highest score first
    (ties in input order); a box is dropped when its IoU with a kept, higher-scored box exceeds
    ``iou_threshold``.
    """
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        kept.append(int(best))
        order = rest[_iou_one_to_many(boxes_xyxy[best], boxes_xyxy[rest]) <= iou_threshold]
    return np.asarray(kept, dtype=np.int64)


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box ``(4,)`` with ``(K, 4)`` xyxy boxes; 0 where the union is empty."""
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


# --- the detector ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DetectorOutput:
    """One batch: ``features`` ``(N, D)`` float32; ``detections``, per image, ``(K, 6)`` float32 rows of
    ``class_id, cx, cy, w, h, confidence`` (box normalised 0-1, see ``decode``)."""

    features: np.ndarray
    detections: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.features)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:<i>"`` as a ``torch.device``; ``ConfigError`` if it is not usable here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported: use 'cpu', 'cuda' or 'cuda:<index>'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA GPU here")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device {device!r} asked for, but only {count} CUDA GPU(s) are visible")
    return dev


class Detector:
    """A ``YoloNet`` in eval mode on a device, with its config and ``detector_id``. The net given is moved to
    the device and put in eval mode in place.

    ``detector_id`` is ``"<config name>-<12 hex>"``, the hex a SHA-256 of the config and of the weights as
    they were when the detector was made. ``feature`` (``"fc"`` or ``"map<N>"``, see ``feature_spec``) says
    which activation ``run`` returns as ``features``; ``features_id`` names the features it produces (the
    detector id, plus ``-map<N>`` for a map), so that features from different weights, configs or
    activations never mix.
    """

    def __init__(self, net: YoloNet, device: str | torch.device = "cpu", feature: str = FC_FEATURE) -> None:
        self.device = resolve_device(device)
        self.feature = feature_spec(net.config, feature)
        # On a CPU, channels-last (NHWC) convolutions are oneDNN's fast path (about 1.6x here).
        self._memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.net = net.to(self.device, memory_format=self._memory_format).eval()
        self.detector_id = detector_id(net.config, net.state_dict())

    @property
    def config(self) -> DetectorConfig:
        return self.net.config

    @property
    def features_id(self) -> str:
        """The detector id, with ``-<feature>`` appended for a feature map."""
        return self.detector_id if not self.feature.is_map else f"{self.detector_id}-{self.feature.name}"

    def __repr__(self) -> str:
        return f"Detector({self.features_id!r}, device={str(self.device)!r})"

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``images``: ``(H, W, 3)`` uint8 BGR frames of any sizes -> ``(N, 3, S, S)`` float32 RGB in 0-1 on
        the CPU, ``S`` = ``input_size`` (bilinear resize, aspect ratio not kept, as YOLO v1)."""
        size = self.config.input_size
        batch = np.empty((len(images), size, size, 3), dtype=np.uint8)
        for i, image in enumerate(images):
            _check_image(image, i)
            resized = cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=cv2.INTER_LINEAR)
            cv2.cvtColor(resized, cv2.COLOR_BGR2RGB, dst=batch[i])
        return torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)

    def infer(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Run the net on a preprocessed ``(N, 3, S, S)`` batch: ``(features (N, D), head (N, S*S*(C+B*5)))``,
        float32 numpy, head undecoded (``decode`` it, possibly on another thread). ``D`` is
        ``feature.size``: a map comes flattened in (C, H, W) order."""
        with torch.inference_mode():
            x = batch.to(self.device, memory_format=self._memory_format, non_blocking=True)
            if self.feature.is_map:
                activation, head = self.net.forward_map(x, self.feature.layer)
                features = activation.flatten(start_dim=1)  # (C, H, W) order whatever the memory format
            else:
                features, head = self.net(x)
            return features.float().cpu().numpy(), head.float().cpu().numpy()

    def warm_up(self, batch_size: int) -> None:
        """Run one batch of ``batch_size`` blank frames, so that the one-off costs of the first call (oneDNN or
        cuDNN kernel selection for this shape, memory pools) are not paid inside the first video's timing."""
        size = self.config.input_size
        self.run(torch.zeros((batch_size, 3, size, size)))  # returns numpy: the device has finished

    def run(self, batch: torch.Tensor) -> DetectorOutput:
        """Features and detections of a batch ``preprocess`` made, ``(N, 3, S, S)`` (``infer`` then ``decode``).

        Preprocessing apart lets a caller decode and resize the next frames on another thread meanwhile."""
        features, head = self.infer(batch)
        return DetectorOutput(features, decode(head, self.config))

    def __call__(self, images: Sequence[np.ndarray], *, batch_size: int = 16) -> DetectorOutput:
        """Features and detections of ``(H, W, 3)`` uint8 BGR frames, ``batch_size`` frames at a time."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        outputs = [self.run(self.preprocess(images[i:i + batch_size]))
                   for i in range(0, len(images), batch_size)]
        if not outputs:
            return DetectorOutput(np.zeros((0, self.feature.size), dtype=np.float32), [])
        return DetectorOutput(np.concatenate([o.features for o in outputs]),
                              [d for o in outputs for d in o.detections])


def _check_image(image: Any, index: int) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        what = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError(f"image {index} must be an (H, W, 3) uint8 BGR array, got a {what}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"image {index} is empty (shape {image.shape})")


def detector_id(config: DetectorConfig, state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"<name>-<12 hex>"``: SHA-256 over the canonical config JSON and every tensor of ``state_dict`` (name,
    shape, float32 little-endian bytes) in sorted key order. Equal weights give equal ids whatever file they
    came from."""
    digest = hashlib.sha256()

    def put(blob: bytes | memoryview) -> None:
        digest.update(len(blob).to_bytes(8, "little"))
        digest.update(blob)

    put(config.to_json().encode())
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu", torch.float32).contiguous()
        put(key.encode())
        put(json.dumps(list(tensor.shape)).encode())
        put(memoryview(np.ascontiguousarray(tensor.numpy(), dtype="<f4")).cast("B"))
    return f"{config.name}-{digest.hexdigest()[:12]}"


# --- weights: building a detector ------------------------------------------------------------------------

def build_detector(name_or_config: str | DetectorConfig | None, weights: str | None = None, *,
                   random_init: bool = False, seed: int = 0, device: str | torch.device = "cpu",
                   feature: str = FC_FEATURE) -> Detector:
    """A detector from a preset name or config and a weights file or URI.

    ``weights``: a local path, ``file://`` or ``s3://`` URI of a Darknet ``.weights`` file or a rolo-batch
    checkpoint (recognised by content). A checkpoint carries its own config: ``name_or_config`` may be None,
    and otherwise must agree with it. ``random_init=True`` (and no weights) gives seeded random weights.
    ``device``: ``"cpu"``, ``"cuda"`` or ``"cuda:<i>"``. ``feature``: the activation it hands out
    (``feature_spec``).
    Raises ``ConfigError`` for a bad request, ``InputError`` for a weights file that does not fit,
    ``StorageError`` when the file cannot be read.
    """
    resolve_device(device)
    if weights is None:
        if not random_init:
            raise ConfigError("no detector weights given: pass a weights URI (a Darknet .weights file or a "
                              "rolo-batch checkpoint), or ask for random initialisation explicitly "
                              "(random_init=True)")
        net = init_weights(_empty_net(_requested_config(name_or_config, needed_for="random weights")), seed)
        return Detector(net, device, feature)
    if random_init:
        raise ConfigError(f"both a weights URI ({weights}) and random_init=True given: choose one")
    data = storage.read_bytes(weights)
    if looks_like_checkpoint(data):
        config, state_dict = _read_checkpoint(data, weights)
        _check_requested(name_or_config, config, weights)
        net = _empty_net(config)
        _load_state_dict(net, state_dict, weights)
    else:
        net = _empty_net(_requested_config(name_or_config, needed_for=f"the Darknet weights {weights}"))
        load_darknet_weights(net, data, source=weights)
    return Detector(net, device, feature)


def _requested_config(name_or_config: str | DetectorConfig | None, *, needed_for: str) -> DetectorConfig:
    if isinstance(name_or_config, DetectorConfig):
        return name_or_config
    if isinstance(name_or_config, str):
        return detector_config(name_or_config)
    raise ConfigError(f"name the detector ({sorted(PRESETS)}) or give its config for {needed_for}")


def _check_requested(name_or_config: str | DetectorConfig | None, config: DetectorConfig, source: str) -> None:
    """A name or config given alongside a checkpoint must agree with the checkpoint's own config."""
    if name_or_config is None:
        return
    if isinstance(name_or_config, str):
        if name_or_config != config.name:
            raise ConfigError(f"{source} is a {config.name!r} checkpoint, not {name_or_config!r}; "
                              f"pass name {config.name!r} or none")
        return
    differing = [f.name for f in dataclasses.fields(config)
                 if getattr(config, f.name) != getattr(name_or_config, f.name)]
    if differing:
        raise ConfigError(f"{source}: the checkpoint's config differs from the one given in {differing}; "
                          f"pass its name or no config to use the checkpoint's")


def looks_like_checkpoint(data: bytes) -> bool:
    """Whether ``data`` is a ``torch.save`` file (zip archive, or legacy pickle) rather than Darknet weights."""
    return data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"


# --- weights: the project's checkpoint -------------------------------------------------------------------

def checkpoint_bytes(detector: Detector) -> bytes:
    """The detector as a rolo-batch checkpoint (``torch.save`` of config and CPU state dict)."""
    state_dict = {k: v.detach().to("cpu").clone() for k, v in detector.net.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "config": detector.config.to_dict(), "state_dict": state_dict}, buffer)
    return buffer.getvalue()


def save_detector(detector: Detector, uri: str) -> None:
    """Write ``detector`` as a rolo-batch checkpoint to ``uri`` (local path or URI), atomically."""
    storage.write_bytes(uri, checkpoint_bytes(detector))


def _read_checkpoint(data: bytes, source: str) -> tuple[DetectorConfig, dict[str, torch.Tensor]]:
    """Config and state dict of a checkpoint, loaded with ``weights_only=True`` (no code runs)."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError("refused to load: the checkpoint holds Python objects other than tensors and plain "
                         "containers, and checkpoints are only loaded with weights_only=True (no code runs); "
                         f"re-save it with rolo_batch.detector.save_detector ({_unpickler_reason(exc)})",
                         path=source) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise InputError(f"not a readable torch checkpoint: {_first_line(exc)}", path=source) from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"a torch file, but not a rolo-batch detector checkpoint (expected a dict with "
                         f"format={CHECKPOINT_FORMAT!r})", path=source)
    if obj.get("version") != CHECKPOINT_VERSION:
        raise InputError(f"checkpoint version {obj.get('version')!r} is not supported (this code reads "
                         f"version {CHECKPOINT_VERSION})", path=source)
    state_dict = obj.get("state_dict")
    if not isinstance(obj.get("config"), dict) or not isinstance(state_dict, dict):
        raise InputError("checkpoint lacks its 'config' or 'state_dict' dict", path=source)
    try:
        config = DetectorConfig.from_dict(obj["config"])
    except ConfigError as exc:
        raise InputError(f"checkpoint config is not valid: {exc}", path=source) from None
    return config, state_dict


def _unpickler_reason(exc: BaseException) -> str:
    """The one line of torch's weights-only refusal that names the offending object."""
    match = re.search(r"WeightsUnpickler error: ([^\n]*?\.)(?:\s|$)", str(exc))
    return match.group(1) if match else "it holds an object weights-only loading does not allow"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_state_dict(net: YoloNet, state_dict: Mapping[str, Any], source: str) -> None:
    """Copy ``state_dict`` into ``net`` after checking names and shapes; ``InputError`` names the culprit."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise InputError(f"checkpoint does not fit {net.config.name}: missing tensors {missing[:5]}, "
                         f"unexpected tensors {unexpected[:5]}", path=source)
    for key, target in expected.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(target.shape):
            found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise InputError(f"checkpoint does not fit {net.config.name}: tensor {key!r} should have shape "
                             f"{tuple(target.shape)}, the file has {found}", path=source)
    net.load_state_dict({k: v.to(torch.float32) for k, v in state_dict.items()}, strict=True)


# --- weights: Darknet ------------------------------------------------------------------------------------

def _require_darknet(config: DetectorConfig, what: str) -> None:
    if config.architecture != DARKNET:
        raise ConfigError(f"{what}: Darknet's weights layout holds only {DARKNET}-architecture networks, and "
                          f"{config.name} is {config.architecture}; use a rolo-batch checkpoint")


def _darknet_header(data: bytes, source: str) -> tuple[int, bool]:
    """Parse the header: ``(offset of the first float, whether FC weights are stored transposed)``.

    int32 major, minor, revision; then ``seen`` as int64 when ``major*10 + minor >= 2`` (and both < 1000),
    else int32. Darknet marks transposed connected weights with major or minor > 1000.
    """
    if len(data) < 16:
        raise InputError(f"too short for a Darknet weights file ({len(data)} bytes, the header alone is 16-20)",
                         path=source)
    major, minor, _revision = struct.unpack_from("<iii", data)
    wide_seen = major * 10 + minor >= 2 and major < 1000 and minor < 1000
    return (20 if wide_seen else 16), (major > 1000 or minor > 1000)


def load_darknet_weights(net: YoloNet, data: bytes, *, source: str = "<bytes>") -> None:
    """Copy Darknet ``.weights`` ``data`` into ``net`` (its conv and FC layers, in order).

    The file must hold exactly as many floats as the net has parameters; otherwise ``InputError`` gives
    expected and found counts and, for a short file, the layer where it runs out.
    """
    _require_darknet(net.config, f"Darknet weights ({source})")
    offset, transposed = _darknet_header(data, source)
    layers = weighted_layers(net)
    expected = sum(layer.weight.numel() + layer.bias.numel() for layer in layers)
    body = len(data) - offset
    found = body // 4
    if body % 4 or found != expected:
        raise InputError(_darknet_mismatch(net, layers, expected, body, offset), path=source)
    floats = np.frombuffer(data, dtype="<f4", count=found, offset=offset)
    position = 0
    with torch.no_grad():
        for layer in layers:
            position = _copy_in(layer.bias, floats, position)
            if isinstance(layer, nn.Linear) and transposed:
                out_features, in_features = layer.weight.shape
                chunk = floats[position:position + layer.weight.numel()].reshape(in_features, out_features)
                layer.weight.copy_(torch.from_numpy(np.array(chunk.T, dtype=np.float32)))
                position += layer.weight.numel()
            else:
                position = _copy_in(layer.weight, floats, position)


def _copy_in(param: torch.Tensor, floats: np.ndarray, position: int) -> int:
    end = position + param.numel()
    param.copy_(torch.from_numpy(np.array(floats[position:end], dtype=np.float32).reshape(param.shape)))
    return end


def _darknet_mismatch(net: YoloNet, layers: list[nn.Module], expected: int, body: int, offset: int) -> str:
    """The message for a Darknet file whose size does not fit ``net``."""
    convs = sum(isinstance(layer, nn.Conv2d) for layer in layers)
    found = body // 4
    message = (f"does not fit {net.config.name}: expected {expected:,} floats ({convs} conv + "
               f"{len(layers) - convs} connected layers) after the {offset}-byte header, the file has "
               f"{found:,}" + (f" and {body % 4} stray bytes" if body % 4 else ""))
    if found > expected:
        return message + f" ({found - expected:,} too many): is it the weights of another network or config?"
    total = 0
    for index, layer in enumerate(layers, start=1):
        total += layer.weight.numel() + layer.bias.numel()
        if total > found:
            return message + f"; it runs out in weighted layer {index} ({_describe(layer)})"
    return message


def _describe(layer: nn.Module) -> str:
    if isinstance(layer, nn.Conv2d):
        k = layer.kernel_size[0]
        return f"conv {layer.in_channels}->{layer.out_channels} {k}x{k}/{layer.stride[0]}"
    return f"connected {layer.in_features}->{layer.out_features}"


def save_darknet_weights(net: YoloNet, *, seen: int = 0) -> bytes:
    """``net``'s weights in Darknet's ``.weights`` layout: header major 0, minor 2, revision 0, ``seen`` as
    int64, then per layer float32 biases and weights."""
    _require_darknet(net.config, "the Darknet weights format")
    parts = [struct.pack("<iiiq", 0, 2, 0, seen)]
    with torch.no_grad():
        for layer in weighted_layers(net):
            for param in (layer.bias, layer.weight):
                parts.append(param.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return b"".join(parts)
