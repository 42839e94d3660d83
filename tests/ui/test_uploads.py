"""flaxtumor.uploads without a server: accepted encodings, every bad upload, zip safety and order."""

from __future__ import annotations

import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from flaxtumor.uploads import UploadError, UploadLimits, central_directory, load_many, load_single
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
        uploads = load_many(paths, TEST_LIMITS, work).images
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


def test_patient_zip_in_natural_order_with_its_masks_paired(tmp_path: Path) -> None:
    png = F.png_bytes(F.slice_array())
    members = {f"TCGA_X/TCGA_X_{n}.png": png for n in (10, 2, 1)}
    truth = np.zeros((64, 64), np.uint8)
    truth[5:9, 5:9] = 255
    members["TCGA_X/TCGA_X_1_mask.png"] = F.png_bytes(truth)
    members["__MACOSX/TCGA_X/._TCGA_X_1.png"] = b"junk"
    members["TCGA_X/data.csv"] = b"a\n"
    work = tmp_path / "work"
    work.mkdir()
    uploads = load_many([F.zip_of(tmp_path / "p.zip", members)], TEST_LIMITS, work).images
    assert [u.name for u in uploads] == [f"p.zip/TCGA_X/TCGA_X_{n}.png" for n in (1, 2, 10)]
    assert uploads[0].truth is not None and uploads[0].truth.sum() == 16 and uploads[0].truth.dtype == bool
    assert uploads[1].truth is None and uploads[2].truth is None  # slices without a mask are simply unpaired
    # Members land under the workdir with sanitised, index-prefixed names only.
    assert sorted(p.name for p in work.iterdir()) == ["0000_TCGA_X_10.png", "0001_TCGA_X_2.png", "0002_TCGA_X_1.png",
                                                      "0003_TCGA_X_1_mask.png"]


def test_per_submission_pixel_budget(tmp_path: Path) -> None:
    paths = [F.good_png(tmp_path, f"s_{i}.png", 512) for i in range(3)]
    with pytest.raises(UploadError, match="exceeds 0.6 MP in total"):
        load_many(paths, UploadLimits(max_total_pixels=600_000), tmp_path)


def test_default_limits_are_documented() -> None:
    text = UploadLimits().describe()
    assert "200 images" in text and "16.8 MP per image" in text and "1000 entries" in text
    assert "192 MiB of memory to decode one image" in text and "320 MiB per submission" in text
    assert "512 MiB on disk per submission" in text


