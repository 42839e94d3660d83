"""Losses on logits: BCE (classification), BCE + soft Dice and focal Tversky (segmentation)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from flaxtumor.config import TrainConfig

LossFn = Callable[[jax.Array, dict[str, jax.Array]], jax.Array]
SMOOTH = 1.0  # keeps Dice/Tversky finite and smooth on batches without tumour


def bce(logits: jax.Array, labels: jax.Array, class_weight: float | None = None) -> jax.Array:
    """Mean binary cross-entropy; `class_weight` multiplies the tumour (label 1) terms."""
    losses = optax.sigmoid_binary_cross_entropy(logits, labels)
    if class_weight is not None:
        losses = losses * jnp.where(labels > 0.5, class_weight, 1.0)
    return losses.mean()


def soft_dice_loss(logits: jax.Array, masks: jax.Array) -> jax.Array:
    """1 - soft Dice over the whole batch (pooled, so slices without tumour do not dominate)."""
    probs = jax.nn.sigmoid(logits)
    intersection = jnp.sum(probs * masks)
    return 1.0 - (2.0 * intersection + SMOOTH) / (jnp.sum(probs) + jnp.sum(masks) + SMOOTH)


def focal_tversky_loss(logits: jax.Array, masks: jax.Array, alpha: float = 0.7, gamma: float = 0.75) -> jax.Array:
    """(1 - Tversky)^gamma, Abraham & Khan 2019; alpha weighs false negatives (the Kaggle kernels' 0.7, 0.75)."""
    probs = jax.nn.sigmoid(logits)
    tp = jnp.sum(probs * masks)
    fn = jnp.sum((1.0 - probs) * masks)
    fp = jnp.sum(probs * (1.0 - masks))
    tversky = (tp + SMOOTH) / (tp + alpha * fn + (1.0 - alpha) * fp + SMOOTH)
    return jnp.power(1.0 - tversky, gamma)


def make_loss(cfg: TrainConfig) -> LossFn:
    """The training loss for `cfg.task`, as `loss(logits, batch)`; logits are float32."""
    if cfg.task == "cls":
        return lambda logits, batch: bce(logits, batch["label"], cfg.class_weight)
    if cfg.loss == "focal_tversky":
        return lambda logits, batch: focal_tversky_loss(logits, batch["mask"])
    return lambda logits, batch: bce(logits, batch["mask"]) + soft_dice_loss(logits, batch["mask"])
