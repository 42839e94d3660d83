"""The Grad-CAM pointing score: a peak on (or within the tolerance of) the tumour is a hit; small tumours are not
scored."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flaxtumor.metrics import pointing_hit, pointing_score


def _mask(size: int = 64, box=(20, 40, 20, 40)) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[box[0]:box[1], box[2]:box[3]] = True
    return m


def _peak_at(r: int, c: int, size: int = 64) -> np.ndarray:
    h = np.zeros((size, size), np.float32)
    h[r, c] = 1.0
    return h


def test_hit_inside_near_and_far() -> None:
    mask = _mask()
    assert pointing_hit(_peak_at(30, 30), mask)
    assert pointing_hit(_peak_at(30, 47), mask)  # 8 px right of the last tumour column (39)
    assert not pointing_hit(_peak_at(30, 48), mask)  # 9 px: outside the tolerance
    assert not pointing_hit(_peak_at(46, 46), mask)  # diagonal 7+7 px: outside the disk (a square would take it)
    assert not pointing_hit(_peak_at(30, 47), mask, tolerance_px=0)


def test_score_counts_only_large_tumours() -> None:
    big, small = _mask(), _mask(box=(5, 10, 5, 10))  # 400 px and 25 px
    heat = [_peak_at(30, 30), _peak_at(60, 60), _peak_at(0, 0)]
    score = pointing_score(heat, [big, big, small])
    assert score["pointing_slices"] == 2 and score["pointing_score"] == pytest.approx(0.5)
    assert math.isnan(pointing_score(heat[:1], [small])["pointing_score"])


def test_shapes_must_match() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        pointing_hit(np.zeros((8, 8)), np.zeros((16, 16), bool))
