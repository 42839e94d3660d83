"""flaxtumor.uploads without a server: accepted encodings, every bad upload, zip safety and order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flaxtumor.uploads import UploadError, UploadLimits, load_many, load_single
from tests.ui import files as F
from tests.ui.conftest import TEST_LIMITS


@pytest.mark.parametrize("kind", F.VARIANTS)
def test_unusual_encodings_are_accepted(tmp_path: Path, kind: str) -> None:
    upload = load_single(F.variant(tmp_path, kind), TEST_LIMITS)
    assert upload.image.dtype == np.uint8 and upload.image.shape == (64, 64, 3)
    assert upload.image.max() > 0


@pytest.mark.parametrize("case", F.BAD_SINGLE)
def test_bad_single_uploads_name_the_file(tmp_path: Path, case: str) -> None:
    (path,), expected = F.bad_upload(tmp_path, case)
    with pytest.raises(UploadError) as e:
        load_single(path, TEST_LIMITS)
    assert expected in str(e.value)


@pytest.mark.parametrize("case", F.BAD_PATIENT + ["non_image", "wrong_extension", "huge", "multipage_tiff"])
def test_bad_patient_uploads_name_the_problem(tmp_path: Path, case: str) -> None:
    paths, expected = F.bad_upload(tmp_path, case)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(UploadError) as e:
        uploads, _ = load_many(paths, TEST_LIMITS, work)
        from flaxtumor.ui import _one_size  # the one check that needs decoded images lives in the UI

        _one_size(uploads)
    assert expected in str(e.value)


def test_empty_submissions(tmp_path: Path) -> None:
    with pytest.raises(UploadError, match="No file uploaded"):
        load_single(None, TEST_LIMITS)
    for empty in (None, []):
        with pytest.raises(UploadError, match="No files uploaded"):
            load_many(empty, TEST_LIMITS, tmp_path)


def test_zip_slip_writes_nothing_outside_the_workdir(tmp_path: Path) -> None:
    (archive,), _ = F.bad_upload(tmp_path, "zip_slip")
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    with pytest.raises(UploadError):
        load_many([archive], TEST_LIMITS, work)
    assert not list(tmp_path.rglob("evil.png"))


def test_patient_zip_in_natural_order_with_masks_skipped(tmp_path: Path) -> None:
    png = F.png_bytes(F.slice_array())
    members = {f"TCGA_X/TCGA_X_{n}.png": png for n in (10, 2, 1)}
    members["TCGA_X/TCGA_X_1_mask.png"] = F.png_bytes(np.zeros((64, 64), np.uint8))
    members["__MACOSX/TCGA_X/._TCGA_X_1.png"] = b"junk"
    members["TCGA_X/data.csv"] = b"a\n"
    work = tmp_path / "work"
    work.mkdir()
    uploads, masks = load_many([F.zip_of(tmp_path / "p.zip", members)], TEST_LIMITS, work)
    assert [u.name for u in uploads] == [f"p.zip/TCGA_X/TCGA_X_{n}.png" for n in (1, 2, 10)]
    assert masks == 1
    # Members land under the workdir with sanitised, index-prefixed names only.
    assert sorted(p.name for p in work.iterdir()) == ["0000_TCGA_X_10.png", "0001_TCGA_X_2.png", "0002_TCGA_X_1.png"]


def test_per_submission_pixel_budget(tmp_path: Path) -> None:
    paths = [F.good_png(tmp_path, f"s_{i}.png", 512) for i in range(3)]
    with pytest.raises(UploadError, match="exceeds 0.6 MP in total"):
        load_many(paths, UploadLimits(max_total_pixels=600_000), tmp_path)


def test_default_limits_are_documented() -> None:
    text = UploadLimits().describe()
    assert "200 images" in text and "16.8 MP per image" in text and "1000 entries" in text and "256 MiB" in text
