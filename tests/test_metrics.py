"""Metrics on hand-made masks and scores with known answers, the empty cases included."""

import itertools
import math

import numpy as np
import pytest

from flaxtumor import metrics


def _mask(shape, *boxes):
    m = np.zeros(shape, bool)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = True
    return m


EMPTY = np.zeros((4, 4), bool)
A = _mask((4, 4), (0, 2, 0, 2))  # 4 pixels
B = _mask((4, 4), (0, 2, 0, 1))  # 2 pixels, inside A
C = _mask((4, 4), (2, 4, 2, 4))  # 4 pixels, disjoint from A


# -- dice / iou ----------------------------------------------------------------------------------------------------


def test_dice_iou_known_values():
    assert metrics.dice(A, A) == 1.0
    assert metrics.iou(A, A) == 1.0
    assert metrics.dice(A, B) == pytest.approx(2 * 2 / (4 + 2))
    assert metrics.iou(A, B) == pytest.approx(2 / 4)
    assert metrics.dice(A, C) == 0.0
    assert metrics.iou(A, C) == 0.0


def test_dice_iou_empty_cases():
    assert math.isnan(metrics.dice(EMPTY, EMPTY))  # never 1
    assert math.isnan(metrics.iou(EMPTY, EMPTY))
    assert metrics.dice(EMPTY, A) == 0.0  # missed tumour
    assert metrics.dice(A, EMPTY) == 0.0  # false positive
    assert metrics.iou(EMPTY, A) == 0.0
    assert metrics.iou(A, EMPTY) == 0.0


def test_dice_accepts_uint8_masks_and_rejects_shape_mismatch():
    assert metrics.dice(A.astype(np.uint8) * 255, B.astype(np.uint8)) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="shape"):
        metrics.dice(A, np.zeros((3, 4), bool))


# -- slice and patient aggregation ---------------------------------------------------------------------------------


def test_tumour_slice_dice_excludes_empty_vs_empty():
    preds = [A, EMPTY, EMPTY, A]
    targets = [B, EMPTY, EMPTY, A]
    # slices 2 and 3 are empty-vs-empty: excluded, not counted as 1
    assert metrics.tumour_slice_dice(preds, targets) == pytest.approx((2 / 3 + 1.0) / 2)
    assert metrics.tumour_slice_iou(preds, targets) == pytest.approx((0.5 + 1.0) / 2)


def test_tumour_slice_dice_counts_false_positive_and_missed_slices_as_zero():
    preds = [A, EMPTY, C]
    targets = [A, A, EMPTY]  # exact, missed, false positive
    assert metrics.tumour_slice_dice(preds, targets) == pytest.approx(1 / 3)


def test_tumour_slice_dice_all_empty_is_nan():
    assert math.isnan(metrics.tumour_slice_dice([EMPTY, EMPTY], [EMPTY, EMPTY]))
    assert math.isnan(metrics.tumour_slice_dice([], []))


def test_pooled_metrics_sum_pixels_over_slices():
    preds = [A, EMPTY, C]
    targets = [B, EMPTY, C]
    # intersection 2 + 4, |P| 8, |T| 6
    assert metrics.pooled_dice(preds, targets) == pytest.approx(12 / 14)
    assert metrics.pooled_iou(preds, targets) == pytest.approx(6 / 8)
    # wrong pixels: 2 false positives of A outside B; 48 pixels in all
    assert metrics.pixel_accuracy(preds, targets) == pytest.approx(46 / 48)
    assert math.isnan(metrics.pooled_dice([EMPTY], [EMPTY]))
    assert metrics.pixel_accuracy([EMPTY], [EMPTY]) == 1.0


