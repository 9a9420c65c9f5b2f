"""ROLO models (torch), their training objective, and the exported-model file.

Three forms share one interface: ``model(x)`` with ``x`` of shape ``(N, steps, D + 6)`` (per step the visual
feature ++ the detection ``(class_id, cx, cy, w, h, confidence)``) returns ``(N, 4)`` boxes ``cxcywh_norm`` for the
last step; ``model.sequence_outputs(x)`` returns the per-step training outputs the loss is taken on.
``model.stream(x_step, carry)`` runs one step ``(N, D + 6)`` from the LSTM state ``carry`` (None: a fresh
state) and returns that step's outputs and the state to carry to the next frame (see ``Carry``), so that
tracking can do one step per frame instead of re-reading a window.

- ``faithful``: the paper's network. One LSTM layer whose hidden size equals its input size ``D + 6``; the box is
  read from the four hidden units aligned with the detection's box in the input (units ``D+1 .. D+4``, the
  paper's ``pred[:, 4097:4101]``). About 134M parameters for ``D = 4096``. Training outputs are the raw hidden
  units (in (-1, 1)); ``forward`` clamps them to 0-1.
- ``compact`` (default): LayerNorm on the feature, a linear projection to ``projection_size``, concatenated with
  the detection, an LSTM (``hidden_size`` x ``num_layers``) and a linear head to 4. With ``box_head="residual"``
  (default) the head corrects the last step's detection box: box = detection + ``max_correction`` x tanh(head),
  or with ``box_head="relative"`` in units of the detection's own size (centre moved by up to
  ``max_correction`` of its width and height, width and height scaled by up to exp(+-``max_correction``)),
  the head starting at zero, so an untrained model reproduces YOLO-only and training learns only corrections,
  which carry over to positions the training frames never showed (an absolute box regressed from a few hundred
  windows does not: on the demo it lost a third of YOLO-only's success AUC). ``box_head="absolute"``: the box
  through a sigmoid, read off the hidden state alone.
- ``heatmap``: the compact trunk with a head to a ``heatmap_size``^2 location map (sigmoid: probability that the
  cell lies inside the target box, in normalised frame coordinates). Its LSTM also reads the detection's box
  rendered as a map of the same size, as the paper's heatmap network read YOLO's detection as a map: a box
  turned into a map is what makes a map easy to regress (with only the 6 numbers, a tiny model barely beats the
  mean map). The loss is on the map; boxes come from ``heatmap_to_box``.

The visual feature is either a vector (the detector's fully-connected feature, as in the paper) or, when
``feature_shape`` is set, a flattened conv activation map of the whole frame. A map is pooled inside each
step's detection box (``roi_pool``, as RoIAlign: ``roi_bins`` x ``roi_bins`` bilinear samples over the box
grown by ``roi_context``), so the compact and heatmap trunks see what the box holds: a box that is off shows
the target cut or shifted, which is what lets the residual head correct it. Training augmentation that jitters
the detection (``perturb_detections``) then moves the pooled feature with the box, as a detection that errs
would. A fully-connected vector does not move with the box; on frames the detector was trained on it encodes
the true box, so a model learns to read the box off it and fails on frames the detector never saw (on the
demo: success AUC 0.57 with the vector vs 0.60 for YOLO alone, 0.69 with the pooled map).

The loss is the paper's mean squared error on the normalised box (on the map for heatmaps), times
``loss_scale`` (the paper's 100), or a smooth L1; ``objective(model, batch)`` computes it apart from any loop.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rolo_batch import boxes, storage
from rolo_batch.errors import ConfigError, InputError

Form = Literal["faithful", "compact", "heatmap"]
LossKind = Literal["mse", "smooth_l1"]
BoxHead = Literal["residual", "relative", "absolute"]
BoxInput = Literal["absolute", "motion"]
DETECTION_SIZE = 6
BOX_UNITS = slice(1, 5)  # (cx, cy, w, h) inside the 6-d detection (class_id, cx, cy, w, h, confidence)
MODEL_FORMAT = "rolo-batch-model"
MODEL_VERSION = 2  # 2: compact models have box_head (version 1 files were all "absolute")


@dataclass(frozen=True)
class RoloConfig:
    """A ROLO network and its loss.

    ``feature_dim``: D, the visual feature size of ``detector_id``'s features (4096 for YOLO small). ``steps``:
    frames per training window. ``hidden_size``, ``num_layers``, ``projection_size``: the compact/heatmap LSTM
    (bigger fits more, costs memory and time; the faithful form ignores them). ``heatmap_size``: map side in
    cells. ``loss``: ``"mse"`` (the paper) or ``"smooth_l1"`` (``smooth_l1_beta`` in normalised units: errors
    below it are squared, above it linear, so outliers such as occlusions pull less). ``loss_scale``: factor
    on the loss (the paper's 100; with Adam it mostly matters for logging). ``dropout``: between LSTM layers.
    ``feature_dropout``: dropout on the visual feature in training (compact/heatmap), against a model that
    memorises features of the training frames. ``box_head``/``max_correction``: the compact form's box (see the
    module docstring; ``max_correction`` in normalised units). ``feature_shape``: ``(C, H, W)`` when the
    feature is a flattened activation map (``C * H * W == feature_dim``), pooled inside each step's detection
    box by the compact and heatmap forms (``roi_pool``): ``roi_bins`` samples per side (more keeps finer
    detail, and more weights in the projection), over the box grown by ``roi_context`` (> 1 shows the
    surroundings, where the part of the target a bad box misses lies). ``box_input``: what the compact and
    heatmap LSTMs read of each detection: its box in frame coordinates (``"absolute"``, the paper's input) or
    only how it moved since the window's previous step (``"motion"``: centre shift in units of the previous
    box, log size change; see ``motion_detection``), so that the model cannot learn where targets stand in the
    training videos.
    """

    form: Form = "compact"
    feature_dim: int = 4096
    steps: int = 6
    hidden_size: int = 256
    num_layers: int = 1
    projection_size: int = 256
    heatmap_size: int = 32
    loss: LossKind = "mse"
    loss_scale: float = 100.0
    smooth_l1_beta: float = 0.05
    dropout: float = 0.0
    feature_dropout: float = 0.0
    box_head: BoxHead = "residual"
    max_correction: float = 0.25
    detector_id: str = ""
    feature_shape: tuple[int, int, int] | None = None
    roi_bins: int = 4
    roi_context: float = 1.6
    box_input: BoxInput = "absolute"

    def __post_init__(self) -> None:
        if isinstance(self.feature_shape, list):  # from a model file or JSON
            object.__setattr__(self, "feature_shape", tuple(self.feature_shape))
        if self.form not in ("faithful", "compact", "heatmap"):
            raise ConfigError(f"form must be 'faithful', 'compact' or 'heatmap', got {self.form!r}")
        if self.loss not in ("mse", "smooth_l1"):
            raise ConfigError(f"loss must be 'mse' or 'smooth_l1', got {self.loss!r}")
        for name in ("feature_dim", "steps", "hidden_size", "num_layers", "projection_size", "roi_bins"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.heatmap_size, int) or self.heatmap_size < 2:
            raise ConfigError(f"heatmap_size must be an integer >= 2, got {self.heatmap_size!r}")
        if not self.loss_scale > 0 or not self.smooth_l1_beta > 0:
            raise ConfigError(f"loss_scale and smooth_l1_beta must be > 0, got {self.loss_scale!r}, "
                              f"{self.smooth_l1_beta!r}")
        for name in ("dropout", "feature_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.box_head not in ("residual", "relative", "absolute"):
            raise ConfigError(f"box_head must be 'residual', 'relative' or 'absolute', got {self.box_head!r}")
        if self.box_input not in ("absolute", "motion"):
            raise ConfigError(f"box_input must be 'absolute' or 'motion', got {self.box_input!r}")
        if self.box_input == "motion" and self.form == "faithful":
            raise ConfigError("the faithful form reads its box off the detection's input units; use box_input "
                              "'absolute' with it, or the compact or heatmap form")
        if not 0 < self.max_correction <= 1:
            raise ConfigError(f"max_correction must be in (0, 1], got {self.max_correction!r}")
        if not isinstance(self.detector_id, str):
            raise ConfigError(f"detector_id must be a string, got {self.detector_id!r}")
        if self.feature_shape is not None:
            shape = self.feature_shape
            if (not isinstance(shape, tuple) or len(shape) != 3
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
                raise ConfigError(f"feature_shape must be three positive integers (C, H, W), got {shape!r}")
            if shape[0] * shape[1] * shape[2] != self.feature_dim:
                raise ConfigError(f"feature_shape {shape} holds {shape[0] * shape[1] * shape[2]} values but "
                                  f"feature_dim is {self.feature_dim}")
            if self.form == "faithful":
                raise ConfigError("the faithful form reads a feature vector (its LSTM is as wide as its input); "
                                  "use the compact or heatmap form for feature maps, or extract --feature fc")
        if not self.roi_context >= 1:
            raise ConfigError(f"roi_context must be >= 1 (the box itself or more), got {self.roi_context!r}")

    @property
    def input_size(self) -> int:
        """Per-step input size: ``D + 6``."""
        return self.feature_dim + DETECTION_SIZE

    @property
    def visual_size(self) -> int:
        """Size of the visual vector the trunk projects: ``D``, or ``C * roi_bins^2`` for a feature map."""
        if self.feature_shape is None:
            return self.feature_dim
        return self.feature_shape[0] * self.roi_bins ** 2


# --- models ----------------------------------------------------------------------------------------------

Carry = dict[str, torch.Tensor]
"""A batch's LSTM state between two steps: ``h`` and ``c`` ``(N, layers, hidden)`` and ``previous``, the last
step's detection ``(N, 6)``; batch first, so that one video's state is a row (``carry_rows``, ``join_carries``)."""


def carry_rows(carry: Carry, index: int) -> Carry:
    """Row ``index`` of a batch's state (a batch of one)."""
    return {key: value[index:index + 1] for key, value in carry.items()}


