"""The app's service without a server: the models run once per upload, and every live control re-renders from the
cached raw outputs with the results a fresh analysis would give; ground truth gives the Dice `evaluate` gives; NIfTI in
and out.

The tiny test segmenter has a mask threshold of 0, so wherever it runs its mask is the whole slice; the classifier's
threshold then decides which slices keep it.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from flaxtumor.app.examples import Examples
from flaxtumor.app.render import PREDICTION_COLOUR, TRUTH_COLOUR, Display
from flaxtumor.app.service import EXPIRED, App, postprocess_field
from flaxtumor.operating_point import POSTPROCESS_RULES
from flaxtumor.uploads import UploadError
from tests.ui import files as F
from tests.ui.conftest import TEST_LIMITS


class Counting:
    """The pipeline, counting every model call the app makes."""

    def __init__(self, pipeline: Any):
        self.pipeline, self.point, self.calls, self.slices_segmented = pipeline, pipeline.point, [], 0
        self.segmenter_spec = pipeline.segmenter_spec

    def tumour_probabilities(self, *a: Any, **k: Any) -> Any:
        self.calls.append("classifier")
        return self.pipeline.tumour_probabilities(*a, **k)

    def segment(self, images: Any, *a: Any, **k: Any) -> Any:
        self.calls.append("segmenter")
        self.slices_segmented += len(images) if k.get("only") is None else int(np.sum(k["only"]))
        return self.pipeline.segment(images, *a, **k)

    def gradcam(self, image: np.ndarray) -> np.ndarray:
        self.calls.append("gradcam")
        return self.pipeline.gradcam(image)

    def summary(self) -> dict:
        return self.pipeline.summary()


@pytest.fixture
def app(pipeline) -> App:
    return App(Counting(pipeline), Examples({}, []), TEST_LIMITS)


def patient_zip(tiny, folder: Path, index: int = 0, masks: bool = True) -> tuple[Path, Path]:
    """(zip of a tiny kaggle-style patient folder, with its masks unless told otherwise; the folder)."""
    patient = sorted(p for p in tiny.data.iterdir() if p.is_dir())[index]
    members = {f"{patient.name}/{p.name}": p.read_bytes() for p in patient.iterdir()
               if masks or not p.stem.endswith("_mask")}
    return F.zip_of(folder / f"{patient.name}.zip", members), patient


def evaluate_dice(pipeline, tiny, patient_id: str, point) -> float:
    """The per-patient Dice `evaluate` reports for this patient at this point."""
    from flaxtumor.data.lgg import discover
    from flaxtumor.evaluate import evaluate_patients

    (patient,) = [p for p in discover(tiny.data) if p.patient_id == patient_id]
    result, _ = evaluate_patients(pipeline, [patient], point, gallery_size=0)
    return result["pipeline"]["per_patient"][patient_id]


def test_live_controls_rerender_from_the_cache_as_a_fresh_analysis_would(app: App, tiny, tmp_path: Path) -> None:
    archive, _ = patient_zip(tiny, tmp_path)
    first = app.analyse_patient([str(archive)], 0.5, "none")
    assert sorted(app.pipeline.calls) == ["classifier", "segmenter"]  # once each, for the whole volume
    for threshold in (0.0, 0.55, 1.0):
        for rule in POSTPROCESS_RULES:
            again = app.render_patient(first.token, threshold, rule, 0.5, 2.0, Display(opacity=0.2), 3)
            fresh = App(app.pipeline.pipeline, Examples({}, []), TEST_LIMITS).analyse_patient(
                [str(archive)], threshold, rule, 0.5, 2.0)
            assert again.table.equals(fresh.table) and again.summary == fresh.summary
            assert again.index == 2  # the viewer stays on the slice the user chose
    assert sorted(app.pipeline.calls) == ["classifier", "segmenter"]  # the re-renders never ran a model
    view = app.view(first.token, 0.0, "none", Display(opacity=0.0), 2)  # the slider's 1-based value
    assert app.pipeline.calls == ["classifier", "segmenter"] and "Slice 2/6" in view.caption


def test_the_segmenter_runs_where_a_point_can_use_its_masks_and_once_per_slice(app: App, tiny, tmp_path: Path
                                                                               ) -> None:
    archive, _ = patient_zip(tiny, tmp_path)  # the tiny segmenter's masks are whole slices wherever it runs
    first = app.analyse_patient([str(archive)], 1.0, "none")  # no slice clears 1.0: the gate empties every mask
    assert app.pipeline.slices_segmented == 0
    p = np.sort(app.store.get(first.token).volumes[0].probabilities)
    middle = float((p[2] + p[3]) / 2)  # 3 of the 6 slices clear it
    fresh_app = App(app.pipeline.pipeline, Examples({}, []), TEST_LIMITS)
    for threshold, segmented in ((middle, 3), (1.0, 3), (middle, 3), (0.0, 6), (middle, 6)):
        again = app.render_patient(first.token, threshold, "none", None, None, Display(), 1)
        fresh = fresh_app.analyse_patient([str(archive)], threshold, "none")
        assert again.table.equals(fresh.table) and again.summary == fresh.summary
        assert app.pipeline.slices_segmented == segmented  # each slice at most once, when first needed
    assert app.pipeline.calls.count("classifier") == 1
    app.pipeline.point = dataclasses.replace(app.pipeline.point, gate=False)  # every mask is kept: all are needed
    app.analyse_patient([str(archive)], 1.0, "none")
    assert app.pipeline.slices_segmented == 12


def test_patient_dice_with_uploaded_masks_equals_evaluate(app: App, pipeline, tiny, tmp_path: Path) -> None:
    archive, folder = patient_zip(tiny, tmp_path, index=1)
    for threshold, rule in ((0.5, "largest_component"), (0.55, "none")):
        r = app.analyse_patient([str(archive)], threshold, rule)
        expected = evaluate_dice(pipeline, tiny, folder.name, pipeline.point.override(threshold=threshold,
                                                                                      postprocess=rule))
        assert not math.isnan(expected)
        assert f"**Per-patient Dice against the uploaded truth: {expected:.4f}**" in r.summary
        assert "per-patient volumetric Dice" in r.summary  # the protocol is stated
        # where the rest of the Dice went: four parts that add up to 1 - Dice (to the 3 decimals shown)
        lost = re.search(r"Dice lost to false regions ([\d.]+), missed slices ([\d.]+), outside outline ([\d.]+), "
                         r"inside outline ([\d.]+)", r.summary)
        assert lost and sum(map(float, lost.groups())) == pytest.approx(1 - expected, abs=0.003)
        assert list(r.table.columns[6:8]) == ["true_pixels", "dice"]  # predict's truth columns
        with zipfile.ZipFile(r.masks_zip) as zf:
            patients = zf.read("patients.csv").decode().splitlines()
        assert patients[0] == "patient,slices,true_pixels,predicted_pixels,dice"
        assert float(patients[1].split(",")[-1]) == pytest.approx(expected, abs=1e-6)  # predict's 6 decimals
        assert r.table["image"].str.contains("/").sum() == 0  # short slice names, not zip/folder paths


def test_without_masks_nothing_about_truth_is_shown(app: App, tiny, tmp_path: Path) -> None:
    archive, _ = patient_zip(tiny, tmp_path, masks=False)
    r = app.analyse_patient([str(archive)], 0.5, None)
    assert "dice" not in r.table.columns and "truth" not in r.summary.lower()
    assert "true tumour" not in r.view.caption and "truth" not in r.view.caption


def test_truth_for_some_slices_gives_slice_dice_only(app: App, tmp_path: Path) -> None:
    slices = [F.good_png(tmp_path, f"s_{i}.png") for i in (1, 2)]
    mask = np.zeros((64, 64), np.uint8)
    mask[:32] = 255
    F.write(tmp_path / "s_1_mask.png", F.png_bytes(mask))
    r = app.analyse_patient([*map(str, slices), str(tmp_path / "s_1_mask.png")], 0.0, "none")
    assert r.table["dice"].tolist()[0] == pytest.approx(2 * 32 * 64 / (64 * 64 + 32 * 64), abs=1e-4)
    assert math.isnan(r.table["dice"].tolist()[1])  # no truth for this slice: blank
    assert r.table["true_pixels"].tolist()[0] == 32 * 64 and math.isnan(r.table["true_pixels"].tolist()[1])
    with zipfile.ZipFile(r.masks_zip) as zf:
        assert "patients.csv" not in zf.namelist()  # no per-patient score without every slice's truth
    assert "Ground truth** uploaded for 1 of 2 slices" in r.summary and "Per-patient Dice" not in r.summary
    assert "1 patient, 2 slices" in r.summary


def _pixels(view_image: np.ndarray, colour: str) -> int:
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((view_image == rgb).all(axis=-1).sum())


def test_opacity_and_toggles_redraw_without_a_model_call(app: App, tiny, tmp_path: Path) -> None:
    archive, _ = patient_zip(tiny, tmp_path)
    r = app.analyse_patient([str(archive)], 0.0, "none")  # threshold 0: the whole slice is predicted
    truth_slice = int(np.flatnonzero(r.table["dice"].fillna(0).to_numpy() > 0)[0])
    calls = list(app.pipeline.calls)
    plain = app.view(r.token, 0.0, "none", Display(opacity=0.0, truth=False), truth_slice + 1)
    full = app.view(r.token, 0.0, "none", Display(opacity=1.0, truth=False), truth_slice + 1)
    with_truth = app.view(r.token, 0.0, "none", Display(opacity=1.0, truth=True), truth_slice + 1)
    assert _pixels(plain.image, PREDICTION_COLOUR) == 0 and "prediction hidden" in plain.caption
    assert _pixels(full.image, PREDICTION_COLOUR) == 384 * 384 and "predicted tumour" in full.caption  # enlarged
    assert _pixels(with_truth.image, TRUTH_COLOUR) > 0 and "true tumour (outline)" in with_truth.caption
    assert _pixels(full.image, TRUTH_COLOUR) == 0 and "truth hidden" in full.caption
    half = app.view(r.token, 0.0, "none", Display(opacity=0.5, truth=False), truth_slice + 1)
    assert 0 < np.abs(half.image.astype(int) - plain.image).mean() < np.abs(full.image.astype(int) - plain.image).mean()
    assert app.pipeline.calls == calls


def test_single_slice_renders_from_its_cache(app: App, tmp_path: Path) -> None:
    path = F.good_png(tmp_path, "one.png")
    r = app.analyse_slice(str(path), 0.0, "none")
    assert sorted(app.pipeline.calls) == ["classifier", "gradcam", "segmenter"] and r.verdict == "tumour"
    again = app.render_slice(r.token, 1.0, "largest_component", Display())
    assert again.verdict == "no tumour" and np.asarray(Image.open(again.mask_file)).max() == 0
    assert "no tumour predicted on this slice" in again.caption and "predicted tumour<" not in again.caption
    assert again.gradcam.shape == r.gradcam.shape == r.overlay.shape
    assert sorted(app.pipeline.calls) == ["classifier", "gradcam", "segmenter"]


def test_a_lone_slice_for_a_2_5d_segmenter_is_warned_about(app: App, tiny, tmp_path: Path) -> None:
    from flaxtumor.inference import LONE_SLICE_WARNING

    path = F.good_png(tmp_path, "one.png")
    assert "Warning" not in app.analyse_slice(str(path), 0.5, "none").details
    app.pipeline.segmenter_spec = dataclasses.replace(app.pipeline.segmenter_spec, context_slices=1)
    assert f"Warning: {LONE_SLICE_WARNING}." in app.analyse_slice(str(path), 0.5, "none").details
    archive, _ = patient_zip(tiny, tmp_path, masks=False)  # a whole volume: its neighbours are there
    assert LONE_SLICE_WARNING not in app.analyse_patient([str(archive)], 0.5, None).summary


def test_an_expired_analysis_says_so(app: App) -> None:
    with pytest.raises(UploadError, match="expired"):
        app.render_patient("no-such-token", 0.5, "none", None, None, Display(), 1)
    assert "analyse it again" in EXPIRED


def test_postprocess_field_takes_rule_names_and_the_old_switch() -> None:
    assert postprocess_field(None) is None and postprocess_field(True) == "largest_component"
    assert postprocess_field(False) == "none"
    for rule in POSTPROCESS_RULES:
        assert postprocess_field(rule) == rule
    with pytest.raises(UploadError, match=r"^Post-processing: expected one of none, largest_component"):
        postprocess_field("yes")


def test_nifti_trio_in_mask_out_with_the_input_affine(app: App, tmp_path: Path) -> None:
    import nibabel as nib

    paths = F.nifti_patient(tmp_path / "in")
    r = app.analyse_patient([str(p) for p in paths.values()], 0.0, "none")
    assert "**Patient ` BraTS_007 `**: 6 slices (40x48 px)" in r.summary
    assert "Per-patient Dice against the uploaded truth" in r.summary
    with zipfile.ZipFile(r.masks_zip) as zf:
        (name,) = [m for m in zf.namelist() if m.endswith(".nii.gz")]
        assert name == "BraTS_007/BraTS_007_mask.nii.gz"
        out = tmp_path / "mask.nii.gz"
        out.write_bytes(zf.read(name))
        pngs = [m for m in zf.namelist() if m.endswith(".png")]
        assert len(pngs) == 6 and np.asarray(Image.open(io.BytesIO(zf.read(pngs[0])))).shape == (48, 40)
    mask = nib.load(out)
    assert np.allclose(mask.affine, F.NIFTI_AFFINE) and mask.shape == F.NIFTI_SHAPE
    assert np.asarray(mask.dataobj).all()  # threshold 0: every voxel predicted
    again = app.render_patient(r.token, 1.0, "none", None, None, Display(), 1)  # the reference outlives the upload
    with zipfile.ZipFile(again.masks_zip) as zf:
        out.write_bytes(zf.read(name))
    assert not np.asarray(nib.load(out).dataobj).any()


def test_with_nothing_drawn_the_viewer_opens_on_the_largest_true_tumour(app: App, tmp_path: Path) -> None:
    paths = F.nifti_patient(tmp_path / "in")
    r = app.analyse_patient([str(p) for p in paths.values()], 1.0, "none")  # threshold 1: nothing is drawn
    assert not r.table["has_tumour"].any()
    assert r.index == int(r.table["true_pixels"].to_numpy().argmax()) and "true tumour (outline)" in r.view.caption


def test_names_in_captions_are_text_not_html() -> None:
    from flaxtumor.app.render import legend_html

    caption = legend_html(f"Slice 1/1: {F.HTML_NAME}", np.ones((4, 4), bool), None, Display())
    assert "<img" not in caption and "<a " not in caption and "&lt;img" in caption
