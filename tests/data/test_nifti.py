"""NIfTI in and out on small volumes the tests write themselves, with non-canonical affines (LPS, and permuted axes) so
the reorientation and its inverse are really exercised."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from flaxtumor.data.io import DataError
from flaxtumor.data.nifti import (AFFINE_ATOL, NiftiCase, Orientation, case_key, load_case, robust_rescale,
                                  role_of, write_mask)

# Stored (file) shape -> canonical (x, y, z) and sliced (D, H, W) shapes differ per affine; in-plane sizes differ so a
# transposed slice cannot pass.
SHAPE = (28, 32, 8)
AFFINES = {
    # stored axes i, j, k point to patient Left, Posterior, Superior (DICOM's LPS), 0.9 x 0.9 x 3 mm
    "LPS": (np.array([[-0.9, 0, 0, 12.0], [0, -0.9, 0, 20.0], [0, 0, 3.0, -10.0], [0, 0, 0, 1]]), SHAPE),
    # i -> Inferior, j -> Left, k -> Posterior: the axial axis is stored first, flipped; in-plane axes swapped
    "ILP": (np.array([[0, -1.0, 0, 5.0], [0, 0, -1.2, 7.0], [-2.5, 0, 0, 30.0], [0, 0, 0, 1]]), (8, 28, 32)),
    # already canonical, for the display-layout check
    "RAS": (np.diag([1.0, 1.0, 2.0, 1.0]), SHAPE),
}


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype=np.float32) -> Path:
    img = nib.Nifti1Image(np.asarray(data, dtype), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def _world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(3, *shape) world (mm) coordinates of every voxel."""
    ijk = np.indices(shape[:3]).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape(3, *shape[:3])


