"""Grad-CAM against a hand-computed reference on the tiny classifier: per-sample gradients of the tumour logit with
respect to the last feature map by explicit `jax.grad`, then the channel weights (spatial mean of the gradients), the
weighted sum, ReLU, bilinear upsampling (half-pixel centres) and peak normalisation in numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxtumor.models import TumourClassifier, gradcam
from flaxtumor.models.resnet import _ResNet1
from tests.models.test_gradcam import synthetic_slices


def _upsample_linear(cam: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (h, w) to (size, size): output pixel centres mapped back with half-pixel offsets, clamped."""
    def weights(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.clip((np.arange(size) + 0.5) * n_in / size - 0.5, 0, n_in - 1)
        lo = np.floor(x).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), x - lo

    (r0, r1, fr), (c0, c1, fc) = weights(cam.shape[0]), weights(cam.shape[1])
    rows = cam[r0] * (1 - fr)[:, None] + cam[r1] * fr[:, None]
    return rows[:, c0] * (1 - fc) + rows[:, c1] * fc


def reference_gradcam(model: TumourClassifier, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(maps (N, H, W) in [0, 1], channel weights (N, C)) computed step by step."""
    model.eval()
    fmap = model.backbone.feature_map(jnp.asarray(images))  # (N, h, w, C)

    def logit(f: jax.Array) -> jax.Array:  # one sample's feature map (h, w, C) -> its tumour logit
        return model.head(jnp.mean(f, axis=(0, 1))[None])[0]

    grads = np.stack([np.asarray(jax.grad(logit)(fmap[n]), np.float64) for n in range(len(images))])
    fmap = np.asarray(fmap, np.float64)
    weights = grads.mean(axis=(1, 2))  # (N, C)
    maps = []
    for n in range(len(images)):
        cam = np.maximum((fmap[n] * weights[n]).sum(axis=-1), 0.0)  # (h, w)
        cam = _upsample_linear(cam, images.shape[1])
        maps.append(cam / cam.max() if cam.max() > 0 else cam)
    return np.stack(maps), weights


def _model(seed: int) -> TumourClassifier:
    return TumourClassifier(_ResNet1(rngs=nnx.Rngs(seed)), (16,), 0.5, rngs=nnx.Rngs(seed + 1))


def test_gradcam_equals_the_hand_computed_reference():
    images = synthetic_slices(3)
    for seed in (0, 1, 4):
        model = _model(seed)
        model.train()  # gradcam must evaluate in eval mode whatever the caller's mode
        heat = np.asarray(gradcam(model, images))
        expected, weights = reference_gradcam(model, images)
        # A comparison that can fail: channels of both signs, every map non-zero, and ReLU clipping part of each.
        assert (weights < 0).any() and (weights > 0).any()
        assert (expected.max(axis=(1, 2)) == 1.0).all() and ((expected == 0).mean(axis=(1, 2)) > 0.05).all()
        assert heat.shape == images.shape[:3]
        assert np.abs(heat - expected).max() < 1e-4, f"seed {seed}: max |diff| {np.abs(heat - expected).max():.2e}"


def test_the_reference_tells_signed_from_absolute_weights():
    """Taking |weights| gives visibly other maps, so the comparison above can fail for that mistake."""
    images = synthetic_slices(3)
    model = _model(0)
    expected, weights = reference_gradcam(model, images)
    fmap = np.asarray(model.backbone.feature_map(jnp.asarray(images)), np.float64)
    for n in range(len(images)):
        cam = np.maximum((fmap[n] * np.abs(weights[n])).sum(-1), 0.0)
        wrong = _upsample_linear(cam, images.shape[1])
        assert np.abs(wrong / wrong.max() - expected[n]).max() > 0.05
