"""Tiny untrained inference checkpoints and a tiny synthetic kaggle_3m set, shared by the inference tests.

The segmenter is exported with a mask threshold of 0.0, so wherever it runs its mask is the whole slice: gating and
`--no-gate` are then visible in the outputs without a trained model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from flax import nnx

from flaxtumor.config import Config
from flaxtumor.data.lgg import discover
from flaxtumor.data.preprocess import Preprocessing
from flaxtumor.data.synthetic import write_synthetic_dataset
from flaxtumor.models import build_model
from flaxtumor.checkpoints import export_inference

IMAGE_SIZE = 32


@dataclass(frozen=True)
class TinySetup:
    checkpoints: Path  # holds classifier/ and segmenter/
    data: Path  # a kaggle_3m folder: 3 patients x 6 slices of 64x64
    val: tuple[str, ...]  # the split's val patients, recorded in both checkpoints


_cache: dict[str, TinySetup] = {}


def export_tiny(out: Path, task: str, normalisation: str, threshold: float, split: dict, crop: str = "none") -> None:
    """An untrained tiny classifier or segmenter exported as an inference checkpoint."""
    cfg = Config().override(**{
        "train.task": task,
        "model.backbone": "resnet_tiny",
        "model.head_widths": (8,),
        "model.dropout": 0.0,
        "model.resunet_widths": (4, 8),
        "data.image_size": IMAGE_SIZE,
        "data.normalisation": normalisation,
        "data.crop": crop,
    })
    model = build_model(cfg, nnx.Rngs(1))
    metadata = {
        "config": cfg.to_dict(),
        "task": task,
        "preprocessing": Preprocessing(IMAGE_SIZE, normalisation, crop).to_dict(),
        "threshold": threshold,
        "backbone_init": "none",
        "split": split,
        "metrics": {"note": "untrained test model"},
        "history": [],
        "versions": {},
    }
    export_inference(out, model, metadata)


def build_tiny_setup(root: Path) -> TinySetup:
    data = write_synthetic_dataset(root / "data", n_patients=3, n_slices=6, size=64, seed=0)
    ids = [p.patient_id for p in discover(data)]
    split = {"train": ids[:1], "val": ids[1:], "test": [], "seed": 0}
    checkpoints = root / "checkpoints"
    export_tiny(checkpoints / "classifier", "cls", "image_zscore", 0.5, split)
    export_tiny(checkpoints / "segmenter", "seg", "volume_zscore", 0.0, split)
    return TinySetup(checkpoints, data, tuple(ids[1:]))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinySetup:
    # Imported into several test modules: build once per session all the same.
    if "setup" not in _cache:
        _cache["setup"] = build_tiny_setup(tmp_path_factory.mktemp("tiny"))
    return _cache["setup"]
