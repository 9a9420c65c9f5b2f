"""Decoding one image file's bytes, with errors that say what is wrong with it, and ``to_bgr``: what makes
every decoded frame the ``(H, W, 3)`` uint8 BGR that ``VideoSource`` promises (see ``rolo_batch.datasets.base``)."""

from __future__ import annotations

import cv2
import numpy as np

from rolo_batch.errors import InputError

_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"


def to_bgr(image: np.ndarray, *, video: str | None = None, path: str | None = None,
           frame: int | None = None) -> np.ndarray:
    """A decoded frame as ``(H, W, 3)`` uint8 BGR, whatever its samples: grey ``(H, W)`` or ``(H, W, 1)`` and
    grey + alpha ``(H, W, 2)`` become three equal channels, BGRA ``(H, W, 4)`` loses its alpha (not blended:
    as OpenCV's ``IMREAD_COLOR``), 16-bit samples keep their high byte (``v >> 8``, as ``IMREAD_COLOR``).
    A frame that is already BGR uint8 comes back as it is (no copy).

    ``InputError`` naming ``video``, ``path`` (and the 1-based ``frame`` number, for a video file) for an empty
    array, another shape, or samples that are not 8- or 16-bit unsigned integers.
    """
    where = f"frame {frame}: " if frame is not None else ""
    shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", None)
    if not isinstance(image, np.ndarray) or image.size == 0:
        raise InputError(f"{where}decoded to an empty image ({type(image).__name__} of shape {shape}); expected "
                         f"(H, W, 3) uint8 BGR", video=video, path=path)
    channels = 1 if image.ndim == 2 else image.shape[2] if image.ndim == 3 else 0
    if channels not in (1, 2, 3, 4) or dtype not in (np.uint8, np.uint16):
        raise InputError(f"{where}decoded to a {shape} array of {dtype}, which cannot be made (H, W, 3) "
                         f"uint8 BGR: expected grey, grey + alpha, BGR or BGRA with 8- or 16-bit samples",
                         video=video, path=path)
    if dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if channels == 3:
        return image
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    grey = image if image.ndim == 2 else image[:, :, 0]
    return cv2.cvtColor(np.ascontiguousarray(grey), cv2.COLOR_GRAY2BGR)


def decode_image(data: bytes, *, video: str | None = None, path: str | None = None) -> np.ndarray:
    """Decode JPEG/PNG/BMP bytes to ``(H, W, 3)`` uint8 BGR: OpenCV's ``IMREAD_COLOR`` (which also turns
    EXIF-rotated photos upright), then ``to_bgr``. Grey, grey + alpha, BGRA and 16-bit files all come out so.

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
    return to_bgr(image, video=video, path=path)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """``(H, W, 3)`` uint8 BGR to JPEG bytes (deterministic for the same pixels and quality)."""
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()
