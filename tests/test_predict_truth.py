"""`predict` with ground truth: kaggle `*_mask.*` files are paired with their slices and scored (per-slice Dice in
predictions.csv, per-patient volumetric Dice in patients.csv, equal to `evaluate`'s); without masks nothing changes."""

import csv
import json
import math
import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image

from flaxtumor import metrics
from flaxtumor.data.io import read_mask
from flaxtumor.evaluate import main as evaluate
from flaxtumor.predict import CSV_HEADER, collect_inputs, main
from flaxtumor.truth import PATIENTS_HEADER, TRUTH_COLUMNS, pair_masks, pair_masks_leniently
from tests.fixtures_checkpoints import tiny  # noqa: F401  (session fixture)


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return tuple(rows[0]), [dict(zip(rows[0], r)) for r in rows[1:]]


def _dice_cell(d: float) -> str:
    return "" if math.isnan(d) else f"{d:.6f}"


@pytest.mark.parametrize("extra", [[], ["--lcc"], ["--no-gate"]])
def test_patient_dice_equals_evaluate(tiny, tmp_path, extra):  # noqa: F811
    # The same patients and operating point through both CLIs: the patient's Dice is one number. 0.56 lies inside the
    # untrained classifier's range (about 0.55 to 0.57 here), so the gate drops some slices: the volumes are neither
    # empty nor whole (the fixture's segmenter marks every pixel of a slice it runs on).
    ids = sorted(p.name for p in tiny.data.iterdir() if p.is_dir())
    point = ["--checkpoints", str(tiny.checkpoints), "--threshold", "0.56", *extra]
    assert evaluate(["--data", str(tiny.data), "--patients", *ids, "--out", str(tmp_path / "eval"), *point]) == 0
    expected = json.loads((tmp_path / "eval" / "metrics.json").read_text())["pipeline"]["per_patient"]
    assert main([str(tiny.data), "--out", str(tmp_path / "pred"), *point]) == 0
    header, patients = _read_csv(tmp_path / "pred" / "patients.csv")
    assert header == PATIENTS_HEADER == ("patient", "slices", "true_pixels", "predicted_pixels", "dice")
    assert sorted(r["patient"] for r in patients) == ids
    for r in patients:
        truth = expected[r["patient"]]
        assert r["dice"] == ("" if truth is None else f"{truth:.6f}")
        assert int(r["slices"]) == 6
    assert any(r["dice"] not in ("", "0.000000", "1.000000") for r in patients)  # a real overlap, not a corner
    whole = 6 * 64 * 64
    if extra != ["--no-gate"]:
        assert any(0 < int(r["predicted_pixels"]) < whole for r in patients)  # the gate dropped some slices


