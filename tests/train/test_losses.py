import jax.numpy as jnp
import numpy as np
import pytest

from flaxtumor.config import TrainConfig
from flaxtumor.train.losses import bce, focal_tversky_loss, make_loss, soft_dice_loss


def test_bce_class_weight_scales_tumour_terms():
    logits, labels = jnp.array([0.3, -1.2]), jnp.array([1.0, 0.0])
    plain = bce(logits, labels)
    weighted = bce(logits, labels, class_weight=3.0)
    pos = float(bce(logits[:1], labels[:1]))
    neg = float(bce(logits[1:], labels[1:]))
    np.testing.assert_allclose(plain, (pos + neg) / 2, rtol=1e-6)
    np.testing.assert_allclose(weighted, (3 * pos + neg) / 2, rtol=1e-6)


def test_dice_and_tversky_are_near_zero_for_a_perfect_prediction_and_high_for_the_inverse():
    mask = jnp.zeros((2, 8, 8, 1)).at[:, 2:6, 2:6].set(1.0)
    perfect = (mask * 2 - 1) * 50.0
    assert float(soft_dice_loss(perfect, mask)) < 1e-3
    assert float(focal_tversky_loss(perfect, mask)) < 0.05
    assert float(soft_dice_loss(-perfect, mask)) > 0.95
    assert float(focal_tversky_loss(-perfect, mask)) > 0.95


@pytest.mark.parametrize("task,loss", [("cls", "bce_dice"), ("seg", "bce_dice"), ("seg", "focal_tversky")])
def test_make_loss_is_finite_and_differentiable(task, loss):
    import jax

    fn = make_loss(TrainConfig(task=task, loss=loss))
    batch = {"label": jnp.array([1.0, 0.0]), "mask": jnp.zeros((2, 4, 4, 1)).at[0, 1:3, 1:3].set(1.0)}
    logits = jnp.zeros((2,)) if task == "cls" else jnp.zeros((2, 4, 4, 1))
    value, grad = jax.value_and_grad(lambda l: fn(l, batch))(logits)
    assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()
