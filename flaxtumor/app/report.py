"""What the patient tab reports at an operating point: per-slice rows, per-patient summaries (with the Dice against
the uploaded truth, when there is one), and the download zip (PNG masks, predictions.csv, NIfTI masks).

Brain area (the denominator of "% of brain"): the non-background pixels, i.e. those whose brightest channel exceeds
`BRAIN_LEVEL` (of 255), with holes filled. kaggle_3m slices show the head on a black background, so this is the head
region as imaged (the skull is not removed); dark ventricles inside it count.

Dice: `flaxtumor.truth` (`slice_dice`, `patient_dice`), the functions `predict` uses, on the same final masks
`evaluate` scores, so a patient's Dice is one number in the app, the CSV and `evaluate`.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from flaxtumor.app.cache import Volume
from flaxtumor.app.errors import md_code
from flaxtumor.metrics import describe_dice_loss
from flaxtumor.operating_point import VERDICT_MEANINGS, OperatingPoint, verdicts
from flaxtumor.truth import (PATIENT_DICE_PROTOCOL, PATIENTS_HEADER, SLICE_DICE_PROTOCOL, TRUTH_COLUMNS, PatientScore,
                             slice_dice)

BRAIN_LEVEL = 10  # uint8 intensity: above JPEG noise on a black background, below any tissue
# predict's CSV columns (flaxtumor.predict.CSV_HEADER) plus the app's extras (slice number, % of brain), the ones a
# reader needs first on the left; predict's truth columns (`truth.TRUTH_COLUMNS`: true_pixels, dice) join them after
# "% of brain" when truth is uploaded.
PATIENT_COLUMNS = ("slice", "image", "tumour_probability", "verdict", "tumour_pixels", "tumour_pct_of_brain",
                   "has_tumour", "classifier_call", "patient", "warning")


def brain_mask(image: np.ndarray) -> np.ndarray:
    """bool (H, W): non-background pixels of a uint8 (H, W, 3) slice, holes filled (see the module docstring)."""
    return ndimage.binary_fill_holes(image.max(axis=-1) > BRAIN_LEVEL)


def tumour_area(mask: np.ndarray, brain: np.ndarray) -> tuple[int, float | None]:
    """Tumour pixels and their percentage of the brain area (None when the slice has no brain pixels); tumour pixels
    count as brain, so the percentage never exceeds 100."""
    tumour = int(mask.sum())
    total = int((brain | mask).sum())
    return tumour, (100.0 * tumour / total if total else None)


def plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n} {word if n == 1 else words or word + 's'}"


def short_name(name: str) -> str:
    """The slice's own file name, without the zip and folder it came in (the `patient` column says whose it is)."""
    return PurePosixPath(name.replace("\\", "/")).name


def file_stem(name: str) -> str:
    """A safe file-name stem for outputs."""
    stem = Path(name.replace("\\", "/")).stem
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)[:100] or "slice"


def columns(with_truth: bool) -> tuple[str, ...]:
    if not with_truth:
        return PATIENT_COLUMNS
    at = PATIENT_COLUMNS.index("tumour_pct_of_brain") + 1
    return (*PATIENT_COLUMNS[:at], *TRUTH_COLUMNS, *PATIENT_COLUMNS[at:])


@dataclass(frozen=True)
class PatientReport:
    """One patient at an operating point."""

    volume: Volume
    rows: list[dict[str, Any]]
    final: np.ndarray  # bool (N, H, W)
    score: PatientScore | None  # against the truth; None unless every slice has its truth

    @property
    def dice(self) -> float | None:
        """Per-patient volumetric Dice (`truth.PATIENT_DICE_PROTOCOL`); None without truth, nan when undefined."""
        return None if self.score is None else self.score.dice


def patient_report(volume: Volume, first: int, probabilities: np.ndarray, final: np.ndarray, brain: np.ndarray,
                   truth: np.ndarray | None, point: OperatingPoint) -> PatientReport:
    """Rows numbered from `first` for one patient's final masks (after `gate_and_postprocess`)."""
    classifier_calls = point.flags(probabilities)
    rows = []
    for i, (name, p, call, mask, verdict) in enumerate(
            zip(volume.names, probabilities, classifier_calls, final, verdicts(classifier_calls, final))):
        area_px, area_pct = tumour_area(mask, brain[i])
        row = {"slice": first + i, "image": short_name(name), "tumour_probability": round(float(p), 4),
               "verdict": verdict, "tumour_pixels": area_px,
               "tumour_pct_of_brain": None if area_pct is None else round(area_pct, 3)}
        if volume.truth is not None:  # blank without this slice's truth; Dice blank when empty vs empty
            d = slice_dice(mask, truth[i]) if volume.truth[i] else math.nan
            row.update({"true_pixels": int(truth[i].sum()) if volume.truth[i] else None,
                        "dice": None if math.isnan(d) else round(d, 4)})
        row.update({"has_tumour": int(mask.any()), "classifier_call": int(call), "patient": volume.patient,
                    "warning": volume.warnings[i] if volume.warnings else ""})
        rows.append(row)
    score = None
    if volume.truth is not None and all(volume.truth):
        score = PatientScore.of(volume.patient, list(final), list(truth))
    return PatientReport(volume, rows, final, score)


