"""The detector: the paper's network and the CPU variant, decoding, weights in both formats, detector ids."""

from __future__ import annotations

import dataclasses
import io
import re
import struct

import numpy as np
import pytest
import torch
from torch import nn

from rolo_batch import storage
from rolo_batch.detector import (
    PRESETS,
    VOC_CLASSES,
    Detector,
    DetectorConfig,
    YoloNet,
    build_detector,
    decode,
    detector_config,
    feature_spec,
    save_darknet_weights,
    save_detector,
)
from rolo_batch.errors import ConfigError, InputError, StorageError

# YOLO v1 small (darknet yolo-small.cfg / the YOLO_small TensorFlow port ROLO used): (filters, size, stride)
# of each conv, "M" for a 2x2/2 max-pool.
PAPER_BACKBONE = [
    (64, 7, 2), "M", (192, 3, 1), "M",
    (128, 1, 1), (256, 3, 1), (256, 1, 1), (512, 3, 1), "M",
    (256, 1, 1), (512, 3, 1), (256, 1, 1), (512, 3, 1), (256, 1, 1), (512, 3, 1), (256, 1, 1), (512, 3, 1),
    (512, 1, 1), (1024, 3, 1), "M",
    (512, 1, 1), (1024, 3, 1), (512, 1, 1), (1024, 3, 1), (1024, 3, 1), (1024, 3, 2),
    (1024, 3, 1), (1024, 3, 1),
]


def paper_parameter_count() -> int:
    """Parameters of YOLO v1 small, counted from the layer list above (an independent computation)."""
    total, channels = 0, 3
    for layer in PAPER_BACKBONE:
        if layer != "M":
            filters, size, _ = layer
            total += filters * channels * size * size + filters
            channels = filters
    for inputs, outputs in ((1024 * 7 * 7, 512), (512, 4096), (4096, 1470)):
        total += inputs * outputs + outputs
    return total


def frames(count: int, seed: int = 0, shape=(120, 160, 3)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]


def head_with(config: DetectorConfig, boxes: list[dict]) -> np.ndarray:
    """A head vector in darknet's YOLO v1 layout holding ``boxes``; everything else is zero.

    Each box: ``cell=(row, col)``, ``slot`` (which of the cell's B boxes), ``xy`` (offset in the cell),
    ``sqrt_wh``, ``conf`` (box confidence), ``probs`` (the cell's class probabilities).
    """
    s, b, c = config.grid, config.boxes_per_cell, config.num_classes
    head = np.zeros(config.head_size, dtype=np.float32)
    class_probs = head[:s * s * c].reshape(s, s, c)
    confidence = head[s * s * c:s * s * (c + b)].reshape(s, s, b)
    coords = head[s * s * (c + b):].reshape(s, s, b, 4)
    for box in boxes:
        row, col = box["cell"]
        class_probs[row, col] = box["probs"]
        confidence[row, col, box["slot"]] = box["conf"]
        coords[row, col, box["slot"]] = [*box["xy"], *box["sqrt_wh"]]
    return head


@pytest.fixture(scope="module")
def tiny() -> Detector:
    return build_detector("yolo-tiny", random_init=True, seed=1)


# --- configs ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, culprit", [
    ({"grid": 14}, "grid"),
    ({"input_size": 100}, "grid"),
    ({"num_classes": 0}, "num_classes"),
    ({"feature_dim": -3}, "feature_dim"),
    ({"boxes_per_cell": 1.5}, "boxes_per_cell"),
    ({"conf_threshold": 1.5}, "conf_threshold"),
    ({"nms_iou": -0.1}, "nms_iou"),
    ({"dropout": 1.0}, "dropout"),
    ({"backbone": ("16x3/2", "bogus")}, "bogus"),
    ({"backbone": ()}, "backbone"),
    ({"backbone": ("M", "M", "M", "M", "M")}, "convolution"),
    ({"class_names": ("a", "b")}, "class_names"),
    ({"name": "../escape"}, "name"),
    ({"name": ""}, "name"),
])
def test_invalid_configs_are_refused_naming_the_setting(overrides, culprit):
    with pytest.raises(ConfigError, match=culprit):
        detector_config("yolo-tiny", **overrides)