def _head(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A noisy ellipsoid 'head' on a zero background."""
    idx = np.indices(shape) / (np.array(shape)[:, None, None, None] - 1) * 2 - 1
    inside = (idx ** 2).sum(0) < 1.2
    return np.where(inside, 100 + 20 * rng.standard_normal(shape), 0).astype(np.float32)


def _blob(shape: tuple[int, ...], centre: tuple[int, int, int], r: float = 2.5) -> np.ndarray:
    idx = np.indices(shape)
    return ((idx - np.array(centre)[:, None, None, None]) ** 2).sum(0) <= r * r


def _patient(folder: Path, affine_key: str = "LPS", *, names=("t1", "flair", "t1ce"), seg: bool = True,
             prefix: str = "BraTS2021_00042", sep: str = "_") -> dict:
    """Three role volumes, each with its own bright blob, and a seg of the FLAIR blob. Returns the stored arrays."""
    affine, shape = AFFINES[affine_key]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    centres = [tuple(int(s * f) for s, f in zip(shape, fr)) for fr in ((0.3, 0.3, 0.4), (0.6, 0.5, 0.5),
                                                                        (0.4, 0.7, 0.6))]
    vols, blobs, paths = [], [], {}
    for role, name, centre in zip(("pre", "flair", "post"), names, centres):
        blob = _blob(shape, centre)
        vol = _head(shape, rng)
        vol[blob] = 400.0
        vols.append(vol)
        blobs.append(blob)
        paths[role] = _save(vol, affine, folder / f"{prefix}{sep}{name}.nii.gz")
    if seg:
        paths["truth"] = _save(blobs[1], affine, folder / f"{prefix}{sep}seg.nii.gz", np.uint8)
    return {"vols": vols, "blobs": blobs, "paths": paths, "affine": affine, "shape": shape}


# ---- role detection ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, role", [
    ("BraTS2021_00000_t1.nii.gz", "pre"), ("BraTS2021_00000_flair.nii.gz", "flair"),
    ("BraTS2021_00000_t1ce.nii.gz", "post"), ("BraTS2021_00000_seg.nii.gz", "truth"),
    ("BraTS2021_00000_t2.nii.gz", "t2"),
    ("BraTS-GLI-00000-000-t1n.nii.gz", "pre"), ("BraTS-GLI-00000-000-t2f.nii.gz", "flair"),
    ("BraTS-GLI-00000-000-t1c.nii.gz", "post"), ("BraTS-GLI-00000-000-seg.nii.gz", "truth"),
    ("BraTS-GLI-00000-000-t2w.nii.gz", "t2"),
    ("sub-01_T1w.nii.gz", "pre"), ("sub-01_FLAIR.nii", "flair"), ("sub-01_T1GD.NII.GZ", "post"),
    ("case7_pre_contrast.nii.gz", "pre"), ("case7_precontrast.nii.gz", "pre"), ("case7_post.nii.gz", "post"),
    ("case7_T1_post.nii.gz", "post"), ("case7_t1.pre.nii.gz", "pre"), ("case7 FLAIR_reg.nii.gz", "flair"),
    ("case7_tumour_mask.nii.gz", "truth"), ("case7_segmentation.nii.gz", "truth"),
    ("case7_brain.nii.gz", None), ("t1ce_as_prefix_is_a_token.nii.gz", "post"), ("patient_t10.nii.gz", None),
])
def test_role_of(name: str, role: str | None) -> None:
    assert role_of(name) == role


@pytest.mark.parametrize("name, key", [
    ("BraTS2021_00042_t1ce.nii.gz", "BraTS2021_00042"), ("BraTS2021_00042_seg.nii.gz", "BraTS2021_00042"),
    ("BraTS-GLI-00000-000-t1n.nii.gz", "BraTS-GLI-00000-000"), ("t1.nii.gz", ""), ("p1_T1_post.nii", "p1"),
    ("caseA.nii.gz", "caseA"),
])
def test_case_key(name: str, key: str) -> None:
    # predict splits a folder of several patients by it
    assert case_key(name) == key


def test_folder_roles_truth_and_skipped_t2(tmp_path: Path) -> None:
    p = _patient(tmp_path / "BraTS2021_00042")
    _save(p["vols"][0], p["affine"], tmp_path / "BraTS2021_00042" / "BraTS2021_00042_t2.nii.gz")  # skipped
    (tmp_path / "BraTS2021_00042" / "notes.txt").write_text("not NIfTI")  # ignored
    case = load_case(tmp_path / "BraTS2021_00042")
    assert isinstance(case, NiftiCase)
    assert case.patient == "BraTS2021_00042"
    assert case.sources == p["paths"]
    assert case.reference == p["paths"]["pre"]
    assert case.truth is not None and case.truth.dtype == bool and case.truth.sum() == p["blobs"][1].sum()
    assert case.names[0] == "BraTS2021_00042_1" and len(case.names) == len(case.slices)


def test_file_list_and_mapping_give_the_same_case(tmp_path: Path) -> None:
    p = _patient(tmp_path / "a", names=("T1w", "FLAIR", "T1Gd"), sep="-", prefix="sub-01", seg=False)
    by_list = load_case([p["paths"]["post"], p["paths"]["pre"], p["paths"]["flair"]])
    assert by_list.patient == "sub-01" and by_list.truth is None
    odd = {r: path.rename(path.with_name(f"volume{i}.nii.gz")) for i, (r, path) in enumerate(p["paths"].items())}
    by_map = load_case(odd, patient="p1")
    assert by_map.patient == "p1"
    np.testing.assert_array_equal(by_map.images(), by_list.images())


# ---- geometry: axial slicing, order, display layout, round trip ----------------------------------------------------


@pytest.mark.parametrize("key", sorted(AFFINES))
def test_slicing_is_axial_inferior_to_superior_in_display_layout(key: str) -> None:
    """World coordinates of every voxel, pushed through the slicing: z is constant on a slice and rises with the slice
    index; rows run anterior -> posterior (y falls), columns run patient right -> left (x falls)."""
    affine, shape = AFFINES[key]
    orientation = Orientation.of(nib.Nifti1Image(np.zeros(shape, np.float32), affine))
    x, y, z = (orientation.to_slices(c) for c in _world(affine, shape))
    assert z.shape == orientation.sliced_shape
    assert np.ptp(z, axis=(1, 2)).max() < 1e-9 and np.all(np.diff(z[:, 0, 0]) > 0)
    assert np.ptp(y, axis=(0, 2)).max() < 1e-9 and np.all(np.diff(y[0, :, 0]) < 0)
    assert np.ptp(x, axis=(0, 1)).max() < 1e-9 and np.all(np.diff(x[0, 0, :]) < 0)
    stack = np.arange(np.prod(shape)).reshape(orientation.sliced_shape)
    np.testing.assert_array_equal(orientation.to_slices(orientation.from_slices(stack)), stack)


def test_sliced_shapes() -> None:
    # LPS (28, 32, 8): canonical (28, 32, 8) -> D=8, H=32, W=28. ILP (8, 28, 32): i->z, j->x, k->y -> same.
    for key in ("LPS", "ILP"):
        affine, shape = AFFINES[key]
        o = Orientation.of(nib.Nifti1Image(np.zeros(shape, np.float32), affine))
        assert o.sliced_shape == (8, 32, 28)
    o = Orientation.of(nib.Nifti1Image(np.zeros(AFFINES["ILP"][1], np.float32), AFFINES["ILP"][0]))
    assert o.axcodes == ("I", "L", "P")


def test_patient_right_anterior_is_image_top_left(tmp_path: Path) -> None:
    """Radiological display: a blob at the patient's right-anterior shows top-left of the image."""
    affine, shape = AFFINES["RAS"]
    vol = _head(shape, np.random.default_rng(1))
    vol[_blob(shape, (shape[0] - 5, shape[1] - 5, 4))] = 500  # +x = right, +y = anterior
    for role in ("t1", "flair", "t1ce"):
        _save(vol, affine, tmp_path / f"p_{role}.nii.gz")
    case = load_case(tmp_path)
    row, col = np.unravel_index(np.argmax(case.slices[4][..., 0]), case.slices[4].shape[:2])
    assert row < 8 and col < 8


@pytest.mark.parametrize("key", ["LPS", "ILP"])
def test_composite_channel_order_and_slice_order(tmp_path: Path, key: str) -> None:
    p = _patient(tmp_path / "p", key)
    case = load_case(tmp_path / "p")
    o = case.orientation
    assert o.shape == p["shape"] and np.allclose(o.affine, p["affine"])
    images = case.images()
    assert images.dtype == np.uint8 and images.shape == (*o.sliced_shape, 3)
    for c, blob in enumerate(p["blobs"]):  # channel c is bright exactly at role c's blob
        where = o.to_slices(blob)
        assert images[..., c][where].min() == 255
        for other in {0, 1, 2} - {c}:
            assert images[..., other][where].mean() < 200
        # only the blob reaches the top of the range (the head's noise stays far below), so the saturated voxels of
        # each channel are exactly its blob, on the slices, rows and columns the geometry test pins down
        np.testing.assert_array_equal(images[..., c] == 255, where)
    np.testing.assert_array_equal(case.truth, o.to_slices(p["blobs"][1]))


@pytest.mark.parametrize("key", ["LPS", "ILP", "RAS"])
def test_written_mask_overlays_the_input_voxel_for_voxel(tmp_path: Path, key: str) -> None:
    p = _patient(tmp_path / "p", key)
    case = load_case(tmp_path / "p")
    out = case.write_mask(case.truth, tmp_path / "out" / "p_pred.nii.gz")
    written, ref = nib.load(out), nib.load(p["paths"]["pre"])
    assert written.shape == ref.shape == p["shape"]
    np.testing.assert_array_equal(written.affine, ref.affine)
    assert written.header.get_data_dtype() == np.uint8
    assert int(written.header["sform_code"]) == int(ref.header["sform_code"]) == 2
    assert int(written.header["qform_code"]) == int(ref.header["qform_code"]) == 1
    np.testing.assert_array_equal(written.header.get_zooms(), ref.header.get_zooms())
    data = np.asanyarray(written.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) == {0, 1}
    np.testing.assert_array_equal(data, p["blobs"][1].astype(np.uint8))  # the truth blob, voxel for voxel


def test_write_mask_from_a_4d_reference_and_bad_mask_shape(tmp_path: Path) -> None:
    p = _patient(tmp_path / "p", "ILP", seg=False)
    four = _save(np.stack(p["vols"], axis=-1), p["affine"], tmp_path / "case.nii.gz")
    case = load_case(four)
    mask = case.orientation.to_slices(p["blobs"][2])
    out = write_mask(mask, four, tmp_path / "case_pred.nii.gz")
    written = nib.load(out)
    assert written.shape == p["shape"] and np.array_equal(written.affine, nib.load(four).affine)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), p["blobs"][2])
    with pytest.raises(ValueError, match=r"slices to \(8, 32, 28\)"):
        write_mask(mask[:-1], four, tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="nii.gz"):
        write_mask(mask, four, tmp_path / "x.png")