def join_carries(carries: list[Carry]) -> Carry:
    """Several states (one per video) as one batch, in order."""
    return {key: torch.cat([c[key] for c in carries]) for key in carries[0]}


def _lstm_state(carry: Carry | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    if carry is None:
        return None
    return carry["h"].transpose(0, 1).contiguous(), carry["c"].transpose(0, 1).contiguous()


def _carry(state: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, feature_dim: int) -> Carry:
    return {"h": state[0].transpose(0, 1), "c": state[1].transpose(0, 1), "previous": x[:, -1, feature_dim:]}


class RoloModel(nn.Module):
    """Base of the three forms: ``forward`` gives last-step boxes; subclasses give per-step training outputs."""

    def __init__(self, config: RoloConfig) -> None:
        super().__init__()
        self.config = config

    def run(self, x: torch.Tensor, carry: Carry | None = None) -> tuple[torch.Tensor, Carry]:
        """Outputs per step of ``x`` ``(N, S, D + 6)`` from the state ``carry`` (None: fresh), and the state
        after the last step."""
        raise NotImplementedError

    def sequence_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Training outputs per step: ``(N, S, 4)`` boxes or ``(N, S, H, W)`` maps."""
        return self.run(x)[0]

    def stream(self, x_step: torch.Tensor, carry: Carry | None = None) -> tuple[torch.Tensor, Carry]:
        """One step ``(N, D + 6)`` from ``carry``: that step's outputs (``(N, 4)`` or ``(N, H, W)``; boxes via
        ``outputs_to_boxes``) and the state to pass with the next step."""
        outputs, carry = self.run(x_step[:, None], carry)
        return outputs[:, 0], carry

    def outputs_to_boxes(self, outputs: torch.Tensor) -> torch.Tensor:
        """``(..., 4)`` ``cxcywh_norm`` boxes in 0-1 from training outputs."""
        return outputs.clamp(0.0, 1.0)

    def step_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``(N, S)`` unscaled loss per step against ``(N, S, 4)`` ``cxcywh_norm`` targets."""
        return _elementwise_loss(outputs, targets, self.config).mean(dim=-1)

    def forward(self, x: torch.Tensor, *, sequence: bool = False) -> torch.Tensor:
        """``x`` (N, S, D + 6) float -> (N, 4) boxes ``cxcywh_norm`` (0-1) of the last step.

        ``sequence=True`` returns the per-step training outputs instead (``sequence_outputs``): the objective
        calls the model this way so that a DDP wrapper's forward, and with it gradient synchronisation, runs.
        """
        if sequence:
            return self.sequence_outputs(x)
        return self.outputs_to_boxes(self.sequence_outputs(x)[:, -1])

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[-1] != self.config.input_size or x.shape[1] < 1:
            raise InputError(f"ROLO input must have shape (N, steps, {self.config.input_size}) "
                             f"(D={self.config.feature_dim} feature ++ 6 detection), got {tuple(x.shape)}")


