"""The app's behaviour without Gradio (`App`): checks uploads, groups them into patients, runs the pipeline at the
request's operating point, writes output files, and says what it found.

Brain area (the denominator of "% of brain"): the non-background pixels, i.e. those whose brightest channel exceeds
`BRAIN_LEVEL` (of 255), with holes filled. kaggle_3m slices show the head on a black background, so this is the head
region as imaged (the skull is not removed); dark ventricles inside it count.
"""

from __future__ import annotations

import io
import tempfile
import threading
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import matplotlib
import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from flaxtumor.app.errors import bool_field, md_code, number_field
from flaxtumor.app.state import BrowserStore, RequestDirs, UploadJanitor, private_root
from flaxtumor.inference import GRAY_WARNING, MASK_REFUSAL, input_warning, looks_like_mask
from flaxtumor.operating_point import VERDICT_MEANINGS, OperatingPoint
from flaxtumor.app.uploads import UploadError, UploadedImage, UploadLimits, load_many, load_single
from flaxtumor.app.examples import Examples

BRAIN_LEVEL = 10  # uint8 intensity: above JPEG noise on a black background, below any tissue
MAX_SPACING_MM, MAX_THICKNESS_MM = 10.0, 50.0  # MRI: ~0.2-2 mm pixels, 1-10 mm slices; larger is a typo


class Predictor(Protocol):
    """What the UI needs from `flaxtumor.inference.Pipeline`: its default operating point, and predictions at the
    point a request asks for (the pipeline itself never changes)."""

    point: OperatingPoint

    def predict_volume(self, images: Sequence[np.ndarray], point: OperatingPoint | None = None) -> list[Any]: ...

    def gradcam(self, image: np.ndarray) -> np.ndarray: ...

    def summary(self) -> dict[str, Any]: ...


def brain_mask(image: np.ndarray) -> np.ndarray:
    """bool (H, W): non-background pixels of a uint8 (H, W, 3) slice, holes filled (see the module docstring)."""
    return ndimage.binary_fill_holes(image.max(axis=-1) > BRAIN_LEVEL)