# ---- 4-D input -----------------------------------------------------------------------------------------------------


def test_4d_volume_equals_three_volumes(tmp_path: Path) -> None:
    p = _patient(tmp_path / "p", "LPS")
    three = load_case(tmp_path / "p")
    four_path = _save(np.stack(p["vols"], axis=-1), p["affine"], tmp_path / "four" / "case9.nii.gz")
    seg = _save(p["blobs"][1], p["affine"], tmp_path / "four" / "case9_seg.nii.gz", np.uint8)
    four = load_case(tmp_path / "four")
    np.testing.assert_array_equal(four.images(), three.images())
    np.testing.assert_array_equal(four.truth, three.truth)
    assert four.reference == four_path and four.sources["truth"] == seg and four.patient == "four"
    assert load_case(four_path).patient == "case9" and load_case(four_path).truth is None
    assert load_case([four_path, seg]).truth is not None


def test_4d_with_other_channel_counts_or_channels_first_is_refused(tmp_path: Path) -> None:
    affine, shape = AFFINES["LPS"]
    four = _save(np.ones((*shape, 4), np.float32), affine, tmp_path / "msd.nii.gz")
    with pytest.raises(DataError, match=r"msd.nii.gz: shape \(28, 32, 8, 4\).*3 channels on its 4th axis"):
        load_case(four)
    first = _save(np.ones((3, *shape), np.float32), affine, tmp_path / "first.nii.gz")
    with pytest.raises(DataError, match=r"shape \(3, 28, 32, 8\)"):
        load_case(first)
    lone = _save(np.ones(shape, np.float32), affine, tmp_path / "lone.nii.gz")
    with pytest.raises(DataError, match="lone.nii.gz: a 3-D volume: a single input volume must be 4-D"):
        load_case(lone)


