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

from flaxtumor.app_state import private_root
from flaxtumor.ui import main
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
    assert overlay["annotations"][0]["label"] == "tumour"
    assert np.asarray(Image.open(heatmap)).shape == (80, 80, 3)
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
    assert len(table["data"]) == n and all(row[3] for row in table["data"])  # all flagged at threshold 0
    assert [row[1].rsplit("_", 1)[-1] for row in table["data"]] == [f"{i}.tif" for i in range(1, n + 1)]
    assert f"**{n} slices**" in summary and f"{n} ground-truth mask file(s) skipped" in summary
    assert f"{n * 64 * 64} px = {n * 64 * 64 * 0.25 * 2.0:.1f} mm³" in summary
    assert slider["maximum"] == n and viewer["value"]["annotations"][0]["label"] == "tumour"
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
    app = served[1].flaxtumor_app
    root = private_root()
    assert app.dirs.root.parent == root and app.browser.root.parent == root
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
    values = {b.label: b.value for b in demo.blocks.values() if isinstance(b, (gr.Slider, gr.Checkbox, gr.Markdown))}
    assert values["Classification threshold"] == 0.3
    assert values["Keep only the largest connected tumour component"] is True
    card = next(b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) == "model-card")
    assert "tuned_on = val patients" in card
