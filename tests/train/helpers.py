"""Tiny configs and a stand-in model shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import jax
from flax import nnx

from flaxtumor.config import Config


def tiny_config(out: Path, task: str = "seg", **overrides) -> Config:
    """Synthetic data at 32², a 2-level ResUNet or a one-block ResNet: seconds per epoch on CPU."""
    fields = {
        "data.root": "synthetic",
        "data.image_size": 32,
        "data.augment": False,
        "model.resunet_widths": (4, 8),
        "model.backbone": "resnet_tiny",
        "model.head_widths": (8,),
        "train.task": task,
        "train.out_dir": str(out),
        "train.epochs": 2,
        "train.batch_size": 8,
        "train.lr": 3e-3,
        "train.warmup_epochs": 0.0,
        "train.plot": False,
        "train.save_every_steps": 0,
    }
    fields.update(overrides)
    return Config().override(**fields)


CV_FOLDS = 2


def tiny_crossval(root: Path, **overrides) -> tuple[Path, Path]:
    """(config file, folder) of a finished tiny cross-validation: 2 folds, 1 epoch each."""
    from flaxtumor import crossval

    config = root / "tiny.json"
    tiny_config(root / "unused", "seg", **{"train.epochs": 1, "data.folds": CV_FOLDS, **overrides}).to_json(config)
    out = root / "cv"
    assert crossval.main(["--config", str(config), "--out", str(out)]) == 0
    return config, out


class ConvBN(nnx.Module):
    """Stand-in with every kind of state the train step touches: kernels, BN statistics, dropout RNG."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)  # a bias before BN has ~0 gradient, which Adam amplifies to noise
        self.bn = nnx.BatchNorm(4, momentum=0.9, use_fast_variance=False, rngs=rngs)
        self.out = nnx.Conv(4, 1, (1, 1), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.bn(self.conv(x))))
