"""Grad-CAM from an inner stage (finer maps): equals the step-by-step reference taken at that stage."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxtumor.models import TumourClassifier, gradcam
from flaxtumor.models.resnet import ResNet
from tests.models.test_gradcam import synthetic_slices
from tests.models.test_gradcam_known_answer import _upsample_linear


def _two_stage(seed: int) -> TumourClassifier:
    return TumourClassifier(ResNet((1, 1), width=8, rngs=nnx.Rngs(seed)), (16,), 0.5, rngs=nnx.Rngs(seed + 1))


def _reference(model: TumourClassifier, images: np.ndarray, stage: int) -> np.ndarray:
    model.eval()
    fmap = model.backbone.pyramid(jnp.asarray(images))[stage + 1]

    def logit(f: jax.Array) -> jax.Array:
        rest = model.backbone.run_stages(f[None], stage + 1)
        return model.head(jnp.mean(rest, axis=(1, 2)))[0]

    maps = []
    for n in range(len(images)):
        g = np.asarray(jax.grad(logit)(fmap[n]), np.float64)
        cam = np.maximum((np.asarray(fmap[n], np.float64) * g.mean(axis=(0, 1))).sum(-1), 0.0)
        cam = _upsample_linear(cam, images.shape[1])
        maps.append(cam / cam.max() if cam.max() > 0 else cam)
    return np.stack(maps)


@pytest.mark.parametrize("seed", [0, 3])
def test_inner_stage_equals_reference_and_is_finer(seed: int) -> None:
    images = synthetic_slices(2)
    model = _two_stage(seed)
    inner = np.asarray(gradcam(model, images, stage=-2))
    expected = _reference(model, images, 0)
    assert expected.max() == 1.0
    assert np.abs(inner - expected).max() < 1e-4
    np.testing.assert_allclose(np.asarray(gradcam(model, images, stage=-1)), _reference(model, images, 1), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(gradcam(model, images)), np.asarray(gradcam(model, images, stage=1)))
    # The inner stage's feature map is twice as fine as the last one's.
    levels = model.backbone.pyramid(jnp.asarray(images))
    assert levels[1].shape[1] == 2 * levels[2].shape[1]


def test_stage_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="stage 2 out of range"):
        gradcam(_two_stage(0), synthetic_slices(1), stage=2)
