"""Post-processing that cannot erase a confident tumour (issue 11's failure, rebuilt): a compact false blob on two
slices beside a larger true tumour that the segmenter saw only weakly, in fragments, on nine slices."""

import numpy as np
import pytest

from flaxtumor.metrics import dice
from flaxtumor.operating_point import (
    POSTPROCESS_RULES, SAFE_POSTPROCESS_RULES, OperatingPoint, drop_small_components, gate_and_postprocess,
)

D, S = 12, 64


def failure_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classifier probabilities, ungated segmenter masks, truth) of the unseen patient that LCC scored 0."""
    truth = np.zeros((D, S, S), bool)
    truth[3:12, 16:46, 16:46] = True  # the tumour: 9 slices of 30×30 px
    masks = np.zeros_like(truth)
    masks[0:2, 2:26, 40:64] = True  # the false region: 24×24 px on two tumour-free slices (1,152 voxels)
    for z in range(3, 12):  # weak responses: three 8×8 fragments per slice, top and bottom rows in turn, so that
        y = 16 if z % 2 else 36  # no two touch, not even diagonally across neighbouring slices
        for x in (16, 27, 38):
            masks[z, y : y + 8, x : x + 8] = True
    probabilities = np.where(truth.any(axis=(1, 2)), 0.97, 0.6)  # the classifier calls every slice
    return probabilities, masks, truth


def test_the_failure_case_is_what_the_issue_describes():
    _, masks, truth = failure_case()
    tumour_part = masks & truth
    assert (masks & ~truth)[:2].sum() == 1152 and tumour_part.sum() == 9 * 3 * 64 > 1152
    from scipy import ndimage
    _, n = ndimage.label(tumour_part, structure=np.ones((3, 3, 3), bool))
    assert n == 27  # fragmented: no fragment touches another, even diagonally across slices


@pytest.mark.parametrize("rule", SAFE_POSTPROCESS_RULES)
def test_every_selectable_rule_keeps_the_weak_fragmented_tumour(rule):
    probabilities, masks, truth = failure_case()
    point = OperatingPoint(threshold=0.5, postprocess=rule)
    _, final = gate_and_postprocess(probabilities, masks, point)
    assert (final & truth).sum() == (masks & truth).sum()  # every tumour voxel the segmenter found survives
    assert dice(final, truth) == pytest.approx(dice(masks, truth))
    assert dice(final, truth) > 0.3  # the issue's patient: 0.29 without LCC


def test_the_largest_component_erases_it_which_is_why_it_is_never_chosen():
    probabilities, masks, truth = failure_case()
    _, final = gate_and_postprocess(probabilities, masks, OperatingPoint(threshold=0.5, postprocess="largest_component"))
    assert dice(final, truth) == 0.0
    assert "largest_component" in POSTPROCESS_RULES and "largest_component" not in SAFE_POSTPROCESS_RULES


def test_drop_small_components_removes_only_components_below_the_floor():
    volume = np.zeros((3, 10, 10), bool)
    volume[0, 0, 0] = True  # 1 voxel
    volume[1, 5:7, 5:7] = True  # 4 voxels
    volume[2, 6, 6] = True  # touches the 4-voxel block diagonally in 3D: one component of 5
    kept = drop_small_components(volume, min_fraction=0.03)  # floor 3 voxels on a 10×10 slice
    assert not kept[0].any() and kept[1:].sum() == 5
    assert drop_small_components(volume, 0.0).sum() == 6
    assert not drop_small_components(np.zeros((2, 4, 4), bool), 0.1).any()


def test_the_shipped_operating_point_uses_a_safe_rule():
    from pathlib import Path

    from flaxtumor.operating_point import read_operating_point

    point, _ = read_operating_point(Path(__file__).resolve().parents[1] / "checkpoints")
    assert point.postprocess in SAFE_POSTPROCESS_RULES, point.postprocess


def test_reports_name_the_threshold_or_say_the_classifier_is_off():
    import math

    from flaxtumor.operating_point import OperatingPoint

    assert OperatingPoint(threshold=0.15).threshold_label == "threshold 0.15"
    assert OperatingPoint(threshold=math.inf).threshold_label == "classifier off"
