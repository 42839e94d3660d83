"""The app's behaviour without Gradio (`App`): checks uploads, groups them into patients, runs the models once per
upload, and renders results at the request's operating point and display settings.

Two kinds of request:
- **analyse** (`analyse_slice`, `run_example`, `analyse_patient`): run the models. Per patient, the classifier's
  probabilities and the segmenter's ungated masks (`Pipeline.tumour_probabilities` and `Pipeline.segment` on the
  stack as one volume, as `evaluate` runs them) go into the `AnalysisStore` behind a token. The segmenter runs only
  on the slices whose mask the request's point can use (`operating_point.needs_segmenting`): with the shipped gate
  about half of a patient's slices, as `predict` does;
- **render** (`render_slice`, `render_patient`, `view`): threshold, classifier gate and post-processing re-run
  `operating_point.gate_and_postprocess` on the stored raw outputs (`FinalMasks`); opacity and toggles re-draw. A
  point that needs slices no earlier one did (a lower threshold, the classifier off) segments those first, once.
An analysis renders itself once at the request's point, so both give the same results.
"""

from __future__ import annotations

import math
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from flaxtumor.app import report
from flaxtumor.app.cache import AnalysisStore, Analysis, Expired, FinalMasks, NewVolume, Volume
from flaxtumor.app.errors import bool_field, md_code, number_field
from flaxtumor.app.examples import Examples
from flaxtumor.app.render import Display, compose, for_display, heatmap_overlay, legend_html
from flaxtumor.app.report import brain_mask, file_stem, mask_png_bytes, tumour_area
from flaxtumor.app.state import RequestDirs, UploadJanitor, private_root
from flaxtumor.app.uploads import Submission, UploadError, UploadedImage, UploadLimits, load_many, load_single
from flaxtumor.inference import MASK_REFUSAL, looks_like_mask, slice_warnings
from flaxtumor.operating_point import (
    POSTPROCESS_RULES, VERDICT_MEANINGS, OperatingPoint, needs_segmenting, verdicts,
)
from flaxtumor.truth import slice_dice

# Names other modules and tests have imported from here.
from flaxtumor.app.report import PATIENT_COLUMNS  # noqa: F401

CLASSIFIER_FIELD = "Classifier gate"  # the checkbox's label, which names it in errors
# The threshold a classifier turned back on gets when the request gives none and the pipeline's point has the
# classifier off (no tuned threshold exists then); the slider starts there too.
CLASSIFIER_ON_THRESHOLD = 0.5
MAX_SPACING_MM, MAX_THICKNESS_MM = 10.0, 50.0  # MRI: ~0.2-2 mm pixels, 1-10 mm slices; larger is a typo
UPLOADED = "uploaded"  # the patient of loose files without a kaggle-style patient prefix
EXPIRED = "This result has expired (results are kept for an hour, for a limited number of users): analyse it again."


class Predictor(Protocol):
    """What the app needs from `flaxtumor.inference.Pipeline`: its default operating point, the models' raw outputs,
    Grad-CAM and the model card (the pipeline itself never changes)."""

    point: OperatingPoint

    def tumour_probabilities(self, images: Sequence[np.ndarray], volume: bool = False,
                             point: OperatingPoint | None = None) -> np.ndarray: ...

    def segment(self, images: Sequence[np.ndarray], volume: bool = False, point: OperatingPoint | None = None,
                only: np.ndarray | None = None) -> list[np.ndarray]: ...

    def gradcam(self, image: np.ndarray) -> np.ndarray: ...

    def summary(self) -> dict[str, Any]: ...


def _check_slices(uploads: Sequence[UploadedImage]) -> None:
    """Refuses an upload that is a segmentation mask rather than a slice (only 0 and one other value)."""
    for u in uploads:
        if looks_like_mask(u.image):
            raise UploadError(f"{u.name}: {MASK_REFUSAL}.")


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