@pytest.mark.parametrize("case", F.CRAFTED_SINGLE)
def test_crafted_images_are_refused_from_the_header(tmp_path: Path, case: str, monkeypatch) -> None:
    """Issue 14's memory bombs: refused before decoding (the decoder must not even be called), with a message in
    words that names the file and carries no server path or exception class."""
    (path,), expected = F.crafted(tmp_path, case)
    decoded = []
    if case != "png_junk":  # junk after a PNG signature passes the header only as far as the decoder gets
        monkeypatch.setattr("flaxtumor.uploads.read_image", lambda p: decoded.append(p))
    tracemalloc.start()
    try:
        with pytest.raises(UploadError) as e:
            load_single(path, TEST_LIMITS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(e.value)
    assert expected in message and not decoded and peak < 16 * 2**20
    assert str(tmp_path) not in message and "Error" not in message


def test_memory_budget_per_image_and_per_submission(tmp_path: Path) -> None:
    paths = [F.good_png(tmp_path, f"s_{i}.png", 512) for i in range(3)]  # each: 2.25 MiB to decode, 0.75 MiB kept
    with pytest.raises(UploadError, match=r"s_0.png: decoding it would need 2 MiB of memory \(512x512, 3 channel"):
        load_single(paths[0], UploadLimits(max_image_bytes=2 * 2**20))
    assert load_single(paths[0], UploadLimits(max_image_bytes=3 * 2**20)).image.shape == (512, 512, 3)
    with pytest.raises(UploadError, match=r"s_1.png: the submission would need 4 MiB of memory to decode"):
        load_many(paths, UploadLimits(max_memory_bytes=3 * 2**20), tmp_path)


@pytest.mark.parametrize("case", [c for c in F.CRAFTED_PATIENT if c != "zip_html_name"])
def test_crafted_zips_are_refused_before_anything_is_written(tmp_path: Path, case: str) -> None:
    paths, expected = F.crafted(tmp_path, case)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(UploadError) as e:
        load_many(paths, TEST_LIMITS, work)
    assert expected in str(e.value)
    assert not list(work.iterdir())  # refused while planning: not one member was copied


def test_a_multi_zip_submission_never_writes_past_the_budget(tmp_path: Path) -> None:
    """The disk test: zips whose declared sizes fit one by one but not together are refused before the first byte."""
    paths, _ = F.crafted(tmp_path, "zips_past_budget")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(UploadError, match=r"part2.zip: the submission would put 5 MiB .* the limit is 4 MiB"):
        load_many(paths, TEST_LIMITS, work)
    assert sum(f.stat().st_size for f in work.iterdir()) == 0
    uploads = load_many(paths[:2], TEST_LIMITS, work).images  # the same zips within the budget are fine
    assert len(uploads) == 2 and sum(f.stat().st_size for f in work.iterdir()) <= TEST_LIMITS.max_submission_bytes


def test_copying_charges_every_chunk_to_the_budget(tmp_path: Path) -> None:
    """Headers can lie: the copy stops at the disk budget whatever the zip declared."""
    from flaxtumor import uploads

    budget = uploads._Budget(3 * 2**20)
    archive = F.zip_of(tmp_path / "big.zip", {"p/p_1.png": bytes(5 * 2**20)})
    with zipfile.ZipFile(archive) as zf, pytest.raises(UploadError, match="expands past its declared size"):
        uploads._copy_member(zf, zf.infolist()[0], tmp_path / "out.png", "big.zip/p/p_1.png", budget)
    assert (tmp_path / "out.png").stat().st_size <= 3 * 2**20


def test_zip_entry_count_is_read_from_the_end_record_before_the_index(tmp_path: Path, monkeypatch) -> None:
    (archive,), _ = F.bad_upload(tmp_path, "zip_bomb_entries")  # 60 entries, limit 50
    monkeypatch.setattr("flaxtumor.uploads.zipfile.ZipFile", lambda *a, **k: pytest.fail("the index was read"))
    with pytest.raises(UploadError, match="many.zip: 60 entries; the limit is 50"):
        load_many([archive], TEST_LIMITS, tmp_path)
    assert central_directory(archive, "many.zip")[0] == 60
    assert central_directory(F.crafted(tmp_path, "zip_entries_index")[0][0], "index.zip")[0] == 400_000


def test_member_names_with_html_are_kept_as_text_here(tmp_path: Path) -> None:
    """uploads reports names as they are; the UI escapes them (tests/ui/test_security.py)."""
    (archive,), _ = F.crafted(tmp_path, "zip_html_name")
    with pytest.raises(UploadError, match="not a valid TIFF file") as e:
        load_many([archive], TEST_LIMITS, tmp_path)
    assert F.HTML_NAME.split("/")[-1] in str(e.value)


def test_an_oversized_zip_index_is_refused_before_it_is_read(tmp_path: Path, monkeypatch) -> None:
    """zipfile reads the index by its size, not its entry count: a few entries with huge names are refused too."""
    archive = F.zip_of(tmp_path / "names.zip", {f"p/{'n' * 20_000}_{i}.png": b"x" for i in range(5)})
    monkeypatch.setattr("flaxtumor.uploads.zipfile.ZipFile", lambda *a, **k: pytest.fail("the index was read"))
    with pytest.raises(UploadError, match=r"names.zip: its index is 97 KiB; the limit is 50 KiB"):
        load_many([archive], TEST_LIMITS, tmp_path)
