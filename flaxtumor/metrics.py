"""Segmentation and classification metrics (pure numpy).

Conventions, used by training, `evaluate` and the model card alike:
- A mask is a boolean array; anything else is compared with `> 0` (probabilities must be thresholded by the caller).
- `dice`/`iou` of two empty masks is **nan**, never 1: averaging callers skip such slices/patients, so a model that
  predicts nothing everywhere cannot score well on the many tumour-free slices of LGG volumes.
- "pooled" metrics sum pixel counts over every slice before dividing (the seed's batch-level Dice); they are always
  labelled "pooled" because they weight large tumours more and hide missed small ones.
- Undefined ratios (0/0) are nan rather than 0, so a report cannot mistake "no data" for "bad".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "dice",
    "iou",
    "volumetric_dice_per_patient",
    "summarise_patient_dice",
    "tumour_slice_dice",
    "tumour_slice_iou",
    "mean_over_scored",
    "DICE_LOSS_PARTS",
    "dice_loss_parts",
    "mean_dice_loss_parts",
    "describe_dice_loss",
    "PixelCounts",
    "pooled_dice",
    "pooled_iou",
    "pixel_accuracy",
    "confusion_counts",
    "auc",
    "roc_curve",
    "calibration",
    "classification_metrics",
    "bootstrap_interval",
]


def _bool(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a if a.dtype == np.bool_ else a > 0


def _overlap(pred: np.ndarray, target: np.ndarray) -> tuple[int, int, int]:
    """(intersection, |pred|, |target|) as Python ints (no overflow on large volumes)."""
    pred, target = _bool(pred), _bool(target)
    if pred.shape != target.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs target {target.shape}")
    return int(np.count_nonzero(pred & target)), int(np.count_nonzero(pred)), int(np.count_nonzero(target))


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """2|P∩T| / (|P|+|T|); nan when both are empty; 0 when exactly one is empty."""
    inter, p, t = _overlap(pred, target)
    return _ratio(2 * inter, p + t)


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    """|P∩T| / |P∪T|; nan when both are empty; 0 when exactly one is empty."""
    inter, p, t = _overlap(pred, target)
    return _ratio(inter, p + t - inter)


def volumetric_dice_per_patient(
    preds: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Dice of each patient's whole (D, H, W) volume, keyed by patient_id.

    A patient with no tumour in truth and none predicted gets nan (see `summarise_patient_dice`, which reports them
    separately and leaves them out of the mean).
    """
    if set(preds) != set(targets):
        raise ValueError(f"patient ids differ: {sorted(set(preds) ^ set(targets))}")
    return {pid: dice(preds[pid], targets[pid]) for pid in sorted(targets)}


def summarise_patient_dice(per_patient: Mapping[str, float]) -> dict[str, float | int | list[str]]:
    """Headline mean/median/min over patients with a defined Dice; empty-vs-empty patients listed, not scored."""
    values = np.array([v for v in per_patient.values() if not np.isnan(v)], dtype=np.float64)
    empty = sorted(pid for pid, v in per_patient.items() if np.isnan(v))
    if values.size == 0:
        stats = dict(mean=float("nan"), median=float("nan"), min=float("nan"), max=float("nan"))
    else:
        stats = dict(
            mean=float(values.mean()),
            median=float(np.median(values)),
            min=float(values.min()),
            max=float(values.max()),
        )
    return {**stats, "n_scored": int(values.size), "n_empty_both": len(empty), "empty_both_patients": empty}


def dice_by_group(per_patient: Mapping[str, float], group_of: Mapping[str, str]) -> dict[str, dict]:
    """`summarise_patient_dice` within each group of patients (e.g. by which MRI sequences they have), with the
    group's patient ids."""
    groups: dict[str, list[str]] = {}
    for pid in sorted(per_patient):
        groups.setdefault(group_of[pid], []).append(pid)
    return {name: {"patients": ids, **summarise_patient_dice({pid: per_patient[pid] for pid in ids})}
            for name, ids in sorted(groups.items())}


