"""ROLO models, the objective, heatmaps and the exported-model file."""

from __future__ import annotations

import io
import os
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from torch import nn

from rolo_batch import rolo
from rolo_batch.errors import ConfigError, InputError
from rolo_batch.synthetic_features import box_maps

D, STEPS = 16, 3


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and two threads per process thrash on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(form: str = "compact", **options) -> rolo.RoloConfig:
    return rolo.RoloConfig(form=form, feature_dim=D, steps=STEPS, hidden_size=64, projection_size=16,
                           heatmap_size=16, detector_id="tiny-abc", **options)


def toy_windows(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Windows whose target is the last step's detection box: random features, a box moving at constant speed."""
    g = torch.Generator().manual_seed(seed)
    centre = 0.25 + 0.5 * torch.rand(n, 1, 2, generator=g)
    velocity = 0.03 * torch.randn(n, 1, 2, generator=g)
    centres = centre + velocity * torch.arange(STEPS).reshape(1, STEPS, 1)
    size = (0.1 + 0.3 * torch.rand(n, 1, 2, generator=g)).expand(n, STEPS, 2)
    detection = torch.cat([torch.zeros(n, STEPS, 1), centres, size, torch.ones(n, STEPS, 1)], dim=-1)
    inputs = torch.cat([torch.randn(n, STEPS, D, generator=g), detection], dim=-1)
    return {"inputs": inputs, "targets": detection[:, -1, 1:5].clone()}


# --- config and shapes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"form": "transformer"}, "form"), ({"feature_dim": 0}, "feature_dim"), ({"steps": -1}, "steps"),
    ({"loss": "l1"}, "loss"), ({"loss_scale": 0}, "loss_scale"), ({"heatmap_size": 1}, "heatmap_size"),
    ({"dropout": 1.0}, "dropout"), ({"hidden_size": 2.5}, "hidden_size"),
    ({"feature_dropout": -0.1}, "feature_dropout"), ({"box_head": "delta"}, "box_head"),
    ({"max_correction": 0}, "max_correction"),
    ({"feature_dim": 500, "feature_shape": (2, 16, 16)}, "holds 512 values but feature_dim is 500"),
    ({"feature_dim": 512, "feature_shape": (2, 16)}, "three positive integers"),
    ({"feature_dim": 512, "feature_shape": (-2, -16, 16)}, "three positive integers"),
    ({"form": "faithful", "feature_dim": 512, "feature_shape": (2, 16, 16)}, "faithful form reads a feature vector"),
    ({"roi_bins": 0}, "roi_bins"), ({"roi_context": 0.5}, "roi_context"),
    ({"box_input": "delta"}, "box_input"), ({"form": "faithful", "box_input": "motion"}, "faithful form reads"),
])
def test_config_is_validated(options, message):
    with pytest.raises(ConfigError, match=message):
        rolo.RoloConfig(**options)


@pytest.mark.parametrize("form", ["faithful", "compact", "heatmap"])
def test_every_form_maps_windows_to_boxes_in_the_unit_square(form):
    model = rolo.build_model(tiny(form))
    x = toy_windows(5, 0)["inputs"] * 3
    out = model(x)
    assert out.shape == (5, 4) and (out >= 0).all() and (out <= 1).all()
    assert model(x[:, :1]).shape == (5, 4)  # fewer steps (start of a video) work too
    with pytest.raises(InputError, match=f"\\(N, steps, {D + 6}\\)"):
        model(torch.zeros(5, STEPS, D + 5))


def test_heatmap_model_exposes_its_maps():
    model = rolo.build_model(tiny("heatmap"))
    maps = model.heatmaps(toy_windows(4, 0)["inputs"])
    assert maps.shape == (4, 16, 16) and (maps >= 0).all() and (maps <= 1).all()


# --- the faithful network --------------------------------------------------------------------------------

def faithful_lstm_parameters(input_size: int) -> int:
    """A one-layer LSTM with hidden size = input size H: four gates, each with an (H x H) input matrix, an
    (H x H) recurrent matrix and two bias vectors (torch keeps b_ih and b_hh)."""
    h = input_size
    return 4 * (2 * h * h + 2 * h)


