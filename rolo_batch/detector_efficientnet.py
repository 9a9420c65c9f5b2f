"""The pretrained detector: an ImageNet EfficientNet-Lite0 backbone under a convolutional YOLO v1 head.

``EfficientYoloNet`` is a drop-in for ``rolo_batch.detector.YoloNet`` (same ``forward``/``forward_map`` contract,
same head layout, same loss and decoding), built from a ``DetectorConfig`` whose ``architecture`` is
``"efficientnet-lite0"``:

    (N, 3, S, S) RGB 0-1 --> (x*255 - 127) / 128 --> EfficientNet-Lite0 stem, stages 1-7, head conv (1280 @ S/32)
        --> 3x3 conv to ``feature_dim`` + leaky ReLU (the "hidden" map; its global mean is the ``fc`` feature)
        --> dropout --> 1x1 conv to C + 5B per cell, rearranged into darknet's YOLO v1 layout (grid = S/32)

The head is convolutional rather than YOLO v1's fully-connected layers: each cell predicts from what it sees,
which is what a few thousand training frames can teach (a fully-connected head memorises where targets were).

``frozen_stages`` (config) keeps the first parts of the backbone at their ImageNet weights, in eval mode (their
BatchNorm statistics fixed) and without gradients: 0 trains everything; ``k`` freezes the first ``k`` of
``BACKBONE_PARTS`` (stem, stages 1-7, head conv). On a CPU, freezing most of it is what makes training
affordable, and with a few thousand frames it also keeps the ImageNet features from drifting.

Feature maps (``map<N>``): the output of the last block at an output stride of 2, 4, 8, 16 or 32 (``layer`` of
the ``FeatureSpec`` is that stride), ``FEATURE_CHANNELS[stride]`` channels at ``ceil(S / stride)`` per side.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from rolo_batch import efficientnet as eff
from rolo_batch import efficientnet_weights
from rolo_batch.errors import ConfigError, InputError

ARCHITECTURE = "efficientnet-lite0"
OUTPUT_STRIDE = 32
LEAKY_SLOPE = 0.1
# The parts ``frozen_stages`` counts, in network order: stem, the seven stages, the 1x1 head conv.
BACKBONE_PARTS = ("stem", *(f"stage{i}" for i in range(1, len(eff.STAGES) + 1)), "head_conv")


def grid_for(input_size: int) -> int:
    """The grid (cells per side) of a square ``input_size`` input: ``ceil(input_size / 32)``."""
    return math.ceil(input_size / OUTPUT_STRIDE)


def map_sides(input_size: int) -> dict[int, int]:
    """Output stride -> side of that feature map for a square ``input_size`` input (SAME padding: ceil)."""
    return {s: math.ceil(input_size / s) for s in eff.FEATURE_STRIDES}


def _stage_of_block() -> list[int]:
    """For each of the 16 blocks, its stage (1-7)."""
    return [stage for stage, spec in enumerate(eff.STAGES, start=1) for _ in range(spec.repeats)]


class EfficientYoloNet(nn.Module):
    """EfficientNet-Lite0 + convolutional YOLO v1 head (see the module docstring).

    ``forward(x)``: ``x`` ``(N, 3, S, S)`` float RGB in 0-1 -> ``(features (N, feature_dim), head (N, S'*S'*(C +
    B*5)))`` with ``S' = grid``, the head in darknet's layout (``rolo_batch.detector`` docstring). Random weights
    until ``load_backbone`` / a checkpoint."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.backbone = eff.EfficientNetLite0()
        del self.backbone._fc, self.backbone._dropout  # the ImageNet classifier is not part of the detector
        self.hidden = nn.Conv2d(eff.HEAD_CHANNELS, config.feature_dim, 3, padding=1)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Conv2d(config.feature_dim, config.num_classes + 5 * config.boxes_per_cell, 1)
        self._block_stage = _stage_of_block()
        self.freeze(config.frozen_stages)

    # --- freezing --------------------------------------------------------------------------------------

    def _frozen_modules(self, parts: int) -> list[nn.Module]:
        b = self.backbone
        modules: list[nn.Module] = [b._conv_stem, b._bn0] if parts >= 1 else []
        modules += [block for block, stage in zip(b._blocks, self._block_stage) if stage < parts]
        if parts >= len(BACKBONE_PARTS):
            modules += [b._conv_head, b._bn1]
        return modules

    def freeze(self, parts: int) -> None:
        """Fix the first ``parts`` of ``BACKBONE_PARTS``: no gradients, BatchNorm in eval mode."""
        self.frozen_parts = parts
        self._frozen = self._frozen_modules(parts)
        for module in self._frozen:
            for param in module.parameters():
                param.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "EfficientYoloNet":
        super().train(mode)
        for module in getattr(self, "_frozen", ()):
            module.eval()
        return self

    # --- forward ---------------------------------------------------------------------------------------

    def _maps(self, x: torch.Tensor, strides: Sequence[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Maps at ``strides`` and the 1280-channel head activation, the frozen prefix run without autograd."""
        size = self.config.input_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise InputError(f"{self.config.name} expects a (N, 3, {size}, {size}) batch, got {tuple(x.shape)}")
        b = self.backbone
        ends = {b._stride_ends[s]: s for s in strides}
        out: dict[int, torch.Tensor] = {}
        frozen = self.frozen_parts
        with torch.set_grad_enabled(torch.is_grad_enabled() and frozen < 1):
            x = b._act(b._bn0(b._conv_stem(x * (255.0 / eff.INPUT_SCALE) - eff.INPUT_MEAN / eff.INPUT_SCALE)))
        for i, (block, stage) in enumerate(zip(b._blocks, self._block_stage)):
            with torch.set_grad_enabled(torch.is_grad_enabled() and stage >= frozen):
                x = block(x)
            if i in ends:
                out[ends[i]] = x
        with torch.set_grad_enabled(torch.is_grad_enabled() and frozen < len(BACKBONE_PARTS)):
            top = b.forward_head(x)
        return out, top

    def _detect(self, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.act(self.hidden(top))
        cells = self.head(self.dropout(hidden))  # (N, C + 5B, S', S')
        n, c, b = cells.shape[0], self.config.num_classes, self.config.boxes_per_cell
        per_cell = cells.permute(0, 2, 3, 1).reshape(n, -1, c + 5 * b)  # (N, S'*S', C + 5B), row-major cells
        head = torch.cat([per_cell[..., :c].reshape(n, -1), per_cell[..., c:c + b].reshape(n, -1),
                          per_cell[..., c + b:].reshape(n, -1)], dim=1)
        return hidden.mean(dim=(2, 3)), head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, top = self._maps(x, ())
        return self._detect(top)

    def forward_map(self, x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(map at output stride layer (N, C, H, W), head)`` in one pass (``layer`` is a stride, 2-32)."""
        if layer not in eff.FEATURE_STRIDES:
            raise ConfigError(f"{self.config.name} has feature maps at strides {eff.FEATURE_STRIDES}, not {layer}")
        maps, top = self._maps(x, (layer,))
        return maps[layer], self._detect(top)[1]

    # --- weights ---------------------------------------------------------------------------------------

    def init_head(self, seed: int = 0) -> "EfficientYoloNet":
        """Seeded initialisation of the head (He-normal hidden conv, small normal output conv, zero biases),
        without touching torch's global RNG."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            for layer, std in ((self.hidden, None), (self.head, 0.01)):
                values = torch.empty(layer.weight.shape)
                if std is None:
                    nn.init.kaiming_normal_(values, a=LEAKY_SLOPE, nonlinearity="leaky_relu", generator=generator)
                else:
                    nn.init.normal_(values, std=std, generator=generator)
                layer.weight.copy_(values)
                layer.bias.zero_()
        return self

    def load_backbone(self, uri: str | None = None, *, sha256: str | None = None) -> "EfficientYoloNet":
        """Load EfficientNet-Lite0 ImageNet weights into the backbone (None: the pinned package's file, digest
        checked; or a state-dict file at ``uri``). The classifier (``_fc``) of the file is not used."""
        state = efficientnet_weights.read_weights(uri, sha256=sha256)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        problems = efficientnet_weights.fit_problems(self.backbone, state)
        if problems:
            source = uri if uri is not None else str(efficientnet_weights.default_weights_path())
            raise InputError("the weights do not fit EfficientNet-Lite0's backbone: " + "; ".join(problems),
                             path=source)
        self.backbone.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v
                                       for k, v in state.items()}, strict=True)
        return self

    def set_head_prior(self, mean_box_cxcywh_norm: Sequence[float]) -> None:
        """The head's biases as ``init_head_bias`` sets a YOLO v1 head's: boxes at their cell's centre with the
        mean training box's size, class probabilities ``1 / C``, confidences 0."""
        c, b = self.config.num_classes, self.config.boxes_per_cell
        with torch.no_grad():
            bias = self.head.bias
            bias[:c] = 1.0 / c
            bias[c:c + b] = 0.0
            coords = bias[c + b:].view(b, 4)
            coords[:, 0:2] = 0.5
            coords[:, 2] = math.sqrt(max(float(mean_box_cxcywh_norm[2]), 1e-4))
            coords[:, 3] = math.sqrt(max(float(mean_box_cxcywh_norm[3]), 1e-4))
