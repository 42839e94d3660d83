"""Data layer: reading files, LGG records and splits, synthetic data, preprocessing, augmentation, grain pipeline."""

from typing import Any

from flaxtumor.data.augment import augment
from flaxtumor.data.io import IMAGE_SUFFIXES, DataError, image_shape, read_image, read_mask
from flaxtumor.data.lgg import (
    Patient,
    Slice,
    Split,
    discover,
    kfold_splits,
    load_dataset,
    load_split,
    make_split,
    patient_split,
    read_clinical_table,
    resolve_root,
    save_split,
    select,
)
from flaxtumor.data.preprocess import Preprocessing, normalise, preprocess, resize_images, resize_mask, volume_stats
from flaxtumor.data.synthetic import write_synthetic_dataset

# The pipeline pulls in grain (and with it jax, ~1.5 s): loaded on first use, so readers of files stay light.
_PIPELINE = ("decode_all", "eval_batches", "steps_per_epoch", "train_batches")


def __getattr__(name: str) -> Any:
    if name in _PIPELINE:
        from flaxtumor.data import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IMAGE_SUFFIXES",
    "DataError",
    "Patient",
    "Preprocessing",
    "Slice",
    "Split",
    "augment",
    "decode_all",
    "discover",
    "eval_batches",
    "image_shape",
    "kfold_splits",
    "load_dataset",
    "load_split",
    "make_split",
    "normalise",
    "patient_split",
    "preprocess",
    "read_clinical_table",
    "read_image",
    "read_mask",
    "resize_images",
    "resize_mask",
    "resolve_root",
    "save_split",
    "select",
    "steps_per_epoch",
    "train_batches",
    "volume_stats",
    "write_synthetic_dataset",
]