def test_volumetric_dice_per_patient_and_summary():
    vol = lambda *ms: np.stack(ms)  # noqa: E731
    preds = {"p1": vol(A, EMPTY), "p2": vol(EMPTY, EMPTY), "p3": vol(EMPTY, EMPTY), "p4": vol(A, C)}
    targets = {"p1": vol(B, EMPTY), "p2": vol(EMPTY, EMPTY), "p3": vol(A, EMPTY), "p4": vol(A, C)}
    per = metrics.volumetric_dice_per_patient(preds, targets)
    assert per["p1"] == pytest.approx(2 / 3)
    assert math.isnan(per["p2"])  # tumour-free and nothing predicted: not scored
    assert per["p3"] == 0.0
    assert per["p4"] == 1.0
    s = metrics.summarise_patient_dice(per)
    assert s["mean"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert s["median"] == pytest.approx(2 / 3)
    assert s["min"] == 0.0
    assert s["n_scored"] == 3
    assert s["n_empty_both"] == 1 and s["empty_both_patients"] == ["p2"]


def test_volumetric_dice_is_volume_level_not_slice_mean():
    # slice dice would be (1 + 0) / 2; volume dice weighs the big slice more
    big = _mask((4, 4), (0, 4, 0, 3))  # 12 px
    small = _mask((4, 4), (3, 4, 3, 4))  # 1 px
    per = metrics.volumetric_dice_per_patient({"p": np.stack([big, EMPTY])}, {"p": np.stack([big, small])})
    assert per["p"] == pytest.approx(24 / 25)


def test_volumetric_dice_rejects_mismatched_patients():
    with pytest.raises(ValueError, match="patient ids"):
        metrics.volumetric_dice_per_patient({"a": A[None]}, {"b": A[None]})


# -- classification ------------------------------------------------------------------------------------------------


def _brute_force_auc(probs, labels):
    pos = [p for p, y in zip(probs, labels) if y]
    neg = [p for p, y in zip(probs, labels) if not y]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_brute_force_pair_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.4
    probs = np.round(rng.random(60) * 0.5 + 0.3 * labels, 1)  # coarse rounding makes many ties
    assert metrics.auc(probs, labels) == pytest.approx(_brute_force_auc(probs, labels))


def test_auc_edge_cases():
    assert metrics.auc([0.1, 0.9], [0, 1]) == 1.0
    assert metrics.auc([0.9, 0.1], [0, 1]) == 0.0
    assert metrics.auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    assert math.isnan(metrics.auc([0.2, 0.3], [1, 1]))  # one class only


def test_roc_curve_area_equals_auc():
    rng = np.random.default_rng(0)
    labels = rng.random(50) < 0.5
    probs = np.round(rng.random(50), 1)
    fpr, tpr, thresholds = metrics.roc_curve(probs, labels)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids handle ties like midranks
    assert area == pytest.approx(metrics.auc(probs, labels))
    assert thresholds[0] == np.inf and np.all(np.diff(thresholds[1:]) < 0)


def test_classification_metrics_known_confusion_matrix():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    probs = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.2, 0.1, 0.1, 0.0, 0.4])
    m = metrics.classification_metrics(probs, labels, threshold=0.5)
    # predicted positive: 0.9 0.8 0.6 (tp) and 0.7 (fp); 0.3 is a missed tumour
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (5, 1, 1, 3)
    assert m["confusion_matrix"] == [[5, 1], [1, 3]]
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["precision"] == pytest.approx(0.75)
    assert m["recall"] == m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["f1"] == pytest.approx(0.75)
    assert m["auc"] == pytest.approx(_brute_force_auc(probs, labels))
    assert m["n"] == 10 and m["n_positive"] == 4


def test_threshold_is_inclusive():
    m = metrics.classification_metrics([0.5], [1], threshold=0.5)
    assert m["tp"] == 1


def test_classification_metrics_undefined_ratios_are_nan():
    m = metrics.classification_metrics([0.1, 0.2], [0, 0], threshold=0.5)
    assert m["accuracy"] == 1.0 and m["specificity"] == 1.0
    assert math.isnan(m["precision"]) and math.isnan(m["recall"]) and math.isnan(m["f1"]) and math.isnan(m["auc"])


def test_classification_metrics_rejects_bad_probabilities():
    with pytest.raises(ValueError, match="probabilities"):
        metrics.classification_metrics([1.2, 0.1], [1, 0])
    with pytest.raises(ValueError):
        metrics.classification_metrics([0.2, 0.1], [1, 0, 1])


