"""Grad-CAM (Selvaraju et al. 2017) of the classifier's tumour logit w.r.t. the backbone's last conv stage."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flaxtumor.models.classifier import TumourClassifier


@nnx.jit
def _gradcam(model: TumourClassifier, images: jax.Array) -> jax.Array:
    fmap = model.backbone.feature_map(images)  # (N, h, w, C)

    def logit_sum(f: jax.Array) -> jax.Array:
        # Eval mode makes samples independent, so the gradient of the sum is each sample's own gradient.
        return model.head(jnp.mean(f, axis=(1, 2))).sum()

    grads = jax.grad(logit_sum)(fmap)
    weights = jnp.mean(grads, axis=(1, 2), keepdims=True)  # channel importance (N, 1, 1, C)
    cam = nnx.relu(jnp.sum(weights * fmap, axis=-1))  # (N, h, w)
    n, height, width = images.shape[:3]
    # Linear interpolation is a convex combination, so the map stays in [0, max].
    cam = jax.image.resize(cam, (n, height, width), method="linear")
    peak = jnp.max(cam, axis=(1, 2), keepdims=True)
    # All-zero evidence (no positive contribution, or zero gradients) gives an all-zero map, never NaN.
    return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0).clip(0.0, 1.0).astype(jnp.float32)


def gradcam(model: TumourClassifier, images: jax.Array) -> jax.Array:
    """Heatmaps (N, H, W) float32 in [0, 1] at input resolution for NHWC images normalised as for the classifier.

    Runs the model in eval mode (a view: the caller's train/eval mode is untouched).
    """
    # raise_if_not_found=False: a head with no hidden layers has no Dropout to switch.
    eval_view = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
    return _gradcam(eval_view, jnp.asarray(images, jnp.float32))