# ---- intensities ---------------------------------------------------------------------------------------------------


def test_robust_rescale() -> None:
    rng = np.random.default_rng(0)
    vol = np.zeros((20, 20, 20), np.float32)
    vol[5:15, 5:15, 5:15] = rng.uniform(100, 200, (10, 10, 10))
    vol[10, 10, 10] = 1e6  # one hot voxel must not squash the rest
    vol[0, 0, 0] = np.nan
    u8, (lo, hi) = robust_rescale(vol)
    head = vol[5:15, 5:15, 5:15]
    assert 100 <= lo < 102 and 198 < hi <= 200
    assert u8.dtype == np.uint8 and u8[10, 10, 10] == 255 and u8[0, 0, 0] == 0 and u8[0, 1, 0] == 0
    assert u8[5:15, 5:15, 5:15].mean() == pytest.approx(127.5, abs=6)
    assert np.all(np.diff(u8[5:15, 5:15, 5:15].ravel()[np.argsort(head.ravel())].astype(int)) >= 0)  # monotone
    assert not robust_rescale(np.zeros((4, 4, 4)))[0].any()


def test_each_role_is_rescaled_on_its_own(tmp_path: Path) -> None:
    p = _patient(tmp_path / "p")
    p["vols"][2] *= 1000  # a post-contrast volume on another scale gives the same composite channel
    _save(p["vols"][2], p["affine"], p["paths"]["post"])
    scaled = load_case(tmp_path / "p")
    assert scaled.intensity_range["post"][1] == pytest.approx(1000 * scaled.intensity_range["pre"][1], rel=0.2)
    q = _patient(tmp_path / "q")
    np.testing.assert_array_equal(load_case(tmp_path / "q").images()[..., 2], scaled.images()[..., 2])


