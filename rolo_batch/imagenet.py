"""ImageNet-1k class names (``rolo_batch/data/imagenet_classes.csv``) and top-k decoding of classifier logits."""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass
from importlib import resources

import torch

NUM_CLASSES = 1000


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet class names, index = classifier output (e.g. 151 "Chihuahua", 817 "sports car")."""
    text = resources.files("rolo_batch").joinpath("data", "imagenet_classes.csv").read_text("utf-8")
    rows = list(csv.DictReader(line for line in io.StringIO(text) if not line.startswith("#")))
    names = tuple(row["name"] for row in rows)
    if len(names) != NUM_CLASSES or [int(row["index"]) for row in rows] != list(range(NUM_CLASSES)):
        raise RuntimeError(f"imagenet_classes.csv must list indices 0-{NUM_CLASSES - 1} in order, "
                           f"found {len(names)} rows")
    return names


@dataclass(frozen=True)
class Prediction:
    """One of an image's top classes: ImageNet ``index``, its ``name``, softmax ``probability`` (0-1)."""

    index: int
    name: str
    probability: float


def top_k(logits: torch.Tensor, k: int = 5) -> list[list[Prediction]]:
    """``(N, 1000)`` logits -> for each image its ``k`` most probable classes, most probable first."""
    if logits.ndim != 2 or logits.shape[1] != NUM_CLASSES:
        raise ValueError(f"logits must be (N, {NUM_CLASSES}), got {tuple(logits.shape)}")
    probs, indices = logits.detach().float().softmax(dim=1).topk(k, dim=1)
    names = imagenet_classes()
    return [[Prediction(int(i), names[int(i)], float(p)) for p, i in zip(row_p, row_i)]
            for row_p, row_i in zip(probs.cpu(), indices.cpu())]