def call_rates(calls: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(sensitivity, specificity) of boolean slice calls against boolean truth; nan where a class has no slice."""
    calls, labels = np.asarray(calls, bool), np.asarray(labels, bool)
    sensitivity = float(calls[labels].mean()) if labels.any() else float("nan")
    specificity = float((~calls[~labels]).mean()) if (~labels).any() else float("nan")
    return sensitivity, specificity


def mean_over_scored(scores: Sequence[float]) -> float:
    """Mean of per-slice scores with the nan ones (empty-vs-empty) left out; nan when none is left."""
    kept = [s for s in scores if not np.isnan(s)]
    return float(np.mean(kept)) if kept else float("nan")


# What a patient's Dice loses to, by where the wrong voxels are (see `dice_loss_parts`).
DICE_LOSS_PARTS = (
    "false_regions",  # drawn on slices with no tumour in truth
    "missed_slices",  # tumour on slices where nothing was drawn
    "outside_outline",  # drawn beyond the outline on tumour slices (over-segmentation)
    "inside_outline",  # tumour left out on slices where something was drawn (under-segmentation)
)


def dice_loss_parts(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """1 − Dice of a (D, H, W) patient volume, split by where its errors lie: (FP + FN) / (2TP + FP + FN) summed over
    `DICE_LOSS_PARTS`, so the parts add up to exactly 1 − `dice(pred, target)`. False regions are what a gate or
    post-processing can remove, missed slices are failed detections, and the two outline parts are boundary errors.
    All nan for an empty-vs-empty patient (not scored, like its Dice)."""
    pred, target = _bool(pred), _bool(target)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"need two (D, H, W) volumes of one shape, got {pred.shape} and {target.shape}")
    tumour_slice = target.any(axis=(1, 2))[:, None, None]
    drawn_slice = pred.any(axis=(1, 2))[:, None, None]
    fp, fn = pred & ~target, target & ~pred
    errors = {
        "false_regions": np.count_nonzero(fp & ~tumour_slice),
        "missed_slices": np.count_nonzero(fn & ~drawn_slice),
        "outside_outline": np.count_nonzero(fp & tumour_slice),
        "inside_outline": np.count_nonzero(fn & drawn_slice),
    }
    denominator = 2 * int(np.count_nonzero(pred & target)) + int(np.count_nonzero(fp)) + int(np.count_nonzero(fn))
    return {part: _ratio(int(errors[part]), denominator) for part in DICE_LOSS_PARTS}


def mean_dice_loss_parts(per_patient: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Each part's mean over scored patients: they add up to 1 − the mean per-patient Dice over the same patients."""
    scored = [parts for parts in per_patient.values() if not any(np.isnan(v) for v in parts.values())]
    return {part: float(np.mean([p[part] for p in scored])) if scored else float("nan") for part in DICE_LOSS_PARTS}


def describe_dice_loss(parts: Mapping[str, float]) -> str:
    """One line for a report: "Dice lost to false regions 0.012, missed slices 0.061, …"."""
    return "Dice lost to " + ", ".join(f"{part.replace('_', ' ')} {parts[part]:.3f}" for part in DICE_LOSS_PARTS)


def _per_slice(fn, preds: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> float:
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
    return mean_over_scored([fn(p, t) for p, t in zip(preds, targets)])


def tumour_slice_dice(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> float:
    """Mean slice Dice over slices where the target or the prediction is non-empty (nan if there are none).

    A false-positive slice (empty truth, non-empty prediction) counts as 0, a missed tumour slice as 0.
    """
    return _per_slice(dice, preds, targets)


def tumour_slice_iou(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> float:
    """Mean slice IoU with the same exclusion rule as `tumour_slice_dice`."""
    return _per_slice(iou, preds, targets)


@dataclass(frozen=True)
class PixelCounts:
    """Pixel confusion counts summed over any number of masks: the state of the pooled metrics, which can be
    accumulated patient by patient (`+`) without keeping every mask in memory."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @classmethod
    def from_masks(cls, preds: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> "PixelCounts":
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
        total = cls()
        for pred, target in zip(preds, targets):
            inter, p, t = _overlap(pred, target)
            n = int(np.asarray(target).size)
            total += cls(tp=inter, fp=p - inter, fn=t - inter, tn=n - p - t + inter)
        return total

    def __add__(self, other: "PixelCounts") -> "PixelCounts":
        return PixelCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def dice(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def iou(self) -> float:
        return _ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def pixel_accuracy(self) -> float:
        return _ratio(self.tp + self.tn, self.tp + self.fp + self.fn + self.tn)


def pooled_dice(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> float:
    """Dice of all pixels of all slices pooled together (the seed's metric; label it "pooled")."""
    return PixelCounts.from_masks(preds, targets).dice


def pooled_iou(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> float:
    """IoU of all pixels pooled together (label it "pooled")."""
    return PixelCounts.from_masks(preds, targets).iou


def pixel_accuracy(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> float:
    """Fraction of all pixels classified right (pooled; dominated by background, so near 1 for any sane model)."""
    return PixelCounts.from_masks(preds, targets).pixel_accuracy


# -- classification ------------------------------------------------------------------------------------------------


def _check_probs_labels(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64).ravel()
    labels = _bool(np.asarray(labels).ravel())
    if probs.shape != labels.shape:
        raise ValueError(f"{probs.size} probabilities for {labels.size} labels")
    if probs.size and (np.isnan(probs).any() or probs.min() < 0 or probs.max() > 1):
        raise ValueError("probabilities must lie in [0, 1] (no nan)")
    return probs, labels


def confusion_counts(pred: np.ndarray, labels: np.ndarray) -> dict[str, int]:
    """tn, fp, fn, tp of boolean predictions against boolean labels."""
    pred, labels = _bool(pred).ravel(), _bool(labels).ravel()
    return {
        "tn": int(np.count_nonzero(~pred & ~labels)),
        "fp": int(np.count_nonzero(pred & ~labels)),
        "fn": int(np.count_nonzero(~pred & labels)),
        "tp": int(np.count_nonzero(pred & labels)),
    }


def auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by ranks (Mann-Whitney U): P(score_pos > score_neg) + 0.5 P(tie). nan with one class only."""
    probs, labels = _check_probs_labels(probs, labels)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata  # here, not at the top: scipy.stats costs ~0.6 s of every predict start

    ranks = rankdata(probs)  # midranks: ties count one half
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def roc_curve(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), one point per distinct score from high to low, starting at (0, 0)."""
    probs, labels = _check_probs_labels(probs, labels)
    order = np.argsort(-probs, kind="stable")
    p, y = probs[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(p)), p.size - 1]  # a threshold between distinct scores only
    tps = np.cumsum(y)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    tpr = np.r_[0.0, tps / n_pos] if n_pos else np.full(tps.size + 1, np.nan)
    fpr = np.r_[0.0, fps / n_neg] if n_neg else np.full(fps.size + 1, np.nan)
    return fpr, tpr, np.r_[np.inf, p[last_of_tie]]


def calibration(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> dict:
    """Expected calibration error of the tumour probability, with the reliability-diagram data.

    Equal-width bins on [0, 1] (the last one closed). In each bin, `confidence` is the mean predicted tumour probability
    and `frequency` the observed fraction of tumour slices; ECE = sum_b n_b/N |frequency_b - confidence_b|.
    Empty bins have nan confidence/frequency and weigh nothing.
    """
    probs, labels = _check_probs_labels(probs, labels)
    edges = np.arange(n_bins + 1) / n_bins  # exact decimal edges (0.3, not 0.30000000000000004)
    idx = np.clip(np.digitize(probs, edges[1:-1], right=False), 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, weights=probs, minlength=n_bins)
    sum_y = np.bincount(idx, weights=labels.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = sum_p / counts
        frequency = sum_y / counts
    filled = counts > 0
    gaps = np.abs(frequency[filled] - confidence[filled])
    ece = float(np.sum(counts[filled] / probs.size * gaps)) if probs.size else float("nan")
    return {
        "ece": ece,
        "n_bins": n_bins,
        "bin_edges": edges.tolist(),
        "bin_counts": counts.astype(int).tolist(),
        "bin_confidence": confidence.tolist(),
        "bin_frequency": frequency.tolist(),
    }


def classification_metrics(
    probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5, n_bins: int = 10
) -> dict:
    """Slice-level tumour detection metrics; a slice is called positive when its probability >= threshold.

    Returns accuracy, precision, recall (= sensitivity), specificity, f1, auc, ece, the counts (tn, fp, fn, tp),
    `confusion_matrix` [[tn, fp], [fn, tp]] (rows truth, columns prediction), `calibration` (see `calibration`),
    `threshold`, `n`, `n_positive`.
    """
    probs, labels = _check_probs_labels(probs, labels)
    c = confusion_counts(probs >= threshold, labels)
    tn, fp, fn, tp = c["tn"], c["fp"], c["fn"], c["tp"]
    recall = _ratio(tp, tp + fn)
    cal = calibration(probs, labels, n_bins)
    return {
        "threshold": float(threshold),
        "n": int(probs.size),
        "n_positive": int(labels.sum()),
        "accuracy": _ratio(tp + tn, probs.size),
        "precision": _ratio(tp, tp + fp),
        "recall": recall,
        "sensitivity": recall,
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "auc": auc(probs, labels),
        "ece": cal["ece"],
        **c,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "calibration": cal,
    }


def bootstrap_interval(
    items: Sequence, statistic: Callable[[list], float], n_resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(items)`: resample the items (e.g. patients) with replacement.

    `statistic` takes a list of items, so it may pool what each item holds (e.g. the slices of each patient). Resamples
    whose statistic is nan are dropped; (nan, nan) when none is left or there are no items."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    items = list(items)
    if not items:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.integers(len(items), size=(n_resamples, len(items)))
    values = np.array([statistic([items[i] for i in row]) for row in draws], dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


# -- explanation quality ---------------------------------------------------------------------------------------------

POINTING_MIN_PIXELS = 200  # only slices with a tumour this large are scored
POINTING_TOLERANCE_PX = 8  # the peak may miss the outline by this much (the true mask is dilated by a disk)


def pointing_hit(heatmap: np.ndarray, mask: np.ndarray, tolerance_px: int = POINTING_TOLERANCE_PX) -> bool:
    """Whether the heatmap's peak (the first maximum) lies inside the true mask dilated by `tolerance_px`."""
    from scipy import ndimage

    heatmap, mask = np.asarray(heatmap), _bool(mask)
    if heatmap.shape != mask.shape:
        raise ValueError(f"heatmap {heatmap.shape} and mask {mask.shape} differ in shape")
    r = np.arange(-tolerance_px, tolerance_px + 1)
    disk = (r[:, None] ** 2 + r[None, :] ** 2) <= tolerance_px**2
    grown = ndimage.binary_dilation(mask, structure=disk) if tolerance_px > 0 else mask
    return bool(grown.flat[int(np.argmax(heatmap))])


def pointing_score(
    heatmaps: Sequence[np.ndarray], masks: Sequence[np.ndarray], min_pixels: int = POINTING_MIN_PIXELS,
    tolerance_px: int = POINTING_TOLERANCE_PX,
) -> dict[str, float | int]:
    """Share of tumour slices (>= `min_pixels` true pixels) whose Grad-CAM peak falls on the tumour (pointing game,
    Zhang et al. 2018, with a tolerance); NaN when no slice qualifies."""
    hits = [pointing_hit(h, m, tolerance_px) for h, m in zip(heatmaps, masks) if np.count_nonzero(m) >= min_pixels]
    return {"pointing_score": float(np.mean(hits)) if hits else float("nan"), "pointing_slices": len(hits),
            "pointing_min_pixels": min_pixels, "pointing_tolerance_px": tolerance_px}
