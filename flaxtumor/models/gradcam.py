"""Grad-CAM (Selvaraju et al. 2017) of the classifier's tumour logit w.r.t. one of the backbone's stages.

The last stage (the default, ``stage=-1``) is the classic choice but coarse: H/32, so 4x4 at 128x128. ``stage=-2``
(ResNet50's conv4, H/16) localises twice as finely, at the price of less class-specific evidence.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxtumor.models.classifier import TumourClassifier


def _gradcam_map(model: TumourClassifier, images: jax.Array, stage: int) -> jax.Array:
    backbone = model.backbone
    stage = stage % len(backbone.stages)
    fmap = backbone.pyramid(images)[stage + 1]  # (N, h, w, C); level 0 is the stem

    def logit_sum(f: jax.Array) -> jax.Array:
        # Eval mode makes samples independent, so the gradient of the sum is each sample's own gradient.
        return model.head(model.pool(backbone.run_stages(f, stage + 1))).sum()

    grads = jax.grad(logit_sum)(fmap)
    weights = jnp.mean(grads, axis=(1, 2), keepdims=True)  # channel importance (N, 1, 1, C)
    cam = nnx.relu(jnp.sum(weights * fmap, axis=-1))  # (N, h, w)
    n, height, width = images.shape[:3]
    # Linear interpolation is a convex combination, so the map stays in [0, max].
    cam = jax.image.resize(cam, (n, height, width), method="linear")
    peak = jnp.max(cam, axis=(1, 2), keepdims=True)
    # All-zero evidence (no positive contribution, or zero gradients) gives an all-zero map, never NaN.
    return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0).clip(0.0, 1.0).astype(jnp.float32)


_gradcam = nnx.jit(_gradcam_map, static_argnames="stage")


def _eval_view(model: TumourClassifier, stage: int) -> TumourClassifier:
    if not -len(model.backbone.stages) <= stage < len(model.backbone.stages):
        raise ValueError(f"stage {stage} out of range for a {len(model.backbone.stages)}-stage backbone")
    # raise_if_not_found=False: a head with no hidden layers has no Dropout to switch.
    return nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)


def gradcam(model: TumourClassifier, images: jax.Array, stage: int = -1) -> jax.Array:
    """Heatmaps (N, H, W) float32 in [0, 1] at input resolution for NHWC images normalised as for the classifier,
    from backbone stage `stage` (Python indexing: -1 the last, -2 the one before).

    Runs the model in eval mode (a view: the caller's train/eval mode is untouched).
    """
    return _gradcam(_eval_view(model, stage), jnp.asarray(images, jnp.float32), stage)


def gradcam_traced(model: TumourClassifier, images: jax.Array, stage: int = -1) -> jax.Array:
    """`gradcam` for use inside a function being traced (the serving cache compiles it ahead of time), where a model
    merged inside the trace cannot pass through `nnx.jit`."""
    return _gradcam_map(_eval_view(model, stage), images, stage)
