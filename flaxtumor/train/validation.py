"""Validation during training: the model's outputs on every validation slice, and the metrics that select the best
checkpoint. Each process loads only its rows of every batch; outputs and targets are gathered to every process."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from flaxtumor import metrics as M
from flaxtumor.config import Config
from flaxtumor.data.lgg import Patient, Slice
from flaxtumor.data.pipeline import eval_batches
from flaxtumor.train import sharding

# The validation metric that picks the best checkpoint (higher is better).
SELECTION_METRIC = {"cls": "auc", "seg": "volumetric_dice"}


def predict(
    model: nnx.Module, eval_step: Callable, slices: Sequence[Slice], cfg: Config, batch_size: int, mesh: Mesh
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Probabilities for `slices` in order (cls: (N,); seg: bool masks (N, S, S) at the threshold) and the targets.

    Each process loads only its rows of every batch; outputs and targets are gathered so every process has them all."""
    shard_index, shard_count = sharding.process_shard(mesh, batch_size)
    outputs, labels, masks = [], [], []
    for local in eval_batches(slices, cfg.data, batch_size, shard_index, shard_count):
        local["mask"] = local["mask"][..., 0] > 0.5
        # One process has every row already; several gather the other processes' targets through the devices.
        keys = ("image", "valid", "label", "mask") if shard_count > 1 else ("image",)
        batch = sharding.shard_batch({k: local[k] for k in keys}, mesh)
        probs = eval_step(model, batch["image"])
        if cfg.train.task == "seg":
            probs = probs[..., 0] >= cfg.train.mask_threshold  # threshold on device: a quarter of the bytes to host
        targets = {k: sharding.to_host(batch[k]) for k in ("valid", "label", "mask")} if shard_count > 1 else local
        valid = targets["valid"]
        outputs.append(sharding.to_host(probs)[valid])
        labels.append(targets["label"][valid])
        masks.append(targets["mask"][valid])
    return np.concatenate(outputs), {"label": np.concatenate(labels), "mask": np.concatenate(masks)}


def evaluate(
    model: nnx.Module, eval_step: Callable, patients: Sequence[Patient], cfg: Config, batch_size: int, mesh: Mesh
) -> dict[str, float]:
    """Validation metrics; seg groups the slices per patient (in slice order) for volumetric Dice."""
    slices = [s for p in patients for s in p.slices]
    outputs, targets = predict(model, eval_step, slices, cfg, batch_size, mesh)
    if cfg.train.task == "cls":
        m = M.classification_metrics(outputs, targets["label"], cfg.train.cls_threshold)
        return {k: m[k] for k in ("accuracy", "precision", "recall", "f1", "auc")}
    preds, truth, start = {}, {}, 0
    for p in patients:
        preds[p.patient_id] = outputs[start : start + len(p.slices)]
        truth[p.patient_id] = targets["mask"][start : start + len(p.slices)]
        start += len(p.slices)
    per_patient = M.summarise_patient_dice(M.volumetric_dice_per_patient(preds, truth))
    return {
        "volumetric_dice": per_patient["mean"],
        "dice": M.tumour_slice_dice(list(outputs), list(targets["mask"])),
        "iou": M.tumour_slice_iou(list(outputs), list(targets["mask"])),
        "pooled_dice": M.pooled_dice(list(outputs), list(targets["mask"])),
    }


def selection_score(metrics: dict[str, float], task: str) -> float:
    """The selection metric, with nan (e.g. one class only in validation) ranked as worst."""
    value = metrics[SELECTION_METRIC[task]]
    return -1.0 if value is None or math.isnan(value) else float(value)


def format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
