"""The shared kaggle_3m copy: exact counts, and disjoint, tumour-holding splits (skipped where the data is absent)."""

from pathlib import Path

import pytest

from flaxtumor.data.lgg import Patient, discover, kfold_splits, make_split, read_clinical_table

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def patients(lgg_root: Path) -> list[Patient]:
    return discover(lgg_root)


def test_counts(patients: list[Patient]) -> None:
    slices = [s for p in patients for s in p.slices]
    assert len(patients) == 81
    assert len(slices) == 2839
    assert sum(s.has_tumour for s in slices) == 993
    assert all([s.slice_index for s in p.slices] == list(range(1, len(p.slices) + 1)) for p in patients)


def test_clinical_table(lgg_root: Path, patients: list[Patient]) -> None:
    table = read_clinical_table(lgg_root)
    assert set(table["patient_id"].dropna()) == {p.patient_id for p in patients}


def test_splits_are_disjoint_and_hold_tumours(patients: list[Patient]) -> None:
    by_id = {p.patient_id: p for p in patients}
    for split in [make_split(patients, seed=0), *kfold_splits(patients, k=5, seed=0)]:
        parts = [split.train, split.val, split.test]
        ids = [pid for part in parts for pid in part]
        assert len(ids) == len(set(ids)) == 81
        for part in parts:
            assert any(s.has_tumour for pid in part for s in by_id[pid].slices)
    split = make_split(patients, seed=0)
    assert (len(split.train), len(split.val), len(split.test)) == (59, 10, 12)  # 85/15, val 15% of train
