"""`predict` on NIfTI volumes the tests write themselves: a mask volume on the input's grid, one CSV row per axial
slice, the truth scored, and bad volumes refused one line each while the other inputs are still written."""

import csv
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from flaxtumor import metrics
from flaxtumor.data.nifti import Orientation
from flaxtumor.predict import CSV_HEADER, collect_inputs, main
from flaxtumor.data.io import DataError
from flaxtumor.predict_nifti import NiftiInput, group_cases, read_case
from flaxtumor.truth import TRUTH_COLUMNS
from tests.data.test_nifti import _save as save_nifti
from tests.fixtures_checkpoints import tiny  # noqa: F401  (session fixture)

SHAPE = (28, 32, 6)  # stored (i, j, k); LPS, so the axial slices are 32x28 and there are 6 of them
LPS = np.array([[-0.9, 0, 0, 12.0], [0, -0.9, 0, 20.0], [0, 0, 3.0, -10.0], [0, 0, 0, 1]])
ROLE_NAMES = ("t1", "flair", "t1ce")


def _save(data, path, affine=LPS, dtype=np.float32):
    return save_nifti(data, affine, path, dtype)  # tests/data/test_nifti.py's writer (qform and sform set)


def _volumes(seed=0, shape=SHAPE):
    """Three noisy 'head' volumes with a bright blob, and that blob as the truth."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape) / (np.array(shape)[:, None, None, None] - 1) * 2 - 1
    head = (idx ** 2).sum(0) < 1.2
    blob = ((idx - np.array([0.2, -0.1, 0.0])[:, None, None, None]) ** 2).sum(0) < 0.15
    vols = []
    for _ in ROLE_NAMES:
        v = np.where(head, 100 + 20 * rng.standard_normal(shape), 0)
        v[blob] = 300
        vols.append(v)
    return vols, blob


def _trio(folder, prefix=None, seg=False, seed=0):
    prefix = folder.name if prefix is None else prefix
    vols, blob = _volumes(seed)
    paths = [_save(v, folder / f"{prefix}_{name}.nii.gz") for v, name in zip(vols, ROLE_NAMES)]
    if seg:
        paths.append(_save(blob, folder / f"{prefix}_seg.nii.gz", dtype=np.uint8))
    return paths, blob


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return tuple(rows[0]), [dict(zip(rows[0], r)) for r in rows[1:]]


def _run(tiny, inputs, out, *extra):  # noqa: F811
    return main([*map(str, inputs), "--out", str(out), "--checkpoints", str(tiny.checkpoints), *map(str, extra)])


def test_trio_writes_a_mask_volume_on_the_input_grid(tiny, tmp_path, capsys):  # noqa: F811
    paths, _ = _trio(tmp_path / "BraTS_001")
    out = tmp_path / "out"
    assert _run(tiny, [tmp_path / "BraTS_001"], out, "--threshold", "0.56") == 0
    assert "out of domain" in capsys.readouterr().err
    written, ref = nib.load(out / "BraTS_001_pred.nii.gz"), nib.load(paths[0])
    assert written.shape == SHAPE and np.array_equal(written.affine, ref.affine)
    assert int(written.header["sform_code"]) == 2 and int(written.header["qform_code"]) == 1
    data = np.asanyarray(written.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1}
    header, rows = _read_csv(out / "predictions.csv")
    assert header == CSV_HEADER and not (out / "patients.csv").exists()  # no truth: the CSV as for TIFs
    assert [r["image"] for r in rows] == [f"{paths[0].resolve()}#z={k}" for k in range(SHAPE[2])]
    assert {r["patient"] for r in rows} == {"BraTS_001"}
    # each row's pixel count is its axial slice of the written volume (slice k = the k-th from inferior)
    sliced = Orientation.of(ref).to_slices(data)
    assert sliced.shape == (6, 32, 28)
    assert [int(r["tumour_pixels"]) for r in rows] == [int(s.sum()) for s in sliced]
    assert 0 < data.sum() < data.size  # the gate at 0.56 keeps some slices, not all
    for r in rows:
        assert (r["has_tumour"] == "1") == (int(r["tumour_pixels"]) > 0) == (r["verdict"] == "tumour")
        assert r["warning"] == ""  # empty slices outside the head are not grayscale inputs


def test_4d_volume_and_explicit_files(tiny, tmp_path):  # noqa: F811
    vols, _ = _volumes()
    four = _save(np.stack(vols, axis=-1), tmp_path / "in" / "case9.nii.gz")
    trio, _ = _trio(tmp_path / "elsewhere", prefix="sub-01")
    out, maps = tmp_path / "out", tmp_path / "maps"
    assert _run(tiny, [four, *trio], out, "--threshold", "0", "--gradcam", maps) == 0
    heat = Image.open(maps / "case9_z5_gradcam.png")  # one Grad-CAM per axial slice, at the slice's size
    assert heat.mode == "L" and heat.size == (28, 32) and len(list(maps.iterdir())) == 12
    for name, ref in (("case9", four), ("sub-01", trio[0])):
        written = nib.load(out / f"{name}_pred.nii.gz")
        assert written.shape == SHAPE and np.array_equal(written.affine, nib.load(ref).affine)
        assert np.asanyarray(written.dataobj).all()  # threshold 0: the fixture's segmenter marks every voxel
    _, rows = _read_csv(out / "predictions.csv")
    assert [r["patient"] for r in rows] == ["case9"] * 6 + ["sub-01"] * 6
    assert rows[0]["image"] == f"{four.resolve()}#z=0" and int(rows[0]["tumour_pixels"]) == 32 * 28


def test_bad_volumes_are_one_line_each_and_the_rest_is_written(tiny, tmp_path, capsys):  # noqa: F811
    vols, _ = _volumes()
    _trio(tmp_path / "good")
    missing, _ = _trio(tmp_path / "missing")
    missing[2].unlink()  # no post-contrast volume
    shape, _ = _trio(tmp_path / "shape")
    _save(np.ones((28, 32, 7)), shape[1])  # FLAIR one slice longer
    affine, _ = _trio(tmp_path / "affine")
    moved = LPS.copy()
    moved[1, 3] += 2.0  # post-contrast shifted by 2 mm
    _save(vols[2], affine[2], moved)
    flat, _ = _trio(tmp_path / "flat")
    _save(np.ones((28, 32)), flat[0])  # 2-D pre-contrast
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    inputs = [tmp_path / d for d in ("missing", "shape", "affine", "flat", "good")] + [tmp_path / "a.png"]
    assert _run(tiny, inputs, out) == 1
    err = capsys.readouterr().err
    failed = err[err.index("4 input(s) failed:"):].splitlines()[1:]
    assert len(failed) == 4  # one line each, naming the file (or the folder missing a role) and the problem
    expected = {
        str(tmp_path / "missing"): "missing the post-contrast (T1-Gd) volume",
        str(shape[1]): "shape (28, 32, 7) differs from shape_t1.nii.gz's (28, 32, 6)",
        str(affine[2]): "affine differs from affine_t1.nii.gz's by up to 2 ",
        str(flat[0]): "2-D data (shape (28, 32))",
    }
    for line, (path, problem) in zip(failed, expected.items()):
        assert line.strip().startswith(f"{path}: ") and problem in line, line
    assert nib.load(out / "good_pred.nii.gz").shape == SHAPE and (out / "a_pred.png").exists()
    _, rows = _read_csv(out / "predictions.csv")
    assert len(rows) == 1 + 6 and {r["patient"] for r in rows} == {"", "good"}
    assert not [p.name for p in out.glob("*.nii.gz") if p.name != "good_pred.nii.gz"]


def test_truth_by_name_and_by_flag_is_scored(tiny, tmp_path):  # noqa: F811
    paths, blob = _trio(tmp_path / "p1", seg=True)
    out = tmp_path / "out"
    assert _run(tiny, [tmp_path / "p1"], out, "--threshold", "0.56") == 0
    header, rows = _read_csv(out / "predictions.csv")
    assert header == CSV_HEADER + TRUTH_COLUMNS
    ref = nib.load(paths[0])
    o = Orientation.of(ref)
    pred, truth = o.to_slices(np.asanyarray(nib.load(out / "p1_pred.nii.gz").dataobj) > 0), o.to_slices(blob)
    for k, r in enumerate(rows):
        assert int(r["true_pixels"]) == int(truth[k].sum())
        d = metrics.dice(pred[k], truth[k])
        assert r["dice"] == ("" if np.isnan(d) else f"{d:.6f}")
    _, patients = _read_csv(out / "patients.csv")
    assert patients == [{"patient": "p1", "slices": "6", "true_pixels": str(int(blob.sum())),
                         "predicted_pixels": str(int(pred.sum())), "dice": f"{metrics.dice(pred, truth):.6f}"}]
    # --truth: a segmentation named for nothing, kept elsewhere
    paths[3].rename(tmp_path / "labels.nii.gz")
    assert _run(tiny, [tmp_path / "p1"], tmp_path / "o2", "--threshold", "0.56",
                "--truth", tmp_path / "labels.nii.gz") == 0
    assert _read_csv(tmp_path / "o2" / "patients.csv")[1] == patients
    # ... which needs exactly one NIfTI case
    _trio(tmp_path / "p2")
    assert _run(tiny, [tmp_path / "p1", tmp_path / "p2"], tmp_path / "o3", "--truth", tmp_path / "labels.nii.gz") == 2
    # --no-truth: the segmentation beside the volumes is neither read nor scored
    (tmp_path / "labels.nii.gz").rename(paths[3])
    assert _run(tiny, [tmp_path / "p1"], tmp_path / "o4", "--no-truth") == 0
    assert _read_csv(tmp_path / "o4" / "predictions.csv")[0] == CSV_HEADER


def test_a_bad_truth_is_a_failure_but_its_case_is_predicted(tiny, tmp_path, capsys):  # noqa: F811
    paths, blob = _trio(tmp_path / "p1")
    labels = blob.astype(np.uint8) * 2  # BraTS-style labels, not binary
    _save(labels, tmp_path / "p1" / "p1_seg.nii.gz", dtype=np.uint8)
    _trio(tmp_path / "p2", seg=True)
    assert _run(tiny, [tmp_path / "p1", tmp_path / "p2"], tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'p1' / 'p1_seg.nii.gz'}: truth is not binary" in err and "predicted without a truth" in err
    _, patients = _read_csv(tmp_path / "out" / "patients.csv")
    assert [r["patient"] for r in patients] == ["p2"] and (tmp_path / "out" / "p1_pred.nii.gz").exists()
    _, rows = _read_csv(tmp_path / "out" / "predictions.csv")
    assert {r["true_pixels"] for r in rows if r["patient"] == "p1"} == {""}
    assert all(r["true_pixels"] for r in rows if r["patient"] == "p2")


def test_its_own_mask_volumes_are_not_read_back(tiny, tmp_path):  # noqa: F811
    _trio(tmp_path / "p1")
    out = tmp_path / "p1" / "preds"  # inside the input folder: `p1_pred` would read as a pre-contrast volume
    assert _run(tiny, [tmp_path / "p1"], out) == 0
    assert _run(tiny, [tmp_path / "p1"], out) == 0
    found = collect_inputs([tmp_path / "p1"])
    assert [c.name for c in found.cases] == ["p1"] and not found.problems
    assert sorted(p.name for p in out.iterdir()) == ["p1_pred.nii.gz", "predictions.csv"]


def test_grouping_cases_in_folders(tmp_path, capsys):
    vols, blob = _volumes()
    flat = tmp_path / "flat"  # two patients' trios in one folder, and a segmentation for the first
    for prefix in ("p1", "p2"):
        _trio(flat, prefix=prefix)
    _save(blob, flat / "p1_seg.nii.gz", dtype=np.uint8)
    fours = tmp_path / "fours"  # two 4-D volumes, one with its truth; a 3-D volume named for no role; a T2
    for name in ("caseA", "caseB"):
        _save(np.stack(vols, axis=-1), fours / f"{name}.nii.gz")
    _save(blob, fours / "caseA_seg.nii.gz", dtype=np.uint8)
    _save(vols[0], fours / "brain.nii.gz")
    _save(vols[0], fours / "caseB_t2.nii.gz")
    orphan = _save(blob, tmp_path / "labels" / "x_seg.nii.gz", dtype=np.uint8)
    found = collect_inputs([flat, fours, tmp_path / "labels"])
    cases = {c.name: sorted(p.name for p in c.files) for c in found.cases}
    assert cases == {
        "p1": ["p1_flair.nii.gz", "p1_seg.nii.gz", "p1_t1.nii.gz", "p1_t1ce.nii.gz"],
        "p2": ["p2_flair.nii.gz", "p2_t1.nii.gz", "p2_t1ce.nii.gz"],
        "caseA": ["caseA.nii.gz", "caseA_seg.nii.gz"],
        "caseB": ["caseB.nii.gz"],  # its T2 is recognised and not used; brain.nii.gz is skipped
    }
    assert found.problems == [f"{orphan}: truth segmentation without its volumes (expected the pre-contrast, FLAIR "
                              "and post-contrast volumes, or a 4-D volume named like it, beside it)"]
    assert f"skipping {fours / 'brain.nii.gz'}: a 3-D NIfTI named for no role" in capsys.readouterr().err
    # given by name, a 3-D volume named for no role is a case, which load_case then refuses with its reason
    cases, _ = group_cases([fours / "brain.nii.gz"], {(fours / "brain.nii.gz").resolve()})
    assert cases == [NiftiInput("brain", (fours / "brain.nii.gz",))]
    # without truth, segmentations are left out, and an orphan one is no problem
    found = collect_inputs([fours, tmp_path / "labels"], use_truth=False)
    assert [c.files for c in found.cases if c.name == "caseA"] == [(fours / "caseA.nii.gz",)] and not found.problems


def test_a_duplicate_role_splits_by_patient_only_when_the_names_do(tmp_path):
    paths, _ = _trio(tmp_path / "p", prefix="scan")
    extra = _save(_volumes()[0][0], tmp_path / "p" / "T1w.nii.gz")  # no patient in its name: cannot be split off
    cases, problems = group_cases(sorted((tmp_path / "p").iterdir()), set())
    assert len(cases) == 1 and len(cases[0].files) == 4 and not problems
    with pytest.raises(DataError, match=r"two pre-contrast \(T1\) volumes"):  # one clear error, not two odd ones
        read_case(cases[0])
    extra.rename(tmp_path / "p" / "other_T1w.nii.gz")  # now it names another patient: the trio is a case of its own
    cases, _ = group_cases(sorted((tmp_path / "p").iterdir()), set())
    assert [(c.name, len(c.files)) for c in cases] == [("other", 1), ("scan", 3)]


def test_duplicate_case_names_fail_before_any_work(tiny, tmp_path, capsys):  # noqa: F811
    _trio(tmp_path / "a" / "x", prefix="same")
    _trio(tmp_path / "b" / "y", prefix="same")
    assert _run(tiny, [tmp_path / "a", tmp_path / "b"], tmp_path / "out") == 2
    assert "NIfTI cases share a name" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_tif_only_runs_never_import_nibabel(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    code = ("import sys; from flaxtumor.predict import collect_inputs; "
            f"found = collect_inputs([{str(tmp_path)!r}]); assert found.images and not found.has_truth; "
            "assert 'nibabel' not in sys.modules, 'nibabel imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_nibabel_is_a_runtime_dependency_of_the_package_and_the_space():
    # predict reads .nii inputs with it: a core dependency (not an extra), and in the Space's requirements.txt, which
    # must list every runtime dependency of pyproject.toml
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    name = lambda spec: re.split(r"[<>=!~\[ ;]", spec.strip(), maxsplit=1)[0].lower()  # noqa: E731
    runtime = {name(d) for d in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]}
    space = {name(line) for line in (root / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    assert "nibabel" in runtime and runtime <= space, sorted(runtime - space)