def _one_size(uploads: Sequence[UploadedImage]) -> None:
    sizes: dict[tuple[int, ...], list[str]] = {}
    for u in uploads:
        sizes.setdefault(u.image.shape[:2], []).append(u.name)
    if len(sizes) > 1:
        parts = [f"{w}x{h}: {len(names)} file(s), e.g. {names[0]}" for (h, w), names in sizes.items()]
        raise UploadError(f"The slices of one patient must share one size; found {'; '.join(parts)}.")


@dataclass(frozen=True)
class View:
    """One slice as a viewer shows it: the drawn image and its caption with the legend (HTML)."""

    image: np.ndarray | None
    caption: str


@dataclass(frozen=True)
class SliceResult:
    verdict: str
    probability: float
    overlay: np.ndarray
    area_px: int
    area_pct: float | None
    gradcam: np.ndarray
    mask_file: Path
    details: str
    caption: str
    token: str


@dataclass(frozen=True)
class PatientResult:
    summary: str
    table: pd.DataFrame
    masks_zip: Path
    token: str  # the analysis in `App.store`
    count: int  # slices
    index: int  # 0-based slice the viewer shows
    view: View


class App:
    """The app's behaviour without Gradio: checks uploads, runs the models once per upload, renders results."""

    def __init__(self, pipeline: Predictor, examples: Examples, limits: UploadLimits):
        self.pipeline = pipeline
        self.examples = examples
        self.limits = limits
        self.dirs = RequestDirs()
        self.store = AnalysisStore()
        self.finals = FinalMasks()
        self.janitor = UploadJanitor()
        # nnx modules are mutable Python objects and Grad-CAM runs through nnx.jit: one call at a time.
        self._gradcam_lock = threading.Lock()
        self._segment_lock = threading.Lock()  # one writer of an analysis's late masks at a time

    # -- request fields ------------------------------------------------------------------------------------------------
    def point(self, threshold: Any, postprocess: Any, classifier: Any = None) -> OperatingPoint:
        """The request's operating point: the pipeline's, with the request's threshold, post-processing rule and
        classifier gate. A value per call, so concurrent requests never see each other's settings.

        `classifier` False turns the classifier off (threshold inf; a given threshold is still checked, then kept
        aside); True applies the threshold (given, else the pipeline's, else `CLASSIFIER_ON_THRESHOLD` when the
        pipeline's classifier is off); None (clients older than the gate) applies a given threshold and otherwise
        keeps the pipeline's, which may be off."""
        threshold = number_field(threshold, "Classification threshold", 0.0, 1.0, include_low=True)
        on = None if classifier is None else bool_field(classifier, CLASSIFIER_FIELD)
        base = self.pipeline.point
        if on is False:
            threshold = math.inf
        elif on and threshold is None and base.threshold == math.inf:
            threshold = CLASSIFIER_ON_THRESHOLD
        return base.override(threshold=threshold, postprocess=postprocess_field(postprocess))

    @staticmethod
    def display(opacity: Any, prediction: Any = True, truth: Any = True) -> Display:
        opacity = number_field(opacity, "Overlay opacity", 0.0, 1.0, include_low=True)
        return Display(opacity=Display.opacity if opacity is None else opacity,
                       prediction=True if prediction is None else bool_field(prediction, "Show the prediction"),
                       truth=True if truth is None else bool_field(truth, "Show the truth"))

    def release(self, token: Any) -> None:
        """A session ended (Gradio's delete callback): its analysis goes at once."""
        self.store.release(token)
        if isinstance(token, str):
            self.finals.forget(token)

    def _analysis(self, token: Any) -> Analysis:
        try:
            return self.store.get(token)
        except Expired:
            raise UploadError(EXPIRED) from None

    def _load(self, paths: list[Any], load: Any) -> Any:
        """Runs `load`; uploads it refuses are deleted at once (nobody can use them), used ones are kept for re-runs."""
        self.janitor.use(paths)
        try:
            return load()
        except UploadError:
            self.janitor.discard(paths)
            raise

    def _raw(self, images: Sequence[np.ndarray], request: OperatingPoint | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The models' raw outputs for one patient volume, at the pipeline's mask threshold and TTA: (N,) float32
        probabilities, (N, H, W) ungated masks and (N,) the slices segmented: those the `request` point can use
        (every slice without one)."""
        point = self.pipeline.point
        probabilities = np.asarray(self.pipeline.tumour_probabilities(images, volume=True, point=point), np.float32)
        only = np.ones(len(probabilities), bool) if request is None else needs_segmenting(probabilities, request)
        masks = np.stack(self.pipeline.segment(images, volume=True, point=point, only=only)).astype(bool)
        return probabilities, masks, only

    def _finals(self, analysis: Analysis, k: int, point: OperatingPoint) -> tuple[np.ndarray, np.ndarray]:
        """`FinalMasks` of patient `k` at `point`, after segmenting the slices it needs that no earlier point did
        (the volume normalised as a whole, as at the analysis, so the masks are the ones a fresh analysis draws)."""
        probabilities = np.asarray(analysis.volumes[k].probabilities, np.float32)
        if (needs_segmenting(probabilities, point) & ~analysis.segmented(k)).any():
            with self._segment_lock:
                missing = needs_segmenting(probabilities, point) & ~analysis.segmented(k)
                if missing.any():
                    masks = self.pipeline.segment(list(analysis.images(k)), volume=True, point=self.pipeline.point,
                                                  only=missing)
                    analysis.add_masks(k, missing, np.stack(masks)[missing])
        return self.finals(analysis, k, point)

    # -- single slice --------------------------------------------------------------------------------------------------
    def analyse_slice(self, path: str | Path | None, threshold: Any, postprocess: Any,
                      display: Display = Display(), classifier: Any = None) -> SliceResult:
        point = self.point(threshold, postprocess, classifier)
        upload = self._load([path], lambda: self._read_slice(path))
        # A slice is a volume of one: the largest component is then the largest 2D blob.
        probabilities, raw, _ = self._raw([upload.image])
        with self._gradcam_lock:
            heat = self.pipeline.gradcam(upload.image)
        volume = Volume(upload.name, (upload.name,), upload.image.shape[:2], tuple(map(float, probabilities)),
                        warnings=tuple(slice_warnings([upload.image], self.pipeline.segmenter_spec, False)))
        new = NewVolume(volume, [upload.image], raw, brain_mask(upload.image)[None],
                        heat=[heatmap_overlay(upload.image, heat)])
        return self._render_slice(self._analysis(self.store.put("slice", [new])), point, display)

    def run_example(self, name: str | None, threshold: Any, postprocess: Any,
                    display: Display = Display(), classifier: Any = None) -> SliceResult:
        if name not in self.examples.slices:
            raise UploadError(f"Unknown example {name!r}; choose one of {', '.join(self.examples.slices) or 'none'}.")
        return self.analyse_slice(self.examples.slices[name], threshold, postprocess, display, classifier)

    def render_slice(self, token: Any, threshold: Any, postprocess: Any, display: Display,
                     classifier: Any = None) -> SliceResult:
        return self._render_slice(self._analysis(token), self.point(threshold, postprocess, classifier), display)

    def _render_slice(self, analysis: Analysis, point: OperatingPoint, display: Display) -> SliceResult:
        volume = analysis.volumes[0]
        _, final = self._finals(analysis, 0, point)
        mask, probability = final[0], volume.probabilities[0]
        (verdict,) = verdicts(point.flags(np.float32([probability])), [mask])  # float32, as the pipeline
        brain = analysis.brain(0)[0]
        area_px, area_pct = tumour_area(mask, brain)
        out = self.dirs.new()
        try:
            mask_file = out / f"{file_stem(volume.patient)}_mask.png"
            mask_file.write_bytes(mask_png_bytes(mask))
        finally:
            self.dirs.finish(out)
        h, w = mask.shape
        warning = f"⚠️ **Warning: {volume.warnings[0]}.**\n\n" if volume.warnings[0] else ""
        details = (f"{warning}**{verdict}**: {VERDICT_MEANINGS[verdict]}.\n\n{md_code(volume.patient)}: {w}x{h} px, "
                   f"brain area {int(brain.sum())} px; {point.threshold_label}, post-processing "
                   f"{md_code(point.postprocess)}.")
        thumb = analysis.thumbnail(0, 0)
        caption = legend_html(f"Predicted tumour: {report.short_name(volume.patient)}", mask, None, display)
        return SliceResult(verdict, float(probability), compose(thumb, mask, None, display), area_px, area_pct,
                           for_display(analysis.heat(0, 0)), mask_file, details, caption, analysis.token)

    def _read_slice(self, path: str | Path | None) -> UploadedImage:
        upload = load_single(path, self.limits)
        _check_slices([upload])
        return upload

    # -- whole patients ------------------------------------------------------------------------------------------------
    def analyse_patient(self, paths: Sequence[str | Path] | None, threshold: Any, postprocess: Any,
                        spacing_mm: Any = None, thickness_mm: Any = None,
                        display: Display = Display(), classifier: Any = None) -> PatientResult:
        # Fields first: a typo there should not cost the upload.
        spacing, thickness = self._lengths(spacing_mm, thickness_mm)
        point = self.point(threshold, postprocess, classifier)
        volumes = self._load(list(paths or []), lambda: self._read_patient(paths, point))
        token = self.store.put("patient", volumes)
        return self._render_patient(self._analysis(token), point, spacing, thickness, display, None)

    def render_patient(self, token: Any, threshold: Any, postprocess: Any, spacing_mm: Any, thickness_mm: Any,
                       display: Display, index: Any, classifier: Any = None) -> PatientResult:
        """Every patient output at another point; `index`: the slider's slice (1-based), kept in view."""
        spacing, thickness = self._lengths(spacing_mm, thickness_mm)
        return self._render_patient(self._analysis(token), self.point(threshold, postprocess, classifier), spacing,
                                    thickness, display, _index(index))

    @staticmethod
    def _lengths(spacing_mm: Any, thickness_mm: Any) -> tuple[float | None, float | None]:
        spacing = number_field(spacing_mm, "Pixel spacing", 0.0, MAX_SPACING_MM, "mm", zero_is_unset=True)
        thickness = number_field(thickness_mm, "Slice thickness", 0.0, MAX_THICKNESS_MM, "mm", zero_is_unset=True)
        return spacing, thickness

    def _render_patient(self, analysis: Analysis, point: OperatingPoint, spacing: float | None,
                        thickness: float | None, display: Display, index: int | None) -> PatientResult:
        reports, first = [], 1
        for k, volume in enumerate(analysis.volumes):  # each patient its own volume and post-processing
            _, final = self._finals(analysis, k, point)
            probabilities = np.asarray(volume.probabilities, np.float32)
            reports.append(report.patient_report(volume, first, probabilities, final, analysis.brain(k),
                                                 analysis.truth(k), point))
            first += len(volume.names)
        frame = report.table(reports)
        out = self.dirs.new()
        try:
            name = f"{file_stem(reports[0].volume.patient)}_masks.zip" if len(reports) == 1 else "patients_masks.zip"
            masks_zip = report.write_zip(out / name, reports, frame,
                                         [analysis.reference(k) for k in range(len(reports))])
        finally:
            self.dirs.finish(out)
        if index is None:  # first shown: the most probable slice with a tumour drawn, else the largest true one
            rows = frame.to_dict("records")
            drawn = [i for i, r in enumerate(rows) if r["has_tumour"]]
            true = [i for i, r in enumerate(rows) if (r.get("true_pixels") or 0) > 0]
            index = (max(drawn, key=lambda i: rows[i]["tumour_probability"]) if drawn else
                     max(true, key=lambda i: rows[i]["true_pixels"]) if true else 0)
        index = int(np.clip(index, 0, analysis.count - 1))
        return PatientResult(report.summary_markdown(reports, point, spacing, thickness), frame, masks_zip,
                             analysis.token, analysis.count, index, self._view(analysis, point, display, index))

    def view(self, token: Any, threshold: Any, postprocess: Any, display: Display, index: Any,
             classifier: Any = None) -> View:
        """The patient viewer at the slider's `index` (1-based, over all patients of the analysis)."""
        return self._view(self._analysis(token), self.point(threshold, postprocess, classifier), display,
                          _index(index) or 0)

    def _view(self, analysis: Analysis, point: OperatingPoint, display: Display, index: int) -> View:
        k, i = analysis.locate(index)
        volume = analysis.volumes[k]
        _, final = self._finals(analysis, k, point)
        truth = analysis.truth(k)
        true_mask = truth[i] if truth is not None and volume.truth[i] else None
        caption = (f"Slice {index + 1}/{analysis.count}: {report.short_name(volume.names[i])}"
                   + (f" (patient {volume.patient})" if len(analysis.volumes) > 1 else "")
                   + f"; tumour probability {volume.probabilities[i]:.2f}")
        if true_mask is not None:
            d = slice_dice(final[i], true_mask)
            caption += f"; Dice {d:.3f}" if not np.isnan(d) else "; Dice undefined (no tumour in truth or prediction)"
        image = compose(analysis.thumbnail(k, i), final[i], true_mask, display)
        return View(image, legend_html(caption, final[i], true_mask, display, has_truth=volume.truth is not None))

    def _read_patient(self, paths: Sequence[str | Path] | None, point: OperatingPoint) -> list[NewVolume]:
        with tempfile.TemporaryDirectory(prefix="in-", dir=private_root()) as workdir:  # zip members, gone at return
            submission = load_many(paths, self.limits, Path(workdir))
        _check_slices(submission.images)
        groups = group_patients(submission.images)
        for group in groups.values():
            _one_size(group)
        # Every check has passed: only now do the models run.
        return [self._image_volume(patient, uploads, point) for patient, uploads in groups.items()] + \
            self._nifti_volume(submission, point)

    def _image_volume(self, patient: str, uploads: list[UploadedImage], point: OperatingPoint) -> NewVolume:
        images = [u.image for u in uploads]
        truth = None
        if any(u.truth is not None for u in uploads):
            truth = np.stack([u.truth if u.truth is not None else np.zeros(u.image.shape[:2], bool) for u in uploads])
        return self._new_volume(patient, [u.name for u in uploads], images, truth,
                                None if truth is None else tuple(u.truth is not None for u in uploads), point)

    def _nifti_volume(self, submission: Submission, point: OperatingPoint) -> list[NewVolume]:
        case = submission.nifti
        if case is None:
            return []
        marks = None if case.truth is None else (True,) * len(case.slices)
        return [self._new_volume(case.patient, case.names, case.slices, case.truth, marks, point,
                                 submission.nifti_reference)]

    def _new_volume(self, patient: str, names: Sequence[str], images: Sequence[np.ndarray], truth: np.ndarray | None,
                    marks: tuple[bool, ...] | None, point: OperatingPoint, write_reference: Any = None) -> NewVolume:
        probabilities, raw, segmented = self._raw(images, point)
        volume = Volume(patient, tuple(names), images[0].shape[:2], tuple(map(float, probabilities)), marks,
                        tuple(slice_warnings(images, self.pipeline.segmenter_spec, True)),
                        nifti=write_reference is not None)
        brain = np.stack([brain_mask(im) for im in images])
        return NewVolume(volume, images, raw, brain, truth, write_reference=write_reference, segmented=segmented)


def postprocess_field(value: Any) -> str | None:
    """A post-processing rule by name (`operating_point.POSTPROCESS_RULES`); None keeps the operating point's. True
    and False are the old largest-component switch (clients written before the rule had a name)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        return "largest_component" if value else "none"
    if isinstance(value, str) and value in POSTPROCESS_RULES:
        return value
    raise UploadError(f"Post-processing: expected one of {', '.join(POSTPROCESS_RULES)} (or true/false for the "
                      f"largest component) (got {str(value)[:40]}).")


def _index(value: Any) -> int | None:
    """The viewer's 1-based slider value as a 0-based index; None when not given or not a number."""
    try:
        return None if value is None else max(int(value) - 1, 0)
    except (TypeError, ValueError, OverflowError):
        return None


__all__ = ["App", "CLASSIFIER_FIELD", "CLASSIFIER_ON_THRESHOLD", "PatientResult", "SliceResult", "View", "Predictor",
           "group_patients", "postprocess_field", "PATIENT_COLUMNS"]
