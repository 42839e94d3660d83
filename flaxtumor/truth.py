"""Ground truth beside a prediction: pairing kaggle-style masks with their slices, and the scores shown with them.

`predict` and the app both use this module, so a patient's Dice is the same number in the CSV, in the app and in
`evaluate` (all three call `metrics.dice` on the same binary masks).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from flaxtumor.data.io import DataError, is_mask_name
from flaxtumor.metrics import dice

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
    images = [Path(p) for p in paths if not is_mask_name(p)]
    by_key = {(p.parent, p.stem.lower()): p for p in images}
    pairs: dict[Path, Path] = {}
    for m in (Path(p) for p in paths if is_mask_name(p)):
        image = by_key.get((m.parent, mask_stem(m).lower()))
        if image is None:
            raise DataError(m, f"mask has no image (expected {mask_stem(m)}.<tif|png|jpg> beside it)")
        if image in pairs:
            raise DataError(m, f"second mask for {image.name} (already have {pairs[image].name})")
        pairs[image] = m
    return images, pairs


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
