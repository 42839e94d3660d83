"""Ground truth and NIfTI in the upload layer, without a server: masks paired with their slices through the same checks
as images, and NIfTI volumes checked (magic bytes, header, voxel budget) before nibabel reads them, with refusals that
name the file as uploaded and carry no server path."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from flaxtumor.uploads import UploadError, UploadLimits, load_many
from tests.ui import files as F
from tests.ui.conftest import TEST_LIMITS


def _mask_png(folder: Path, name: str, size: int = 64, values=(0, 255)) -> Path:
    mask = np.full((size, size), values[0], np.uint8)
    mask[10:20, 10:20] = values[1]
    return F.write(folder / name, F.png_bytes(mask))


def _load(tmp_path: Path, paths: list[Path], limits: UploadLimits = TEST_LIMITS):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return load_many(paths, limits, work)


def _refused(tmp_path: Path, paths: list[Path], limits: UploadLimits = TEST_LIMITS) -> str:
    with pytest.raises(UploadError) as e:
        _load(tmp_path, paths, limits)
    message = str(e.value)
    assert str(tmp_path) not in message and "Error" not in message and "Exception" not in message, message
    return message


def test_loose_masks_pair_with_their_slices(tmp_path: Path) -> None:
    slices = [F.good_png(tmp_path, f"TCGA_AA_0001_20000101_{i}.png") for i in (1, 2)]
    mask = _mask_png(tmp_path, "TCGA_AA_0001_20000101_2_mask.png")
    uploads = _load(tmp_path, [mask, *slices]).images
    assert [u.name for u in uploads] == [p.name for p in slices]
    assert uploads[0].truth is None and uploads[1].truth.sum() == 100


@pytest.mark.parametrize("case, expected", [
    ("grey_levels", "s_1_mask.png: mask is not binary: values {0, 7}"),
    ("wrong_size", "s_1_mask.png: the mask is 80x80 px but its slice s_1.png is 64x64 px"),
    ("orphan", "x_9_mask.png: mask has no image"),  # the rest of the reason is flaxtumor.truth's
    ("not_an_image", "s_1_mask.png: not a valid PNG file"),
    ("rgb_mask", "s_1_mask.png: mask has shape (64, 64, 3) with differing channels"),
])
def test_bad_masks_are_refused_by_name(tmp_path: Path, case: str, expected: str) -> None:
    slice_file = F.good_png(tmp_path, "s_1.png")
    if case == "grey_levels":
        mask = _mask_png(tmp_path, "s_1_mask.png", values=(0, 7))
    elif case == "wrong_size":
        mask = _mask_png(tmp_path, "s_1_mask.png", size=80)
    elif case == "orphan":
        mask = _mask_png(tmp_path, "x_9_mask.png")
    elif case == "not_an_image":
        mask = F.write(tmp_path / "s_1_mask.png", b"not a png at all" * 4)
    else:
        mask = F.write(tmp_path / "s_1_mask.png", F.png_bytes(F.slice_array()))
    assert expected in _refused(tmp_path, [slice_file, mask])


def test_masks_alone_are_not_a_patient(tmp_path: Path) -> None:
    masks = [_mask_png(tmp_path, f"s_{i}_mask.png") for i in (1, 2)]
    assert "No images to analyse: all 2 uploaded files are ground-truth masks" in _refused(tmp_path, masks)


def test_masks_count_towards_the_disk_budget(tmp_path: Path) -> None:
    members = {"p/p_1.png": F.png_bytes(F.slice_array()), "p/p_1_mask.png": bytes(3 * 2**20)}
    archive = F.zip_of(tmp_path / "heavy.zip", members)
    limits = UploadLimits(max_submission_bytes=2 * 2**20)
    assert "heavy.zip: the submission would put 3 MiB on the server's disk" in _refused(tmp_path, [archive], limits)


# ---- NIfTI ---------------------------------------------------------------------------------------------------------


def test_a_nifti_trio_with_truth_is_one_case(tmp_path: Path) -> None:
    paths = F.nifti_patient(tmp_path / "in")
    submission = _load(tmp_path, list(paths.values()))
    case = submission.nifti
    assert submission.images == [] and case.patient == "BraTS_007"
    assert len(case.slices) == F.NIFTI_SHAPE[2] and case.slices[0].shape == (48, 40, 3)
    assert case.truth is not None and case.truth.any() and submission.nifti_reference is not None
    reference = tmp_path / "reference.nii.gz"
    submission.nifti_reference(reference)

    import nibabel as nib

    ref = nib.load(reference)
    assert np.allclose(ref.affine, F.NIFTI_AFFINE) and ref.shape == F.NIFTI_SHAPE
    assert not (tmp_path / "work" / "nifti").exists() or all(p.is_symlink() for p in (tmp_path / "work" / "nifti").iterdir())


def test_nifti_and_slices_in_one_submission(tmp_path: Path) -> None:
    paths = F.nifti_patient(tmp_path / "in", seg=False)
    submission = _load(tmp_path, [*paths.values(), F.good_png(tmp_path, "s_1.png")])
    assert len(submission.images) == 1 and submission.nifti.truth is None


def _damaged(tmp_path: Path, case: str) -> tuple[list[Path], str]:
    paths = F.nifti_patient(tmp_path / "in")
    trio = [paths["pre"], paths["flair"], paths["post"]]
    if case == "plain_named_gz":
        raw = tmp_path / "in" / "BraTS_007_t1.nii"
        raw.write_bytes(gzip.decompress(paths["pre"].read_bytes()))
        paths["pre"].unlink()
        shutil.move(raw, paths["pre"])
        return trio, "BraTS_007_t1.nii.gz: not gzip-compressed, although it is named .nii.gz"
    if case == "gz_named_plain":
        renamed = paths["pre"].with_name("BraTS_007_t1.nii")
        paths["pre"].rename(renamed)
        return [renamed, *trio[1:]], "BraTS_007_t1.nii: gzip-compressed, although it is named .nii"
    if case == "no_header":
        fake = F.write(tmp_path / "in" / "BraTS_007_t1.nii", b"\x00" * 400)
        return [fake, *trio[1:]], "BraTS_007_t1.nii: not a valid NIfTI file (no NIfTI-1 or NIfTI-2 header"
    if case == "truncated_gzip":
        data = paths["flair"].read_bytes()
        paths["flair"].write_bytes(data[:60])
        return trio, "BraTS_007_flair.nii.gz: "
    if case == "corrupt_payload":
        data = paths["flair"].read_bytes()
        paths["flair"].write_bytes(data[: len(data) // 2])
        return trio, "BraTS_007_flair.nii.gz: unreadable or corrupt NIfTI (damaged, truncated or not really NIfTI)"
    if case == "missing_role":
        return trio[:2], "The NIfTI upload: missing the post-contrast (T1-Gd) volume"
    if case == "mismatched_shape":
        F.save_nifti(np.ones((40, 44, 6)), paths["post"])
        return trio, "BraTS_007_t1ce.nii.gz: shape (40, 44, 6) differs from BraTS_007_t1.nii.gz's (40, 48, 6)"
    if case == "mismatched_affine":
        shifted = F.NIFTI_AFFINE.copy()
        shifted[0, 3] += 5.0
        F.save_nifti(np.ones(F.NIFTI_SHAPE), paths["flair"], affine=shifted)
        return trio, "BraTS_007_flair.nii.gz: affine differs from BraTS_007_t1.nii.gz's by up to 5"
    if case == "two_d":
        F.save_nifti(np.ones((40, 48)), paths["pre"])
        return trio, "BraTS_007_t1.nii.gz: 2-D data (shape (40, 48)); expected a 3-D volume"
    if case == "unnamed":
        other = F.save_nifti(np.ones(F.NIFTI_SHAPE), tmp_path / "in" / "scan.nii.gz")
        return [*trio, other], "scan.nii.gz: file name matches no role"
    if case == "too_many_voxels":
        return trio, "BraTS_007_t1.nii.gz: a 40x48x6 volume has 0.0 M voxels; the limit is 0.0 M per volume"
    if case == "zipped":
        archive = F.zip_of(tmp_path / "vols.zip", {f"p/{p.name}": p.read_bytes() for p in trio})
        return [archive], "vols.zip: the zip holds no slices"
    raise ValueError(case)


NIFTI_CASES = ["plain_named_gz", "gz_named_plain", "no_header", "truncated_gzip", "corrupt_payload", "missing_role",
               "mismatched_shape", "mismatched_affine", "two_d", "unnamed", "too_many_voxels", "zipped"]


@pytest.mark.parametrize("case", NIFTI_CASES)
def test_bad_nifti_uploads_name_the_file(tmp_path: Path, case: str) -> None:
    paths, expected = _damaged(tmp_path, case)
    limits = UploadLimits(max_volume_voxels=1000) if case == "too_many_voxels" else TEST_LIMITS
    message = _refused(tmp_path, paths, limits)
    assert expected in message, message
    if case == "zipped":
        assert "upload the .nii/.nii.gz files themselves" in message


def test_a_gzip_bomb_is_never_inflated(tmp_path: Path, monkeypatch) -> None:
    """A .nii.gz whose header claims a huge volume is refused from its first 540 inflated bytes; nibabel is never
    called."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.float32)
    bomb = tmp_path / "bomb_t1.nii.gz"
    with gzip.open(bomb, "wb") as f:
        f.write(header.binaryblock + b"\x00" * 4)
        f.write(bytes(8 * 2**20))  # inflates to far more than the header needs
    monkeypatch.setattr("nibabel.load", lambda *a, **k: pytest.fail("nibabel read a refused file"))
    assert "bomb_t1.nii.gz: a 4096x4096x4096 volume has 68719.5 M voxels" in _refused(tmp_path, [bomb])
