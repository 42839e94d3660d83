"""`python -m flaxtumor.predict`: the CSV/PNG output contract, input discovery and failure handling."""

import csv
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from flaxtumor.predict import CSV_HEADER, collect_inputs, duplicate_stems, group_volumes, main
from flaxtumor.truth import TRUTH_COLUMNS
from tests.fixtures_checkpoints import tiny  # noqa: F401  (session fixture)


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


@pytest.fixture
def loose(tmp_path):
    """Odd-size RGB, gray, RGBA, uint16 and JPEG slices, plus a mask file that must never be an input."""
    rng = np.random.default_rng(0)
    d = tmp_path / "loose"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(d / "odd.png")
    Image.fromarray(rng.integers(0, 256, (64, 48), dtype=np.uint8)).save(d / "sub" / "gray.png")
    Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8), "RGBA").save(d / "sub" / "rgba.png")
    tifffile.imwrite(d / "deep16.tif", rng.integers(0, 4000, (50, 70), dtype=np.uint16))
    Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(d / "photo.jpg")
    Image.fromarray(np.zeros((37, 53), np.uint8)).save(d / "odd_mask.png")
    return d


def _input_shape(path):
    from flaxtumor.data.io import read_image

    return read_image(path).shape[:2]


def test_output_contract_for_a_patient_folder_and_loose_images(tiny, loose, tmp_path):  # noqa: F811
    patient = tiny.data / tiny.val[0]
    out = tmp_path / "out"
    assert main([str(patient), str(loose), "--out", str(out), "--checkpoints", str(tiny.checkpoints),
                 "--batch-size", "2"]) == 0
    header, rows = _read_csv(out / "predictions.csv")
    assert CSV_HEADER == ("image", "tumour_probability", "has_tumour", "tumour_pixels", "verdict", "classifier_call",
                          "patient", "warning")
    # the patient's *_mask.tif (and loose/odd_mask.png) are its ground truth: two columns follow the usual ones
    assert tuple(header) == CSV_HEADER + TRUTH_COLUMNS == CSV_HEADER + ("true_pixels", "dice")
    slices = sorted((p for p in patient.glob("*.tif") if not p.stem.endswith("_mask")),
                    key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    others = ["deep16.tif", "odd.png", "photo.jpg", "sub/gray.png", "sub/rgba.png"]
    inputs = slices + [loose / name for name in others]
    assert [r[0] for r in rows] == [str(p.resolve()) for p in inputs]  # input order, slices in numeric order
    by_image = {r[0]: r for r in rows}
    for path in inputs:
        row = by_image[str(path.resolve())]
        mask = np.asarray(Image.open(out / f"{path.stem}_pred.png"))
        assert mask.dtype == np.uint8 and mask.shape == _input_shape(path)
        assert set(np.unique(mask)) <= {0, 255}
        assert 0.0 <= float(row[1]) <= 1.0
        assert row[2] in ("0", "1")
        assert int(row[3]) == int((mask == 255).sum())
        assert (row[2] == "1") == (int(row[3]) > 0) == (row[4] == "tumour")  # has_tumour exactly when a mask is drawn
        assert row[4] != "suspicious" or row[5] == "1"
        assert row[6] == (patient.name if path.parent == patient else "")
    assert not (out / "odd_mask_pred.png").exists()
    assert not list(out.glob("*_mask_pred.png"))


def test_threshold_and_no_gate_flags(tiny, loose, tmp_path):  # noqa: F811
    args = [str(loose / "odd.png"), str(loose / "sub"), "--checkpoints", str(tiny.checkpoints)]
    # threshold 0: every slice passes the gate; the fixture's segmenter then marks every pixel
    assert main(args + ["--out", str(tmp_path / "a"), "--threshold", "0"]) == 0
    _, rows = _read_csv(tmp_path / "a" / "predictions.csv")
    assert all(r[2] == "1" and int(r[3]) > 0 for r in rows)
    assert int(rows[0][3]) == 37 * 53
    # threshold 1: nothing passes, so nothing is segmented ...
    assert main(args + ["--out", str(tmp_path / "b"), "--threshold", "1"]) == 0
    _, rows = _read_csv(tmp_path / "b" / "predictions.csv")
    assert all(r[2] == "0" and r[3] == "0" for r in rows)
    # ... unless --no-gate runs the segmenter everywhere: a drawn mask is a tumour call
    assert main(args + ["--out", str(tmp_path / "c"), "--threshold", "1", "--no-gate"]) == 0
    _, rows = _read_csv(tmp_path / "c" / "predictions.csv")
    assert all(r[2] == "1" and int(r[3]) > 0 for r in rows)
    assert main(args + ["--out", str(tmp_path / "d"), "--threshold", "1.5"]) == 2


def test_duplicate_stems_fail_before_any_work(tiny, loose, tmp_path, capsys):  # noqa: F811
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(loose / "odd.png", other / "odd.tif")
    out = tmp_path / "out"
    assert main([str(loose), str(other), "--out", str(out), "--checkpoints", str(tiny.checkpoints)]) == 2
    err = capsys.readouterr().err
    assert "odd" in err and str(other / "odd.tif") in err and str(loose / "odd.png") in err
    assert not out.exists()


def test_the_same_file_twice_is_not_a_duplicate(loose):
    found = collect_inputs([loose / "odd.png", loose, str(loose / "odd.png")])
    files = found.images
    assert files.count(loose / "odd.png") == 1 and not found.problems and not duplicate_stems(files)
    assert found.masks == {loose / "odd.png": loose / "odd_mask.png"}  # the mask is its truth, never an input


def test_unreadable_inputs_are_reported_and_the_rest_written(tiny, loose, tmp_path, capsys):  # noqa: F811
    (loose / "empty.png").write_bytes(b"")
    (loose / "broken.tif").write_bytes(b"II*\x00garbage")
    out = tmp_path / "out"
    code = main([str(loose), str(tmp_path / "missing.png"), "--out", str(out), "--checkpoints", str(tiny.checkpoints)])
    assert code == 1
    err = capsys.readouterr().err
    for name in ("empty.png", "broken.tif", "missing.png"):
        assert name in err
    assert "3 input(s) failed" in err
    _, rows = _read_csv(out / "predictions.csv")
    assert len(rows) == 5 and all((out / f"{p}_pred.png").exists() for p in ("odd", "gray", "rgba", "deep16", "photo"))
    assert not (out / "empty_pred.png").exists()


def test_explicit_mask_file_is_not_an_input_and_no_inputs_is_an_error(loose, tmp_path, capsys):
    # a mask named without its image: an unpaired truth, and nothing to predict
    assert main([str(loose / "odd_mask.png"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{loose / 'odd_mask.png'}: mask has no image" in err and "no input images" in err
    assert main([str(loose / "odd_mask.png"), "--out", str(tmp_path / "o"), "--no-truth"]) == 2
    err = capsys.readouterr().err
    assert "never inputs" in err and "no input images" in err


def test_bad_checkpoints_exit_2_with_one_line(loose, tmp_path, capsys):
    assert main([str(loose / "odd.png"), "--out", str(tmp_path / "o"), "--checkpoints", str(tmp_path / "none")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_patient_folders_become_volumes_in_slice_order(tmp_path):
    folder = tmp_path / "TCGA_XX_0001_20000101"
    folder.mkdir()
    names = [f"{folder.name}_{n}.tif" for n in (10, 2, 1)]
    for n in names:
        (folder / n).touch()
    (tmp_path / "loose.png").touch()
    groups = group_volumes([folder / n for n in names] + [tmp_path / "loose.png"], batch_size=8)
    assert groups[0].volume and [p.name for p in groups[0].files] == [names[2], names[1], names[0]]
    assert not groups[1].volume and groups[1].files == (tmp_path / "loose.png",)


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "flaxtumor.predict", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--no-gate" in done.stdout


def test_its_own_output_folder_is_not_read_back_as_inputs(tiny, loose, tmp_path):  # noqa: F811
    # --out inside an input folder, run twice: the second run must not predict on the first run's *_pred.png
    out = loose / "preds"
    args = [str(loose), "--out", str(out), "--checkpoints", str(tiny.checkpoints)]
    assert main(args) == 0 and (out / "odd_pred.png").exists()
    assert main(args) == 0
    _, rows = _read_csv(out / "predictions.csv")
    assert len(rows) == 5 and not any("_pred" in r[0] for r in rows)
    assert not list(out.glob("*_pred_pred.png"))
    assert collect_inputs([out]).images == []


def test_verdict_agrees_with_the_mask_on_synthetic_data(tiny, tmp_path):  # noqa: F811
    # a threshold inside the probabilities' range and the real mask threshold: some slices are flagged with nothing
    # drawn (suspicious), some drawn; has_tumour must follow the pixels in every row
    out = tmp_path / "out"
    assert main([str(tiny.data), "--out", str(out), "--checkpoints", str(tiny.checkpoints), "--threshold", "0.5"]) == 0
    _, rows = _read_csv(out / "predictions.csv")
    assert len(rows) == 3 * 6
    for r in rows:
        assert (r[2] == "1") == (int(r[3]) > 0) == (r[4] == "tumour")
        assert r[4] in ("tumour", "suspicious", "no tumour") and r[5] in ("0", "1")
        assert (r[4] == "suspicious") == (r[5] == "1" and r[3] == "0")


def test_several_patient_folders_are_post_processed_each_on_its_own(tiny, tmp_path):  # noqa: F811
    # With LCC, two patients stacked as one volume would keep only the larger tumour; each patient keeps its own.
    out = tmp_path / "out"
    args = [str(tiny.data), "--out", str(out), "--checkpoints", str(tiny.checkpoints), "--threshold", "0", "--lcc"]
    assert main(args) == 0
    _, rows = _read_csv(out / "predictions.csv")
    patients = sorted({r[6] for r in rows})
    assert patients == sorted(p.name for p in tiny.data.iterdir() if p.is_dir())
    for patient in patients:  # the fixture's segmenter marks every pixel: each patient's whole volume is one component
        assert all(int(r[3]) == 64 * 64 for r in rows if r[6] == patient)


def test_loose_slices_are_grouped_by_kaggle_patient_prefix(tmp_path):
    names = ["TCGA_AA_0001_20000101_2.tif", "TCGA_BB_0002_20000202_1.tif", "TCGA_AA_0001_20000101_1.tif",
             "TCGA_BB_0002_20000202_3.tif", "scan.png", "TCGA_CC_0003_20000303_1.tif"]
    for n in names:
        (tmp_path / n).touch()
    groups = group_volumes([tmp_path / n for n in names], batch_size=8)
    volumes = {g.patient: [p.name for p in g.files] for g in groups if g.volume}
    assert volumes == {"TCGA_AA_0001_20000101": ["TCGA_AA_0001_20000101_1.tif", "TCGA_AA_0001_20000101_2.tif"],
                       "TCGA_BB_0002_20000202": ["TCGA_BB_0002_20000202_1.tif", "TCGA_BB_0002_20000202_3.tif"]}
    loose = [p.name for g in groups if not g.volume for p in g.files]
    assert loose == ["scan.png", "TCGA_CC_0003_20000303_1.tif"]


def test_gray_slices_are_warned_about_and_masks_refused(tiny, tmp_path, capsys):  # noqa: F811
    rng = np.random.default_rng(1)
    d = tmp_path / "in"
    d.mkdir()
    gray = rng.integers(0, 256, (40, 40), dtype=np.uint8)
    Image.fromarray(gray).save(d / "flair.png")
    Image.fromarray(np.repeat(gray[..., None], 3, -1)).save(d / "flair_rgb.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / "composite.png")
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 10:20] = 255
    Image.fromarray(mask).save(d / "label.png")  # a mask not named *_mask.*
    out = tmp_path / "out"
    assert main([str(d), "--out", str(out), "--checkpoints", str(tiny.checkpoints)]) == 1
    err = capsys.readouterr().err
    assert "label.png: looks like a segmentation mask" in err
    assert f"warning: {d / 'flair.png'}" in err and f"warning: {d / 'flair_rgb.png'}" in err
    assert "composite.png: all three channels" not in err
    _, rows = _read_csv(out / "predictions.csv")
    warnings = {Path(r[0]).name: r[7] for r in rows}
    assert set(warnings) == {"flair.png", "flair_rgb.png", "composite.png"}
    assert "pre-contrast/FLAIR/post-contrast" in warnings["flair.png"] and warnings["composite.png"] == ""


def test_gradcam_maps_have_the_input_size(tiny, loose, tmp_path):  # noqa: F811
    out, maps = tmp_path / "out", tmp_path / "maps"
    assert main([str(loose), "--out", str(out), "--gradcam", str(maps), "--checkpoints", str(tiny.checkpoints)]) == 0
    inputs = ["deep16.tif", "odd.png", "photo.jpg", "sub/gray.png", "sub/rgba.png"]
    for name in inputs:
        heat = Image.open(maps / f"{Path(name).stem}_gradcam.png")
        assert heat.mode == "L"
        assert heat.size[::-1] == _input_shape(loose / name)
    # Its own outputs are never inputs when it is pointed at them again.
    assert collect_inputs([maps, out]).images == []


def test_missing_checkpoints_name_the_flag(loose, tmp_path, capsys):
    assert main([str(loose), "--out", str(tmp_path / "out"), "--checkpoints", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no such checkpoint folder" in err and "--checkpoints" in err and "repository root" in err
    assert err.strip().count("\n") == 0  # one line, no traceback


def test_a_volume_with_a_grey_background_is_warned_about_on_every_slice(tiny, tmp_path, capsys):  # noqa: F811
    from flaxtumor.data.synthetic import write_synthetic_dataset

    root = write_synthetic_dataset(tmp_path / "data", n_patients=1, n_slices=4, size=64, seed=2)
    folder = next(p for p in root.iterdir() if p.is_dir())
    for path in sorted(folder.glob("*[0-9].tif")):
        image = tifffile.imread(path)
        image[..., 0] = np.clip(image[..., 0].astype(np.int16) + 80, 0, 255).astype(np.uint8)  # pre-contrast grey
        tifffile.imwrite(path, image, photometric="rgb")
    out = tmp_path / "out"
    assert main([str(folder), "--out", str(out), "--checkpoints", str(tiny.checkpoints)]) == 0
    err = capsys.readouterr().err
    assert err.count("a grey background: outside the head the pre-contrast reads 80") == 4
    _, rows = _read_csv(out / "predictions.csv")
    assert len(rows) == 4 and all("pre-contrast reads 80" in r[7] for r in rows)
