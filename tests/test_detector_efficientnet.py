"""The pretrained detector (``efficientnet-yolo``): ImageNet backbone, convolutional YOLO head in darknet's
layout, frozen stages that stay frozen, checkpoints, feature maps, and a Ray Train run that extraction reads."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from rolo_batch import detector as det
from rolo_batch import detector_train as dt
from rolo_batch import efficientnet as eff
from rolo_batch import tables
from rolo_batch.datasets import discover
from rolo_batch.detector_efficientnet import BACKBONE_PARTS, EfficientYoloNet
from rolo_batch.efficientnet_weights import load_weights
from rolo_batch.errors import ConfigError, InputError

# 64 px: a 2x2 grid; a narrow head. The backbone is the real one (its weights are what is tested).
TINY = det.detector_config("efficientnet-yolo", input_size=64, grid=2, feature_dim=16)


@pytest.fixture(scope="module")
def pretrained() -> EfficientYoloNet:
    torch.set_num_threads(1)
    return det.new_net(TINY, 0).eval()


def test_the_backbone_is_the_imagenet_network_on_its_own_input_scaling(pretrained):
    reference = load_weights(eff.EfficientNetLite0())
    x = torch.rand(2, 3, 64, 64)  # the detector's input: RGB 0-1
    with torch.no_grad():
        ours, _ = pretrained.forward_map(x, 16)
        theirs = reference.forward_features((x * 255 - eff.INPUT_MEAN) / eff.INPUT_SCALE, (16,))[16]
    torch.testing.assert_close(ours, theirs)


def test_the_head_comes_out_in_darknets_layout_and_decodes_to_the_right_cell(pretrained):
    config = dataclasses.replace(TINY, num_classes=2, class_names=("a", "b"))
    net = EfficientYoloNet(config).eval()
    c, b, s = 2, config.boxes_per_cell, config.grid
    cells = torch.zeros(1, c + 5 * b, s, s)
    row, col = 1, 0  # bottom-left cell, box predictor 0, class "b" (class and predictor indices differ, so that
    cells[0, 1, row, col] = 1.0  # swapping the class and confidence blocks changes the result)
    cells[0, c + 0, row, col] = 0.9
    cells[0, c + b:c + b + 4, row, col] = torch.tensor([0.5, 0.25, 0.5, 0.6])  # x, y, sqrt(w), sqrt(h)
    net.head.register_forward_hook(lambda *_: cells)
    with torch.no_grad():
        _, head = net(torch.zeros(1, 3, 64, 64))
    assert head.shape == (1, config.head_size)
    (found,) = det.decode(head, config)
    np.testing.assert_allclose(found, [[1, 0.25, 0.625, 0.25, 0.36, 0.9]], atol=1e-6)


def test_frozen_parts_keep_their_weights_and_statistics_while_the_rest_learns():
    net = det.new_net(dataclasses.replace(TINY, frozen_stages=6, dropout=0.0), 0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    dt.init_head_bias(net, [0.5, 0.5, 0.3, 0.3])
    images = (np.random.default_rng(0).random((4, 64, 64, 3)) * 255).astype(np.uint8)
    batch = dt.make_batch(images, [[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.3], [0.5, 0.5, 0.4, 0.2],
                                   [0.2, 0.8, 0.2, 0.2]], [True] * 4, [0] * 4)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    first = dt.train_step(net, optimizer, batch)
    for _ in range(15):
        last = dt.train_step(net, optimizer, batch)
    assert last["loss_sum"] < 0.5 * first["loss_sum"]
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    frozen_prefixes = ["backbone._conv_stem.", "backbone._bn0."] + [f"backbone._blocks.{i}." for i in range(11)]
    assert not [k for k in changed if any(k.startswith(p) for p in frozen_prefixes)]  # stem, stages 1-5
    assert "backbone._blocks.11._bn1.running_mean" in changed  # stage 6 trains, statistics too
    assert {"hidden.weight", "head.weight", "backbone._conv_head.weight"} <= changed


def test_freezing_everything_trains_only_the_head():
    net = det.new_net(dataclasses.replace(TINY, frozen_stages=len(BACKBONE_PARTS)), 0)
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"hidden.weight", "hidden.bias", "head.weight", "head.bias"}
    net.train()
    assert not any(m.training for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert net.head.training


def test_a_checkpoint_round_trips_with_its_id_and_a_map_feature(tmp_path, pretrained):
    detector = det.Detector(pretrained, feature="map8")
    uri = str(tmp_path / "detector.pt")
    det.save_detector(detector, uri)
    again = det.build_detector(None, uri, feature="map8")
    assert again.detector_id == detector.detector_id and again.config == TINY
    assert again.feature == det.FeatureSpec("map8", 40 * 8 * 8, 8, (40, 8, 8))  # stage 3, stride 8
    assert again.features_id == f"{detector.detector_id}-map8"
    frames = [np.full((48, 80, 3), v, np.uint8) for v in (30, 200)]
    a, b = detector(frames), again(frames)
    np.testing.assert_allclose(a.features, b.features, atol=1e-5)
    assert a.features.shape == (2, 40 * 8 * 8)
    assert det.Detector(pretrained).features_id == detector.detector_id  # fc: the pooled head activation
    assert det.Detector(pretrained)(frames).features.shape == (2, TINY.feature_dim)


@pytest.mark.parametrize("overrides,message", [
    ({"grid": 3}, r"grid must be ceil\(input_size / 32\) = 2"),
    ({"backbone": ("16x3",)}, "backbone and fc_hidden must be empty"),
    ({"frozen_stages": 10}, "frozen_stages must be an integer from 0"),
    ({"input_size": 16, "grid": 1}, "input_size must be at least 32"),
    ({"architecture": "resnet"}, "architecture must be"),
], ids=["grid", "backbone", "frozen", "small input", "unknown architecture"])
def test_config_is_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(TINY, **overrides)


def test_darknet_configs_keep_their_ids_and_refuse_efficientnet_settings():
    tiny = det.detector_config("yolo-tiny")
    assert "architecture" not in tiny.to_json() and "frozen_stages" not in tiny.to_json()
    assert "efficientnet-lite0" in TINY.to_json()
    with pytest.raises(ConfigError, match="frozen_stages is for the efficientnet-lite0 architecture"):
        det.detector_config("yolo-tiny", frozen_stages=2)
    with pytest.raises(ConfigError,
                       match=r"Darknet weights \(<bytes>\): Darknet's weights layout holds only darknet-architecture"):
        det.load_darknet_weights(EfficientYoloNet(TINY), b"\0" * 64)
    with pytest.raises(ConfigError, match="backbone weights .* are for a pretrained architecture"):
        det.new_net(tiny, 0, backbone_weights="x.pth")


def test_other_backbone_weights_load_from_a_uri_and_a_foreign_file_is_refused(tmp_path):
    state = {k: v for k, v in det.new_net(TINY, 0).backbone.state_dict().items()}
    state = {k: torch.zeros_like(v) if k == "_conv_stem.weight" else v for k, v in state.items()}
    path = tmp_path / "finetuned.pth"
    torch.save(state, path)
    net = det.new_net(TINY, 0, backbone_weights=str(path))
    assert not net.backbone._conv_stem.weight.any()
    del state["_bn0.weight"]
    torch.save(state, path)
    with pytest.raises(InputError,
                       match=r"do not fit EfficientNet-Lite0's backbone: missing tensors \(1\): _bn0.weight"):
        det.new_net(TINY, 0, backbone_weights=str(path))


def test_train_detector_trains_the_pretrained_detector_and_extraction_reads_it(ray_local, tmp_path):
    from rolo_batch.datasets.synthetic import SynthConfig, synthesize
    from rolo_batch.extract import ExtractOptions, extract_video

    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    synthesize(data, SynthConfig(videos=2, frames=12, width=96, height=72, seed=3))
    config = dt.DetectorTrainConfig(
        data, out, detector="efficientnet-yolo", overrides={"input_size": 64, "grid": 2, "feature_dim": 16},
        first_part="third", epochs=1, batch_size=4, gpu="off", threads_per_worker=1, learning_rate=1e-3)
    result = dt.run_detector_training(config, log=None)
    assert result.final["train_frames"] == 8 and 0.0 <= result.final["ap50"] <= 1.0
    detector = det.build_detector(None, result.detector_uri, feature="map4")
    assert detector.config.architecture == "efficientnet-lite0" and detector.config.frozen_stages == 4
    trained = detector.net.backbone.state_dict()
    imagenet = det.new_net(TINY, 0).backbone.state_dict()
    assert torch.equal(trained["_blocks.4._project_conv.weight"], imagenet["_blocks.4._project_conv.weight"])  # stage 3
    assert not torch.equal(trained["_blocks.15._project_conv.weight"], imagenet["_blocks.15._project_conv.weight"])
    table = str(tmp_path / "features" / detector.features_id)
    done = extract_video(detector, discover(data).videos[0], table, ExtractOptions(batch_size=4))
    assert done.status == "done" and done.frames == 12
    opened = tables.FeaturesTable.open(table)
    assert opened.detector_id == detector.detector_id


def test_the_demo_can_train_the_pretrained_detector_beside_the_default():
    from rolo_batch.demo import DemoConfig

    default, pretrained = DemoConfig(), DemoConfig(detector_name="efficientnet-yolo")
    assert (default.run, default.detector().detector, default.detector().epochs) == ("demo", "yolo-tiny", 60)
    train = pretrained.detector()
    assert (pretrained.run, train.detector, train.epochs, dict(train.overrides)) == (
        "demo-efficientnet-yolo", "efficientnet-yolo", 10, {})
    assert train.augment.strength == 2.0 and train.learning_rate == 1e-3
    assert train.detector_config().pretrained
    assert pretrained.pipeline("x.pt").train.run == pretrained.run != default.run


@pytest.mark.parametrize("argv,detector,epochs,lr,augment,overrides", [
    ([], "efficientnet-yolo", 10, 1e-3, 2.0, {}),
    (["--fast-cpu"], "yolo-tiny", 60, 2e-3, 1.0, dt.FAST_CPU_OVERRIDES),
    (["--input-size", "192", "--frozen-stages", "4", "--epochs", "3", "--lr", "5e-4", "--augment", "1"],
     "efficientnet-yolo", 3, 5e-4, 1.0, {"input_size": 192, "grid": 6, "frozen_stages": 4}),
], ids=["default", "fast-cpu", "overrides"])
def test_train_detector_command_defaults_to_the_pretrained_detector(argv, detector, epochs, lr, augment, overrides):
    from rolo_batch import cli

    args = cli.build_parser().parse_args(["train-detector", "data", "out", *argv])
    config = cli._detector_train_config(args, "data", "out")
    assert (config.detector, config.epochs, config.learning_rate, config.augment.strength) == (
        detector, epochs, lr, augment)
    assert dict(config.overrides) == dict(overrides)


@pytest.mark.parametrize("argv,message", [
    (["--fast-cpu", "--detector", "efficientnet-yolo"], "--fast-cpu is yolo-tiny's CPU variant"),
    (["--detector", "yolo-tiny", "--frozen-stages", "3"], "are for a pretrained detector"),
])
def test_train_detector_command_refuses_options_of_the_other_network(argv, message):
    from rolo_batch import cli

    args = cli.build_parser().parse_args(["train-detector", "data", "out", *argv])
    with pytest.raises(ConfigError, match=message):
        cli._detector_train_config(args, "data", "out")