def test_calibration_known_ece_and_bins():
    # bin [0.0, 0.1): 2 slices at 0.05, none positive → gap 0.05; bin [0.9, 1.0]: 2 at 1.0, one positive → gap 0.5
    probs = np.array([0.05, 0.05, 1.0, 1.0])
    labels = np.array([0, 0, 1, 0])
    cal = metrics.calibration(probs, labels, n_bins=10)
    assert cal["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.5)
    assert cal["bin_counts"] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    assert cal["bin_confidence"][0] == pytest.approx(0.05) and cal["bin_frequency"][9] == 0.5
    assert math.isnan(cal["bin_confidence"][5])
    assert len(cal["bin_edges"]) == 11


def test_perfectly_calibrated_scores_have_zero_ece():
    probs = np.array([0.25] * 4 + [0.75] * 4)
    labels = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    assert metrics.calibration(probs, labels, n_bins=4)["ece"] == pytest.approx(0.0)


def test_pixel_counts_accumulate_like_pooling_everything():
    preds, targets = [A, EMPTY, C, B], [B, EMPTY, C, A]
    whole = metrics.PixelCounts.from_masks(preds, targets)
    counts = metrics.PixelCounts.from_masks
    parts = counts(preds[:2], targets[:2]) + counts(preds[2:], targets[2:])
    assert whole == parts
    assert whole.tp + whole.fp + whole.fn + whole.tn == 4 * 16
    assert whole.dice == pytest.approx(metrics.pooled_dice(preds, targets))


def test_mean_over_scored_skips_nan():
    assert metrics.mean_over_scored([1.0, float("nan"), 0.0]) == 0.5
    assert math.isnan(metrics.mean_over_scored([float("nan")]))


def _volume(*slices: list[tuple[int, int]]) -> np.ndarray:
    """A (D, 4, 4) bool volume; each slice is given as its set (row, col) pixels."""
    vol = np.zeros((len(slices), 4, 4), bool)
    for d, pixels in enumerate(slices):
        for r, c in pixels:
            vol[d, r, c] = True
    return vol


def test_dice_loss_parts_known_answer_and_sum():
    # slice 0: truth 2 px, drawn 3 px (2 right, 1 outside); slice 1: truth 2 px, nothing drawn;
    # slice 2: no truth, 1 px drawn; slice 3: truth 2 px, 1 of them drawn
    truth = _volume([(0, 0), (0, 1)], [(1, 1), (1, 2)], [], [(2, 2), (2, 3)])
    pred = _volume([(0, 0), (0, 1), (3, 3)], [], [(0, 0)], [(2, 2)])
    parts = metrics.dice_loss_parts(pred, truth)
    # TP 3, FP 2 (1 outside the outline, 1 false region), FN 3 (2 on the missed slice, 1 inside the outline)
    assert parts == {"false_regions": 1 / 11, "missed_slices": 2 / 11, "outside_outline": 1 / 11,
                     "inside_outline": 1 / 11}
    assert math.isclose(sum(parts.values()), 1 - metrics.dice(pred, truth))


@pytest.mark.parametrize("seed", range(5))
def test_dice_loss_parts_add_up_to_one_minus_dice(seed):
    rng = np.random.default_rng(seed)
    truth = rng.random((6, 8, 8)) < 0.2
    truth[2] = False  # a tumour-free slice
    pred = rng.random((6, 8, 8)) < 0.2
    pred[4] = False  # a missed slice
    parts = metrics.dice_loss_parts(pred, truth)
    assert all(v >= 0 for v in parts.values()) and parts["false_regions"] > 0 and parts["missed_slices"] > 0
    assert math.isclose(sum(parts.values()), 1 - metrics.dice(pred, truth))


def test_dice_loss_parts_perfect_empty_and_bad_shapes():
    truth = _volume([(0, 0)], [])
    assert set(metrics.dice_loss_parts(truth, truth).values()) == {0.0}
    empty = np.zeros((2, 4, 4), bool)
    assert all(math.isnan(v) for v in metrics.dice_loss_parts(empty, empty).values())
    with pytest.raises(ValueError, match="volumes"):
        metrics.dice_loss_parts(truth[0], truth[0])


def test_mean_dice_loss_parts_adds_up_to_one_minus_mean_dice():
    rng = np.random.default_rng(0)
    volumes = {f"p{i}": (rng.random((5, 8, 8)) < 0.3, rng.random((5, 8, 8)) < 0.3) for i in range(4)}
    volumes["empty"] = (np.zeros((5, 8, 8), bool), np.zeros((5, 8, 8), bool))  # not scored
    per_patient = {pid: metrics.dice_loss_parts(p, t) for pid, (p, t) in volumes.items()}
    dice = metrics.summarise_patient_dice({pid: metrics.dice(p, t) for pid, (p, t) in volumes.items()})
    assert math.isclose(sum(metrics.mean_dice_loss_parts(per_patient).values()), 1 - dice["mean"])


def test_call_rates_known_answer_and_missing_class():
    calls = np.array([1, 0, 1, 1, 0], bool)
    labels = np.array([1, 1, 0, 0, 0], bool)
    assert metrics.call_rates(calls, labels) == (0.5, 1 / 3)
    sensitivity, specificity = metrics.call_rates(calls[2:], labels[2:])  # no tumour slice: sensitivity undefined
    assert np.isnan(sensitivity) and specificity == 1 / 3