def patient_summary(report: PatientReport, spacing: float | None, thickness: float | None) -> str:
    volume, rows = report.volume, report.rows
    h, w = volume.shape
    tumour = [r["slice"] for r in rows if r["verdict"] == "tumour"]
    suspicious = [r["slice"] for r in rows if r["verdict"] == "suspicious"]
    burden = sum(r["tumour_pixels"] for r in rows)
    mm3 = (f" = {burden * spacing**2 * thickness:.1f} mm³ (pixel spacing {spacing} mm, slice thickness {thickness} mm)"
           if spacing and thickness else " (give the pixel spacing and the slice thickness for mm³)")
    text = (f"**Patient {md_code(volume.patient)}**: {plural(len(rows), 'slice')} ({w}x{h} px). **Tumour outlined** "
            f"on slices: {', '.join(map(str, tumour)) or 'none'} ({len(tumour)} of {len(rows)}); **suspicious** "
            f"(flagged by the classifier, nothing outlined): {', '.join(map(str, suspicious)) or 'none'}. "
            f"**Tumour burden:** {burden} px{mm3}.")
    text += _dice_text(report)
    for message, n in Counter(r["warning"] for r in rows if r["warning"]).items():  # gray input, a lone slice
        text += f"\n\n⚠️ **Warning: {plural(n, 'slice')} of this patient: {message}.**"
    return text


def _dice_text(report: PatientReport) -> str:
    marks = report.volume.truth
    if marks is None:
        return ""
    if report.dice is None:
        return (f" **Ground truth** uploaded for {sum(marks)} of {len(marks)} slices: per-slice Dice in the table; no "
                "per-patient Dice without the truth of every slice.")
    if math.isnan(report.dice):
        return (" **Per-patient Dice against the uploaded truth: undefined (no tumour in the truth or the "
                f"prediction)** ({PATIENT_DICE_PROTOCOL}).")
    return (f" **Per-patient Dice against the uploaded truth: {report.dice:.4f}** ({PATIENT_DICE_PROTOCOL}). "
            f"{describe_dice_loss(report.score.dice_loss)} (with the Dice they sum to 1: false regions are drawn on "
            "tumour-free slices, missed slices have tumour and nothing drawn).")


def summary_markdown(reports: Sequence[PatientReport], point: OperatingPoint, spacing: float | None,
                     thickness: float | None) -> str:
    n = sum(len(r.rows) for r in reports)
    flags = f" (suspicious at {point.flag_label}, the classifier's own threshold)" if point.flags_apart else ""
    head = (f"**{plural(len(reports), 'patient')}, {plural(n, 'slice')}**; {point.threshold_label}{flags}, "
            f"post-processing {md_code(point.postprocess)} (per patient).")
    parts = [head, *(patient_summary(r, spacing, thickness) for r in reports)]
    if any(r.volume.truth is not None for r in reports):
        parts.append("Ground truth is drawn as an outline in the viewer. Table columns `true_pixels` (blank without the "
                     f"slice's truth) and `dice`: {SLICE_DICE_PROTOCOL}.")
    parts.append("Verdicts: " + "; ".join(f"**{v}**: {m}" for v, m in VERDICT_MEANINGS.items()) + ".")
    return "\n\n".join(parts)


def table(reports: Sequence[PatientReport]) -> pd.DataFrame:
    with_truth = any(r.volume.truth is not None for r in reports)
    return pd.DataFrame([row for r in reports for row in r.rows], columns=columns(with_truth))


def mask_png_bytes(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")  # uint8 2-D: 8-bit gray
    return buf.getvalue()


def write_zip(path: Path, reports: Sequence[PatientReport], frame: pd.DataFrame,
              references: Sequence[Path | None]) -> Path:
    """One folder per patient with its PNG masks (0/255, input size) and, for a NIfTI upload, its mask as .nii.gz on
    the input's grid (affine and header kept); predictions.csv at the top, and with truth predict's patients.csv."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for report, reference in zip(reports, references):
            folder = file_stem(report.volume.patient)
            for row, name, mask in zip(report.rows, report.volume.names, report.final):
                zf.writestr(f"{folder}/{row['slice']:03d}_{file_stem(name)}_mask.png", mask_png_bytes(mask))
            if reference is not None:
                from flaxtumor.data.nifti import write_mask  # nibabel: only for NIfTI uploads

                staged = write_mask(report.final, reference, path.parent / f"{folder}_mask.nii.gz")
                zf.write(staged, f"{folder}/{folder}_mask.nii.gz")
                staged.unlink()
        zf.writestr("predictions.csv", frame.to_csv(index=False))
        scores = [r.score for r in reports if r.score is not None]
        if scores:  # predict's patients.csv
            zf.writestr("patients.csv", pd.DataFrame([s.row() for s in scores], columns=PATIENTS_HEADER)
                        .to_csv(index=False))
    return path
