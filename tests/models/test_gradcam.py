"""Grad-CAM on a synthetic slice: shape, range, finiteness, and no NaN from all-zero gradients."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxtumor.models import TumourClassifier, gradcam
from flaxtumor.models.resnet import _ResNet1


def synthetic_slices(n: int, size: int = 64) -> np.ndarray:
    """A bright disc (the "tumour") on a dimmer ellipse (the "brain"), z-scored."""
    yy, xx = np.mgrid[:size, :size] / size
    brain = ((xx - 0.5) ** 2 / 0.16 + (yy - 0.5) ** 2 / 0.2 < 1).astype(np.float32)
    out = []
    for i in range(n):
        tumour = (xx - 0.35 - 0.1 * i) ** 2 + (yy - 0.4) ** 2 < 0.01
        image = 0.5 * brain + tumour
        out.append(np.repeat(((image - image.mean()) / image.std())[..., None], 3, -1))
    return np.stack(out).astype(np.float32)


def test_gradcam_shape_range_finite():
    model = TumourClassifier(_ResNet1(rngs=nnx.Rngs(0)), (16,), 0.5, rngs=nnx.Rngs(1))
    model.train()
    heat = gradcam(model, synthetic_slices(2))
    assert heat.shape == (2, 64, 64) and heat.dtype == jnp.float32
    assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0
    assert model.dropouts[0].deterministic is False  # the caller's mode is untouched


def test_gradcam_zero_gradients_give_zeros_not_nan():
    model = TumourClassifier(_ResNet1(rngs=nnx.Rngs(0)), (16,), 0.0, rngs=nnx.Rngs(1))
    model.logit.kernel[...] = jnp.zeros_like(model.logit.kernel[...])
    heat = gradcam(model, synthetic_slices(1))
    assert heat.shape == (1, 64, 64) and np.array_equal(heat, np.zeros_like(heat))


def test_gradcam_follows_the_heads_pool():
    # Grad-CAM differentiates the model's own logit: with an avg+max head it must go through that pool, so the map
    # differs from the same weights read through an average alone.
    model = TumourClassifier(_ResNet1(rngs=nnx.Rngs(0)), (16,), 0.0, rngs=nnx.Rngs(1), pool="avgmax")
    heat = gradcam(model, synthetic_slices(2))
    assert heat.shape == (2, 64, 64) and np.isfinite(heat).all() and 0.0 <= heat.min() <= heat.max() <= 1.0
    fmap = model.backbone.feature_map(synthetic_slices(2))
    np.testing.assert_allclose(model(synthetic_slices(2)), model.head(model.pool(fmap)), rtol=1e-6)
