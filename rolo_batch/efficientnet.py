"""EfficientNet-Lite0 in plain torch: the network, its input normalisation, and its multi-stride feature maps.

The architecture is EfficientNet-B0's, made "Lite" for mobile hardware (Tan & Le 2019; the TensorFlow
``efficientnet-lite`` release): no squeeze-excitation, ReLU6 instead of swish, a fixed 32-channel stem and
1280-channel head. Layout, with the output stride of each stage for a ``(N, 3, H, W)`` input:

    stem   3x3 conv s2 -> 32, BN, ReLU6                                    stride 2
    stage  blocks  kernel  stride  expand  out                             output stride
      1      1       3       1       1      16   (blocks 0)                  2
      2      2       3       2       6      24   (blocks 1-2)                4
      3      2       5       2       6      40   (blocks 3-4)                8
      4      3       3       2       6      80   (blocks 5-7)               16
      5      3       5       1       6     112   (blocks 8-10)              16
      6      4       5       2       6     192   (blocks 11-14)             32
      7      1       3       1       6     320   (blocks 15)                32
    head   1x1 conv -> 1280, BN, ReLU6; global average pool; dropout; fc -> 1000 ImageNet logits

Each block (MBConv): 1x1 expand conv + BN + ReLU6 (absent when expand is 1), depthwise kxk conv (the block's
stride) + BN + ReLU6, 1x1 project conv + BN (linear), plus the input when the stride is 1 and widths match.
Convolutions have no bias; BatchNorm has eps 1e-3 (TensorFlow's). Padding is TensorFlow "SAME": output side
``ceil(side / stride)``, and on a stride-2 convolution the odd pixel of padding goes to the bottom/right.

Parameter names follow the weights file's (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``, ...), so the
ImageNet state dict loads as it is (``rolo_batch.efficientnet_weights.load_weights``).

Input: RGB scaled as ``(x - 127) / 128`` from 0-255 (``preprocess_bgr`` takes OpenCV's BGR uint8 frames).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rolo_batch.errors import ConfigError, InputError

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99; only matters when fine-tuning the statistics
INPUT_MEAN = 127.0  # on 0-255 RGB
INPUT_SCALE = 128.0
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
DROPOUT = 0.2


@dataclass(frozen=True)
class StageSpec:
    """One stage: ``repeats`` blocks of ``kernel``; the first has ``stride`` and widens to ``out_channels``."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block: widths in channels, depthwise ``kernel`` and ``stride``, ``expand`` ratio."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    expand: int


def block_specs(stages: Sequence[StageSpec] = STAGES) -> list[BlockSpec]:
    """The blocks of ``stages`` in order (16 for Lite0)."""
    specs, width = [], STEM_CHANNELS
    for stage in stages:
        for i in range(stage.repeats):
            specs.append(BlockSpec(width, stage.out_channels, stage.kernel, stage.stride if i == 0 else 1,
                                   stage.expand))
            width = stage.out_channels
    return specs


def _stride_ends(blocks: Sequence[BlockSpec]) -> dict[int, int]:
    """Output stride -> index of the last block at that stride (stride 2 counts the stem)."""
    ends, stride = {}, 2
    for i, block in enumerate(blocks):
        stride *= block.stride
        ends[stride] = i
    return ends


