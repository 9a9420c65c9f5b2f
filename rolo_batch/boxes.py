"""Box formats and conversions. Every function names its formats; arrays are ``(N, 4)`` float, one box a row.

- ``xywh_px``: OTB's format: top-left x, y, width, height, in pixels.
- ``xyxy_px``: top-left and bottom-right corners, in pixels.
- ``cxcywh_norm``: centre x, y, width, height as fractions (0-1) of the frame width / height (YOLO, ROLO).
"""

from __future__ import annotations

import numpy as np


def as_boxes(boxes: np.ndarray | list) -> np.ndarray:
    """``boxes`` as a float64 ``(N, 4)`` array (a single box becomes ``(1, 4)``)."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {arr.shape}")
    return arr


def valid_mask(boxes_xywh_px: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: the box is finite and has width and height > 0."""
    b = as_boxes(boxes_xywh_px)
    return np.isfinite(b).all(axis=1) & (b[:, 2] > 0) & (b[:, 3] > 0)


def xywh_to_xyxy(boxes_xywh: np.ndarray) -> np.ndarray:
    b = as_boxes(boxes_xywh)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def xyxy_to_xywh(boxes_xyxy: np.ndarray) -> np.ndarray:
    b = as_boxes(boxes_xyxy)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def xywh_px_to_cxcywh_norm(boxes_xywh_px: np.ndarray, image_wh: tuple[float, float] | np.ndarray) -> np.ndarray:
    """OTB pixel boxes to centre/size normalised by the frame size ``image_wh`` = (width, height) or ``(N, 2)``."""
    b = as_boxes(boxes_xywh_px)
    wh = np.broadcast_to(np.asarray(image_wh, dtype=np.float64).reshape(-1, 2), (len(b), 2))
    centre = b[:, :2] + b[:, 2:] / 2.0
    return np.concatenate([centre / wh, b[:, 2:] / wh], axis=1)


def cxcywh_norm_to_xywh_px(boxes_cxcywh_norm: np.ndarray, image_wh: tuple[float, float] | np.ndarray) -> np.ndarray:
    """Inverse of ``xywh_px_to_cxcywh_norm``."""
    b = as_boxes(boxes_cxcywh_norm)
    wh = np.broadcast_to(np.asarray(image_wh, dtype=np.float64).reshape(-1, 2), (len(b), 2))
    size = b[:, 2:] * wh
    return np.concatenate([b[:, :2] * wh - size / 2.0, size], axis=1)


def centers_xywh(boxes_xywh: np.ndarray) -> np.ndarray:
    """``(N, 2)`` box centres, ``x + w / 2`` and ``y + h / 2`` (the got10k / pysot convention)."""
    b = as_boxes(boxes_xywh)
    return b[:, :2] + b[:, 2:] / 2.0


def iou_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of two ``(N, 4)`` arrays of xywh boxes (continuous coordinates, no +1).

    A pair with a non-finite or empty box has IoU 0.
    """
    a, b = as_boxes(a), as_boxes(b)
    if len(a) != len(b):
        raise ValueError(f"iou_xywh needs the same number of boxes, got {len(a)} and {len(b)}")
    ax1, ay1, ax2, ay2 = xywh_to_xyxy(a).T
    bx1, by1, bx2, by2 = xywh_to_xyxy(b).T
    with np.errstate(invalid="ignore"):
        iw = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None)
        ih = np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None)
        inter = iw * ih
        union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    ok = valid_mask(a) & valid_mask(b)
    return np.where(ok, np.nan_to_num(iou, nan=0.0), 0.0)


def iou_matrix_xywh(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(len(a), len(b))`` pairwise IoU of xywh boxes."""
    a, b = as_boxes(a), as_boxes(b)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    ia = np.repeat(a, len(b), axis=0)
    ib = np.tile(b, (len(a), 1))
    return iou_xywh(ia, ib).reshape(len(a), len(b))