class FaithfulRolo(RoloModel):
    """The paper's ROLO: one LSTM layer, hidden size = input size, box read from hidden units ``D+1 .. D+4``."""

    def __init__(self, config: RoloConfig) -> None:
        super().__init__(config)
        self.lstm = nn.LSTM(config.input_size, config.input_size, num_layers=1, batch_first=True)
        start = config.feature_dim + BOX_UNITS.start
        self.box_units = slice(start, start + 4)

    def run(self, x: torch.Tensor, carry: Carry | None = None) -> tuple[torch.Tensor, Carry]:
        """``(N, S, 4)`` raw hidden units ``D+1 .. D+4`` per step (in (-1, 1))."""
        self._check_input(x)
        hidden, state = self.lstm(x, _lstm_state(carry))
        return hidden[..., self.box_units], _carry(state, x, self.config.feature_dim)


class _Trunk(nn.Module):
    """The visual vector (the feature, or a feature map pooled inside the step's detection box: ``roi_pool``)
    -> LayerNorm -> linear projection, ++ detection (++ the detection's box as a flattened map when
    ``detection_map``) -> LSTM: ``(N, S, D + 6)`` -> ``(N, S, hidden)``."""

    def __init__(self, config: RoloConfig, detection_map: bool = False) -> None:
        super().__init__()
        self.config = config
        self.feature_dim = config.feature_dim
        self.map_size = config.heatmap_size if detection_map else 0
        self.norm = nn.LayerNorm(config.visual_size)
        self.feature_dropout = nn.Dropout(config.feature_dropout)
        self.project = nn.Linear(config.visual_size, config.projection_size)
        self.lstm = nn.LSTM(config.projection_size + DETECTION_SIZE + self.map_size ** 2, config.hidden_size,
                            num_layers=config.num_layers, batch_first=True,
                            dropout=config.dropout if config.num_layers > 1 else 0.0)

    def visual(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, S, visual_size)``: the feature vector, or the map pooled inside each step's detection box."""
        feature, detection = x[..., :self.feature_dim], x[..., self.feature_dim:]
        shape = self.config.feature_shape
        if shape is None:
            return feature
        n, steps = x.shape[:2]
        pooled = roi_pool(feature.reshape(n * steps, *shape), detection[..., BOX_UNITS].reshape(n * steps, 4),
                          self.config.roi_bins, self.config.roi_context)
        return pooled.reshape(n, steps, -1)

    def forward(self, x: torch.Tensor, carry: Carry | None = None) -> tuple[torch.Tensor, Carry]:
        detection = x[..., self.feature_dim:]
        if self.config.box_input == "motion":
            read = motion_detection(detection, None if carry is None else carry["previous"])
        else:
            read = detection
        parts = [self.project(self.feature_dropout(self.norm(self.visual(x)))), read]
        if self.map_size:
            parts.append(box_to_heatmap(detection[..., BOX_UNITS], self.map_size).flatten(start_dim=-2))
        hidden, state = self.lstm(torch.cat(parts, dim=-1), _lstm_state(carry))
        return hidden, _carry(state, x, self.feature_dim)


