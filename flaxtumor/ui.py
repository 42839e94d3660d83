"""The Gradio app: one slice or a whole patient in, verdict, mask overlay, tumour burden and Grad-CAM out.

`build_demo(pipeline)` wires the UI around an already loaded `flaxtumor.inference.Pipeline`; `main()` is what `app.py`
runs: load the checkpoints once, warm up, launch.

Files come in through `gr.File` (browsers cannot display TIFF) and are checked and decoded on the server by
`flaxtumor.uploads`; every bad upload becomes a `gr.Error` naming the file, and the server stays up.

Files and state (`flaxtumor.app_state`): everything lives in one private temp root (mode 0700, umask 077) that also
holds Gradio's temp dir: uploads (deleted after 10 minutes when no request used them, and at once when a request
refused them), per-request input and output folders (deleted with their request, outputs after a grace period),
the slice browser's thumbnails (TTL, capacity and byte cap; sessions only hold a token) and the synthetic examples.
What the app says to clients (escaping, number fields, errors without server details) is in `flaxtumor.app_errors`.

Brain area (the denominator of "% of brain"): the non-background pixels, i.e. those whose brightest channel exceeds
`BRAIN_LEVEL` (of 255), with holes filled. kaggle_3m slices show the head on a black background, so this is the head
region as imaged (the skull is not removed); dark ventricles inside it count.
"""

from __future__ import annotations

import argparse
import functools
import io
import shutil
import signal
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import gradio as gr
import matplotlib
import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from flaxtumor.app.gradio_patches import atomic_image_cache, no_stray_temp_files
from flaxtumor.app_errors import bool_field, md_code, number_field, user_errors
from flaxtumor.app_state import BrowserStore, Housekeeping, RequestDirs, UploadJanitor, private_root
from flaxtumor.data.io import IMAGE_SUFFIXES, is_mask_name, natural_key, read_mask
from flaxtumor.inference import GRAY_WARNING, MASK_REFUSAL, input_warning, looks_like_mask
from flaxtumor.operating_point import VERDICT_MEANINGS, OperatingPoint
from flaxtumor.uploads import UploadError, UploadedImage, UploadLimits, load_many, load_single

NOTICE = (
    "**Research use only. Not a medical device.** This demo has not been clinically validated and must not be used "
    "for diagnosis or treatment decisions. Uploads and results are kept in private temporary folders on the server for "
    "at most an hour, then deleted."
)
BRAIN_LEVEL = 10  # uint8 intensity: above JPEG noise on a black background, below any tissue
MAX_FILE_SIZE = "100mb"  # per uploaded file, enforced by Gradio before our checks run
QUEUE_MAX_SIZE = 64  # waiting requests; more are refused with "queue full" rather than piling up memory
DELETE_CACHE = (600, 3600)  # Gradio cache: every 10 min delete files older than 1 h
MAX_SPACING_MM, MAX_THICKNESS_MM = 10.0, 50.0  # MRI: ~0.2-2 mm pixels, 1-10 mm slices; larger is a typo
SESSION_CAPACITY = 1000  # sessions whose state Gradio keeps (its default, 10,000, each with a copy of the config)
EXAMPLE_SEED = 7
TUMOUR_COLOUR = "#ff3b30"
IMAGE_HEIGHT = 384  # px on screen: kaggle_3m slices are 256 px; small uploads are scaled up to stay readable
# The pipeline pads every call to its batch size. Measured on 2 CPU cores with full-size models (bench/app_latency.py):
# one slice padded to 8 costs ~6x batch 1; a 40-slice patient takes 2.5 s at batch 1 vs 2.1 s at 8 (128 px inputs),
# 6.1 s vs 7.4 s (256 px). Batch 1 keeps single slices fast and needs one compiled shape.
BATCH_SIZE = 1


class Predictor(Protocol):
    """What the UI needs from `flaxtumor.inference.Pipeline`: its default operating point, and predictions at the
    point a request asks for (the pipeline itself never changes)."""

    point: OperatingPoint

    def predict_volume(self, images: Sequence[np.ndarray], point: OperatingPoint | None = None) -> list[Any]: ...

    def gradcam(self, image: np.ndarray) -> np.ndarray: ...

    def summary(self) -> dict[str, Any]: ...