def test_faithful_parameter_count_follows_the_lstm_formula():
    assert rolo.count_parameters(rolo.build_model(tiny("faithful"))) == faithful_lstm_parameters(D + 6)
    with torch.device("meta"):  # the paper's size without allocating it
        paper = rolo.build_model(rolo.RoloConfig(form="faithful", feature_dim=4096))
    assert rolo.count_parameters(paper) == faithful_lstm_parameters(4102) == 134_644_048


def test_faithful_box_comes_from_hidden_units_d1_to_d4():
    torch.manual_seed(0)
    model = rolo.build_model(tiny("faithful"))
    x = toy_windows(3, 1)["inputs"][:, :1]  # one step from a zero state: unit j depends on gate rows of j only
    before = model.sequence_outputs(x).detach()
    hidden = D + 6

    def nudge(unit: int) -> torch.Tensor:
        with torch.no_grad():
            for gate in range(4):
                model.lstm.bias_ih_l0[gate * hidden + unit] += 0.7
        return model.sequence_outputs(x).detach()

    for unit in [0, D - 1, D, D + 5]:  # feature units, the class unit and the confidence unit
        torch.testing.assert_close(nudge(unit), before)
    after = nudge(D + 2)  # the unit aligned with the detection's cy
    changed = (after - before).abs().amax(dim=(0, 1)) > 1e-4
    assert changed.tolist() == [False, True, False, False]


def test_faithful_matches_an_independent_lstm_computation():
    torch.manual_seed(1)
    model = rolo.build_model(tiny("faithful"))
    x = toy_windows(2, 2)["inputs"].double().numpy()
    w_ih, w_hh = (getattr(model.lstm, n).detach().double().numpy() for n in ("weight_ih_l0", "weight_hh_l0"))
    bias = (model.lstm.bias_ih_l0 + model.lstm.bias_hh_l0).detach().double().numpy()
    h = c = np.zeros((2, D + 6))
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    for t in range(STEPS):
        i, f, g, o = np.split(x[:, t] @ w_ih.T + h @ w_hh.T + bias, 4, axis=1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
    expected = h[:, D + 1:D + 5]
    np.testing.assert_allclose(model.sequence_outputs(torch.as_tensor(x).float())[:, -1].detach().numpy(),
                               expected, atol=1e-5)
    np.testing.assert_allclose(model(torch.as_tensor(x).float()).detach().numpy(), np.clip(expected, 0, 1),
                               atol=1e-5)


# --- learning --------------------------------------------------------------------------------------------

def fit(model: rolo.RoloModel, train: dict[str, torch.Tensor], steps: int, lr: float) -> None:
    """``steps`` Adam steps on random batches of 64 windows of ``train``."""
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        index = torch.randint(0, len(train["inputs"]), (64,))
        loss, _ = rolo.objective(model, {k: v[index] for k, v in train.items()})
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


@pytest.mark.parametrize("form, options", [("faithful", {}), ("compact", {"box_head": "absolute"}),
                                           ("heatmap", {})])
def test_each_form_learns_a_toy_problem_well_below_the_mean_box_baseline(form, options):
    torch.manual_seed(0)
    config = tiny(form, **options)
    model = rolo.build_model(config)
    held_out = toy_windows(256, 2)
    fit(model, toy_windows(512, 1), steps=400, lr=1e-2)
    with torch.no_grad():
        _, metrics = rolo.objective(model.eval(), held_out)
    baseline = rolo.mean_prediction_loss(config, held_out)
    assert metrics["loss"] < 0.35 * baseline, (metrics, baseline)
    assert metrics["mean_iou"] > 0.4


@pytest.mark.parametrize("box_head", ["residual", "relative"])
def test_an_untrained_residual_model_reproduces_each_steps_detection_box(box_head):
    model = rolo.build_model(tiny("compact", box_head=box_head))
    windows = toy_windows(7, 3)["inputs"]
    np.testing.assert_allclose(model(windows).detach(), windows[:, -1, D + 1:D + 5], atol=1e-6)
    np.testing.assert_allclose(model(windows, sequence=True).detach(), windows[..., D + 1:D + 5], atol=1e-6)


def test_the_relative_head_corrects_in_units_of_the_boxs_own_size():
    """The same head output moves a box half as large half as far, and scales its size by the same factor."""
    model = rolo.build_model(tiny("compact", box_head="relative", max_correction=0.5))
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([10.0, -10.0, 10.0, 0.0]))  # tanh saturates: +-max_correction
    windows = toy_windows(2, 3)["inputs"].clone()
    windows[:, :, D + 1:D + 5] = torch.tensor([0.5, 0.5, 0.2, 0.1])
    windows[1, :, D + 3:D + 5] /= 2
    with torch.no_grad():
        boxes = model(windows)
    np.testing.assert_allclose(boxes[0], [0.5 + 0.1, 0.5 - 0.05, 0.2 * np.exp(0.5), 0.1], atol=1e-5)
    np.testing.assert_allclose(boxes[1], [0.5 + 0.05, 0.5 - 0.025, 0.1 * np.exp(0.5), 0.05], atol=1e-5)