class CompactRolo(RoloModel):
    """Projection, a smaller LSTM and a linear box head: a bounded correction of each step's detection box
    (``box_head="residual"``, starting at zero) or a box through a sigmoid (``"absolute"``); boxes in 0-1."""

    def __init__(self, config: RoloConfig) -> None:
        super().__init__(config)
        self.trunk = _Trunk(config)
        self.head = nn.Linear(config.hidden_size, 4)
        if config.box_head in ("residual", "relative"):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def run(self, x: torch.Tensor, carry: Carry | None = None) -> tuple[torch.Tensor, Carry]:
        """``(N, S, 4)`` boxes ``cxcywh_norm`` per step."""
        self._check_input(x)
        hidden, carry = self.trunk(x, carry)
        return self._boxes(self.head(hidden), x), carry

    def _boxes(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.config.box_head == "absolute":
            return torch.sigmoid(out)
        detection_box = x[..., self.config.feature_dim + BOX_UNITS.start:self.config.feature_dim + BOX_UNITS.stop]
        correction = self.config.max_correction * torch.tanh(out)
        if self.config.box_head == "relative":  # in units of the box: the same for a small and a large target
            size = detection_box[..., 2:]
            return torch.cat([detection_box[..., :2] + correction[..., :2] * size,
                              size * torch.exp(correction[..., 2:])], dim=-1).clamp(0.0, 1.0)
        return (detection_box + correction).clamp(0.0, 1.0)


class HeatmapRolo(RoloModel):
    """The compact trunk (its input also holding the detection as a map) with a head to a ``heatmap_size``^2
    location map; boxes via ``heatmap_to_box``."""

    def __init__(self, config: RoloConfig) -> None:
        super().__init__(config)
        self.trunk = _Trunk(config, detection_map=True)
        self.head = nn.Linear(config.hidden_size, config.heatmap_size ** 2)

    def run(self, x: torch.Tensor, carry: Carry | None = None) -> tuple[torch.Tensor, Carry]:
        """``(N, S, H, W)`` probabilities (0-1) that each cell lies inside the target box."""
        self._check_input(x)
        size = self.config.heatmap_size
        hidden, carry = self.trunk(x, carry)
        logits = self.head(hidden)
        return torch.sigmoid(logits).reshape(*logits.shape[:-1], size, size), carry

    def heatmaps(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, H, W)`` location maps of the last step (probabilities; rows = y, columns = x)."""
        return self.sequence_outputs(x)[:, -1]

    def outputs_to_boxes(self, outputs: torch.Tensor) -> torch.Tensor:
        return heatmap_to_box(outputs.detach())

    def step_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        target_maps = box_to_heatmap(targets, self.config.heatmap_size).to(outputs.dtype)
        return _elementwise_loss(outputs, target_maps, self.config).flatten(start_dim=2).mean(dim=-1)


def motion_detection(detection: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """``(N, S, 6)`` detections -> the same with the box replaced by its motion since the previous step:
    ``(class_id, dx / w', dy / h', log(w / w'), log(h / h'), confidence)`` where ``'`` is the previous step
    (``previous`` ``(N, 6)`` before the first step; without it the first step has no motion). Nothing in it
    says where in the frame the box is, or how large."""
    box = detection[..., BOX_UNITS]
    before = box[:, :1] if previous is None else previous[:, None, BOX_UNITS].to(box.dtype)
    box_before = torch.cat([before, box[:, :-1]], dim=1)
    size = box[..., 2:].clamp_min(1e-4)
    previous_centre = box_before[..., :2]
    previous_size = box_before[..., 2:].clamp_min(1e-4)
    motion = torch.cat([(box[..., :2] - previous_centre) / previous_size, torch.log(size / previous_size)], dim=-1)
    return torch.cat([detection[..., :1], motion, detection[..., 5:]], dim=-1)


def roi_pool(maps: torch.Tensor, boxes_cxcywh_norm: torch.Tensor, bins: int = 4, context: float = 1.6
             ) -> torch.Tensor:
    """What each map shows inside its box, as RoIAlign: ``(N, C * bins * bins)``.

    ``maps`` ``(N, C, H, W)``: activation maps covering the whole frame (rows top to bottom);
    ``boxes_cxcywh_norm`` ``(N, 4)``: one box per map, normalised to 0-1 of the frame. The box, grown
    ``context`` times about its centre, is cut into ``bins`` x ``bins`` cells; each cell's value is the mean of
    2 x 2 bilinear samples of the map (a map pixel covers ``1/W`` x ``1/H`` of the frame; outside the frame
    the map is 0). Differentiable in the maps; the boxes only choose where to look. Output order: channel,
    then cell row, then cell column.
    """
    if maps.ndim != 4 or tuple(boxes_cxcywh_norm.shape) != (len(maps), 4):
        raise InputError(f"roi_pool needs maps (N, C, H, W) and boxes (N, 4), got {tuple(maps.shape)} and "
                         f"{tuple(boxes_cxcywh_norm.shape)}")
    n, samples = len(maps), 2 * bins
    offsets = (torch.arange(samples, dtype=maps.dtype, device=maps.device) + 0.5) / samples - 0.5
    boxes = boxes_cxcywh_norm.to(maps.dtype)
    x = boxes[:, 0:1] + offsets[None, :] * boxes[:, 2:3] * context  # (N, samples), 0-1 of the frame
    y = boxes[:, 1:2] + offsets[None, :] * boxes[:, 3:4] * context
    grid = torch.stack([x[:, None, :].expand(n, samples, samples), y[:, :, None].expand(n, samples, samples)],
                       dim=-1)
    # grid_sample's -1 and 1 are the outer edges of the corner pixels (align_corners=False): the frame's edges
    sampled = F.grid_sample(maps, grid * 2 - 1, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.avg_pool2d(sampled, 2).flatten(start_dim=1)


def build_model(config: RoloConfig) -> RoloModel:
    """A freshly initialised model of ``config.form``."""
    if config.form == "faithful":
        return FaithfulRolo(config)
    if config.form == "heatmap":
        return HeatmapRolo(config)
    return CompactRolo(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _elementwise_loss(pred: torch.Tensor, target: torch.Tensor, config: RoloConfig) -> torch.Tensor:
    if config.loss == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none", beta=config.smooth_l1_beta)
    return F.mse_loss(pred, target, reduction="none")


# --- heatmaps --------------------------------------------------------------------------------------------

def box_to_heatmap(boxes_cxcywh_norm: torch.Tensor | np.ndarray, size: int = 32) -> torch.Tensor | np.ndarray:
    """Target maps ``(..., size, size)`` (rows = y, columns = x) from boxes ``(..., 4)`` ``cxcywh_norm``.

    A cell is 1 when its centre lies inside the box (edges included), else 0. Along an axis where the box
    covers no cell centre (thinner than a cell), the cell holding the box centre counts as covered, so a small
    box still marks its place. numpy in, numpy out.
    """
    as_numpy = isinstance(boxes_cxcywh_norm, np.ndarray)
    b = torch.as_tensor(boxes_cxcywh_norm, dtype=torch.float32)
    cx, cy, w, h = b.unbind(dim=-1)
    inside_y, inside_x = _covered_cells(cy, h, size), _covered_cells(cx, w, size)
    maps = (inside_y[..., :, None] & inside_x[..., None, :]).float()
    return maps.numpy() if as_numpy else maps


def _covered_cells(centre: torch.Tensor, extent: torch.Tensor, size: int) -> torch.Tensor:
    """``(..., size)`` bool: cells along one axis whose centre lies in ``centre +- extent / 2`` (normalised);
    the cell holding ``centre`` where no cell centre does."""
    centres = (torch.arange(size, dtype=torch.float32, device=centre.device) + 0.5) / size
    inside = (centres >= (centre - extent / 2)[..., None]) & (centres <= (centre + extent / 2)[..., None])
    own = torch.arange(size, device=centre.device) == (centre.clamp(0, 1 - 1e-6) * size).long()[..., None]
    return inside | (own & ~inside.any(dim=-1, keepdim=True))


def heatmap_to_box(maps: torch.Tensor | np.ndarray, threshold: float = 0.5) -> torch.Tensor | np.ndarray:
    """Boxes ``(..., 4)`` ``cxcywh_norm`` from location maps ``(..., H, W)`` (values 0-1, rows = y).

    The box is the bounding box (cell edges) of the largest 8-connected region of cells ``>= threshold``.
    Where no cell passes, it falls back to the map's weighted moments: centre = mean, size from the variance
    per axis (exact for a uniform box of whole cells; an all-zero map gives the whole frame). Vectorised over
    the batch. numpy in, numpy out.
    """
    as_numpy = isinstance(maps, np.ndarray)
    m = torch.as_tensor(maps, dtype=torch.float32)
    lead, (height, width) = m.shape[:-2], m.shape[-2:]
    flat = m.reshape(-1, height, width)
    region = _largest_region(flat >= threshold)
    out = torch.where(region.flatten(1).any(dim=1)[:, None], _region_box(region), _moment_box(flat))
    out = out.reshape(*lead, 4)
    return out.numpy() if as_numpy else out


def _largest_region(foreground: torch.Tensor) -> torch.Tensor:
    """``(N, H, W)`` bool: the largest 8-connected component of each map (ties: the first in raster order)."""
    n, height, width = foreground.shape
    zero = torch.zeros((), device=foreground.device)
    ids = torch.arange(1, height * width + 1, dtype=torch.float32, device=foreground.device)
    labels = torch.where(foreground, ids.reshape(1, height, width), zero)
    # Every cell ends up labelled with the largest cell id (1-based) of its component: spread the maximum to
    # neighbours, then jump to the label of the cell one's label names (same component, never smaller), which
    # shortens long thin components from O(length) rounds to about O(log length).
    for _ in range(height * width):
        spread = torch.where(foreground, F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0], zero)
        flat = spread.flatten(1)
        jumped = torch.where(flat > 0, flat.gather(1, (flat.long() - 1).clamp(min=0)), flat)
        jumped = torch.maximum(jumped, flat).reshape(n, height, width)
        if torch.equal(jumped, labels):
            break
        labels = jumped
    index = labels.flatten(1).long()
    sizes = torch.zeros(n, height * width + 1, device=foreground.device).scatter_add_(
        1, index, torch.ones_like(index, dtype=torch.float32))
    sizes[:, 0] = 0
    best = sizes.argmax(dim=1)
    return (labels == best[:, None, None].float()) & foreground


def _region_box(region: torch.Tensor) -> torch.Tensor:
    """``(N, 4)`` ``cxcywh_norm`` bounding box of the cells in each ``(N, H, W)`` mask (garbage where empty)."""
    _, height, width = region.shape
    x1, x2 = _extent(region.any(dim=1), width)
    y1, y2 = _extent(region.any(dim=2), height)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=1)


def _extent(occupied: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last occupied cell of ``(N, size)`` as normalised edges (left edge, right edge)."""
    index = torch.arange(size, device=occupied.device, dtype=torch.float32)
    first = torch.where(occupied, index, torch.full_like(index, size)).amin(dim=1)
    last = torch.where(occupied, index, torch.full_like(index, -1)).amax(dim=1)
    return first / size, (last + 1) / size


def _moment_box(maps: torch.Tensor) -> torch.Tensor:
    """``(N, 4)`` ``cxcywh_norm`` box from weighted moments of ``(N, H, W)`` maps (uniform where all zero)."""
    _, height, width = maps.shape
    weights = maps.clamp(min=0)
    weights = torch.where(weights.flatten(1).sum(1)[:, None, None] > 0, weights, torch.ones_like(weights))
    weights = weights / weights.flatten(1).sum(1)[:, None, None]
    xs = (torch.arange(width, device=maps.device, dtype=torch.float32) + 0.5) / width
    ys = (torch.arange(height, device=maps.device, dtype=torch.float32) + 0.5) / height
    px, py = weights.sum(dim=1), weights.sum(dim=2)  # marginals over x (N, W) and y (N, H)
    cx, cy = (px * xs).sum(1), (py * ys).sum(1)
    # k uniform cells of size 1/S have variance (k^2 - 1) / (12 S^2): add the 1/S^2 back to get k/S exactly.
    w = (12 * (px * (xs - cx[:, None]) ** 2).sum(1) + width ** -2).sqrt().clamp(max=1)
    h = (12 * (py * (ys - cy[:, None]) ** 2).sum(1) + height ** -2).sqrt().clamp(max=1)
    return torch.stack([cx, cy, w, h], dim=1)


# --- objective -------------------------------------------------------------------------------------------

def objective(model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch and its metrics, apart from any loop.

    ``model``: a ``RoloModel``, or a wrapper holding it in ``.module`` (DistributedDataParallel), which is
    called (``model(inputs, sequence=True)``) so that its hooks run.

    ``batch``: ``inputs`` (N, S, D + 6) float; either ``step_targets`` (N, S, 4) ``cxcywh_norm`` with
    ``step_mask`` (N, S) (loss on every masked step), or ``targets`` (N, 4) with optional ``weights`` (N,)
    (loss on the last step, weighted). Other keys (``video``, ``last_frame``) are ignored; numpy is accepted.
    The loss is ``loss_scale`` x the masked (weighted) mean over supervised steps of the per-step loss; a batch
    with nothing supervised gives a zero loss still connected to every parameter.
    Metrics: ``loss``, ``mean_iou`` (predicted vs target boxes over supervised steps, xywh in a unit frame),
    ``iou_sum`` and ``num_targets`` (to aggregate over batches).
    """
    inner: RoloModel = getattr(model, "module", model)  # DDP keeps the model in .module
    inputs, targets, weights = _batch_tensors(batch, next(inner.parameters()).device)
    outputs = model(inputs, sequence=True)
    per_step = inner.step_loss(outputs, targets)
    loss = inner.config.loss_scale * (per_step * weights).sum() / weights.sum().clamp(min=1e-12)
    with torch.no_grad():
        supervised = weights > 0
        ious = box_iou_cxcywh(inner.outputs_to_boxes(outputs[supervised]), targets[supervised])
    count = int(supervised.sum())
    return loss, {"loss": float(loss.detach()), "mean_iou": float(ious.mean()) if count else 0.0,
                  "iou_sum": float(ious.sum()), "num_targets": count}


def perturb_detections(inputs: torch.Tensor, feature_dim: int, *, jitter: float = 0.0, drop: float = 0.0,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Training augmentation of the detection input: a copy of ``inputs`` (N, S, D + 6) whose detection boxes
    are jittered and sometimes lost, the way they err on frames the detector never saw.

    Each step's centre moves by ``jitter`` x its size x N(0, 1) per axis and its size scales by
    exp(``jitter`` x N(0, 1)); with probability ``drop`` a step (never the first) loses its detection, entering
    as a missed one does in tracking: the previous step's box with confidence 0. Boxes stay in 0-1; the
    features and the targets are untouched. Why: the detector is trained on the frames ROLO trains on, so
    there its boxes are better than on test frames, and a model trained on them alone learns to trust them.
    """
    if jitter < 0 or not 0 <= drop < 1:
        raise ConfigError(f"jitter must be >= 0 and drop in [0, 1), got {jitter!r}, {drop!r}")
    out = inputs.clone()
    if jitter == 0 and drop == 0:
        return out
    det = out[..., feature_dim:]  # a view: edits land in ``out``
    present = det[..., 5:6] > 0
    noise = torch.randn(det.shape[:-1] + (4,), generator=generator, device=det.device).to(det.dtype) * jitter
    size = det[..., 3:5]
    moved = torch.cat([det[..., 1:3] + noise[..., :2] * size, size * noise[..., 2:].exp()], dim=-1)
    det[..., 1:5] = torch.where(present, moved.clamp(0.0, 1.0), det[..., 1:5])
    if drop > 0:
        lost = torch.rand(det.shape[:-1], generator=generator, device=det.device) < drop
        lost[:, 0] = False
        for step in range(1, det.shape[1]):
            rows = lost[:, step]
            det[rows, step, 1:5] = det[rows, step - 1, 1:5]
            det[rows, step, 5] = 0.0
    return out


def _batch_tensors(batch: Mapping[str, Any], device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``inputs`` (N, S, D+6), per-step ``targets`` (N, S, 4) (zeros where unsupervised), ``weights`` (N, S)."""
    inputs = torch.as_tensor(batch["inputs"], dtype=torch.float32, device=device)
    n, steps = inputs.shape[:2]
    if "step_mask" in batch:
        weights = torch.as_tensor(batch["step_mask"], device=device).to(torch.float32)
        targets = torch.as_tensor(batch["step_targets"], dtype=torch.float32, device=device)
    else:
        last = torch.as_tensor(batch["targets"], dtype=torch.float32, device=device)
        raw = batch.get("weights")
        last_weight = torch.ones(n, device=device) if raw is None else \
            torch.as_tensor(raw, dtype=torch.float32, device=device)
        weights = torch.zeros(n, steps, device=device)
        weights[:, -1] = last_weight
        targets = torch.zeros(n, steps, 4, device=device)
        targets[:, -1] = last
    if targets.shape != (n, steps, 4) or weights.shape != (n, steps):
        raise InputError(f"batch targets {tuple(targets.shape)} / mask {tuple(weights.shape)} do not match "
                         f"inputs {tuple(inputs.shape)}")
    # An unsupervised step may hold anything (NaN): zero it so that nothing reaches the loss or its gradient.
    targets = torch.where(weights[..., None] > 0, targets, torch.zeros((), device=device))
    return inputs, targets, weights


def box_iou_cxcywh(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise IoU of ``(M, 4)`` ``cxcywh_norm`` boxes, via ``rolo_batch.boxes.iou_xywh`` in a unit frame."""
    if len(a) == 0:
        return torch.zeros(0)
    unit = (1.0, 1.0)
    ious = boxes.iou_xywh(boxes.cxcywh_norm_to_xywh_px(a.detach().cpu().double().numpy(), unit),
                          boxes.cxcywh_norm_to_xywh_px(b.detach().cpu().double().numpy(), unit))
    return torch.as_tensor(ious, dtype=torch.float32)


def mean_prediction_loss(config: RoloConfig, batch: Mapping[str, Any],
                         mean_target: torch.Tensor | None = None) -> float:
    """The baseline: the loss (as ``objective`` scales it) of predicting one constant for every window.

    ``mean_target``: a ``cxcywh_norm`` box (4,), or for heatmaps a map (H, W); default the mean of the batch's
    supervised targets (for heatmaps, the mean of their target maps).
    """
    _, targets, weights = _batch_tensors(batch)
    supervised = weights > 0
    if config.form == "heatmap":
        target_repr = box_to_heatmap(targets, config.heatmap_size)
    else:
        target_repr = targets
    constant = target_repr[supervised].mean(dim=0) if mean_target is None else torch.as_tensor(mean_target)
    prediction = constant.to(target_repr.dtype).expand_as(target_repr)
    per_step = _elementwise_loss(prediction, target_repr, config).flatten(start_dim=2).mean(dim=-1)
    return float(config.loss_scale * (per_step * weights).sum() / weights.sum().clamp(min=1e-12))


# --- export / load ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelInfo:
    """What an exported model expects and where it came from: its config (with ``detector_id``,
    ``feature_dim``, ``steps``), the split it was trained on, and free-form metadata."""

    config: RoloConfig
    split: str
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def detector_id(self) -> str:
        return self.config.detector_id

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def steps(self) -> int:
        return self.config.steps


_METADATA_TYPES = (str, int, float, bool, type(None))


def model_to_bytes(model: nn.Module, *, split: str, metadata: Mapping[str, Any] | None = None) -> bytes:
    """The exported-model file as bytes: a plain dict saved with ``torch.save`` (no pickled code).

    ``model``: a ``RoloModel`` (or one wrapped by DDP). ``metadata``: extra str/int/float/bool/None values
    (e.g. run name, epoch).
    """
    inner = getattr(model, "module", model)
    if not isinstance(inner, RoloModel):
        raise ConfigError(f"can only export a RoloModel, got {type(inner).__name__}")
    metadata = dict(metadata or {})
    bad = {k: type(v).__name__ for k, v in metadata.items()
           if not isinstance(k, str) or not isinstance(v, _METADATA_TYPES)}
    if bad:
        raise ConfigError(f"model metadata must map names to str/int/float/bool/None, got {bad}")
    config = inner.config
    payload = {
        "format": MODEL_FORMAT, "version": MODEL_VERSION, "config": asdict(config),
        "state_dict": {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()},
        "detector_id": config.detector_id, "feature_dim": config.feature_dim, "steps": config.steps,
        "split": split, "metadata": metadata,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def export_model(model: nn.Module, uri: str, *, split: str, metadata: Mapping[str, Any] | None = None) -> None:
    """Write the exported model to ``uri`` (local path or ``s3://``), atomically."""
    storage.write_bytes(uri, model_to_bytes(model, split=split, metadata=metadata))


def load_model(uri: str, *, form: str | None = None, feature_dim: int | None = None,
               detector_id: str | None = None, steps: int | None = None,
               device: str | torch.device = "cpu") -> tuple[RoloModel, ModelInfo]:
    """Load an exported model (``torch.load(weights_only=True)``: a file with pickled code is refused).

    The optional expectations (``form``, ``feature_dim``, ``detector_id``, ``steps``) are checked against the
    file; any mismatch, and weights that do not fit the file's own config, are an ``InputError`` naming ``uri``.
    The model comes back in eval mode on ``device``.
    """
    return model_from_bytes(storage.read_bytes(uri), source=uri, form=form, feature_dim=feature_dim,
                            detector_id=detector_id, steps=steps, device=device)


def model_from_bytes(data: bytes, *, source: str = "<bytes>", form: str | None = None,
                     feature_dim: int | None = None, detector_id: str | None = None, steps: int | None = None,
                     device: str | torch.device = "cpu") -> tuple[RoloModel, ModelInfo]:
    """``load_model`` on the file's content; ``source`` names it in errors."""
    payload = _safe_load(data, source)
    config = _payload_config(payload, source)
    expected = {"form": form, "feature_dim": feature_dim, "detector_id": detector_id, "steps": steps}
    for name, want in expected.items():
        if want is not None and getattr(config, name) != want:
            raise InputError(f"model has {name}={getattr(config, name)!r}, expected {name}={want!r}", path=source)
    model = build_model(config)
    _load_weights(model, payload.get("state_dict"), source)
    metadata = payload.get("metadata") or {}
    info = ModelInfo(config=config, split=str(payload.get("split", "")), metadata=dict(metadata))
    return model.to(device).eval(), info


def _safe_load(data: bytes, source: str) -> dict:
    if not data.startswith(b"PK\x03\x04"):  # torch.save writes a zip archive; anything else is not ours
        raise InputError("not a torch model file (expected the zip archive torch.save writes)", path=source)
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError("refused: the file holds pickled objects other than weights and plain data, which "
                         f"could run code when loaded (torch.load weights_only=True said: {reason})",
                         path=source) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, zipfile/OSError for non-checkpoint bytes
        raise InputError(f"not a torch model file: {type(exc).__name__}: {str(exc).strip()[:200]}",
                         path=source) from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise InputError(f"not a rolo-batch model (format {found!r}, expected {MODEL_FORMAT!r}); export one "
                         "with rolo_batch.rolo.export_model", path=source)
    if payload.get("version") == 1 and isinstance(payload.get("config"), dict):
        payload["config"].setdefault("box_head", "absolute")  # version 1 had only the sigmoid head
    elif payload.get("version") != MODEL_VERSION:
        raise InputError(f"model file version {payload.get('version')!r} is not supported "
                         f"(this code reads {MODEL_VERSION})", path=source)
    return payload


def _payload_config(payload: dict, source: str) -> RoloConfig:
    raw = payload.get("config")
    if not isinstance(raw, dict):
        raise InputError("model file has no config", path=source)
    known = {f.name for f in fields(RoloConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InputError(f"model config has unknown fields {unknown} (written by a newer version?)", path=source)
    try:
        config = RoloConfig(**raw)
    except ConfigError as exc:
        raise InputError(f"model config is invalid: {exc}", path=source) from None
    for name in ("detector_id", "feature_dim", "steps"):
        if name in payload and payload[name] != getattr(config, name):
            raise InputError(f"model file says {name}={payload[name]!r} but its config has "
                             f"{getattr(config, name)!r}", path=source)
    return config


def _load_weights(model: RoloModel, state: Any, source: str) -> None:
    """Load ``state`` into ``model``, naming missing, unexpected and mis-shaped tensors on failure."""
    if not isinstance(state, dict):
        raise InputError("model file has no state_dict", path=source)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(getattr(state[k], 'shape', ()))} vs {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state))
              if not isinstance(state[k], torch.Tensor) or state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            problems.append(f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        if shapes:
            problems.append(f"shape mismatch {shapes[:3]}{' ...' if len(shapes) > 3 else ''}")
        raise InputError(f"weights do not fit a {model.config.form} ROLO with the file's config "
                         f"(another architecture?): {'; '.join(problems)}", path=source)
    model.load_state_dict(state)
