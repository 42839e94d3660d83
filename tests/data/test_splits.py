"""Patient-level splits: disjoint, deterministic, stratified, k-fold, and a JSON round trip that re-checks overlap."""

import json
from pathlib import Path

import pytest

from flaxtumor.config import DataConfig
from flaxtumor.data.io import DataError
from flaxtumor.data.lgg import (
    Patient,
    Slice,
    Split,
    kfold_splits,
    load_split,
    make_split,
    patient_split,
    save_split,
    select,
)


def _patients(n: int = 40) -> list[Patient]:
    """Patients with varied tumour shares, a few with none."""
    out = []
    for i in range(n):
        pid = f"TCGA_XX_{i:04d}_20000101"
        tumour = (i * 7) % 11  # 0..10 tumour slices of 12
        slices = (Slice(pid, k, Path(f"{pid}_{k}.tif"), Path(f"{pid}_{k}_mask.tif"), k <= tumour) for k in range(1, 13))
        out.append(Patient(pid, tuple(slices)))
    return out


def _assert_partition(split: Split, patients: list[Patient]) -> None:
    ids = split.train + split.val + split.test
    assert len(ids) == len(set(ids)) == len(patients)
    by_id = {p.patient_id: p for p in patients}
    for name in ("train", "val", "test"):
        assert any(s.has_tumour for pid in getattr(split, name) for s in by_id[pid].slices), name


def test_make_split_is_deterministic_disjoint_and_stratified() -> None:
    patients = _patients()
    split = make_split(patients, seed=1, test_fraction=0.15, val_fraction=0.15)
    _assert_partition(split, patients)
    assert (len(split.test), len(split.val), len(split.train)) == (6, 5, 29)
    assert make_split(list(reversed(patients)), seed=1) == split  # input order does not matter
    assert make_split(patients, seed=2) != split
    # Stratified: test patients span low and high tumour shares.
    shares = sorted(p.tumour_share for p in patients if p.patient_id in split.test)
    assert shares[0] < 0.3 and shares[-1] > 0.6


def test_small_dataset_still_gets_every_split(synthetic_patients: list[Patient]) -> None:
    split = make_split(synthetic_patients, seed=0)
    _assert_partition(split, synthetic_patients)
    assert (len(split.train), len(split.val), len(split.test)) == (4, 1, 1)


def test_overlap_is_refused() -> None:
    with pytest.raises(ValueError, match="patient A is in both train and test"):
        Split(("A", "B"), ("C",), ("A",), seed=0)


def test_kfold() -> None:
    patients = _patients()
    folds = kfold_splits(patients, k=5, seed=0)
    assert len(folds) == 5
    tests = [set(f.test) for f in folds]
    assert set().union(*tests) == {p.patient_id for p in patients} and sum(map(len, tests)) == len(patients)
    for f in folds:
        _assert_partition(f, patients)
    assert kfold_splits(patients, k=5, seed=0) == folds


def test_json_round_trip(tmp_path: Path) -> None:
    split = make_split(_patients(), seed=0)
    save_split(split, tmp_path / "split.json")
    assert load_split(tmp_path / "split.json") == split
    assert json.loads((tmp_path / "split.json").read_text())["test"] == list(split.test)


def test_hand_edited_overlap_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"seed": 0, "train": ["A", "B"], "val": ["B"], "test": ["C"]}))
    with pytest.raises(DataError, match=r"split\.json: patient B is in both train and val"):
        load_split(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match=r"split\.json: not valid JSON"):
        load_split(path)


def test_patient_split_from_file_and_select(tmp_path: Path, synthetic_patients: list[Patient]) -> None:
    split = make_split(synthetic_patients, seed=0)
    save_split(split, tmp_path / "s.json")
    assert patient_split(DataConfig(split_file=str(tmp_path / "s.json")), synthetic_patients) == split
    assert patient_split(DataConfig(), synthetic_patients) == split
    assert [p.patient_id for p in select(synthetic_patients, split.train)] == list(split.train)
    with pytest.raises(DataError, match=r"s\.json: 6 patient id\(s\) not in the dataset"):
        patient_split(DataConfig(split_file=str(tmp_path / "s.json")), _patients(3))
    with pytest.raises(ValueError, match="not in the dataset"):
        select(synthetic_patients, ["TCGA_NO_0000_20000101"])