@pytest.mark.parametrize("form, options", [("faithful", {}), ("compact", {}), ("heatmap", {}),
                                           ("compact", {"box_head": "relative", "box_input": "motion"}),
                                           ("heatmap", {"box_input": "motion"})])
def test_streaming_one_step_at_a_time_gives_the_windows_outputs(form, options):
    """The state carried from step to step is the LSTM's whole memory: stepping through a window gives what
    the window gives at every step, and a batch's state split into rows and joined again is the same."""
    torch.manual_seed(0)
    model = rolo.build_model(tiny(form, **options)).eval()
    if form == "compact":
        nn.init.normal_(model.head.weight, std=0.5)  # a trained head: outputs that depend on the state
    windows = toy_windows(3, 7)["inputs"]
    with torch.no_grad():
        whole = model.sequence_outputs(windows)
        carry, streamed = None, []
        for step in range(STEPS):
            outputs, carry = model.stream(windows[:, step], carry)
            streamed.append(outputs)
            carry = rolo.join_carries([rolo.carry_rows(carry, i) for i in (0, 1, 2)])
    np.testing.assert_allclose(torch.stack(streamed, dim=1), whole, atol=1e-5)


def test_motion_detection_is_the_shift_in_units_of_the_previous_box_and_the_log_size_change():
    detection = torch.tensor([[[0, 0.5, 0.5, 0.2, 0.1, 0.9], [0, 0.6, 0.45, 0.4, 0.1, 0.8]]])
    motion = rolo.motion_detection(detection)
    np.testing.assert_allclose(motion[0, 0], [0, 0, 0, 0, 0, 0.9], atol=1e-6)
    np.testing.assert_allclose(motion[0, 1], [0, 0.5, -0.5, np.log(2), 0, 0.8], atol=1e-6)


@pytest.mark.parametrize("box_input, moves_with_the_window", [("motion", True), ("absolute", False)])
def test_with_motion_input_the_correction_does_not_depend_on_where_the_target_stands(box_input,
                                                                                      moves_with_the_window):
    """The same window shifted across the frame: a model reading motion moves its box by the same shift, so it
    cannot learn where the targets of its training videos stood."""
    torch.manual_seed(1)
    model = rolo.build_model(tiny("compact", box_head="relative", box_input=box_input))
    nn.init.normal_(model.head.weight, std=0.5)  # a trained head: corrections that depend on the input
    windows = toy_windows(4, 5)["inputs"]
    windows[..., D + 1:D + 5] = torch.tensor([0.5, 0.5, 0.2, 0.1]) + 0.01 * torch.randn(4, STEPS, 4)
    shifted = windows.clone()
    shifted[..., D + 1:D + 3] -= 0.1
    with torch.no_grad():
        moved = model(windows) - model(shifted)
    expected = torch.tensor([0.1, 0.1, 0.0, 0.0]).expand_as(moved)
    assert torch.allclose(moved, expected, atol=1e-5) == moves_with_the_window, moved


