"""Shared fixtures: one small synthetic kaggle_3m tree per test session."""

from pathlib import Path

import pytest

from flaxtumor.data.lgg import Patient, discover
from flaxtumor.data.synthetic import write_synthetic_dataset


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_patients=6, n_slices=12, size=256, seed=0)


@pytest.fixture(scope="session")
def synthetic_patients(synthetic_root: Path) -> list[Patient]:
    return discover(synthetic_root)