# ---------------------------------------------------------------------------------------------------------------------
# Examples (synthetic only: real dataset images cannot be shipped)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Examples:
    slices: dict[str, Path]  # display name -> image file
    patients: list[Path]  # zips


def make_examples(dest: Path, seed: int = EXAMPLE_SEED) -> Path:
    """Writes a tumour slice, a tumour-free slice and a patient zip made by the project's synthetic generator."""
    from flaxtumor.data.synthetic import write_synthetic_dataset

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="examples-", dir=private_root()) as tmp:
        (patient,) = [p for p in write_synthetic_dataset(tmp, n_patients=1, n_slices=24, seed=seed).iterdir() if p.is_dir()]
        slices = sorted((p for p in patient.glob("*.tif") if not is_mask_name(p)), key=lambda p: natural_key(p.name))
        areas = [int(read_mask(p.with_name(f"{p.stem}_mask.tif")).sum()) for p in slices]
        shutil.copyfile(slices[int(np.argmax(areas))], dest / "synthetic_tumour_slice.tif")
        clear = min((i for i, a in enumerate(areas) if a == 0), key=lambda i: abs(i - len(areas) // 2))
        shutil.copyfile(slices[clear], dest / "synthetic_clear_slice.tif")
        with zipfile.ZipFile(dest / "synthetic_patient.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(patient.iterdir()):
                zf.write(p, f"{patient.name}/{p.name}")
    return dest


_EXAMPLES_LOCK = threading.Lock()


def default_examples_dir() -> Path:
    """Generated fresh once per process inside the private root: a shared, predictable folder could be planted by
    another local user (and anything in it would be served)."""
    dest = private_root() / "examples"
    with _EXAMPLES_LOCK:
        if not (dest / "synthetic_patient.zip").is_file():
            shutil.rmtree(dest, ignore_errors=True)
            make_examples(dest)
    return dest


def find_examples(folder: Path) -> Examples:
    """Image files in `folder` are slice examples, `*.zip` files patient examples (masks `*_mask.*` are skipped)."""
    files = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: natural_key(p.name))
    slices = {p.name: p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and not is_mask_name(p)}
    return Examples(slices=slices, patients=[p for p in files if p.suffix.lower() == ".zip"])


# ---------------------------------------------------------------------------------------------------------------------
# Pure helpers (no Gradio)
# ---------------------------------------------------------------------------------------------------------------------


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


def threshold_info(min_tumour_area: float) -> str:
    """The slider's help: with a fused gate the classifier threshold is not the only way a slice is called tumour."""
    text = "A slice is called tumour when its tumour probability is at least this"
    if min_tumour_area > 0:
        text += f", or when the segmenter outlines at least {min_tumour_area:.2%} of it (the fused gate)"
    return text + "; the default is the checkpoints' operating point."


def model_card_markdown(summary: dict[str, Any]) -> str:
    """The model-card panel: per model its validation metrics (with the protocol they came from) and how it was made."""
    lines = []
    for name, info in summary.get("models", {}).items():
        prep = info.get("preprocessing") or {}
        sizes = info.get("split_sizes") or {}
        lines.append(f"**{name}** ({info.get('task')}): input {prep.get('image_size')} px, "
                     f"normalisation `{prep.get('normalisation')}`, backbone init `{info.get('backbone_init')}`, "
                     f"weights {info.get('dtype')}, threshold {_fmt(info.get('threshold'))}.")
        split = ", ".join(f"{k} {v}" for k, v in sizes.items())
        metrics = dict(info.get("metrics") or {})
        protocol = metrics.pop("protocol", None)
        lines.append(
            f"- Protocol: {protocol or _DEFAULT_PROTOCOL}" + (f" Patients per split: {split}." if split else "")
        )
        lines += [f"- {line}" for line in _metric_lines(metrics)] or ["- No validation metrics recorded."]
        lines.append("")
    settings = summary.get("pipeline") or {}
    if settings:
        lines.append("Pipeline: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in settings.items()) + ".")
    point = summary.get("operating_point") or {}
    lines.append(
        "Operating point from `pipeline.json`: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in point.items()) + "."
        if point else "No `pipeline.json`: thresholds are the checkpoints' own."
    )
    return "\n".join(lines)


_DEFAULT_PROTOCOL = (
    "validation patients of a patient-level split (no patient in both train and validation), at the epoch chosen on "
    "that same split, so slightly optimistic; the untouched test split is reported by `python -m flaxtumor.evaluate`."
)
# What each metric the training loop records means, so the numbers are not read as something they are not.
_METRIC_NOTES = {
    "volumetric_dice": "3D Dice per patient, mean over patients",
    "dice": "per slice, mean over slices with tumour in truth or prediction",
    "iou": "per slice, mean over slices with tumour in truth or prediction",
    "pooled_dice": "pixels of all slices pooled",
    "accuracy": "per slice, at the checkpoint threshold",
    "precision": "per slice, at the checkpoint threshold",
    "recall": "per slice, at the checkpoint threshold",
    "f1": "per slice, at the checkpoint threshold",
    "auc": "per-slice ROC AUC",
}


def _metric_lines(metrics: dict[str, Any], prefix: str = "") -> list[str]:
    lines = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            lines += _metric_lines(value, f"{prefix}{key} / ")
        elif isinstance(value, (int, float, str, bool)) or value is None:
            note = f" ({_METRIC_NOTES[key]})" if key in _METRIC_NOTES else ""
            lines.append(f"{prefix}{key}: {_fmt(value)}{note}")
    return lines


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------------------------------
# Request handling
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Gradio
# ---------------------------------------------------------------------------------------------------------------------


def _slice_outputs(r: SliceResult) -> tuple:
    return r.verdict, r.probability, r.overlay, r.area_px, r.area_pct, r.gradcam, str(r.mask_file), r.details


def _browse(store: BrowserStore, token: Any, index: Any) -> Any:
    """The viewer at slice `index` (1-based) of the patient behind `token`, read back from its thumbnails."""
    try:
        i = int(index or 1) - 1
    except (TypeError, ValueError, OverflowError):
        i = 0
    shown = store.get(token, i) if token else None
    if shown is None:
        label = "Slice viewer (this result has expired: analyse the patient again)" if token else "Slice viewer"
        return gr.AnnotatedImage(value=None, label=label)
    label = f"Slice {shown.index + 1}/{shown.count}: {shown.name} (tumour probability {shown.probability:.2f})"
    return gr.AnnotatedImage(value=(shown.image, [(shown.mask, "tumour")]), label=label)


def build_demo(
    pipeline: Predictor,
    examples_dir: str | Path | None = None,
    limits: UploadLimits = UploadLimits(),
    concurrency_limit: int = 2,
) -> gr.Blocks:
    """The app around a loaded pipeline; the threshold and LCC controls start at its operating point. Examples come
    from `examples_dir`, else from the synthetic generator."""
    private_root()  # before any Blocks: Gradio's temp dir is read when they are made
    atomic_image_cache()
    examples = find_examples(Path(examples_dir) if examples_dir is not None else default_examples_dir())
    app = App(pipeline, examples, limits)
    image_types = ".tif, .tiff, .png, .jpg, .jpeg"

    with gr.Blocks(title="flaxtumor: LGG MRI tumour detection (research use only)", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown("# flaxtumor: brain-tumour detection and segmentation on LGG MRI slices")
        gr.Markdown(NOTICE, elem_id="notice")
        with gr.Accordion("Model card", open=False):
            gr.Markdown(model_card_markdown(pipeline.summary()), elem_id="model-card")
        with gr.Row():
            threshold = gr.Slider(0.0, 1.0, value=pipeline.point.threshold, step=0.01, label="Classification threshold",
                                  info=threshold_info(pipeline.point.min_tumour_area))
            # Range-checked by App._point, with a message naming the field (Gradio's own does not).
            threshold.preprocess = lambda payload: payload  # type: ignore[method-assign]
            lcc = gr.Checkbox(value=pipeline.point.lcc, label="Keep only the largest connected tumour component",
                              info="3D over a patient's slices, 2D on a single slice.")

        with gr.Tab("Single slice"):
            with gr.Row():
                with gr.Column(scale=1):
                    slice_file = no_stray_temp_files(gr.File(label=f"MRI slice ({image_types})", elem_id="slice-file"))
                    slice_button = gr.Button("Analyse slice", variant="primary", elem_id="slice-button")
                    example = gr.Dropdown(list(examples.slices), value=next(iter(examples.slices), None),
                                          label="Or try a synthetic example (made by flaxtumor.data.synthetic)",
                                          elem_id="example-choice")
                    example_button = gr.Button("Run example", elem_id="example-button")
                    verdict = gr.Label(label="Verdict", elem_id="verdict")
                    probability = gr.Number(label="Tumour probability", precision=3)
                    with gr.Row():
                        area_px = gr.Number(label="Tumour area (px)", precision=0)
                        area_pct = gr.Number(label="Tumour area (% of brain)", precision=2)
                    details = gr.Markdown(label="Details")
                    mask_file = gr.File(label="Mask (PNG, 0/255, input size)")
                with gr.Column(scale=2):
                    with gr.Row():
                        overlay = gr.AnnotatedImage(label="Predicted tumour mask", color_map={"tumour": TUMOUR_COLOUR}, format="png",
                                                    height=IMAGE_HEIGHT)
                        heatmap = gr.Image(label="Grad-CAM of the classifier", type="numpy", format="png",
                                           interactive=False, height=IMAGE_HEIGHT)
            slice_outputs = [verdict, probability, overlay, area_px, area_pct, heatmap, mask_file, details]
            def predict_slice(image: Any, threshold: float | None = pipeline.point.threshold,
                              largest_component: bool = pipeline.point.lcc) -> tuple:
                return _slice_outputs(app.predict_slice(image, threshold, largest_component))

            def run_example(example: str | None, threshold: float | None = pipeline.point.threshold,
                            largest_component: bool = pipeline.point.lcc) -> tuple:
                return _slice_outputs(app.run_example(example, threshold, largest_component))

            slice_button.click(
                user_errors(predict_slice),
                [slice_file, threshold, lcc], slice_outputs, api_name="predict_slice", concurrency_id="slice",
                concurrency_limit=concurrency_limit,
            )
            example_button.click(
                user_errors(run_example),
                [example, threshold, lcc], slice_outputs, api_name="example", concurrency_id="slice",
                concurrency_limit=concurrency_limit,
            )

        with gr.Tab("Whole patient"):
            with gr.Row():
                with gr.Column(scale=1):
                    patient_files = no_stray_temp_files(gr.File(
                        file_count="multiple", label=f"Slices ({image_types}) or one .zip of a patient folder",
                        elem_id="patient-files"))
                    with gr.Row():
                        spacing = gr.Number(value=None, label="Pixel spacing (mm)")
                        thickness = gr.Number(value=None, label="Slice thickness (mm)")
                    patient_button = gr.Button("Analyse patient", variant="primary", elem_id="patient-button")
                    if examples.patients:
                        gr.Examples([[[str(p)]] for p in examples.patients], inputs=[patient_files],
                                    label="Synthetic example patient")
                    summary = gr.Markdown(label="Summary", elem_id="patient-summary")
                    masks_zip = gr.File(label="All masks (zip of PNGs + predictions.csv)")
                with gr.Column(scale=2):
                    browser_slider = gr.Slider(1, 2, value=1, step=1, label="Slice", interactive=False)
                    browser_image = gr.AnnotatedImage(label="Slice viewer", color_map={"tumour": TUMOUR_COLOUR}, format="png",
                                                      height=IMAGE_HEIGHT)
                    with gr.Row():
                        prob_plot = gr.LinePlot(x="slice", y="tumour_probability", y_lim=[0, 1], label="Tumour probability per slice")
                        area_plot = gr.LinePlot(x="slice", y="tumour_pixels", label="Tumour area per slice (px)")
            table = gr.Dataframe(label="Per-slice results", interactive=False)
            # Only a token per session (Gradio keeps API sessions until its capacity); it expires with the thumbnails.
            browser_state = gr.State(time_to_live=app.browser.ttl_s, delete_callback=app.browser.release)

            def predict_patient(files: Any, threshold: float | None = pipeline.point.threshold,
                                largest_component: bool = pipeline.point.lcc, pixel_spacing_mm: float | None = None,
                                slice_thickness_mm: float | None = None) -> tuple:
                r = app.predict_patient(files, threshold, largest_component, pixel_spacing_mm, slice_thickness_mm)
                # Gradio sliders need minimum < maximum: a one-slice patient gets a disabled 1..2 slider.
                n = r.count
                slider = gr.Slider(1, max(n, 2), value=r.first + 1, step=1, label="Slice", interactive=n > 1)
                viewer = _browse(app.browser, r.browser, r.first + 1)
                return r.summary, r.table, r.table, r.table, slider, viewer, str(r.masks_zip), r.browser

            patient_button.click(
                user_errors(predict_patient), [patient_files, threshold, lcc, spacing, thickness],
                [summary, table, prob_plot, area_plot, browser_slider, browser_image, masks_zip, browser_state],
                api_name="predict_patient", concurrency_id="patient", concurrency_limit=1,
            )
            browser_slider.input(functools.partial(_browse, app.browser), [browser_state, browser_slider], browser_image,
                                 api_visibility="private",
                                 concurrency_limit=None, trigger_mode="always_last", show_progress="hidden")

        gr.Markdown(f"Upload limits: {limits.describe()}; at most {MAX_FILE_SIZE} per file.")
    demo.queue(default_concurrency_limit=concurrency_limit, max_size=QUEUE_MAX_SIZE)
    app.janitor.blocks = demo
    demo.flaxtumor_app = app  # type: ignore[attr-defined]  # launch() serves its examples; tests inspect its temp dirs
    return demo


def warm_up(pipeline: Predictor) -> float:
    """Compiles every model function once so the first user does not wait; returns seconds. The pipeline resizes
    every slice to the checkpoint's size and pads batches to its fixed batch size, so one call covers all later shapes."""
    start = time.perf_counter()
    image = np.zeros((256, 256, 3), np.uint8)
    image[64:192, 64:192] = 100
    # gate off: the segmenter compiles too
    pipeline.predict_volume([image], pipeline.point.override(lcc=True, gate=False))
    pipeline.gradcam(image)
    return time.perf_counter() - start


def launch(demo: gr.Blocks, host: str | None = None, port: int | None = None, share: bool = False,
           prevent_thread_lock: bool = False) -> str:
    """Starts the server with the app's limits; returns its local URL."""
    app: App = demo.flaxtumor_app  # type: ignore[attr-defined]
    # The exact example files only, never their folder: whatever else lands there is not served.
    allowed = sorted(str(p.resolve()) for p in [*app.examples.slices.values(), *app.examples.patients])
    _, url, _ = demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE,
                            allowed_paths=allowed, prevent_thread_lock=prevent_thread_lock, theme=gr.themes.Soft(),
                            footer_links=["api", "gradio"], state_session_capacity=SESSION_CAPACITY)
    Housekeeping(app.janitor.sweep, app.browser.sweep, app.dirs.sweep).start()
    return url


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description="flaxtumor Gradio app (research use only)")
    parser.add_argument("--checkpoints", default="checkpoints", metavar="DIR", help="folder with classifier/ and segmenter/")
    parser.add_argument("--host", default=None, metavar="H", help="bind address (default 127.0.0.1; 0.0.0.0 on Spaces via GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=None, metavar="P", help="port (default 7860 or GRADIO_SERVER_PORT)")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    parser.add_argument("--examples", default=None, metavar="DIR", help="folder of example slices (images) and patients (.zip)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, started: float | None = None) -> int:
    """Load once, warm up, serve. `started` is a perf_counter() taken before the heavy imports (by app.py)."""
    started = time.perf_counter() if started is None else started
    args = parse_args(argv)
    if args.examples is not None and not Path(args.examples).is_dir():
        print(f"error: --examples {args.examples}: no such folder", file=sys.stderr)
        return 2
    from flaxtumor.inference import Pipeline

    try:
        t0 = time.perf_counter()
        # Threshold, LCC, TTA and gating start at DIR/pipeline.json when it exists (the tuned operating point).
        pipeline = Pipeline.from_checkpoints(args.checkpoints, batch_size=BATCH_SIZE)
        loaded = time.perf_counter() - t0
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError with a one-line message
        print(f"error: cannot load checkpoints from {args.checkpoints}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    warm = warm_up(pipeline)
    demo = build_demo(pipeline, args.examples)
    url = launch(demo, args.host, args.port, args.share, prevent_thread_lock=True)
    # A stop by SIGTERM (Spaces, docker, the benches) exits normally, so atexit removes the temp dirs too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"flaxtumor app ready at {url}: start-up {time.perf_counter() - started:.1f} s "
          f"(checkpoints {loaded:.1f} s, warm-up {warm:.1f} s)", flush=True)
    try:
        demo.block_thread()
    finally:
        demo.close()
    return 0