def noisy_track_windows(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Detections jittered around a box moving at constant speed; the target is the true last box. The feature
    is one fixed vector (a target that looks the same throughout): random features per window would let the
    model memorise each window's noise instead of learning to smooth it."""
    g = torch.Generator().manual_seed(seed)
    start = 0.3 + 0.4 * torch.rand(n, 1, 2, generator=g)
    velocity = 0.02 * torch.randn(n, 1, 2, generator=g)
    true = start + velocity * torch.arange(STEPS).reshape(1, STEPS, 1)
    size = torch.full((n, STEPS, 2), 0.2)
    seen = true + 0.03 * torch.randn(n, STEPS, 2, generator=g)
    detection = torch.cat([torch.zeros(n, STEPS, 1), seen, size, torch.ones(n, STEPS, 1)], dim=-1)
    feature = torch.randn(1, 1, D, generator=torch.Generator().manual_seed(0)).expand(n, STEPS, D)
    inputs = torch.cat([feature, detection], dim=-1)
    return {"inputs": inputs, "targets": torch.cat([true[:, -1], size[:, -1]], dim=-1)}


@pytest.mark.parametrize("box_input", ["absolute", "motion"])
def test_the_residual_model_learns_to_beat_the_detection_it_corrects(box_input):
    """ROLO's premise: reading the window, it places the box better than the last detection alone (also when
    it reads only how the detection moved)."""
    torch.manual_seed(0)
    model = rolo.build_model(tiny("compact", box_input=box_input))
    held_out = noisy_track_windows(512, 2)
    fit(model, noisy_track_windows(1024, 1), steps=300, lr=3e-3)
    with torch.no_grad():
        _, learned = rolo.objective(model.eval(), held_out)
        _, detection_only = rolo.objective(rolo.build_model(tiny("compact", box_input=box_input)).eval(), held_out)
    assert learned["loss"] < 0.8 * detection_only["loss"], (learned, detection_only)


def test_perturbed_detections_stay_in_the_frame_and_a_lost_one_carries_the_previous_box():
    windows = toy_windows(200, 4)["inputs"]
    g = torch.Generator().manual_seed(0)
    out = rolo.perturb_detections(windows, D, jitter=0.2, drop=0.3, generator=g)
    torch.testing.assert_close(out[..., :D], windows[..., :D])  # features untouched
    det, before = out[..., D:], windows[..., D:]
    assert (det[..., 1:5] >= 0).all() and (det[..., 1:5] <= 1).all()
    assert not torch.equal(det[..., 1:5], before[..., 1:5])
    lost = det[..., 5] == 0
    assert not lost[:, 0].any() and 0.2 < lost[:, 1:].float().mean() < 0.4
    rows, steps = torch.nonzero(lost, as_tuple=True)
    torch.testing.assert_close(det[rows, steps, 1:5], det[rows, steps - 1, 1:5])
    again = rolo.perturb_detections(windows, D, jitter=0.2, drop=0.3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, out)  # seeded: reproducible
    torch.testing.assert_close(rolo.perturb_detections(windows, D), windows)


def test_a_version_1_model_file_loads_with_the_absolute_head_it_was_trained_with(tmp_path):
    model = rolo.build_model(tiny("compact", box_head="absolute"))
    payload = torch.load(io.BytesIO(rolo.model_to_bytes(model, split="exp2")), weights_only=True)
    payload["version"] = 1
    del payload["config"]["box_head"], payload["config"]["max_correction"], payload["config"]["feature_dropout"]
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    loaded, info = rolo.model_from_bytes(buffer.getvalue())
    assert info.config.box_head == "absolute"
    x = toy_windows(3, 5)["inputs"]
    torch.testing.assert_close(loaded(x), model.eval()(x))


# --- feature maps ----------------------------------------------------------------------------------------

def numpy_roi_pool(maps: np.ndarray, boxes: np.ndarray, bins: int, context: float) -> np.ndarray:
    """An independent RoIAlign: per bin, the mean of 2 x 2 bilinear samples; a map pixel (i, j) is centred at
    ((j + 0.5) / W, (i + 0.5) / H) of the frame; the map is 0 outside."""
    n, channels, height, width = maps.shape
    out = np.zeros((n, channels, bins, bins))

    def pixel(k, i, j):
        return maps[k, :, i, j] if 0 <= i < height and 0 <= j < width else np.zeros(channels)

    for k, (cx, cy, w, h) in enumerate(boxes):
        for row in range(bins):
            for col in range(bins):
                total = np.zeros(channels)
                for sy in range(2):
                    for sx in range(2):
                        u = cx + ((col * 2 + sx + 0.5) / (2 * bins) - 0.5) * w * context
                        v = cy + ((row * 2 + sy + 0.5) / (2 * bins) - 0.5) * h * context
                        x, y = u * width - 0.5, v * height - 0.5
                        j0, i0 = int(np.floor(x)), int(np.floor(y))
                        fx, fy = x - j0, y - i0
                        total += ((1 - fx) * (1 - fy) * pixel(k, i0, j0) + fx * (1 - fy) * pixel(k, i0, j0 + 1)
                                  + (1 - fx) * fy * pixel(k, i0 + 1, j0) + fx * fy * pixel(k, i0 + 1, j0 + 1))
                out[k, :, row, col] = total / 4
    return out.reshape(n, -1)


@pytest.mark.parametrize("box, bins, context, shape", [
    ((0.5, 0.5, 0.3, 0.2), 4, 1.6, (3, 16, 16)),   # inside the frame
    ((0.05, 0.9, 0.3, 0.4), 3, 1.0, (2, 8, 12)),   # hanging off the left and bottom edges: zeros outside
    ((0.31, 0.62, 0.02, 0.05), 1, 2.0, (1, 10, 6)),  # smaller than a map pixel, one bin
])
def test_roi_pool_matches_an_independent_roialign(box, bins, context, shape):
    maps = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    boxes = torch.tensor([box, (0.6, 0.4, 0.5, 0.5)], dtype=torch.float64)
    got = rolo.roi_pool(maps, boxes, bins, context)
    assert got.shape == (2, shape[0] * bins * bins)
    np.testing.assert_allclose(got.numpy(), numpy_roi_pool(maps.numpy(), boxes.numpy(), bins, context), atol=1e-9)


def map_tiny(**options) -> rolo.RoloConfig:
    return rolo.RoloConfig(form="compact", feature_dim=2 * 16 * 16, feature_shape=(2, 16, 16), steps=STEPS,
                           hidden_size=64, projection_size=32, detector_id="tiny-abc", **options)


def test_each_step_is_pooled_inside_its_own_detection_box():
    config = map_tiny()
    model = rolo.build_model(config)
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(4, STEPS, config.feature_dim, generator=g)
    boxes = 0.2 + 0.5 * torch.rand(4, STEPS, 4, generator=g)
    x = torch.cat([maps, torch.zeros(4, STEPS, 1), boxes, torch.ones(4, STEPS, 1)], dim=-1)
    expected = rolo.roi_pool(maps.reshape(-1, 2, 16, 16), boxes.reshape(-1, 4), config.roi_bins, config.roi_context)
    torch.testing.assert_close(model.trunk.visual(x), expected.reshape(4, STEPS, -1))
    assert model(x).shape == (4, 4)


def offset_detection_windows(n: int, seed: int, x_range: tuple[float, float] = (0.3, 0.7)) -> dict[str, torch.Tensor]:
    """The target is marked in channel 0 of the map (channel 1 is noise), its centre's x in ``x_range``;
    the detection is that box moved and resized by an error that stays the same over the window (as a
    detector's errors on unseen frames do), so only what the map shows inside and around the detection can
    correct it, not smoothing over steps."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.stack([x_range[0] + (x_range[1] - x_range[0]) * torch.rand(n, generator=g),
                          0.3 + 0.4 * torch.rand(n, generator=g)], dim=1)
    size = 0.15 + 0.15 * torch.rand(n, 2, generator=g)
    true = torch.cat([centre, size], dim=-1)
    shift = 0.25 * size * torch.randn(n, 2, generator=g)
    scale = torch.exp(0.15 * torch.randn(n, 2, generator=g))
    seen = torch.cat([centre + shift, size * scale], dim=-1).clamp(0, 1)
    maps = torch.as_tensor(box_maps(true.numpy(), (2, 16, 16), np.random.default_rng(seed)), dtype=torch.float32)
    maps = maps[:, None].expand(n, STEPS, -1)
    detection = torch.cat([torch.zeros(n, 1), seen, torch.ones(n, 1)], dim=-1)[:, None].expand(n, STEPS, 6)
    return {"inputs": torch.cat([maps, detection], dim=-1), "targets": true}


def test_with_feature_maps_the_residual_model_corrects_a_detection_that_is_off():
    """What pooling the map inside the detection buys: boxes placed better than the detection, at positions the
    training windows never held, and only because the map shows the target (blank maps teach nothing)."""
    torch.manual_seed(0)
    train, held_out = offset_detection_windows(1024, 1, (0.25, 0.5)), offset_detection_windows(256, 2, (0.5, 0.75))
    model = rolo.build_model(map_tiny())
    fit(model, train, steps=300, lr=3e-3)
    blank = {k: v.clone() for k, v in train.items()}
    blank["inputs"][..., :map_tiny().feature_dim] = 0
    blind = rolo.build_model(map_tiny())
    fit(blind, blank, steps=300, lr=3e-3)
    held_out_blank = {k: v.clone() for k, v in held_out.items()}
    held_out_blank["inputs"][..., :map_tiny().feature_dim] = 0
    with torch.no_grad():
        _, learned = rolo.objective(model.eval(), held_out)
        _, detection = rolo.objective(rolo.build_model(map_tiny()).eval(), held_out)
        _, without_map = rolo.objective(blind.eval(), held_out_blank)
    assert learned["mean_iou"] > detection["mean_iou"] + 0.1, (learned, detection)
    assert learned["loss"] < 0.5 * detection["loss"], (learned, detection)
    assert without_map["mean_iou"] < detection["mean_iou"] + 0.05, (without_map, detection)


def test_a_model_for_feature_maps_round_trips_through_its_file():
    torch.manual_seed(3)
    model = rolo.build_model(map_tiny(roi_bins=3, roi_context=1.4))
    loaded, info = rolo.model_from_bytes(rolo.model_to_bytes(model, split="exp2"))
    assert info.config.feature_shape == (2, 16, 16) and info.config == model.config
    x = offset_detection_windows(3, 0)["inputs"]
    torch.testing.assert_close(loaded(x), model.eval()(x))


# --- objective -------------------------------------------------------------------------------------------

def constant_box_model(box: list[float]) -> rolo.RoloModel:
    """A compact model that outputs ``box`` whatever the input (zero head weights, bias = logit(box))."""
    model = rolo.build_model(tiny("compact", box_head="absolute"))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.logit(torch.tensor(box)))
    return model


def test_objective_of_a_perfect_prediction_is_zero_loss_and_iou_one():
    box = [0.5, 0.4, 0.2, 0.3]
    batch = {"inputs": toy_windows(6, 0)["inputs"], "targets": torch.tensor([box] * 6)}
    loss, metrics = rolo.objective(constant_box_model(box), batch)
    assert float(loss.detach()) == pytest.approx(0, abs=1e-8)
    assert metrics["mean_iou"] == pytest.approx(1.0, abs=1e-5) and metrics["num_targets"] == 6


def test_objective_is_the_scaled_mse_on_the_box_and_iou_in_a_unit_frame():
    model = constant_box_model([0.5, 0.5, 0.2, 0.2])
    batch = {"inputs": toy_windows(2, 0)["inputs"],
             "targets": torch.tensor([[0.6, 0.5, 0.2, 0.2], [0.5, 0.5, 0.4, 0.2]])}
    loss, metrics = rolo.objective(model, batch)
    expected_mse = ((0.1 ** 2) / 4 + (0.2 ** 2) / 4) / 2
    assert float(loss.detach()) == pytest.approx(100 * expected_mse, rel=1e-4)
    # IoU: shifted by half its width -> 1/3; same centre, half the width of the target -> 1/2
    assert metrics["mean_iou"] == pytest.approx((1 / 3 + 1 / 2) / 2, rel=1e-4)
    model.config = replace(model.config, loss_scale=7.0)
    assert rolo.objective(model, batch)[1]["loss"] == pytest.approx(7 * expected_mse, rel=1e-4)


def test_step_mask_on_the_last_step_equals_weighted_last_step_loss():
    model = rolo.build_model(tiny("compact"))
    data = toy_windows(8, 3)
    weights = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1], dtype=torch.float32)
    mask = torch.zeros(8, STEPS, dtype=torch.bool)
    mask[:, -1] = weights > 0
    step_targets = torch.full((8, STEPS, 4), float("nan"))  # unsupervised steps may hold anything
    step_targets[:, -1] = data["targets"]
    by_weight, m1 = rolo.objective(model, {**data, "weights": weights})
    by_mask, m2 = rolo.objective(model, {"inputs": data["inputs"], "step_targets": step_targets, "step_mask": mask})
    torch.testing.assert_close(by_weight, by_mask)
    assert m1["num_targets"] == m2["num_targets"] == 6
    by_mask.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_objective_calls_a_data_parallel_wrapper_so_that_its_hooks_run():
    class Wrapper(nn.Module):  # how DistributedDataParallel looks from outside: forward delegates, .module
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module
            self.calls = 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    model = rolo.build_model(tiny("heatmap"))
    wrapped = Wrapper(model)
    batch = toy_windows(4, 0)
    loss, metrics = rolo.objective(wrapped, batch)
    assert wrapped.calls == 1
    torch.testing.assert_close(loss, rolo.objective(model, batch)[0])


def test_batch_without_targets_gives_zero_loss_and_finite_gradients():
    model = rolo.build_model(tiny("heatmap"))
    data = toy_windows(4, 0)
    loss, metrics = rolo.objective(model, {**data, "weights": torch.zeros(4)})
    loss.backward()
    assert metrics["loss"] == 0 and metrics["num_targets"] == 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_smooth_l1_is_gentler_than_mse_on_large_errors():
    batch = {"inputs": toy_windows(1, 0)["inputs"], "targets": torch.tensor([[0.9, 0.9, 0.5, 0.5]])}
    model = constant_box_model([0.1, 0.1, 0.5, 0.5])
    mse = rolo.objective(model, batch)[1]["loss"]
    model.config = replace(model.config, loss="smooth_l1")
    smooth = rolo.objective(model, batch)[1]["loss"]
    # |error| = 0.8 on two of four coordinates: mse 0.64, smooth L1 (beta 0.05) 0.8 - 0.025 = 0.775
    assert mse == pytest.approx(100 * 0.64 / 2, rel=1e-4) and smooth == pytest.approx(100 * 0.775 / 2, rel=1e-4)


# --- heatmaps --------------------------------------------------------------------------------------------

def test_box_to_heatmap_marks_the_cells_whose_centres_lie_in_the_box():
    grid = rolo.box_to_heatmap(np.array([[0.5, 0.25, 0.5, 0.25]]), 8)[0]
    expected = np.zeros((8, 8))
    expected[1:3, 2:6] = 1  # rows (y) 0.125-0.375, columns (x) 0.25-0.75
    np.testing.assert_array_equal(grid, expected)
    tiny_box = rolo.box_to_heatmap(np.array([0.9, 0.1, 0.001, 0.001]), 8)
    assert tiny_box.sum() == 1 and tiny_box[0, 7] == 1


@pytest.mark.parametrize("size", [16, 32])
def test_heatmap_box_round_trip_within_a_cell(size):
    rng = np.random.default_rng(0)
    centre, extent = rng.uniform(0.3, 0.7, (200, 2)), rng.uniform(0.05, 0.5, (200, 2))
    original = np.concatenate([centre, extent], axis=1).astype(np.float32)
    maps = rolo.box_to_heatmap(original, size)
    back = rolo.heatmap_to_box(maps)
    assert isinstance(back, np.ndarray) and back.shape == (200, 4)
    assert np.abs(back - original).max() <= 1 / size + 1e-6
    np.testing.assert_allclose(rolo.box_to_heatmap(back, size), maps)  # and the map survives exactly


def test_heatmap_to_box_keeps_the_largest_region_and_falls_back_to_moments():
    maps = np.zeros((3, 16, 16), np.float32)
    maps[0, 2:4, 2:4] = 0.9  # small blob
    maps[0, 8:14, 6:12] = 0.8  # larger blob wins
    maps[1, 4:12, 2:6] = 0.3  # nothing passes 0.5: the weighted moments of a uniform box give the box
    got = rolo.heatmap_to_box(maps)
    np.testing.assert_allclose(got[0], [9 / 16, 11 / 16, 6 / 16, 6 / 16], atol=1e-6)
    np.testing.assert_allclose(got[1], [4 / 16, 8 / 16, 4 / 16, 8 / 16], atol=1e-5)
    np.testing.assert_allclose(got[2], [0.5, 0.5, 1.0, 1.0], atol=1e-2)  # an empty map: no idea, whole frame
    torch.testing.assert_close(rolo.heatmap_to_box(torch.as_tensor(maps)), torch.as_tensor(got))


def test_largest_region_agrees_with_opencv_connected_components():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(3)
    maps = (rng.random((100, 16, 16)) < 0.45).astype(np.float32)
    ours = rolo.heatmap_to_box(maps)
    compared = 0
    for i in range(len(maps)):
        _, _, stats, _ = cv2.connectedComponentsWithStats(maps[i].astype(np.uint8), connectivity=8)
        areas = stats[1:, cv2.CC_STAT_AREA]
        if len(areas) == 0 or (areas == areas.max()).sum() > 1:
            continue  # ties: either region is right
        x, y, w, h = stats[1 + areas.argmax(), :4]
        np.testing.assert_allclose(ours[i], np.array([x + w / 2, y + h / 2, w, h]) / 16, atol=1e-6)
        compared += 1
    assert compared > 50


# --- export / load ---------------------------------------------------------------------------------------

def trained_looking(form: str = "compact") -> rolo.RoloModel:
    torch.manual_seed(7)
    return rolo.build_model(tiny(form))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_export_load_round_trip(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else f"s3://{request.getfixturevalue('bucket')}/runs"
    uri = f"{root}/run-1/model.pt"
    model = trained_looking("heatmap")
    rolo.export_model(model, uri, split="exp2", metadata={"run": "run-1", "epochs": 3})
    loaded, info = rolo.load_model(uri, form="heatmap", feature_dim=D, detector_id="tiny-abc", steps=STEPS)
    assert isinstance(loaded, rolo.HeatmapRolo) and not loaded.training
    assert info.config == model.config and info.split == "exp2" and info.metadata == {"run": "run-1", "epochs": 3}
    assert (info.detector_id, info.feature_dim, info.steps) == ("tiny-abc", D, STEPS)
    x = toy_windows(4, 0)["inputs"]
    torch.testing.assert_close(loaded.heatmaps(x), model.heatmaps(x))


def test_export_unwraps_a_data_parallel_wrapper():
    class Wrapper(nn.Module):  # what DistributedDataParallel looks like from outside: the model in .module
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    model = trained_looking()
    loaded, _ = rolo.model_from_bytes(rolo.model_to_bytes(Wrapper(model), split="exp1"))
    x = toy_windows(2, 0)["inputs"]
    torch.testing.assert_close(loaded(x), model(x))


class _RunsCode:
    """Unpickling this object would create a directory: the loader must refuse before that happens."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_file_with_pickled_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "was-run"
    payload = {"format": rolo.MODEL_FORMAT, "version": 1, "config": asdict(tiny()), "hook": _RunsCode(str(marker))}
    path = tmp_path / "evil.pt"
    torch.save(payload, str(path))
    with pytest.raises(InputError, match=r"evil\.pt.*refused.*pickled"):
        rolo.load_model(str(path))
    assert not marker.exists()


def test_a_checkpoint_for_another_architecture_is_an_input_error_naming_file_and_mismatch(tmp_path):
    path = tmp_path / "model.pt"
    rolo.export_model(trained_looking("compact"), str(path), split="exp2")
    with pytest.raises(InputError, match=r"model\.pt.*form='compact', expected form='faithful'"):
        rolo.load_model(str(path), form="faithful")
    with pytest.raises(InputError, match=r"model\.pt.*detector_id='tiny-abc', expected detector_id='yolo-small'"):
        rolo.load_model(str(path), detector_id="yolo-small")
    # weights of a compact model under a config that claims a bigger LSTM
    payload = torch.load(str(path), weights_only=True)
    payload["config"]["hidden_size"] = 128
    torch.save(payload, str(path))
    with pytest.raises(InputError, match=r"model\.pt.*do not fit a compact ROLO.*shape mismatch.*lstm"):
        rolo.load_model(str(path))
    # a faithful model's weights under a compact config: different tensors altogether
    payload["config"]["hidden_size"] = 64
    payload["state_dict"] = rolo.build_model(tiny("faithful")).state_dict()
    torch.save(payload, str(path))
    with pytest.raises(InputError, match=r"model\.pt.*missing.*unexpected"):
        rolo.load_model(str(path))


@pytest.mark.parametrize("content, message", [
    (b"not a checkpoint at all", "not a torch model file"),
    ("plain-weights", "not a rolo-batch model"),
    ("future-version", "version 3 is not supported"),
])
def test_other_files_are_input_errors(content, message, tmp_path):
    path = tmp_path / "x.pt"
    if content == "plain-weights":
        torch.save({"weight": torch.zeros(2)}, str(path))
    elif content == "future-version":
        data = io.BytesIO(rolo.model_to_bytes(trained_looking(), split="exp1"))
        payload = torch.load(data, weights_only=True)
        payload["version"] = 3
        torch.save(payload, str(path))
    else:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        rolo.load_model(str(path))


def test_metadata_must_be_plain_values():
    with pytest.raises(ConfigError, match="metadata"):
        rolo.model_to_bytes(trained_looking(), split="exp1", metadata={"when": object()})