# ---- errors --------------------------------------------------------------------------------------------------------


def test_missing_role_is_named(tmp_path: Path) -> None:
    p = _patient(tmp_path / "p")
    p["paths"]["post"].unlink()
    with pytest.raises(DataError, match=r"p: missing the post-contrast \(T1-Gd\) volume") as e:
        load_case(tmp_path / "p")
    assert e.value.path == tmp_path / "p"
    p["paths"]["flair"].unlink()
    with pytest.raises(DataError, match=r"missing the FLAIR and post-contrast \(T1-Gd\) volumes"):
        load_case([p["paths"]["pre"], p["paths"]["truth"]])
    with pytest.raises(DataError, match="missing the FLAIR"):
        load_case({"pre": p["paths"]["pre"]})


def test_mismatched_shapes(tmp_path: Path) -> None:
    p = _patient(tmp_path / "p")
    _save(np.ones((28, 32, 9)), p["affine"], p["paths"]["flair"])
    with pytest.raises(DataError, match=r"_flair.nii.gz: shape \(28, 32, 9\) differs from .*_t1.nii.gz's "
                                        r"\(28, 32, 8\)"):
        load_case(tmp_path / "p")


def test_mismatched_affines_with_tolerance(tmp_path: Path) -> None:
    p = _patient(tmp_path / "p")
    near = p["affine"].copy()
    near[0, 3] += AFFINE_ATOL / 10  # float noise from another writer: accepted
    _save(p["vols"][2], near, p["paths"]["post"])
    load_case(tmp_path / "p")
    off = p["affine"].copy()
    off[1, 3] += 1.0  # a 1 mm shift: not on the same grid
    _save(p["vols"][2], off, p["paths"]["post"])
    with pytest.raises(DataError, match=r"_t1ce.nii.gz: affine differs from .*_t1.nii.gz's by up to 1 ") as e:
        load_case(tmp_path / "p")
    assert "\n" not in str(e.value) and "element [1, 3]: 21 vs 20" in str(e.value)  # one line, pointing at it
    flipped = p["affine"] @ np.diag([-1.0, 1, 1, 1])
    _save(p["vols"][2], flipped, p["paths"]["post"])
    with pytest.raises(DataError, match="affine differs"):
        load_case(tmp_path / "p")


def test_2d_data(tmp_path: Path) -> None:
    p = _patient(tmp_path / "p", seg=False)
    _save(np.ones((28, 32)), p["affine"], p["paths"]["pre"])
    with pytest.raises(DataError, match=r"_t1.nii.gz: 2-D data \(shape \(28, 32\)\)"):
        load_case(tmp_path / "p")
    affine, _ = AFFINES["RAS"]
    for role in ("t1", "flair", "t1ce"):  # one coronal plane: the axial slices would be 1 pixel tall
        _save(np.ones((28, 1, 8)), affine, tmp_path / "c" / f"c_{role}.nii.gz")
    with pytest.raises(DataError, match="2-D data: shape .* single sagittal or coronal plane"):
        load_case(tmp_path / "c")


def test_a_4d_role_volume_is_refused(tmp_path: Path) -> None:
    p = _patient(tmp_path / "p", seg=False)
    _save(np.ones((*SHAPE, 2)), p["affine"], p["paths"]["flair"])
    with pytest.raises(DataError, match=r"_flair.nii.gz: shape \(28, 32, 8, 2\): expected a 3-D volume"):
        load_case(tmp_path / "p")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "gzipped_garbage", "empty"])
