"""Inference checkpoint metadata (`metadata.json`), typed, and the error every unloadable checkpoint raises.

Kept apart from `flaxtumor.checkpoints` (weights: Orbax and the model builders) so that serving can read what a
checkpoint is without importing flax or Orbax: a warm `predict` takes its weights from the serving cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flaxtumor.config import Config
from flaxtumor.data.preprocess import Preprocessing


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line starting with the path."""


@dataclass(frozen=True)
class InferenceMetadata:
    """`metadata.json` of an inference checkpoint, typed. `threshold` is the task's own: a classifier's tumour
    probability, a segmenter's mask probability. Keys this type does not name (history, versions, best epoch,
    trained patients, provenance) are kept in `extra` and written back unchanged."""

    config: Config
    task: str
    preprocessing: Preprocessing
    threshold: float = 0.5
    backbone_init: str | None = None
    dtype: str = "float32"
    split: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    _NAMED = ("config", "task", "preprocessing", "threshold", "backbone_init", "dtype", "split", "metrics")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InferenceMetadata":
        """Raises KeyError/TypeError/ValueError for metadata that is not usable (CheckpointError wraps them)."""
        if not isinstance(d, dict):
            raise TypeError(f"expected a JSON object, got {type(d).__name__}")
        config = Config.from_dict(d["config"])
        preprocessing = (Preprocessing.from_dict(d["preprocessing"]) if "preprocessing" in d
                         else Preprocessing.from_config(config.data))
        threshold = d.get("threshold", 0.5)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"'threshold' must be a number, got {threshold!r}")
        return cls(
            config=config, task=str(d.get("task", config.train.task)), preprocessing=preprocessing,
            threshold=float(threshold), backbone_init=d.get("backbone_init"), dtype=str(d.get("dtype", "float32")),
            split=d.get("split"), metrics=dict(d.get("metrics") or {}),
            extra={k: v for k, v in d.items() if k not in cls._NAMED},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(), "task": self.task, "preprocessing": self.preprocessing.to_dict(),
            "threshold": self.threshold, "backbone_init": self.backbone_init, "dtype": self.dtype,
            "split": self.split, "metrics": self.metrics, **self.extra,
        }

    # A read-only view as the JSON dict, for code written against metadata.json (`meta["split"]["val"]`).
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def segmenter_export(run: str | Path) -> Path:
    """The segmenter checkpoint of a training folder (RUN/segmenter, as `train.py --out` writes it), or RUN itself
    when it is one."""
    run = Path(run)
    return run / "segmenter" if (run / "segmenter" / "metadata.json").is_file() else run


def read_metadata(path: str | Path) -> InferenceMetadata:
    """The metadata of the inference checkpoint folder `path`; CheckpointError (one line) when the folder is missing
    or its metadata.json is unreadable."""
    path = Path(path).absolute()
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: no such checkpoint folder. The shipped checkpoints are in the repository's checkpoints/: run from "
            "the repository root, or pass --checkpoints /path/to/flaxtumor/checkpoints (or train your own with "
            "`python train.py`)"
        )
    meta_file = path / "metadata.json"
    try:
        return InferenceMetadata.from_dict(json.loads(meta_file.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_file}: missing or corrupt metadata ({first_line(e)})") from None