def test_unknown_preset_and_unknown_setting_name_the_choices():
    with pytest.raises(ConfigError, match="yolo-tiny"):
        detector_config("yolo-v9")
    with pytest.raises(ConfigError, match="feature_dims"):
        detector_config("yolo-tiny", feature_dims=3)


def test_presets_and_overrides():
    small = PRESETS["yolo-v1-small"]
    assert (small.input_size, small.grid, small.boxes_per_cell, small.num_classes, small.feature_dim) == \
        (448, 7, 2, 20, 4096)
    assert small.labels == VOC_CLASSES and len(VOC_CLASSES) == 20 and VOC_CLASSES[14] == "person"
    tiny = detector_config("yolo-tiny")
    assert tiny.num_classes == 1 and tiny.feature_dim == 256 and tiny.input_size < small.input_size
    three = detector_config("yolo-tiny", num_classes=3, feature_dim=64)
    assert three.labels == ("class0", "class1", "class2") and three.head_size == 7 * 7 * (3 + 2 * 5)


def test_config_survives_a_dict_and_json_round_trip():
    config = detector_config("yolo-tiny", feature_dim=32, conf_threshold=0.3)
    as_json = config.to_json()
    import json

    assert DetectorConfig.from_dict(json.loads(as_json)) == config
    with pytest.raises(ConfigError, match="colour"):
        DetectorConfig.from_dict({**config.to_dict(), "colour": "red"})


# --- the networks ----------------------------------------------------------------------------------------

