import jax.numpy as jnp
import numpy as np
import pytest

from flaxtumor.config import TrainConfig
from flaxtumor.train.losses import (
    bce, deep_supervision_weights, focal_tversky_loss, make_loss, max_pool_mask, soft_dice_loss,
)


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


# -- deep supervision -------------------------------------------------------------------------------------------------


def _bce_dice_by_hand(z: np.ndarray, y: np.ndarray) -> float:
    bce_ = np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))
    p = 1 / (1 + np.exp(-z))
    return float(bce_ + 1 - (2 * np.sum(p * y) + 1) / (np.sum(p) + np.sum(y) + 1))


def test_deep_supervision_loss_is_the_halving_weighted_sum_at_max_pooled_masks():
    rng = np.random.default_rng(0)
    mask = np.zeros((1, 4, 4, 1), np.float32)
    mask[0, 1, 2] = 1.0  # one tumour pixel: max-pooling keeps it at every level
    full, half, quarter = (rng.normal(size=(1, s, s, 1)).astype(np.float32) for s in (4, 2, 1))
    half_mask = np.array([[0, 1], [0, 0]], np.float32).reshape(1, 2, 2, 1)
    quarter_mask = np.ones((1, 1, 1, 1), np.float32)
    weights = np.array([1, 0.5, 0.25]) / 1.75
    expected = (weights[0] * _bce_dice_by_hand(full, mask) + weights[1] * _bce_dice_by_hand(half, half_mask)
                + weights[2] * _bce_dice_by_hand(quarter, quarter_mask))
    loss = make_loss(TrainConfig(task="seg"), deep_supervision=True)
    got = loss((jnp.asarray(full), jnp.asarray(half), jnp.asarray(quarter)), {"mask": jnp.asarray(mask)})
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    # One output is the plain loss; and the option leaves the plain loss as it was.
    plain = make_loss(TrainConfig(task="seg"))
    np.testing.assert_allclose(float(loss((jnp.asarray(full),), {"mask": mask})), float(plain(full, {"mask": mask})))
    np.testing.assert_allclose(float(plain(full, {"mask": mask})), _bce_dice_by_hand(full, mask), rtol=1e-5)


def test_deep_supervision_weights_and_mask_pooling():
    np.testing.assert_allclose(deep_supervision_weights(4), np.array([8, 4, 2, 1]) / 15, rtol=1e-6)
    mask = jnp.zeros((2, 8, 6, 1)).at[1, 5, 3].set(1.0)
    pooled = max_pool_mask(mask, (2, 4, 3, 1))
    assert pooled.shape == (2, 4, 3, 1) and float(pooled.sum()) == 1.0 and float(pooled[1, 2, 1, 0]) == 1.0