def tumour_area(mask: np.ndarray, brain: np.ndarray) -> tuple[int, float | None]:
    """Tumour pixels and their percentage of the brain area (None when the slice has no brain pixels); tumour pixels
    count as brain, so the percentage never exceeds 100."""
    tumour = int(mask.sum())
    total = int((brain | mask).sum())
    return tumour, (100.0 * tumour / total if total else None)


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Grad-CAM blended over the slice (jet colour map), uint8 (H, W, 3)."""
    colours = matplotlib.colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    return (image.astype(np.float32) * (1 - alpha) + colours * alpha).clip(0, 255).astype(np.uint8)


def mask_png_bytes(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")  # uint8 2-D: 8-bit gray
    return buf.getvalue()


def _stem(name: str) -> str:
    stem = Path(name.replace("\\", "/")).stem
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in stem)[:100] or "slice"


def _check_slices(uploads: Sequence[UploadedImage]) -> None:
    """Refuses an upload that is a segmentation mask rather than a slice (only 0 and one other value)."""
    for u in uploads:
        if looks_like_mask(u.image):
            raise UploadError(f"{u.name}: {MASK_REFUSAL}.")


UPLOADED = "uploaded"  # the patient of loose files without a kaggle-style patient prefix
# predict's CSV columns (flaxtumor.predict.CSV_HEADER), plus the app's extras: slice number and % of brain
PATIENT_COLUMNS = ("slice", "patient", "image", "tumour_probability", "has_tumour", "tumour_pixels", "verdict",
                   "classifier_call", "warning", "tumour_pct_of_brain")


def group_patients(uploads: Sequence[UploadedImage]) -> dict[str, list[UploadedImage]]:
    """Patients in upload order: each zip is one patient (named after the zip), loose files are grouped by their
    kaggle-style patient prefix (TCGA_XX_NNNN_YYYYMMDD), and the rest form one "uploaded" volume."""
    from flaxtumor.predict import KAGGLE_PATIENT

    groups: dict[str, list[UploadedImage]] = {}
    for u in uploads:
        top = u.name.split("/")[0]
        if "/" in u.name and top.lower().endswith(".zip"):
            patient = top
        else:
            m = KAGGLE_PATIENT.fullmatch(Path(u.name).stem)
            patient = m.group(1) if m else UPLOADED
        groups.setdefault(patient, []).append(u)
    return groups


def _patient_row(index: int, patient: str, u: UploadedImage, p: Any) -> dict[str, Any]:
    area_px, area_pct = tumour_area(p.mask, brain_mask(u.image))
    return {"slice": index, "patient": patient, "image": u.name,
            "tumour_probability": round(float(p.tumour_probability), 4), "has_tumour": int(p.has_tumour),
            "tumour_pixels": area_px, "verdict": p.verdict, "classifier_call": int(p.classifier_call),
            "warning": input_warning(u.image) or "",
            "tumour_pct_of_brain": None if area_pct is None else round(area_pct, 3)}


def _patient_summary(patient: str, rows: list[dict[str, Any]], shape: tuple[int, ...], spacing: float | None,
                     thickness: float | None) -> str:
    h, w = shape[:2]
    tumour = [r["slice"] for r in rows if r["verdict"] == "tumour"]
    suspicious = [r["slice"] for r in rows if r["verdict"] == "suspicious"]
    burden = sum(r["tumour_pixels"] for r in rows)
    mm3 = (f" = {burden * spacing**2 * thickness:.1f} mm³ (pixel spacing {spacing} mm, slice thickness {thickness} mm)"
           if spacing and thickness else " (give the pixel spacing and the slice thickness for mm³)")
    gray = sum(1 for r in rows if r["warning"])
    warn = f"\n\n{_warning_md(f'{gray} slice(s) of this patient: {GRAY_WARNING}')}" if gray else ""
    return (f"**Patient {md_code(patient)}**: {len(rows)} slices ({w}x{h} px). **Tumour outlined** on slices: "
            f"{', '.join(map(str, tumour)) or 'none'} ({len(tumour)} of {len(rows)}); **suspicious** (flagged by the "
            f"classifier, nothing outlined): {', '.join(map(str, suspicious)) or 'none'}. **Tumour burden:** "
            f"{burden} px{mm3}.{warn}")


def _warning_md(warning: str | None) -> str:
    return f"⚠️ **Warning: {warning}.**\n\n" if warning else ""


def _one_size(uploads: Sequence[UploadedImage]) -> None:
    sizes: dict[tuple[int, ...], list[str]] = {}
    for u in uploads:
        sizes.setdefault(u.image.shape[:2], []).append(u.name)
    if len(sizes) > 1:
        parts = [f"{w}x{h}: {len(names)} file(s), e.g. {names[0]}" for (h, w), names in sizes.items()]
        raise UploadError(f"The slices of one patient must share one size; found {'; '.join(parts)}.")


@dataclass(frozen=True)
class SliceResult:
    verdict: str
    probability: float
    overlay: tuple[np.ndarray, list[tuple[np.ndarray, str]]]
    area_px: int
    area_pct: float | None
    gradcam: np.ndarray
    mask_file: Path
    details: str


@dataclass(frozen=True)
class PatientResult:
    summary: str
    table: pd.DataFrame
    masks_zip: Path
    browser: str  # the slice browser's token in `App.browser` (thumbnails on disk, not arrays in session state)
    count: int  # slices
    first: int  # 0-based slice shown first: the most probable flagged slice, else 0


class App:
    """The app's behaviour without Gradio: checks uploads, runs the pipeline, writes output files."""

    def __init__(self, pipeline: Predictor, examples: Examples, limits: UploadLimits):
        self.pipeline = pipeline
        self.examples = examples
        self.limits = limits
        self.dirs = RequestDirs()
        self.browser = BrowserStore()
        self.janitor = UploadJanitor()
        # nnx modules are mutable Python objects and Grad-CAM runs through nnx.jit: one call at a time.
        self._gradcam_lock = threading.Lock()

    def _point(self, threshold: float | None, lcc: Any) -> OperatingPoint:
        """The request's operating point: the pipeline's, with the request's threshold and post-processing. A value
        per call, so concurrent requests never see each other's settings."""
        threshold = number_field(threshold, "Classification threshold", 0.0, 1.0, include_low=True)
        lcc = bool_field(lcc, "Largest connected component")
        return self.pipeline.point.override(threshold=threshold, lcc=lcc)

    def _load(self, paths: list[Any], load: Callable[[], Any]) -> Any:
        """Runs `load`; uploads it refuses are deleted at once (nobody can use them), used ones are kept for re-runs."""
        self.janitor.use(paths)
        try:
            return load()
        except UploadError:
            self.janitor.discard(paths)
            raise

    def predict_slice(self, path: str | Path | None, threshold: float | None, lcc: bool) -> SliceResult:
        point = self._point(threshold, lcc)
        upload = self._load([path], lambda: self._read_slice(path))
        # A slice is a volume of one: LCC then keeps the largest 2D blob.
        (pred,) = self.pipeline.predict_volume([upload.image], point)
        with self._gradcam_lock:
            heat = self.pipeline.gradcam(upload.image)
        brain = brain_mask(upload.image)
        area_px, area_pct = tumour_area(pred.mask, brain)
        out = self.dirs.new()
        try:
            mask_file = out / f"{_stem(upload.name)}_mask.png"
            mask_file.write_bytes(mask_png_bytes(pred.mask))
        finally:
            self.dirs.finish(out)
        h, w = pred.mask.shape
        details = (
            f"{_warning_md(input_warning(upload.image))}**{pred.verdict}**: {VERDICT_MEANINGS[pred.verdict]}.\n\n"
            f"{md_code(upload.name)}: {w}x{h} px, brain area {int(brain.sum())} px; "
            f"threshold {point.threshold:.2f}, largest connected component {'on' if point.lcc else 'off'}."
        )
        return SliceResult(
            verdict=pred.verdict,
            probability=float(pred.tumour_probability),
            overlay=(upload.image, [(pred.mask.astype(np.float32), "tumour")]),
            area_px=area_px,
            area_pct=area_pct,
            gradcam=heatmap_overlay(upload.image, heat),
            mask_file=mask_file,
            details=details,
        )

    def run_example(self, name: str | None, threshold: float | None, lcc: bool) -> SliceResult:
        if name not in self.examples.slices:
            raise UploadError(f"Unknown example {name!r}; choose one of {', '.join(self.examples.slices) or 'none'}.")
        return self.predict_slice(self.examples.slices[name], threshold, lcc)

    def predict_patient(
        self,
        paths: Sequence[str | Path] | None,
        threshold: float | None,
        lcc: bool,
        spacing_mm: float | None,
        thickness_mm: float | None,
    ) -> PatientResult:
        # Number fields first: a typo there should not cost the upload.
        spacing = number_field(spacing_mm, "Pixel spacing", 0.0, MAX_SPACING_MM, "mm", zero_is_unset=True)
        thickness = number_field(thickness_mm, "Slice thickness", 0.0, MAX_THICKNESS_MM, "mm", zero_is_unset=True)
        point = self._point(threshold, lcc)
        groups, skipped_masks = self._load(list(paths or []), lambda: self._read_patient(paths))
        rows, lines, names, images, masks, probs = [], [], [], [], [], []
        for patient, uploads in groups.items():  # each patient its own volume: own normalisation and post-processing
            preds = self.pipeline.predict_volume([u.image for u in uploads], point)
            for u, p in zip(uploads, preds):
                rows.append(_patient_row(len(rows) + 1, patient, u, p))
                names.append(u.name if len(groups) == 1 else f"{patient}: {u.name}")
                images.append(u.image)
                masks.append(p.mask)
                probs.append(p.tumour_probability)
            lines.append(_patient_summary(patient, rows[-len(uploads):], uploads[0].image.shape, spacing, thickness))
        table = pd.DataFrame(rows, columns=PATIENT_COLUMNS)
        out = self.dirs.new()
        try:
            masks_zip = out / (f"{_stem(next(iter(groups)))}_masks.zip" if len(groups) == 1 else "patients_masks.zip")
            with zipfile.ZipFile(masks_zip, "w", zipfile.ZIP_DEFLATED) as zf:
                for row, mask in zip(rows, masks):  # one folder per patient
                    zf.writestr(f"{_stem(row['patient'])}/{row['slice']:03d}_{_stem(row['image'])}_mask.png",
                                mask_png_bytes(mask))
                zf.writestr("predictions.csv", table.to_csv(index=False))
        finally:
            self.dirs.finish(out)
        n = len(rows)
        skipped = f", {skipped_masks} ground-truth mask file(s) skipped" if skipped_masks else ""
        head = (f"**{len(groups)} patient{'s' if len(groups) > 1 else ''}, {n} slices**{skipped}; threshold "
                f"{point.threshold:.2f}, largest connected component {'on' if point.lcc else 'off'} (per patient).")
        legend = "Verdicts: " + "; ".join(f"**{v}**: {m}" for v, m in VERDICT_MEANINGS.items()) + "."
        token = self.browser.put(names, images, masks, probs)
        drawn = [i for i, r in enumerate(rows) if r["has_tumour"]]
        first = max(drawn, key=lambda i: probs[i]) if drawn else 0
        return PatientResult("\n\n".join([head, *lines, legend]), table, masks_zip, token, n, first)

    def _read_slice(self, path: str | Path | None) -> UploadedImage:
        upload = load_single(path, self.limits)
        _check_slices([upload])
        return upload

    def _read_patient(self, paths: Sequence[str | Path] | None) -> tuple[dict[str, list[UploadedImage]], int]:
        with tempfile.TemporaryDirectory(prefix="in-", dir=private_root()) as workdir:  # zip members, gone at return
            uploads, skipped_masks = load_many(paths, self.limits, Path(workdir))
        _check_slices(uploads)
        groups = group_patients(uploads)
        for group in groups.values():
            _one_size(group)
        return groups, skipped_masks