FEATURE_STRIDES: tuple[int, ...] = tuple(sorted(_stride_ends(block_specs())))  # (2, 4, 8, 16, 32)
FEATURE_CHANNELS: dict[int, int] = {s: block_specs()[i].out_channels for s, i in _stride_ends(block_specs()).items()}


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one side of ``size`` pixels: ``(before, after)``, the odd pixel after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SamePadConv2d(nn.Conv2d):
    """A ``Conv2d`` with TensorFlow "SAME" padding computed from each input's size (for strides above 1,
    where it is asymmetric). Construct it with ``padding=0`` (the default here)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def conv_same(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """A bias-free conv with "SAME" output size: static ``kernel // 2`` padding at stride 1 (identical to SAME
    for odd kernels), ``SamePadConv2d`` otherwise."""
    if stride == 1:
        return nn.Conv2d(in_channels, out_channels, kernel, 1, kernel // 2, groups=groups, bias=False)
    return SamePadConv2d(in_channels, out_channels, kernel, stride, 0, groups=groups, bias=False)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation: ``(N, in, H, W)`` -> ``(N, out, H/s, W/s)``."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        mid = spec.in_channels * spec.expand
        if spec.expand != 1:
            self._expand_conv = nn.Conv2d(spec.in_channels, mid, 1, bias=False)
            self._bn0 = batch_norm(mid)
        self._depthwise_conv = conv_same(mid, mid, spec.kernel, spec.stride, groups=mid)
        self._bn1 = batch_norm(mid)
        self._project_conv = nn.Conv2d(mid, spec.out_channels, 1, bias=False)
        self._bn2 = batch_norm(spec.out_channels)
        self._act = nn.ReLU6(inplace=True)
        self.spec = spec
        self.has_residual = spec.stride == 1 and spec.in_channels == spec.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._act(self._bn0(self._expand_conv(x))) if self.spec.expand != 1 else x
        h = self._act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.has_residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: ``(N, 3, H, W)`` normalised RGB (``preprocess_bgr``) -> ``(N, 1000)`` ImageNet
    logits; ``forward_features`` gives the maps at strides 2-32 instead. Any ``H, W`` >= 32 works (the
    ImageNet weights were trained at 224 x 224). Random weights until ``load_weights``."""

    def __init__(self) -> None:
        super().__init__()
        blocks = block_specs()
        self._conv_stem = conv_same(3, STEM_CHANNELS, 3, 2)
        self._bn0 = batch_norm(STEM_CHANNELS)
        self._act = nn.ReLU6(inplace=True)
        self._blocks = nn.ModuleList(MBConvBlock(spec) for spec in blocks)
        self._conv_head = nn.Conv2d(blocks[-1].out_channels, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = batch_norm(HEAD_CHANNELS)
        self._dropout = nn.Dropout(DROPOUT)
        self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)
        self._stride_ends = _stride_ends(blocks)

    def forward_features(self, x: torch.Tensor, strides: Sequence[int] = FEATURE_STRIDES) -> dict[int, torch.Tensor]:
        """Feature maps at the requested output ``strides`` (a subset of 2, 4, 8, 16, 32): stride ->
        ``(N, FEATURE_CHANNELS[stride], ceil(H / stride), ceil(W / stride))``, each the output of the last
        block at that stride (before the head). Stops after the deepest block needed."""
        wanted = set(strides)
        unknown = sorted(wanted - set(self._stride_ends))
        if unknown or not wanted:
            raise ConfigError(f"feature strides must be a non-empty subset of {FEATURE_STRIDES}, got {list(strides)}")
        ends = {self._stride_ends[s]: s for s in wanted}
        out: dict[int, torch.Tensor] = {}
        x = self._act(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks[:max(ends) + 1]):
            x = block(x)
            if i in ends:
                out[ends[i]] = x
        return out

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 320, h, w)`` stride-32 map -> ``(N, 1280, h, w)`` head activation (after ReLU6)."""
        return self._act(self._bn1(self._conv_head(x)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` -> ``(N, 1280)``: the globally pooled head activation (the classifier's input)."""
        return self.forward_head(self.forward_features(x, (32,))[32]).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` -> ``(N, 1000)`` ImageNet logits (softmax for probabilities)."""
        return self._fc(self._dropout(self.embed(x)))


def preprocess_bgr(frames: np.ndarray | Sequence[np.ndarray], *, channels_last: bool = False) -> torch.Tensor:
    """OpenCV frames -> the network's input.

    ``frames``: ``(N, H, W, 3)`` uint8 BGR array, or a sequence of ``(H, W, 3)`` uint8 BGR frames of one size.
    Returns ``(N, 3, H, W)`` float32 RGB, ``(x - 127) / 128`` (about -1 to 1), on the CPU. With
    ``channels_last`` the tensor keeps the frames' pixel-interleaved memory layout (no copy for the
    transpose; faster on CPUs with ``model.to(memory_format=torch.channels_last)``).
    """
    batch = _as_batch(frames)
    rgb = torch.from_numpy(np.ascontiguousarray(batch[..., ::-1])).permute(0, 3, 1, 2)
    out = rgb.to(torch.float32).sub_(INPUT_MEAN).div_(INPUT_SCALE)
    return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _as_batch(frames: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """``frames`` as one ``(N, H, W, 3)`` uint8 array; ``InputError`` naming what is wrong otherwise."""
    if not isinstance(frames, np.ndarray):
        frames = list(frames)
        shapes = {f.shape if isinstance(f, np.ndarray) else type(f).__name__ for f in frames}
        if len(shapes) > 1:
            raise InputError(f"frames must all have one shape to make a batch, got {sorted(map(str, shapes))}")
        frames = np.stack(frames) if frames else np.zeros((0, 1, 1, 3), np.uint8)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise InputError(f"frames must be an (N, H, W, 3) uint8 BGR array, got {frames.dtype} of shape "
                         f"{frames.shape}")
    return frames
