"""Ground truth beside a prediction: pairing kaggle-style masks with their slices, and the scores shown with them.

`predict` and the app both use this module, so a patient's Dice is the same number in the CSV, in the app and in
`evaluate` (all three call `metrics.dice` on the same binary masks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from flaxtumor.data.io import DataError, is_mask_name
from flaxtumor.metrics import dice, dice_loss_parts

PATIENT_DICE_PROTOCOL = (
    "per-patient volumetric Dice: the true and predicted tumour voxels of all the patient's slices pooled, after the "
    "operating point's gate and post-processing; undefined (not 0) when neither has any tumour"
)
SLICE_DICE_PROTOCOL = "per-slice Dice; blank when the slice has no tumour in truth or prediction (empty vs empty)"


def mask_stem(name: str | Path) -> str:
    """The image stem a kaggle mask belongs to: `TCGA_X_12_mask.tif` -> `TCGA_X_12` (case kept)."""
    stem = PurePosixPath(str(name)).stem
    return stem[: -len("_mask")] if stem.lower().endswith("_mask") else stem


def pair_masks(paths: Sequence[str | Path]) -> tuple[list[Path], dict[Path, Path]]:
    """Splits `paths` into images and their masks: (images in the given order, {image: mask}).

    A mask pairs with the image whose stem it extends by `_mask`, in the same folder (any image suffix).
    A mask without an image is an error that names it; images without masks are simply unpaired.
    """
    images, pairs, problems = pair_masks_leniently(paths)
    if problems:
        raise problems[0]
    return images, pairs


def pair_masks_leniently(paths: Sequence[str | Path]) -> tuple[list[Path], dict[Path, Path], list[DataError]]:
    """`pair_masks` that goes on past bad masks: (images, {image: mask}, one DataError per mask left unpaired), for
    callers that report every problem and still predict the rest (`predict`)."""
    images = [Path(p) for p in paths if not is_mask_name(p)]
    by_key = {(p.parent, p.stem.lower()): p for p in images}
    pairs: dict[Path, Path] = {}
    problems: list[DataError] = []
    for m in (Path(p) for p in paths if is_mask_name(p)):
        image = by_key.get((m.parent, mask_stem(m).lower()))
        if image is None:
            problems.append(DataError(m, f"mask has no image (expected {mask_stem(m)}.<tif|png|jpg> beside it, "
                                         "among the inputs)"))
        elif image in pairs:
            problems.append(DataError(m, f"second mask for {image.name} (already have {pairs[image].name})"))
        else:
            pairs[image] = m
    return images, pairs, problems


def slice_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of one slice; nan when both are empty (shown blank, never as 1)."""
    return dice(pred, truth)


def patient_dice(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> float:
    """Volumetric Dice over one patient's slices (see PATIENT_DICE_PROTOCOL); nan when both volumes are empty."""
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} predicted slices for {len(truths)} true masks")
    if not preds:
        return float("nan")
    return dice(np.stack([np.asarray(p) > 0 for p in preds]), np.stack([np.asarray(t) > 0 for t in truths]))


# ---- the figures as predict writes them ----------------------------------------------------------------------------

TRUTH_COLUMNS = ("true_pixels", "dice")  # appended to predict's CSV when any input has ground truth
PATIENTS_HEADER = ("patient", "slices", "true_pixels", "predicted_pixels", "dice")


def dice_cell(d: float) -> str:
    """A Dice for a CSV cell: blank when undefined (empty vs empty), never 1 or 0."""
    return "" if np.isnan(d) else f"{d:.6f}"


def truth_cells(pred: np.ndarray, truth: np.ndarray | None) -> tuple[str, str]:
    """The TRUTH_COLUMNS of one slice: blank without a truth."""
    if truth is None:
        return "", ""
    return str(int(np.count_nonzero(truth))), dice_cell(slice_dice(pred, truth))


@dataclass(frozen=True)
class PatientScore:
    """One patient volume's truth against its prediction (see PATIENT_DICE_PROTOCOL)."""

    patient: str
    slices: int
    true_pixels: int
    predicted_pixels: int
    dice: float  # nan when neither has tumour
    dice_loss: dict[str, float]  # 1 - dice by where the errors lie (`metrics.dice_loss_parts`); all nan with the dice

    @classmethod
    def of(cls, patient: str, preds: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> PatientScore:
        d = patient_dice(preds, truths)  # also checks the lengths
        parts = dice_loss_parts(np.stack([np.asarray(p) > 0 for p in preds]),
                                np.stack([np.asarray(t) > 0 for t in truths])) if preds else {}
        return cls(patient, len(preds), int(sum(np.count_nonzero(t) for t in truths)),
                   int(sum(np.count_nonzero(p) for p in preds)), d, parts)

    def row(self) -> tuple[str, int, int, int, str]:
        return self.patient, self.slices, self.true_pixels, self.predicted_pixels, dice_cell(self.dice)


def patients_table(scores: Sequence[PatientScore]) -> str:
    """The scores as an aligned text table under the protocol (what predict prints on stderr)."""
    width = max([len("patient"), *(len(s.patient) for s in scores)])
    lines = [PATIENT_DICE_PROTOCOL + ":", f"  {'patient':<{width}}  slices  true px  predicted px  dice"]
    for s in scores:
        shown = "-" if np.isnan(s.dice) else f"{s.dice:.4f}"
        lines.append(f"  {s.patient:<{width}}  {s.slices:>6}  {s.true_pixels:>7}  {s.predicted_pixels:>12}  {shown}")
    return "\n".join(lines)