def test_yolo_v1_small_is_the_paper_network_layer_for_layer():
    net = YoloNet(detector_config("yolo-v1-small"))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
    fcs = [m for m in net.modules() if isinstance(m, nn.Linear)]
    leaky = [m for m in net.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(convs) == 24 and len(pools) == 4
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == \
        [layer for layer in PAPER_BACKBONE if layer != "M"]
    assert all(c.padding[0] == c.kernel_size[0] // 2 for c in convs)
    assert [(f.in_features, f.out_features) for f in fcs] == [(50176, 512), (512, 4096), (4096, 1470)]
    assert len(leaky) == 26 and all(m.negative_slope == pytest.approx(0.1) for m in leaky)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert sum(p.numel() for p in net.parameters()) == paper_parameter_count()

    with torch.inference_mode():
        features, head = net.eval()(torch.rand(1, 3, 448, 448))
        # The feature is the activation the last layer reads (after the 4096-wide layer's leaky ReLU).
        torch.testing.assert_close(head, net.head(features))
    assert features.shape == (1, 4096) and head.shape == (1, 1470)
    assert (features < 0).any()  # leaky, not a plain ReLU


@pytest.mark.parametrize("overrides", [{}, {"feature_dim": 48, "num_classes": 3}])
def test_tiny_detector_shapes(overrides):
    detector = build_detector(detector_config("yolo-tiny", **overrides), random_init=True)
    out = detector(frames(5, shape=(90, 130, 3)) + frames(2, shape=(300, 200, 3)), batch_size=3)
    assert out.features.shape == (7, detector.config.feature_dim) and out.features.dtype == np.float32
    assert len(out.detections) == 7
    assert all(d.dtype == np.float32 and d.ndim == 2 and d.shape[1] == 6 for d in out.detections)
    empty = detector([])
    assert empty.features.shape == (0, detector.config.feature_dim) and empty.detections == []


def conv_output_shapes(net: YoloNet, image_size: int) -> list[tuple[int, tuple[int, int, int]]]:
    """(index in the backbone, output shape) of every leaky ReLU after a conv, recorded by forward hooks on a
    real pass: an independent account of where each activation map is and how big."""
    shapes = []
    hooks = [module.register_forward_hook(lambda m, i, o, k=k: shapes.append((k, tuple(o.shape[1:]))))
             for k, module in enumerate(net.backbone) if isinstance(module, nn.LeakyReLU)]
    with torch.no_grad():
        net(torch.zeros(1, 3, image_size, image_size))
    for hook in hooks:
        hook.remove()
    return shapes


@pytest.mark.parametrize("preset, side",
                         [("yolo-tiny", 14), ("yolo-tiny", 28), ("yolo-tiny", 7), ("yolo-v1-small", 14)])
def test_a_map_feature_is_the_deepest_conv_activation_at_least_that_side(preset, side):
    config = detector_config(preset)
    spec = feature_spec(config, f"map{side}")
    net = YoloNet(config) if preset == "yolo-tiny" else None
    if net is not None:
        shapes = conv_output_shapes(net, config.input_size)
        layer, shape = [(k, s) for k, s in shapes if s[1] >= side][-1]
        assert (spec.layer, spec.shape) == (layer, shape)
    assert spec.shape[1] == spec.shape[2] >= side and spec.size == int(np.prod(spec.shape))
    assert feature_spec(config, "fc").shape is None and feature_spec(config, "fc").size == config.feature_dim


def test_a_map_detector_returns_that_activation_and_the_same_detections(tiny):
    mapped = Detector(tiny.net, feature="map14")
    images = frames(3)
    out, vector = mapped(images), tiny(images)
    activations = {}
    hook = tiny.net.backbone[mapped.feature.layer].register_forward_hook(
        lambda m, i, o: activations.__setitem__("map", o.detach()))
    with torch.no_grad():
        tiny.net(tiny.preprocess(images))
    hook.remove()
    assert out.features.shape == (3, 256 * 14 * 14) and mapped.feature.shape == (256, 14, 14)
    np.testing.assert_allclose(out.features, activations["map"].reshape(3, -1).numpy(), rtol=1e-5, atol=1e-6)
    for a, b in zip(out.detections, vector.detections):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert mapped.features_id == f"{tiny.detector_id}-map14" and tiny.features_id == tiny.detector_id
    assert mapped([]).features.shape == (0, 256 * 14 * 14)


@pytest.mark.parametrize("feature, message", [
    ("map0", "not understood"), ("map", "not understood"), ("conv5", "not understood"), ("FC", "not understood"),
    ("map225", "at least 225 x 225.*224 px input"),
])
def test_feature_names_are_checked(tiny, feature, message):
    with pytest.raises(ConfigError, match=message):
        build_detector("yolo-tiny", random_init=True, feature=feature)


def test_batch_size_does_not_change_results(tiny):
    images = frames(5)
    one_by_one, all_at_once = tiny(images, batch_size=1), tiny(images, batch_size=16)
    np.testing.assert_allclose(one_by_one.features, all_at_once.features, rtol=1e-4, atol=1e-5)
    preprocessed = tiny.run(tiny.preprocess(images))
    np.testing.assert_array_equal(preprocessed.features, all_at_once.features)


def test_preprocess_resizes_converts_bgr_to_rgb_and_scales_to_0_1(tiny):
    blue = np.zeros((50, 100, 3), dtype=np.uint8)
    blue[..., 0] = 255  # BGR
    grey = np.full((300, 20, 3), 51, dtype=np.uint8)
    batch = tiny.preprocess([blue, grey])
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == torch.float32
    assert torch.all(batch[0, 2] == 1.0) and torch.all(batch[0, :2] == 0.0)
    assert torch.allclose(batch[1], torch.full((3, 224, 224), 0.2))


@pytest.mark.parametrize("bad", [
    np.zeros((10, 10), dtype=np.uint8),
    np.zeros((10, 10, 4), dtype=np.uint8),
    np.zeros((10, 10, 3), dtype=np.float32),
    np.zeros((0, 10, 3), dtype=np.uint8),
    "frame.jpg",
])
def test_bad_images_are_input_errors_naming_the_image(tiny, bad):
    with pytest.raises(InputError, match="image 1"):
        tiny.preprocess([frames(1)[0], bad])


def test_a_detector_reports_what_its_head_encodes():
    """End to end: a net whose head always outputs one known box reports it, for any image."""
    config = detector_config("yolo-tiny", num_classes=2)
    net = YoloNet(config)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.copy_(torch.from_numpy(head_with(config, [
            dict(cell=(2, 5), slot=0, xy=(0.5, 0.5), sqrt_wh=(0.4, 0.2), conf=0.9, probs=[0.0, 1.0])])))
    out = Detector(net)(frames(3))
    for detections in out.detections:
        np.testing.assert_allclose(detections, [[1, 5.5 / 7, 2.5 / 7, 0.16, 0.04, 0.9]], atol=1e-6)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "mps"])
