"""Decoding one image file's bytes, with errors that say what is wrong with it."""

from __future__ import annotations

import cv2
import numpy as np

from rolo_batch.errors import InputError

_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"


def decode_image(data: bytes, *, video: str | None = None, path: str | None = None) -> np.ndarray:
    """Decode JPEG/PNG/BMP bytes to ``(H, W, 3)`` uint8 BGR (grey images become three channels).

    Raises ``InputError`` for a zero-byte file, a truncated JPEG (no end-of-image marker) or bytes no
    decoder accepts, naming ``video`` and ``path``.
    """
    if not data:
        raise InputError("image file is empty (0 bytes)", video=video, path=path)
    if data[:2] == _JPEG_START and _JPEG_END not in data[-64:]:
        raise InputError("JPEG is truncated (no end-of-image marker)", video=video, path=path)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise InputError("image cannot be decoded (corrupt or not an image)", video=video, path=path)
    return image


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """``(H, W, 3)`` uint8 BGR to JPEG bytes (deterministic for the same pixels and quality)."""
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()
