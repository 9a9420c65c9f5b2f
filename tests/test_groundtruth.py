"""Ground-truth parsing: every delimiter and quirk OTB files have, and errors that name file and line."""

from __future__ import annotations

import numpy as np
import pytest

from rolo_batch.datasets import format_groundtruth, parse_groundtruth
from rolo_batch.errors import InputError

NAN = float("nan")


@pytest.mark.parametrize(
    "text, boxes, valid",
    [
        ("1,2,3,4\n5,6,7,8\n", [[1, 2, 3, 4], [5, 6, 7, 8]], [True, True]),
        ("1\t2\t3\t4\n", [[1, 2, 3, 4]], [True]),
        ("1 2  3 4\n", [[1, 2, 3, 4]], [True]),
        ("1,2\t3 4\n5, 6,\t7 8\r\n", [[1, 2, 3, 4], [5, 6, 7, 8]], [True, True]),
        ("1.5,2.25,3,4", [[1.5, 2.25, 3, 4]], [True]),
        ("1,2,0,0\n", [[1, 2, 0, 0]], [False]),
        ("NaN,NaN,NaN,NaN\n", [[NAN] * 4], [False]),
        ("nan,2,3,4\n", [[NAN, 2, 3, 4]], [False]),
        ("1,2,-3,4\n", [[1, 2, -3, 4]], [False]),
        ("-5,-6,3,4\n", [[-5, -6, 3, 4]], [True]),
        ("1,2,3,4\n\n\n", [[1, 2, 3, 4]], [True]),
        ("1,2,3,4,\n", [[1, 2, 3, 4]], [True]),
        ("", np.zeros((0, 4)), []),
    ],
    ids=["comma", "tab", "spaces", "mixed", "decimals", "zero-size", "all-nan", "one-nan", "negative-size",
         "negative-position", "trailing-blank-lines", "trailing-comma", "empty"],
)
def test_parse(text, boxes, valid):
    gt = parse_groundtruth(text, "v/groundtruth_rect.txt")
    np.testing.assert_array_equal(gt.boxes_xywh_px, np.asarray(boxes, float).reshape(-1, 4))
    np.testing.assert_array_equal(gt.valid, valid)


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("1,2,3,4\n1,2,3\n", 2, "has 3 values, expected 4"),
        ("1,2,3,4,5\n", 1, "has 5 values, expected 4"),
        ("1,2,3,4\n1,2,3,4\n1,2,x,4\n", 3, "is not four numbers"),
        ("1,2,3,4\n\n1,2,3,4\n", 2, "blank line"),
        ("1,2,inf,4\n", 1, "infinite"),
    ],
    ids=["three-values", "five-values", "not-a-number", "blank-line-inside", "infinite"],
)
def test_malformed_lines_name_the_file_and_line(text, line, message):
    with pytest.raises(InputError, match=message) as info:
        parse_groundtruth(text, "Woman/groundtruth_rect.txt")
    assert info.value.line == line
    assert f"Woman/groundtruth_rect.txt line {line}" in str(info.value)


def test_format_round_trips():
    boxes = np.array([[1.25, 2, 3.5, 4], [NAN] * 4, [0, 0, 0, 0]])
    gt = parse_groundtruth(format_groundtruth(boxes), "x")
    np.testing.assert_array_equal(gt.boxes_xywh_px, boxes)
    assert format_groundtruth(np.array([[100, 20, 30, 40]]), decimals=0) == "100,20,30,40\n"
