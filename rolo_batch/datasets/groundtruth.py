"""Ground-truth files: OTB's ``groundtruth_rect.txt`` and the sidecar of a video file.

One box per line, ``x,y,w,h`` in pixels (top-left corner, width, height). Values may be separated by commas,
tabs or spaces, mixed even within one file. ``NaN`` and zero-size boxes (OTB marks a target that left the
frame that way) are kept and marked invalid; negative sizes are kept and marked invalid too. Blank lines
are allowed only at the end of the file. Any other malformed line raises ``InputError`` naming the file and
the line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from rolo_batch import boxes
from rolo_batch.errors import InputError

_SEPARATORS = re.compile(r"[,\s;]+")


@dataclass(frozen=True)
class GroundTruth:
    """Boxes of one target, one row per line of its file.

    ``boxes_xywh_px`` (N, 4) float64 (NaN where the file says NaN); ``valid`` (N,) bool.
    """

    boxes_xywh_px: np.ndarray
    valid: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.boxes_xywh_px)

    @classmethod
    def empty(cls, source: str = "") -> "GroundTruth":
        return cls(np.zeros((0, 4)), np.zeros(0, bool), source)


def parse_groundtruth(text: str, source: str) -> GroundTruth:
    """Parse the text of a ground-truth file; ``source`` names the file in errors."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for number, line in enumerate(lines, start=1):
        stripped = line.strip().strip(",;")
        if not stripped:
            raise InputError("blank line inside the ground truth (only trailing blank lines are allowed)",
                             path=source, line=number)
        tokens = _SEPARATORS.split(stripped)
        if len(tokens) != 4:
            raise InputError(f"has {len(tokens)} values, expected 4 (x, y, w, h): {line.strip()[:80]!r}",
                             path=source, line=number)
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            raise InputError(f"is not four numbers: {line.strip()[:80]!r}", path=source, line=number) from None
        if any(np.isinf(v) for v in values):
            raise InputError(f"has an infinite value: {line.strip()[:80]!r}", path=source, line=number)
        rows.append(values)
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
    return GroundTruth(arr, boxes.valid_mask(arr) if len(arr) else np.zeros(0, bool), source)


def format_groundtruth(boxes_xywh_px: np.ndarray, decimals: int = 2) -> str:
    """Text of a ground-truth file (comma separated, one box per line); NaN rows are written as NaN."""
    lines = []
    for row in np.asarray(boxes_xywh_px, dtype=np.float64).reshape(-1, 4):
        lines.append(",".join(_format_number(v, decimals) for v in row))
    return "\n".join(lines) + "\n"


def _format_number(value: float, decimals: int) -> str:
    if not np.isfinite(value):
        return "NaN"
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
