"""Data layer: reading files, LGG records and splits, synthetic data, preprocessing, augmentation, grain pipeline.

Every name is loaded on first use (PEP 562): serving imports `flaxtumor.data.preprocess` and `.io` alone, without
pandas (the clinical table) or grain and jax (the training pipeline), which would add seconds to start-up.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "augment": ("augment",),
    "io": ("IMAGE_SUFFIXES", "DataError", "image_shape", "read_image", "read_mask"),
    "lgg": ("Patient", "Slice", "Split", "discover", "kfold_splits", "load_dataset", "load_split", "make_split",
            "patient_split", "read_clinical_table", "resolve_root", "save_split", "select"),
    "preprocess": ("Box", "Preprocessing", "crop_box", "input_channels", "normalise", "preprocess", "resize_images",
                   "mask_at_input_size", "mask_targets", "resize_mask", "stack_context", "uncrop_probabilities",
                   "volume_stats"),
    "synthetic": ("write_synthetic_dataset",),
    "pipeline": ("decode_all", "eval_batches", "steps_per_epoch", "train_batches"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = sorted(_MODULE_OF)