def test_unreadable_or_corrupt_files(tmp_path: Path, damage: str) -> None:
    p = _patient(tmp_path / "p", seg=False)
    path = p["paths"]["flair"]
    raw = path.read_bytes()
    path.write_bytes({"garbage": b"this is not a NIfTI file" * 50, "truncated": raw[: len(raw) // 2],
                      "gzipped_garbage": gzip.compress(b"\x00" * 400), "empty": b""}[damage])
    expected = "zero-byte file" if damage == "empty" else "unreadable or corrupt NIfTI"
    with pytest.raises(DataError, match=f"_flair.nii.gz: {expected}") as e:
        load_case(tmp_path / "p")
    assert e.value.path == path


def test_missing_file_wrong_type_duplicate_and_unnamed(tmp_path: Path) -> None:
    p = _patient(tmp_path / "p")
    with pytest.raises(DataError, match="nope_t1.nii.gz: file not found"):
        load_case({"pre": tmp_path / "nope_t1.nii.gz", "flair": p["paths"]["flair"], "post": p["paths"]["post"]})
    tif = tmp_path / "x_t1.tif"
    tif.write_bytes(b"II*\x00")
    with pytest.raises(DataError, match="x_t1.tif: unsupported file type"):
        load_case({"pre": tif, "flair": p["paths"]["flair"], "post": p["paths"]["post"]})
    _save(p["vols"][0], p["affine"], tmp_path / "p" / "BraTS2021_00042_T1w.nii.gz")
    with pytest.raises(DataError, match="two pre-contrast .* volumes"):
        load_case(tmp_path / "p")
    other = _save(p["vols"][0], p["affine"], tmp_path / "brain.nii.gz")
    with pytest.raises(DataError, match="brain.nii.gz: file name matches no role"):
        load_case([other, p["paths"]["flair"], p["paths"]["post"]])
    with pytest.raises(DataError, match="no NIfTI files"):
        load_case((tmp_path / "empty").mkdir() or tmp_path / "empty")


def test_bad_truth(tmp_path: Path) -> None:
    p = _patient(tmp_path / "p", seg=False)
    wrong = _save(np.zeros((28, 32, 7), np.uint8), p["affine"], tmp_path / "wrong_seg.nii.gz")
    with pytest.raises(DataError, match=r"wrong_seg.nii.gz: truth has shape \(28, 32, 7\) but the volumes have "
                                        r"\(28, 32, 8\)"):
        load_case(tmp_path / "p", truth=wrong)
    labels = np.zeros(SHAPE, np.uint8)
    labels[5:8, 5:8, 2:4], labels[10:12, 10:12, 3] = 1, 2
    labels[20, 20, 5] = 4
    brats = _save(labels, p["affine"], tmp_path / "brats_seg.nii.gz", np.uint8)
    with pytest.raises(DataError, match=r"brats_seg.nii.gz: truth is not binary: values \{0, 1, 2, 4\}"):
        load_case(tmp_path / "p", truth=brats)
    half = _save(np.full(SHAPE, 0.5), p["affine"], tmp_path / "soft_mask.nii.gz")
    with pytest.raises(DataError, match="not binary"):
        load_case(tmp_path / "p", truth=half)
    moved = p["affine"].copy()
    moved[2, 3] += 3
    shifted = _save(labels > 0, moved, tmp_path / "shifted_seg.nii.gz", np.uint8)
    with pytest.raises(DataError, match="shifted_seg.nii.gz: affine differs"):
        load_case(tmp_path / "p", truth=shifted)
    ok = load_case(tmp_path / "p", truth=_save(labels > 0, p["affine"], tmp_path / "ok.nii.gz", np.uint8))
    assert ok.truth.sum() == (labels > 0).sum()


@pytest.mark.parametrize("qform_code, sform_code", [(1, 0), (0, 0), (0, 3), (4, 1)])
def test_written_mask_keeps_the_reference_form_codes(tmp_path: Path, qform_code: int, sform_code: int) -> None:
    affine, shape = AFFINES["ILP"]
    header = nib.Nifti1Header()
    header.set_qform(affine, code=qform_code)
    header.set_sform(affine, code=sform_code)
    nib.save(nib.Nifti1Image(np.zeros((*shape, 3), np.float32), None, header=header), tmp_path / "ref.nii.gz")
    ref = nib.load(tmp_path / "ref.nii.gz")
    assert (int(ref.header["qform_code"]), int(ref.header["sform_code"])) == (qform_code, sform_code)
    mask = np.zeros(Orientation.of(ref).sliced_shape, bool)
    mask[3, 4, 5] = True
    out = nib.load(write_mask(mask, tmp_path / "ref.nii.gz", tmp_path / "out.nii"))
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (qform_code, sform_code)
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-6)
    assert np.asanyarray(out.dataobj).sum() == 1