def test_unsupported_devices_are_config_errors(device):
    with pytest.raises(ConfigError, match="device"):
        build_detector("yolo-tiny", random_init=True, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        build_detector("yolo-tiny", random_init=True, device="cuda:0")


# --- decoding --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["yolo-v1-small", "yolo-tiny"])
def test_a_known_box_in_a_known_cell_decodes_to_the_normalised_box(name):
    config = detector_config(name)
    probs = np.zeros(config.num_classes)
    probs[-1] = 0.8
    head = head_with(config, [dict(cell=(3, 2), slot=1, xy=(0.5, 0.25), sqrt_wh=(0.4, 0.6), conf=0.9,
                                   probs=probs)])
    (detections,) = decode(head[None], config)
    expected = [config.num_classes - 1, 2.5 / 7, 3.25 / 7, 0.16, 0.36, 0.72]
    np.testing.assert_allclose(detections, [expected], atol=1e-6)
    (from_torch,) = decode(torch.from_numpy(head)[None], config)
    np.testing.assert_array_equal(from_torch, detections)


def test_below_threshold_is_dropped_and_classes_scored_separately():
    config = detector_config("yolo-tiny", num_classes=3)
    head = head_with(config, [dict(cell=(1, 1), slot=0, xy=(0.5, 0.5), sqrt_wh=(0.3, 0.3), conf=0.5,
                                   probs=[0.38, 0.5, 0.9])])  # scores 0.19, 0.25, 0.45
    (detections,) = decode(head, config)
    assert detections[:, 0].tolist() == [2, 1]
    np.testing.assert_allclose(detections[:, 5], [0.45, 0.25], atol=1e-6)
    (lenient,) = decode(head, dataclasses.replace(config, conf_threshold=0.1))
    assert sorted(lenient[:, 0].tolist()) == [0, 1, 2]


def test_nms_removes_a_duplicate_of_the_same_class_but_keeps_other_classes_and_distant_boxes():
    config = detector_config("yolo-tiny", num_classes=2)
    box = dict(xy=(0.5, 0.5), sqrt_wh=(0.5, 0.5))
    head = head_with(config, [
        dict(cell=(3, 3), slot=0, conf=0.9, probs=[1.0, 0.0], **box),
        dict(cell=(3, 3), slot=1, conf=0.8, probs=[1.0, 0.0], xy=(0.55, 0.5), sqrt_wh=(0.5, 0.5)),
        dict(cell=(3, 4), slot=0, conf=0.7, probs=[0.0, 1.0], xy=(-0.5, 0.5), sqrt_wh=(0.5, 0.5)),
        dict(cell=(0, 6), slot=0, conf=0.6, probs=[1.0, 0.0], xy=(0.5, 0.5), sqrt_wh=(0.2, 0.2)),
    ])
    (detections,) = decode(head, config)
    np.testing.assert_allclose(detections[:, 5], [0.9, 0.7, 0.6], atol=1e-6)  # the 0.8 duplicate is gone
    assert detections[:, 0].tolist() == [0, 1, 0]
    (no_nms,) = decode(head, dataclasses.replace(config, nms_iou=1.0))
    assert len(no_nms) == 4


def test_boxes_are_clipped_to_the_image():
    config = detector_config("yolo-tiny")
    head = head_with(config, [dict(cell=(3, 0), slot=0, xy=(0.1, 0.5), sqrt_wh=(0.3 ** 0.5, 1.2),
                                   conf=0.9, probs=[1.0])])  # centre (0.1/7, 0.5), size 0.3 x 1.44
    (detections,) = decode(head, config)
    x2 = 0.1 / 7 + 0.15
    np.testing.assert_allclose(detections[0, 1:5], [x2 / 2, 0.5, x2, 1.0], atol=1e-6)


def test_decode_keeps_images_apart_and_handles_empty_batches():
    config = detector_config("yolo-tiny")
    hit = head_with(config, [dict(cell=(6, 6), slot=0, xy=(0.5, 0.5), sqrt_wh=(0.2, 0.2), conf=1.0,
                                  probs=[1.0])])
    result = decode(np.stack([np.zeros(config.head_size, np.float32), hit, hit * 0.5]), config)
    assert [len(d) for d in result] == [0, 1, 1]
    assert result[2][0, 5] == pytest.approx(0.25)
    assert decode(np.zeros((0, config.head_size), np.float32), config) == []
    with pytest.raises(ConfigError, match=str(config.head_size)):
        decode(np.zeros((1, 1470), np.float32), config)


# --- weights ---------------------------------------------------------------------------------------------

def test_no_weights_needs_an_explicit_random_init():
    with pytest.raises(ConfigError, match="random_init"):
        build_detector("yolo-tiny")
    with pytest.raises(ConfigError, match="choose one"):
        build_detector("yolo-tiny", "some.weights", random_init=True)


def test_random_init_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = (build_detector("yolo-tiny", random_init=True, seed=7) for _ in range(2))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.detector_id == b.detector_id
    assert a.detector_id != build_detector("yolo-tiny", random_init=True, seed=8).detector_id


def test_darknet_round_trip(tiny, tmp_path):
    path = tmp_path / "tiny.weights"
    path.write_bytes(save_darknet_weights(tiny.net))
    loaded = build_detector("yolo-tiny", str(path))
    images = frames(4)
    expected, actual = tiny.infer(tiny.preprocess(images)), loaded.infer(loaded.preprocess(images))
    np.testing.assert_array_equal(actual[0], expected[0])
    np.testing.assert_array_equal(actual[1], expected[1])
    assert loaded.detector_id == tiny.detector_id


def darknet_file(net: YoloNet, header: bytes, *, transpose_fc: bool = False) -> bytes:
    """Darknet's layout written out independently: per conv / connected layer in order, float32 biases then
    weights ((out, in, k, k), or (out, in) / transposed (in, out) for connected layers)."""
    parts = [header]
    for layer in net.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            weight = layer.weight.detach().numpy()
            if transpose_fc and isinstance(layer, nn.Linear):
                weight = weight.T
            parts += [layer.bias.detach().numpy().astype("<f4").tobytes(), weight.astype("<f4").tobytes()]
    return b"".join(parts)


def test_darknet_layout_matches_an_independent_writer(tiny, tmp_path):
    header = struct.pack("<iiiq", 0, 2, 0, 0)
    assert save_darknet_weights(tiny.net)[20:] == darknet_file(tiny.net, header)[20:]
    transposed = tmp_path / "transposed.weights"  # darknet flags transposed FC weights with minor > 1000
    transposed.write_bytes(darknet_file(tiny.net, struct.pack("<iiii", 0, 1001, 0, 0), transpose_fc=True))
    assert build_detector("yolo-tiny", str(transposed)).detector_id == tiny.detector_id


def test_darknet_files_with_the_old_header_and_without_the_extension_load(tiny, tmp_path):
    body = save_darknet_weights(tiny.net)[20:]  # after major, minor, revision and a 64-bit "seen"
    old = tmp_path / "yolo-small-2015.bin"
    old.write_bytes(struct.pack("<iiii", 0, 1, 0, 12345) + body)  # minor 1: "seen" is 32-bit
    assert build_detector("yolo-tiny", f"file://{old}").detector_id == tiny.detector_id


def test_darknet_weights_need_the_detector_named(tiny, tmp_path):
    path = tmp_path / "tiny.weights"
    path.write_bytes(save_darknet_weights(tiny.net))
    with pytest.raises(ConfigError, match="name the detector"):
        build_detector(None, str(path))


def test_darknet_weights_of_another_network_say_expected_and_found_sizes(tmp_path):
    narrow = build_detector(detector_config("yolo-tiny", feature_dim=64), random_init=True)
    path = tmp_path / "narrow.weights"
    path.write_bytes(save_darknet_weights(narrow.net))
    found = sum(p.numel() for p in narrow.net.parameters())
    expected = sum(p.numel() for p in YoloNet(detector_config("yolo-tiny")).parameters())
    with pytest.raises(InputError) as error:
        build_detector("yolo-tiny", str(path))
    message = str(error.value)
    assert str(path) in message and f"expected {expected:,} floats" in message and f"has {found:,}" in message
    with pytest.raises(InputError, match=re.escape(f"expected {paper_parameter_count():,} floats")):
        build_detector("yolo-v1-small", str(path))


def test_a_truncated_darknet_file_names_the_layer_where_it_runs_out(tiny, tmp_path):
    path = tmp_path / "cut.weights"
    path.write_bytes(save_darknet_weights(tiny.net)[:-5000])
    with pytest.raises(InputError, match=r"runs out in weighted layer \d+ \(connected"):
        build_detector("yolo-tiny", str(path))


def test_checkpoint_round_trip_through_a_local_path(tmp_path):
    config = detector_config("yolo-tiny", feature_dim=64, conf_threshold=0.3)
    original = build_detector(config, random_init=True, seed=3)
    path = str(tmp_path / "models" / "detector.pt")
    save_detector(original, path)
    loaded = build_detector(None, path)
    assert loaded.config == config and loaded.detector_id == original.detector_id
    images = frames(3)
    np.testing.assert_array_equal(loaded(images).features, original(images).features)
    assert build_detector("yolo-tiny", path).detector_id == original.detector_id


def test_checkpoint_round_trip_through_s3(tiny, bucket):
    uri = f"s3://{bucket}/models/tiny.pt"
    save_detector(tiny, uri)
    assert storage.is_file(uri)
    loaded = build_detector("yolo-tiny", uri)
    assert loaded.detector_id == tiny.detector_id
    images = frames(2)
    np.testing.assert_array_equal(loaded(images).features, tiny(images).features)


def test_a_checkpoint_of_another_detector_is_a_config_error(tiny, tmp_path):
    path = str(tmp_path / "tiny.pt")
    save_detector(tiny, path)
    with pytest.raises(ConfigError, match="yolo-tiny"):
        build_detector("yolo-v1-small", path)
    with pytest.raises(ConfigError, match="feature_dim"):
        build_detector(detector_config("yolo-tiny", feature_dim=8), path)


def test_a_checkpoint_whose_tensors_do_not_fit_names_the_tensor_and_both_shapes(tmp_path):
    narrow = build_detector(detector_config("yolo-tiny", feature_dim=64), random_init=True)
    path = tmp_path / "bad.pt"
    torch.save({"format": "rolo-batch-detector", "version": 1, "config": detector_config("yolo-tiny").to_dict(),
                "state_dict": narrow.net.state_dict()}, path)
    with pytest.raises(InputError, match=r"tensor '[\w.]+' should have shape \(256, \d+\), the file has \(64, \d+\)"):
        build_detector("yolo-tiny", str(path))


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_holding_python_objects_is_refused_without_running_them(tiny, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": "rolo-batch-detector", "version": 1, "config": tiny.config.to_dict(),
                "state_dict": tiny.net.state_dict(), "extra": _RunsCodeWhenUnpickled(str(marker))}, path)
    with pytest.raises(InputError, match=r"weights_only=True.*open"):
        build_detector("yolo-tiny", str(path))
    assert not marker.exists()


