"""The pipeline's operating point: one frozen type, read, validated and written in one place (`pipeline.json`).

An `OperatingPoint` says how the classifier's probabilities and the segmenter's masks become a slice's verdict and its
final mask:

- `threshold`: a slice is flagged by the classifier when its tumour probability is ≥ this (`math.inf`: the classifier
  is off, no slice is flagged by it; `null` in pipeline.json, which is strict JSON);
- `min_tumour_area`: the fused gate; > 0 also flags a slice whose segmenter mask covers at least this fraction of it;
- `mask_threshold`: the segmenter's per-pixel probability;
- `postprocess`: the rule applied to a patient's gated masks, by name (`POSTPROCESS_RULES`): "none",
  "drop_small_<floor>" (3D components below a floor, a fraction of one slice's area, removed) or the legacy
  "largest_component" (3D largest connected component, which can erase a real tumour; see `SAFE_POSTPROCESS_RULES`);
- `tta`: average each model's output over the image and its horizontal flip;
- `gate`: empty the masks of slices that are not flagged (off: the segmenter's masks are kept everywhere);
- `flag_threshold`: the classifier probability at which a slice with nothing outlined is reported "suspicious"
  (`flags`); unset (null), the gate's `threshold`. A gate tuned for Dice may sit far below the classifier's own
  decision threshold (0.05: it only clears slices the classifier is sure of), and flagging every slice above it
  would call a quarter of the tumour-free slices suspicious.

`gate_and_postprocess` is the single function that turns raw outputs into slice calls and final masks; the pipeline,
`evaluate` and `tune` all call it. `verdicts` turns a final mask and the classifier's call into the slice's verdict,
which always agrees with the mask: "tumour" exactly when a region is outlined.

Nothing changes a point in place: use `dataclasses.replace(point, threshold=0.3)` or `point.override(...)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

OPERATING_POINT_FILE = "pipeline.json"

TUMOUR, SUSPICIOUS, NO_TUMOUR = "tumour", "suspicious", "no tumour"
VERDICT_MEANINGS = {
    TUMOUR: "a tumour region is outlined on this slice",
    SUSPICIOUS: "the classifier flags this slice, but no region is outlined: look at it yourself",
    NO_TUMOUR: "the classifier does not flag this slice and no region is outlined",
}


def largest_connected_component(volume: np.ndarray) -> np.ndarray:
    """Keeps the largest 3D component of a (D, H, W) bool volume (26-connectivity: slices are thick, so a tumour
    may only touch its neighbour slice diagonally)."""
    labels, n = ndimage.label(volume, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return volume.astype(bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def drop_small_components(volume: np.ndarray, min_fraction: float) -> np.ndarray:
    """Removes the 3D components (26-connectivity) of a (D, H, W) bool volume with fewer voxels than `min_fraction`
    of one slice's area, and nothing else. Unlike the largest component, it never weighs one region against another,
    so a real tumour survives a larger false region however weak or fragmented it is, as long as each of its
    fragments is above the floor."""
    labels, n = ndimage.label(volume, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return volume.astype(bool)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_fraction * volume.shape[1] * volume.shape[2]
    keep[0] = False
    return keep[labels]


# Component floors (fractions of one slice's area) that cross-validation chooses among; 0.001 of a 256² slice is
# 66 voxels, 0.008 is 524. The first cross-validation chose 0.004, then the grid's edge, so the grid grew: 0.008 won
# and 0.016 lost (it erased small tumours). 0.016 is not offered: it would also erase the weak, fragmented tumour of
# tests/test_postprocess.py (fragments of 1.6 % of a slice), which every selectable rule must keep.
SMALL_COMPONENT_FLOORS = (0.0005, 0.001, 0.002, 0.004, 0.008)


def _floor_rule(fraction: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda volume: drop_small_components(volume, fraction)


# Post-processing rules by name: (D, H, W) bool volume of gated masks -> the final volume. Add rules here.
POSTPROCESS_RULES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda volume: volume,
    "largest_component": largest_connected_component,
    **{f"drop_small_{f:g}": _floor_rule(f) for f in SMALL_COMPONENT_FLOORS},
}
# The rules a tuning or cross-validation may choose: those that cannot erase a tumour because a larger false region
# exists elsewhere. "largest_component" can (a compact false blob beats a fragmented tumour), so it stays loadable
# for old pipeline.json files but is never chosen.
SAFE_POSTPROCESS_RULES = tuple(name for name in POSTPROCESS_RULES if name != "largest_component")
_FIELDS = {"threshold": float, "min_tumour_area": float, "mask_threshold": float, "postprocess": str, "tta": bool,
           "gate": bool, "flag_threshold": float}
_OPTIONAL = {"flag_threshold"}  # None: unset


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float = 0.5
    min_tumour_area: float = 0.0
    mask_threshold: float = 0.5
    postprocess: str = "none"
    tta: bool = False
    gate: bool = True
    flag_threshold: float | None = None

    def __post_init__(self) -> None:
        for name, kind in _FIELDS.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            ok = isinstance(value, bool) if kind is bool else isinstance(value, str) if kind is str else (
                isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, (bool, np.bool_)))
            if not ok:
                raise ValueError(f"{name!r} must be a {kind.__name__}, got {value!r}")
            if kind is float:
                object.__setattr__(self, name, float(value))
        if not (0.0 <= self.threshold <= 1.0 or self.threshold == math.inf):
            raise ValueError(f"'threshold' must lie in [0, 1] (or be inf: classifier off), got {self.threshold!r}")
        if self.flag_threshold is not None and not 0.0 <= self.flag_threshold <= 1.0:
            raise ValueError(f"'flag_threshold' must lie in [0, 1] (or be null: the threshold), got "
                             f"{self.flag_threshold!r}")
        for name in ("min_tumour_area", "mask_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name!r} must lie in [0, 1], got {getattr(self, name)!r}")
        if self.postprocess not in POSTPROCESS_RULES:
            raise ValueError(f"'postprocess' must be one of {sorted(POSTPROCESS_RULES)}, got {self.postprocess!r}")

    @property
    def threshold_label(self) -> str:
        """How reports name the classifier threshold: "threshold 0.15", or "classifier off" (inf)."""
        return "classifier off" if self.threshold == math.inf else f"threshold {self.threshold:.2f}"

    @property
    def flag_label(self) -> str:
        """How reports say when a slice is flagged: "P(tumour) ≥ 0.50", or "classifier off"."""
        return "classifier off" if self.threshold == math.inf else f"P(tumour) ≥ {self.effective_flag_threshold:.2f}"

    @property
    def effective_flag_threshold(self) -> float:
        """The probability at which the classifier flags a slice: `flag_threshold`, unset the gate's `threshold`
        (inf: the classifier is off and flags nothing, whatever `flag_threshold` says)."""
        return self.flag_threshold if self.flags_apart else self.threshold

    @property
    def flags_apart(self) -> bool:
        """Whether the classifier flags slices at a threshold of their own, not the gate's (it is on, and
        `flag_threshold` is set)."""
        return self.threshold != math.inf and self.flag_threshold is not None

    def flags(self, probabilities: np.ndarray | Sequence[float]) -> np.ndarray:
        """(N,) bool: the slices the classifier flags, the ones a verdict calls "suspicious" when nothing is
        outlined on them. The one place a flag is computed (the pipeline, evaluate, the app)."""
        return np.asarray(probabilities) >= self.effective_flag_threshold

    @property
    def needs_every_mask(self) -> bool:
        """Whether every slice's segmenter mask can reach the final masks, whatever the classifier says: there is no
        gate, or the fused gate lets a mask flag its own slice (`needs_segmenting`)."""
        return not self.gate or self.min_tumour_area > 0

    @property
    def lcc(self) -> bool:
        """Whether the post-processing keeps the largest 3D component."""
        return self.postprocess == "largest_component"

    def override(self, **changes: Any) -> "OperatingPoint":
        """A copy with the given fields changed; a None value keeps the field. `lcc=True/False` is accepted as a
        shorthand for `postprocess="largest_component"/"none"` (the CLIs' --lcc flag)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "lcc" in changes:
            changes["postprocess"] = "largest_component" if changes.pop("lcc") else "none"
        unknown = set(changes) - set(_FIELDS)
        if unknown:
            raise TypeError(f"unknown operating-point field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as `pipeline.json` stores them: the two original rules as `"lcc": true/false` (the format every
        version reads), any other rule as `"postprocess": NAME`."""
        d = dataclasses.asdict(self)
        if self.flag_threshold is None:  # unset: files stay as every earlier version wrote and reads them
            del d["flag_threshold"]
        if self.postprocess in ("none", "largest_component"):
            d["lcc"] = self.lcc
            del d["postprocess"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], defaults: "OperatingPoint | None" = None) -> "OperatingPoint":
        """The operating-point keys of `d` over `defaults`; other keys (provenance such as `tuned_on`) are ignored.
        A file written before `postprocess` existed says `"lcc": true/false`; `"threshold": null` is the classifier
        off (inf)."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        changes = {k: d[k] for k in _FIELDS if k in d}
        if "threshold" in changes and changes["threshold"] is None:
            changes["threshold"] = math.inf  # strict JSON has no infinity: the writer stores "classifier off" as null
        if "lcc" in d:
            if not isinstance(d["lcc"], bool):
                raise ValueError(f"'lcc' must be a bool, got {d['lcc']!r}")
            rule = "largest_component" if d["lcc"] else "none"
            if changes.get("postprocess", rule) != rule:
                raise ValueError(f"'lcc' ({d['lcc']}) contradicts 'postprocess' ({changes['postprocess']!r})")
            changes["postprocess"] = rule
        base = defaults or cls()
        return dataclasses.replace(base, **changes)


def youden_j(sensitivity: float, specificity: float) -> float:
    """Sensitivity + specificity - 1 of the slice calls; -inf when either is undefined (one class only)."""
    j = sensitivity + specificity - 1.0
    return -math.inf if math.isnan(j) else j


def choice_key(dice_mean: float, sensitivity: float, specificity: float, tta: bool, postprocess: str,
               min_tumour_area: float, moved_mask_threshold: bool = False) -> tuple:
    """THE rule that picks an operating point (`tune` on validation patients, `crossval` on out-of-fold predictions):
    the best mean per-patient Dice, where a tie is equal to 4 decimals; ties go to the slice calls' Youden's J, so
    neither sensitivity nor specificity is bought with the other for no Dice; then to the simpler setting (no TTA,
    then no post-processing, then no fused area gate, then the segmenter checkpoint's own mask threshold). Larger is
    better."""
    return (round(dice_mean, 4), youden_j(sensitivity, specificity), -tta, -(postprocess != "none"),
            -(min_tumour_area > 0), -moved_mask_threshold)


def flag_at_classifier_threshold(point: OperatingPoint, classifier_threshold: float) -> OperatingPoint:
    """A tuned point with its suspicious flags at the classifier checkpoint's own threshold. The gate's threshold is
    chosen for Dice (`tune`, `classifier_gate`) and may sit far below the classifier's decision; flags stay at the
    decision. Unchanged when the classifier is off or the two agree."""
    if point.threshold == math.inf or point.threshold == classifier_threshold:
        return dataclasses.replace(point, flag_threshold=None)  # (override reads None as "keep")
    return point.override(flag_threshold=classifier_threshold)


def read_operating_point(dir: str | Path, defaults: OperatingPoint | None = None) -> tuple[OperatingPoint, dict]:
    """(the point in DIR/pipeline.json over `defaults`, the file's whole content for the record: provenance,
    validation scores, ablation). No file: (`defaults`, {}). A malformed file is an error naming it."""
    path = Path(dir) / OPERATING_POINT_FILE
    defaults = defaults or OperatingPoint()
    if not path.is_file():
        return defaults, {}
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the operating point ({e})") from None
    try:
        return OperatingPoint.from_dict(content, defaults), content
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def write_operating_point(path: str | Path, point: OperatingPoint, **record: Any) -> Path:
    """Writes `point` plus `record` (provenance, scores, ablation; strict JSON, nan/inf as null) to `path`."""
    path = Path(path)
    clash = set(record) & (set(_FIELDS) | {"lcc"})
    if clash:
        raise ValueError(f"the record repeats operating-point field(s) {sorted(clash)}")
    content = {**point.to_dict(), **record}
    path.write_text(json.dumps(jsonable(content), indent=2) + "\n")
    return path


def jsonable(x: Any) -> Any:
    """nan/inf → null (strict JSON), numpy scalars → Python; dicts and lists recursively."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ---------------------------------------------------------------------------------------------------------------------
# From raw model outputs to calls, masks and verdicts: the one code path of the pipeline, evaluate and tune
# ---------------------------------------------------------------------------------------------------------------------


def needs_segmenting(probabilities: np.ndarray | Sequence[float], point: OperatingPoint) -> np.ndarray:
    """(N,) bool: the slices whose segmenter mask can reach the final masks at `point`. Every slice without a gate or
    with the fused gate (its own mask may flag it); else only those the classifier lets through, since the gate
    empties every other mask: leaving those unsegmented gives what segmenting them would."""
    probabilities = np.asarray(probabilities)
    return np.ones(probabilities.shape, bool) if point.needs_every_mask else probabilities >= point.threshold


def slice_calls(probabilities: np.ndarray, masks: Sequence[np.ndarray], threshold: float, min_tumour_area: float
                ) -> np.ndarray:
    """(N,) bool: the classifier's probability clears `threshold`, or (fused gate, `min_tumour_area` > 0) the
    segmenter's mask covers at least that fraction of the slice. Sizes may differ between slices."""
    calls = np.asarray(probabilities) >= threshold
    if min_tumour_area > 0:
        calls |= np.array([np.asarray(m).mean() >= min_tumour_area for m in masks], bool)
    return calls


def gate_and_postprocess(probabilities: np.ndarray, masks: np.ndarray | Sequence[np.ndarray], point: OperatingPoint
                         ) -> tuple[np.ndarray, np.ndarray | list[np.ndarray]]:
    """(N,) tumour probabilities and N ungated segmenter masks → (slice calls (N,), final masks): slices not called
    are emptied when `point.gate`, then `point.postprocess` runs over the stack as one volume. Masks given as one
    (N, H, W) array come back as one; masks given as a list (sizes may differ) come back as a list, and then only
    the rule "none" is possible."""
    as_array = isinstance(masks, np.ndarray)
    masks = np.asarray(masks, bool) if as_array else [np.asarray(m, bool) for m in masks]
    calls = slice_calls(probabilities, masks, point.threshold, point.min_tumour_area)
    if point.gate:
        masks = masks & calls[:, None, None] if as_array else [m & c for m, c in zip(masks, calls)]
    if point.postprocess == "none" or len(masks) == 0:
        return calls, masks
    if not as_array:
        if len({m.shape for m in masks}) != 1:
            raise ValueError(f"post-processing {point.postprocess!r} needs a volume of one slice size")
        return calls, list(POSTPROCESS_RULES[point.postprocess](np.stack(masks)))
    return calls, POSTPROCESS_RULES[point.postprocess](masks)


def verdicts(classifier_calls: Sequence[bool], masks: Sequence[np.ndarray]) -> list[str]:
    """Per slice: "tumour" when its final mask outlines a region, else "suspicious" when the classifier flags it,
    else "no tumour". The verdict never contradicts the mask."""
    return [TUMOUR if np.any(m) else SUSPICIOUS if c else NO_TUMOUR for c, m in zip(classifier_calls, masks)]
