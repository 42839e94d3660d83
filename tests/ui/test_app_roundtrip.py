"""The app in-process, called through gradio_client: each endpoint, every bad upload, temp-dir cleanup, start-up errors.

The tiny test segmenter has a mask threshold of 0, so wherever it runs its mask is the whole slice; the threshold slider
then decides the verdict: 0 → every slice is tumour (full mask), 1 → none is (empty mask).
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from flaxtumor.app_errors import TITLE
from flaxtumor.app_state import private_root
from flaxtumor.app.report import columns
from flaxtumor.operating_point import POSTPROCESS_RULES
from flaxtumor.ui import PATIENT_COLUMNS, main
from tests.ui import files as F


def _mask(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_single_slice(client, files: Path) -> None:
    path = F.good_tiff(files, "TCGA_T_7.tif", size=80)
    verdict, prob, overlay, area_px, area_pct, heatmap, mask_file, details = client.predict(
        handle_file(str(path)), 0.0, False, api_name="/predict_slice"
    )
    assert verdict["label"] == "tumour" and 0.0 <= prob <= 1.0
    assert Path(mask_file).name == "TCGA_T_7_mask.png"
    mask = _mask(mask_file)
    assert mask.shape == (80, 80) and set(np.unique(mask)) == {255}
    assert area_px == 80 * 80 and area_pct == pytest.approx(100.0)
    # drawn at the viewers' size (small slices enlarged), the overlay and the Grad-CAM alike
    assert np.asarray(Image.open(overlay)).shape == np.asarray(Image.open(heatmap)).shape == (384, 384, 3)
    assert "TCGA_T_7.tif" in details

    verdict, *_, mask_file, _ = client.predict(handle_file(str(path)), 1.0, True, api_name="/predict_slice")
    assert verdict["label"] == "no tumour" and _mask(mask_file).max() == 0


def test_patient_zip(client, tiny, files: Path) -> None:
    patient = sorted(p for p in tiny.data.iterdir() if p.is_dir())[0]
    archive = files / "patient.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in patient.iterdir():  # slices and their *_mask.tif, as in kaggle_3m
            zf.write(p, f"{patient.name}/{p.name}")
    n = len([p for p in patient.iterdir() if not p.stem.endswith("_mask")])
    summary, table, _, _, slider, viewer, masks_zip = client.predict(
        [handle_file(str(archive))], 0.0, True, 0.5, 2.0, api_name="/predict_patient"
    )
    # predict's column names, plus the app's extras, and the Dice against the masks in the zip
    assert table["headers"] == list(columns(with_truth=True)) and set(PATIENT_COLUMNS) < set(table["headers"])
    rows = [dict(zip(table["headers"], row)) for row in table["data"]]
    assert len(rows) == n and all(r["has_tumour"] == 1 and r["verdict"] == "tumour" for r in rows)  # threshold 0
    assert [r["image"].rsplit("_", 1)[-1] for r in rows] == [f"{i}.tif" for i in range(1, n + 1)]
    assert {r["patient"] for r in rows} == {"patient.zip"}
    assert f"**1 patient, {n} slices**" in summary and "Per-patient Dice against the uploaded truth" in summary
    assert f"{n * 64 * 64} px = {n * 64 * 64 * 0.25 * 2.0:.1f} mm³" in summary
    assert slider["maximum"] == n and np.asarray(Image.open(viewer)).shape == (384, 384, 3)
    with zipfile.ZipFile(masks_zip) as zf:
        pngs = sorted(m for m in zf.namelist() if m.endswith(".png"))
        assert len(pngs) == n and "predictions.csv" in zf.namelist()
        assert np.asarray(Image.open(io.BytesIO(zf.read(pngs[0])))).shape == (64, 64)


def test_example(client) -> None:
    verdict, prob, _, _, _, _, mask_file, details = client.predict(
        "synthetic_tumour_slice.tif", 1.0, False, api_name="/example"
    )
    assert verdict["label"] == "no tumour" and _mask(mask_file).shape == (256, 256)
    assert "synthetic_tumour_slice.tif" in details


@pytest.mark.parametrize("case", F.BAD_SINGLE)
def test_bad_slice_upload_is_an_error_and_the_app_stays_up(client, files: Path, case: str) -> None:
    (path,), expected = F.bad_upload(files, case)
    with pytest.raises(AppError, match=re.escape(expected)):
        client.predict(handle_file(str(path)), 0.5, False, api_name="/predict_slice")
    verdict, *_ = client.predict(handle_file(str(F.good_png(files))), 0.0, False, api_name="/predict_slice")
    assert verdict["label"] == "tumour"


@pytest.mark.parametrize("kind", F.VARIANTS)
def test_16bit_gray_rgba_palette_and_jpeg_are_accepted(client, files: Path, kind: str) -> None:
    path = F.variant(files, kind)
    verdict, *_, mask_file, _ = client.predict(handle_file(str(path)), 0.0, False, api_name="/predict_slice")
    assert verdict["label"] == "tumour" and _mask(mask_file).shape == (64, 64)


@pytest.mark.parametrize("case", F.BAD_PATIENT)
def test_bad_patient_upload_is_an_error_and_the_app_stays_up(client, files: Path, case: str) -> None:
    paths, expected = F.bad_upload(files, case)
    with pytest.raises(AppError, match=re.escape(expected)):
        client.predict([handle_file(str(p)) for p in paths], 0.5, False, None, None, api_name="/predict_patient")
    table = client.predict([handle_file(str(F.good_png(files)))], 0.5, False, None, None, api_name="/predict_patient")[1]
    assert len(table["data"]) == 1


def test_empty_submissions_are_errors(client) -> None:
    with pytest.raises(AppError, match="No file uploaded"):
        client.predict(None, 0.5, False, api_name="/predict_slice")
    with pytest.raises(AppError, match="No files uploaded"):
        client.predict([], 0.5, False, None, None, api_name="/predict_patient")


def test_temp_dirs_are_cleaned_up(client, served, files: Path) -> None:
    app = served[1].app
    root = private_root()
    assert app.dirs.root.parent == root and app.store.root.parent == root
    zipped = F.zip_of(files / "p.zip", {"p/p_1.png": F.png_bytes(F.slice_array())})  # members go to an input dir
    client.predict([handle_file(str(zipped))], 0.5, False, None, None, api_name="/predict_patient")
    assert any(app.dirs.root.iterdir())  # the outputs of the request just answered
    app.dirs.sweep(grace_s=0)
    assert not any(app.dirs.root.iterdir())
    assert not list(root.glob("in-*"))  # the request's input folder went with the request


def test_missing_or_broken_checkpoints_fail_fast(tmp_path: Path, tiny, capsys) -> None:
    assert main(["--checkpoints", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such checkpoint folder" in err and "Traceback" not in err

    broken = tmp_path / "broken"
    for name in ("classifier", "segmenter"):
        (broken / name).mkdir(parents=True)
        (broken / name / "metadata.json").write_text("{not json")
    assert main(["--checkpoints", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "corrupt metadata" in err

    assert main(["--checkpoints", str(tiny.checkpoints), "--examples", str(tmp_path / "none")]) == 2
    assert "--examples" in capsys.readouterr().err


def test_controls_start_at_the_shipped_operating_point(tiny, tmp_path: Path) -> None:
    import json
    import shutil

    import gradio as gr

    from flaxtumor.inference import Pipeline
    from flaxtumor.ui import build_demo

    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(tiny.checkpoints, checkpoints)
    (checkpoints / "pipeline.json").write_text(json.dumps({"threshold": 0.3, "lcc": True, "tuned_on": "val patients"}))
    demo = build_demo(Pipeline.from_checkpoints(checkpoints, batch_size=1))
    values = {b.label: b.value for b in demo.blocks.blocks.values() if isinstance(b, gr.Slider)}
    assert values["Classification threshold"] == 0.3
    gate = next(b for b in demo.blocks.blocks.values() if getattr(b, "elem_id", None) == "classifier-gate")
    assert gate.value is True  # a finite threshold: the classifier is on
    rule = next(b for b in demo.blocks.blocks.values() if getattr(b, "elem_id", None) == "postprocess")
    assert rule.value == "largest_component" and [c[0] for c in rule.choices] == list(POSTPROCESS_RULES)
    card = next(b.value for b in demo.blocks.blocks.values() if getattr(b, "elem_id", None) == "model-card")
    assert "| tuned_on | val patients |" in card


def test_two_patients_in_one_upload_stay_two_patients(client, pipeline, tiny, files: Path) -> None:
    # Each zip is one patient, post-processed on its own: with LCC, one stacked volume would keep one tumour only.
    zips, expected = [], {}
    for patient in sorted(p for p in tiny.data.iterdir() if p.is_dir())[:2]:
        slices = sorted((p for p in patient.glob("*.tif") if not p.stem.endswith("_mask")),
                        key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        zips.append(F.zip_of(files / f"{patient.name}.zip", {f"{patient.name}/{p.name}": p.read_bytes() for p in slices}))
        from flaxtumor.data.io import read_image

        preds = pipeline.predict_volume([read_image(p) for p in slices], pipeline.point.override(lcc=True))
        expected[zips[-1].name] = [int(p.mask.sum()) for p in preds]
    summary, table, *_, masks_zip = client.predict(files=[handle_file(str(z)) for z in zips], threshold=0.5,
                                                   postprocess="largest_component", api_name="/predict_patient")
    rows = [dict(zip(table["headers"], row)) for row in table["data"]]
    got = {name: [r["tumour_pixels"] for r in rows if r["patient"] == name] for name in expected}
    assert got == expected and "**2 patients, 12 slices**" in summary
    assert all(f"**Patient ` {name} `**" in summary for name in expected)
    for r in rows:
        assert (r["has_tumour"] == 1) == (r["tumour_pixels"] > 0) == (r["verdict"] == "tumour")
    with zipfile.ZipFile(masks_zip) as zf:
        folders = {m.split("/")[0] for m in zf.namelist() if m.endswith(".png")}
    assert folders == {Path(name).stem for name in expected}  # the download says whose slice each mask is


def test_loose_slices_of_two_kaggle_patients_are_two_volumes(client, files: Path) -> None:
    paths = [F.good_png(files, f"TCGA_AA_0001_20000101_{i}.png") for i in (1, 2)]
    paths += [F.good_png(files, f"TCGA_BB_0002_20000202_{i}.png", size=80) for i in (1, 2)]  # another size: fine
    paths.append(F.good_png(files, "scan.png"))
    _, table, *_ = client.predict(files=[handle_file(str(p)) for p in paths], api_name="/predict_patient")
    patients = [row[table["headers"].index("patient")] for row in table["data"]]
    assert sorted(set(patients)) == ["TCGA_AA_0001_20000101", "TCGA_BB_0002_20000202", "uploaded"]


def test_gray_slice_is_warned_about_and_a_mask_is_refused(client, files: Path) -> None:
    gray = F.slice_array()[..., 0]
    path = files / "flair.png"
    Image.fromarray(gray).save(path)
    verdict, *_, details = client.predict(image=handle_file(str(path)), api_name="/predict_slice")
    assert "⚠️" in details and "pre-contrast/FLAIR/post-contrast" in details
    summary, table, *_ = client.predict(files=[handle_file(str(path))], api_name="/predict_patient")
    assert "pre-contrast/FLAIR/post-contrast" in summary
    assert "pre-contrast" in table["data"][0][table["headers"].index("warning")]
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 10:30] = 255
    Image.fromarray(mask).save(files / "label.png")
    with pytest.raises(AppError, match="looks like a segmentation mask"):
        client.predict(image=handle_file(str(files / "label.png")), api_name="/predict_slice")
    with pytest.raises(AppError, match="looks like a segmentation mask"):
        client.predict(files=[handle_file(str(files / "label.png"))], api_name="/predict_patient")


def test_api_takes_keywords_with_defaults_and_names_the_bad_field(client, files: Path) -> None:
    path = F.good_png(files)
    info = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    names = {e: [p["parameter_name"] for p in info[e]["parameters"]] for e in ("/predict_slice", "/predict_patient")}
    # New parameters go at the end: positional clients keep working.
    assert names == {"/predict_slice": ["image", "threshold", "postprocess", "use_classifier"],
                     "/predict_patient": ["files", "threshold", "postprocess", "pixel_spacing_mm",
                                          "slice_thickness_mm", "use_classifier"]}
    assert all(p["parameter_has_default"] for e in info.values() for p in e["parameters"][1:])
    verdict, *_ = client.predict(image=handle_file(str(path)), api_name="/predict_slice")  # optionals omitted
    assert verdict["label"] in ("tumour", "suspicious", "no tumour")
    with pytest.raises(AppError, match=re.escape("Classification threshold: must lie in [0, 1] (got 1.5)")) as err:
        client.predict(image=handle_file(str(path)), threshold=1.5, api_name="/predict_slice")
    assert err.value.title == TITLE  # the title the app sets, not Gradio's "Error"
    with pytest.raises(AppError, match=re.escape("Pixel spacing: must lie in (0, 10] mm (got 11)")):
        client.predict(files=[handle_file(str(path))], pixel_spacing_mm=11, api_name="/predict_patient")


def test_session_state_callbacks_do_not_drag_the_models_into_the_config(served) -> None:
    """Gradio deep-copies its config, state callbacks included, on every page load and API client: a bound method of
    the App would copy the models' weights each time (8 concurrent clients then timed out fetching the config)."""
    import inspect
    import time

    import gradio as gr
    import httpx

    states = [b for b in served[1].blocks.blocks.values() if isinstance(b, gr.State)]
    assert states and all(inspect.isfunction(s.delete_callback) for s in states)
    start = time.perf_counter()
    httpx.get(served[0] + "config", timeout=30).raise_for_status()
    assert time.perf_counter() - start < 2.0


def test_nifti_volumes_through_the_api(client, files: Path) -> None:
    """The three role volumes and a truth in, the mask out as .nii.gz on the input's grid; a missing role is refused
    in words that name the problem."""
    import nibabel as nib

    paths = F.nifti_patient(files / "in")
    summary, table, *_, masks_zip = client.predict(files=[handle_file(str(p)) for p in paths.values()], threshold=0.0,
                                                   api_name="/predict_patient")
    assert "**Patient ` BraTS_007 `**: 6 slices (40x48 px)" in summary and "Per-patient Dice" in summary
    assert table["headers"][6:8] == ["true_pixels", "dice"] and len(table["data"]) == 6
    with zipfile.ZipFile(masks_zip) as zf:
        (out := files / "mask.nii.gz").write_bytes(zf.read("BraTS_007/BraTS_007_mask.nii.gz"))
    assert np.allclose(nib.load(out).affine, F.NIFTI_AFFINE) and nib.load(out).shape == F.NIFTI_SHAPE
    with pytest.raises(AppError, match=re.escape("The NIfTI upload: missing the post-contrast (T1-Gd) volume")):
        client.predict(files=[handle_file(str(paths["pre"])), handle_file(str(paths["flair"]))],
                       api_name="/predict_patient")