@pytest.mark.parametrize("content, reason", [
    ({"state_dict": {}}, "not a rolo-batch detector checkpoint"),
    ({"format": "rolo-batch-detector", "version": 99}, "version 99"),
])
def test_other_torch_files_are_refused(tmp_path, content, reason):
    buffer = io.BytesIO()
    torch.save(content, buffer)
    path = tmp_path / "other.pt"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(InputError, match=reason):
        build_detector("yolo-tiny", str(path))


def test_a_missing_weights_file_is_a_storage_error(tmp_path):
    with pytest.raises(StorageError, match="not found"):
        build_detector("yolo-tiny", str(tmp_path / "nope.weights"))


# --- detector ids ----------------------------------------------------------------------------------------

def test_detector_id_is_the_name_and_a_hash_of_config_and_weights(tiny, tmp_path):
    assert re.fullmatch(r"yolo-tiny-[0-9a-f]{12}", tiny.detector_id)
    darknet, checkpoint = tmp_path / "t.weights", str(tmp_path / "t.pt")
    darknet.write_bytes(save_darknet_weights(tiny.net))
    save_detector(tiny, checkpoint)
    assert build_detector("yolo-tiny", str(darknet)).detector_id == build_detector(None, checkpoint).detector_id \
        == tiny.detector_id

    stricter = build_detector(detector_config("yolo-tiny", conf_threshold=0.5), str(darknet))
    assert stricter.detector_id != tiny.detector_id  # same weights, other config

    nudged = build_detector("yolo-tiny", str(darknet))
    with torch.no_grad():
        nudged.net.head.bias[0] += 1e-3
    assert Detector(nudged.net).detector_id != tiny.detector_id  # same config, other weights