def test_kaggle_masks_are_paired_and_scored_per_slice(tiny, tmp_path, capsys):  # noqa: F811
    patient = tiny.data / tiny.val[0]
    out = tmp_path / "out"
    assert main([str(patient), "--out", str(out), "--checkpoints", str(tiny.checkpoints), "--threshold", "0"]) == 0
    err = capsys.readouterr().err
    header, rows = _read_csv(out / "predictions.csv")
    assert header == CSV_HEADER + TRUTH_COLUMNS
    slices = sorted((p for p in patient.glob("*.tif") if not p.stem.endswith("_mask")),
                    key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    assert [r["image"] for r in rows] == [str(p.resolve()) for p in slices]  # the masks are never inputs
    assert not list(out.glob("*_mask_pred.png"))
    preds, truths = [], []
    for path, r in zip(slices, rows):
        truth = read_mask(path.with_name(f"{path.stem}_mask.tif"))
        pred = np.asarray(Image.open(out / f"{path.stem}_pred.png")) > 0
        assert int(r["true_pixels"]) == int(truth.sum())
        assert r["dice"] == _dice_cell(metrics.dice(pred, truth))
        preds.append(pred)
        truths.append(truth)
    _, patients = _read_csv(out / "patients.csv")
    assert patients == [{"patient": patient.name, "slices": "6", "true_pixels": str(int(np.sum(truths))),
                         "predicted_pixels": str(int(np.sum(preds))),
                         "dice": _dice_cell(metrics.dice(np.stack(preds), np.stack(truths)))}]
    assert "per-patient volumetric Dice" in err and patient.name in err  # the table on stderr, with its protocol


def test_empty_versus_empty_is_blank_never_one(tiny, tmp_path):  # noqa: F811
    # threshold 1: nothing is drawn; the slices without tumour score blank, those with tumour 0
    patient = tiny.data / tiny.val[0]
    out = tmp_path / "out"
    assert main([str(patient), "--out", str(out), "--checkpoints", str(tiny.checkpoints), "--threshold", "1"]) == 0
    _, rows = _read_csv(out / "predictions.csv")
    assert {r["dice"] for r in rows if r["true_pixels"] == "0"} == {""}
    assert {r["dice"] for r in rows if r["true_pixels"] != "0"} == {"0.000000"}
    _, patients = _read_csv(out / "patients.csv")
    assert patients[0]["dice"] == "0.000000" and patients[0]["predicted_pixels"] == "0"


def _slices(folder, n=3, size=40, with_masks=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(1, n + 1):
        tifffile.imwrite(folder / f"{folder.name}_{k}.tif", rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                         photometric="rgb")
        if with_masks:
            mask = np.zeros((size, size), np.uint8)
            mask[5 : 5 + 3 * k, 8:20] = 255
            tifffile.imwrite(folder / f"{folder.name}_{k}_mask.tif", mask)
    return folder


def test_without_masks_the_csv_is_unchanged(tiny, tmp_path):  # noqa: F811
    folder = _slices(tmp_path / "PAT", with_masks=False)
    out = tmp_path / "out"
    assert main([str(folder), "--out", str(out), "--checkpoints", str(tiny.checkpoints)]) == 0
    header, rows = _read_csv(out / "predictions.csv")
    assert header == CSV_HEADER and len(rows) == 3
    assert not (out / "patients.csv").exists()
    # --no-truth: masks present, but neither read nor scored
    with_masks = _slices(tmp_path / "MASKED")
    assert main([str(with_masks), "--out", str(tmp_path / "o2"), "--checkpoints", str(tiny.checkpoints),
                 "--no-truth"]) == 0
    header, rows = _read_csv(tmp_path / "o2" / "predictions.csv")
    assert header == CSV_HEADER and len(rows) == 3 and not (tmp_path / "o2" / "patients.csv").exists()


def test_mask_without_its_image_is_an_error_and_the_rest_is_written(tiny, tmp_path, capsys):  # noqa: F811
    folder = _slices(tmp_path / "PAT")
    (folder / "PAT_2.tif").unlink()  # its mask stays behind
    out = tmp_path / "out"
    assert main([str(folder), "--out", str(out), "--checkpoints", str(tiny.checkpoints)]) == 1
    err = capsys.readouterr().err
    assert f"{folder / 'PAT_2_mask.tif'}: mask has no image (expected PAT_2.<tif|png|jpg> beside it" in err
    assert "1 input(s) failed" in err
    _, rows = _read_csv(out / "predictions.csv")
    assert [r["image"] for r in rows] == [str((folder / f"PAT_{k}.tif").resolve()) for k in (1, 3)]
    assert all(r["true_pixels"] for r in rows) and (out / "PAT_3_pred.png").exists()
    assert not list(out.glob("*mask*"))


def test_a_bad_mask_is_a_failure_but_its_slice_is_predicted(tiny, tmp_path, capsys):  # noqa: F811
    folder = _slices(tmp_path / "PAT")
    tifffile.imwrite(folder / "PAT_2_mask.tif", np.zeros((10, 10), np.uint8))  # another size than its slice
    out = tmp_path / "out"
    assert main([str(folder), "--out", str(out), "--checkpoints", str(tiny.checkpoints)]) == 1
    err = capsys.readouterr().err
    assert f"{folder / 'PAT_2_mask.tif'}: mask is 10x10 but its image is 40x40" in err
    # a patient without every slice's truth has no volumetric Dice (evaluate would refuse it): a note says why
    assert "PAT: no per-patient Dice (2 of 3 slices have a truth" in err
    _, rows = _read_csv(out / "predictions.csv")
    assert [r["true_pixels"] == "" for r in rows] == [False, True, False]
    _, patients = _read_csv(out / "patients.csv")
    assert patients == []


def test_loose_slices_get_slice_dice_but_no_patient_row(tiny, tmp_path):  # noqa: F811
    folder = _slices(tmp_path / "loose", n=1)
    shutil.move(folder / "loose_1.tif", folder / "scan.tif")
    shutil.move(folder / "loose_1_mask.tif", folder / "scan_mask.tif")
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / "x.png")
    out = tmp_path / "out"
    assert main([str(folder), "--out", str(out), "--checkpoints", str(tiny.checkpoints), "--threshold", "0"]) == 0
    _, rows = _read_csv(out / "predictions.csv")
    by_name = {r["image"].rsplit("/", 1)[1]: r for r in rows}
    assert by_name["scan.tif"]["true_pixels"] == str(3 * 12) and by_name["scan.tif"]["dice"] != ""
    assert by_name["x.png"]["true_pixels"] == by_name["x.png"]["dice"] == ""  # no mask: blank, not 0
    _, patients = _read_csv(out / "patients.csv")
    assert patients == []


def test_explicit_files_pair_with_their_masks(tmp_path):
    folder = _slices(tmp_path / "PAT", n=2)
    found = collect_inputs([folder / "PAT_1.tif", folder / "PAT_1_mask.tif", folder / "PAT_2.tif"])
    assert found.images == [folder / "PAT_1.tif", folder / "PAT_2.tif"] and not found.problems
    assert found.masks == {folder / "PAT_1.tif": folder / "PAT_1_mask.tif"}  # PAT_2's mask was not given
    assert collect_inputs([folder], use_truth=False).masks == {}


def test_pair_masks_strict_and_lenient(tmp_path):
    a, a_mask, orphan = tmp_path / "A_1.tif", tmp_path / "a_1_MASK.png", tmp_path / "B_1_mask.tif"
    images, pairs = pair_masks([a, a_mask])
    assert images == [a] and pairs == {a: a_mask}  # case-insensitive, any image suffix
    with pytest.raises(ValueError, match="B_1_mask.tif: mask has no image"):
        pair_masks([a, a_mask, orphan])
    images, pairs, problems = pair_masks_leniently([a, orphan, a_mask, tmp_path / "A_1_mask.tif"])
    assert images == [a] and pairs == {a: a_mask}
    assert [e.path for e in problems] == [orphan, tmp_path / "A_1_mask.tif"]
    assert "second mask for A_1.tif" in str(problems[1])
