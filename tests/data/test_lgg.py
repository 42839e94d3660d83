"""Discovery: layout, numeric ordering, data.csv, and a clear DataError for each bad input."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from flaxtumor.config import DataConfig
from flaxtumor.data.io import DataError
from flaxtumor.data.lgg import discover, load_dataset, read_clinical_table
from flaxtumor.data.synthetic import write_synthetic_dataset

PID = "TCGA_AB_1234_20000101"


def _write_patient(root: Path, n_slices: int = 11, pid: str = PID, size: int = 16) -> Path:
    folder = root / pid
    folder.mkdir(parents=True)
    for n in range(1, n_slices + 1):
        image = np.full((size, size, 3), n, np.uint8)
        mask = np.zeros((size, size), np.uint8)
        if n % 3 == 0:
            mask[2:5, 2:5] = 255
        tifffile.imwrite(folder / f"{pid}_{n}.tif", image, photometric="rgb")
        tifffile.imwrite(folder / f"{pid}_{n}_mask.tif", mask)
    return folder


def test_numeric_order_and_records(tmp_path: Path) -> None:
    _write_patient(tmp_path)
    (tmp_path / PID / ".DS_Store").write_bytes(b"junk")  # ignored
    [patient] = discover(tmp_path)
    assert patient.patient_id == PID
    assert [s.slice_index for s in patient.slices] == list(range(1, 12))  # _10 after _9, never as text
    s10 = patient.slices[9]
    assert s10.image_path.name == f"{PID}_10.tif" and s10.mask_path.name == f"{PID}_10_mask.tif"
    assert [s.has_tumour for s in patient.slices] == [n % 3 == 0 for n in range(1, 12)]
    assert all(s.patient_id == PID for s in patient.slices)


def test_root_or_kaggle_3m_subfolder(synthetic_root: Path) -> None:
    assert synthetic_root.name == "kaggle_3m"
    by_parent, by_folder = discover(synthetic_root.parent), discover(synthetic_root)
    assert by_parent == by_folder
    assert [p.patient_id for p in by_parent] == sorted(p.patient_id for p in by_parent)
    assert len(by_parent) == 6 and all(len(p.slices) == 12 for p in by_parent)


@pytest.mark.parametrize("sep", [",", ";"])
def test_data_csv_separators_and_missing_folders(tmp_path: Path, sep: str) -> None:
    _write_patient(tmp_path, 3)
    (tmp_path / "data.csv").write_text(f"Patient{sep}age\nTCGA_AB_1234{sep}40\nTCGA_ZZ_9999{sep}50\n")
    table = read_clinical_table(tmp_path)
    assert list(table["Patient"]) == ["TCGA_AB_1234", "TCGA_ZZ_9999"]
    assert table["patient_id"].iloc[0] == PID and table["patient_id"].isna().iloc[1]
    assert len(discover(tmp_path)) == 1


def test_bad_data_csv(tmp_path: Path) -> None:
    _write_patient(tmp_path, 3)
    (tmp_path / "data.csv").write_text("Name,age\nx,1\n")
    with pytest.raises(DataError, match=r"data\.csv: no 'Patient' column"):
        discover(tmp_path)


def test_missing_mask(tmp_path: Path) -> None:
    folder = _write_patient(tmp_path, 3)
    (folder / f"{PID}_2_mask.tif").unlink()
    with pytest.raises(DataError, match=rf"{PID}_2\.tif: image has no mask"):
        discover(tmp_path)


def test_missing_image(tmp_path: Path) -> None:
    folder = _write_patient(tmp_path, 3)
    (folder / f"{PID}_3.tif").unlink()
    with pytest.raises(DataError, match=rf"{PID}_3_mask\.tif: mask has no image"):
        discover(tmp_path)


def test_size_mismatch(tmp_path: Path) -> None:
    folder = _write_patient(tmp_path, 3)
    tifffile.imwrite(folder / f"{PID}_2_mask.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=rf"{PID}_2_mask\.tif: mask is 8x8 but its image {PID}_2\.tif is 16x16"):
        discover(tmp_path)


def test_non_binary_mask(tmp_path: Path) -> None:
    folder = _write_patient(tmp_path, 3)
    tifffile.imwrite(folder / f"{PID}_1_mask.tif", np.arange(256, dtype=np.uint8).reshape(16, 16))
    with pytest.raises(DataError, match=rf"{PID}_1_mask\.tif: mask is not binary"):
        discover(tmp_path)


@pytest.mark.parametrize("which", ["", "_mask"])
def test_zero_byte(tmp_path: Path, which: str) -> None:
    folder = _write_patient(tmp_path, 3)
    (folder / f"{PID}_2{which}.tif").write_bytes(b"")
    with pytest.raises(DataError, match=rf"{PID}_2{which}\.tif: zero-byte file"):
        discover(tmp_path)


@pytest.mark.parametrize("which", ["", "_mask"])
def test_corrupt(tmp_path: Path, which: str) -> None:
    folder = _write_patient(tmp_path, 3)
    (folder / f"{PID}_2{which}.tif").write_bytes(b"garbage" * 50)
    with pytest.raises(DataError, match=rf"{PID}_2{which}\.tif: unreadable or corrupt image"):
        discover(tmp_path)


def test_multipage_mask(tmp_path: Path) -> None:
    folder = _write_patient(tmp_path, 3)
    for _ in range(2):
        tifffile.imwrite(folder / "extra.tif", np.zeros((16, 16), np.uint8), append=True)
    shutil.move(folder / "extra.tif", folder / f"{PID}_2_mask.tif")
    with pytest.raises(DataError, match=rf"{PID}_2_mask\.tif: multi-page TIFF"):
        discover(tmp_path)


def test_empty_root(tmp_path: Path) -> None:
    (tmp_path / "not_a_patient").mkdir()
    with pytest.raises(DataError, match=r"no patient folders .*mateuszbuda/lgg-mri-segmentation"):
        discover(tmp_path)


def test_empty_patient_folder(tmp_path: Path) -> None:
    (tmp_path / PID).mkdir()
    with pytest.raises(DataError, match=rf"{PID}: patient folder holds no slices"):
        discover(tmp_path)


def test_missing_root_explains_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere: dataset folder not found.*kaggle.*--data synthetic"):
        load_dataset(DataConfig(root=str(tmp_path / "nowhere")))


def test_synthetic_is_deterministic(tmp_path: Path) -> None:
    a = write_synthetic_dataset(tmp_path / "a", n_patients=2, n_slices=6, seed=3)
    b = write_synthetic_dataset(tmp_path / "b", n_patients=2, n_slices=6, seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*.tif"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.tif")) and len(files) == 24
    assert all(np.array_equal(tifffile.imread(a / f), tifffile.imread(b / f)) for f in files)


def test_load_dataset_synthetic_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAXTUMOR_CACHE", str(tmp_path))
    cfg = DataConfig(root="synthetic", synthetic_patients=3, synthetic_slices=6, synthetic_seed=1)
    first = load_dataset(cfg)
    [cache] = [p for p in tmp_path.iterdir()]
    assert cache.name.startswith("synthetic-1-3x6-") and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    stamp = (cache / "kaggle_3m" / "data.csv").stat().st_mtime_ns
    assert load_dataset(cfg) == first  # reused, not rewritten
    assert (cache / "kaggle_3m" / "data.csv").stat().st_mtime_ns == stamp
    assert len(first) == 3 and all(any(s.has_tumour for s in p.slices) for p in first)
