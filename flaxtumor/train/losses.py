"""Losses on logits: BCE (classification), BCE + soft Dice and focal Tversky (segmentation), and nnU-Net's deep
supervision over a segmenter's outputs at several resolutions."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from flaxtumor.config import Config, TrainConfig

LossFn = Callable[[jax.Array, dict[str, jax.Array]], jax.Array]
# With deep supervision the "logits" are the model's `deep_logits`: full resolution first, then coarser.
DeepLossFn = Callable[[Sequence[jax.Array], dict[str, jax.Array]], jax.Array]
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


def deep_supervision_weights(levels: int) -> jax.Array:
    """nnU-Net's weights: halving per level from full resolution down, normalised to sum to 1."""
    weights = 0.5 ** jnp.arange(levels, dtype=jnp.float32)
    return weights / weights.sum()


def max_pool_mask(mask: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """(N, H, W, 1) {0, 1} mask -> (N, h, w, 1) by max over each (H/h, W/w) block: a tumour pixel anywhere in a block
    marks it, so small tumours survive at the coarse levels (nearest-neighbour could drop them)."""
    n, h, w, c = mask.shape
    fh, fw = h // shape[1], w // shape[2]
    return mask.reshape(n, h // fh, fh, w // fw, fw, c).max(axis=(2, 4))


def deep_supervised(loss: LossFn) -> DeepLossFn:
    """sum_i w_i * loss(logits_i, mask max-pooled to logits_i's size), w from `deep_supervision_weights`."""

    def deep(logits: Sequence[jax.Array], batch: dict[str, jax.Array]) -> jax.Array:
        weights = deep_supervision_weights(len(logits))
        total = 0.0
        for weight, level in zip(weights, logits):
            total = total + weight * loss(level, {**batch, "mask": max_pool_mask(batch["mask"], level.shape)})
        return total

    return deep


def uses_deep_supervision(cfg: Config) -> bool:
    """The run trains on `deep_logits` with `deep_supervised` loss: a segmenter with the option on."""
    return cfg.train.task == "seg" and cfg.model.deep_supervision


def make_loss(cfg: TrainConfig, deep_supervision: bool = False) -> LossFn | DeepLossFn:
    """The training loss for `cfg.task`, as `loss(logits, batch)`; logits are float32. With `deep_supervision`
    (seg only) it takes the tuple of `ResUNet.deep_logits` and is `deep_supervised` of the plain loss."""
    if cfg.task == "cls":
        return lambda logits, batch: bce(logits, batch["label"], cfg.class_weight)
    if cfg.loss == "focal_tversky":
        loss = lambda logits, batch: focal_tversky_loss(logits, batch["mask"])  # noqa: E731
    else:
        loss = lambda logits, batch: bce(logits, batch["mask"]) + soft_dice_loss(logits, batch["mask"])  # noqa: E731
    return deep_supervised(loss) if deep_supervision else loss
