"""The fast layers equal the previous implementation (`lax.conv`, flax's own BatchNorm): layer by layer and whole
models, forward and backward, within 1e-5 relative to the largest value."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from flaxtumor.config import ModelConfig
from flaxtumor.models import ResUNet, build_classifier
from flaxtumor.models.layers import BatchNorm, Conv
from flaxtumor.models.resnet import ResNet50

RTOL = 1e-5


def assert_close(actual, expected) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.abs(expected).max()), 1e-12)
    err = float(np.abs(actual - expected).max())
    assert err <= RTOL * scale, f"largest error {err:.3g} > {RTOL} x largest value {scale:.3g}"


def lax_twin(model: nnx.Module) -> nnx.Module:
    """A copy of `model` as it was computed before: plain `lax.conv_general_dilated`, flax's own BatchNorm."""
    twin = nnx.clone(model)
    for _, module in nnx.iter_modules(twin):
        if isinstance(module, nnx.Conv):
            module.conv_general_dilated = lax.conv_general_dilated
        if isinstance(module, BatchNorm):
            module.__class__ = nnx.BatchNorm
    return twin


def forward_and_grads(model: nnx.Module, x: jax.Array, train: bool):
    model.train() if train else model.eval()

    def loss(m: nnx.Module, x: jax.Array) -> jax.Array:
        y = m(x)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))  # a loss whose gradient is not constant

    (value, grads) = nnx.value_and_grad(loss, argnums=(0, 1))(model, x)
    return model(x) if not train else None, value, grads


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", ["VALID", "SAME", ((0, 0), (0, 0))])
def test_1x1_conv_equals_lax(stride: int, padding) -> None:
    conv = Conv(24, 40, (1, 1), strides=stride, padding=padding, use_bias=True, rngs=nnx.Rngs(0))
    ref = lax_twin(conv)
    x = jax.random.normal(jax.random.key(1), (2, 9, 10, 24))
    assert_close(conv(x), ref(x))
    g = jax.grad(lambda m, x: jnp.sum(jnp.sin(m(x))), argnums=(0, 1))
    (gm, gx), (rm, rx) = g(conv, x), g(ref, x)
    assert_close(gx, rx)
    assert_close(gm.kernel[...], rm.kernel[...])
    assert_close(gm.bias[...], rm.bias[...])


def test_conv_keeps_nnx_conv_parameters() -> None:
    """Same variables, shapes and initial values as `nnx.Conv`: checkpoints and converted weights load unchanged."""
    ours = Conv(8, 16, (1, 1), rngs=nnx.Rngs(3))
    theirs = nnx.Conv(8, 16, (1, 1), rngs=nnx.Rngs(3))
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(theirs))
    assert ours.kernel[...].shape == (1, 1, 8, 16)
    np.testing.assert_array_equal(ours.kernel[...], theirs.kernel[...])


@pytest.mark.parametrize("fast_variance", [False, True])
def test_batch_norm_train_equals_flax(fast_variance: bool) -> None:
    bn = BatchNorm(12, momentum=0.9, use_fast_variance=fast_variance, rngs=nnx.Rngs(0))
    bn.scale[...] = jax.random.normal(jax.random.key(3), (12,))
    bn.bias[...] = jax.random.normal(jax.random.key(4), (12,))
    ref = lax_twin(bn)
    assert type(ref) is nnx.BatchNorm
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(5), (4, 6, 5, 12))
    loss = lambda m, x: jnp.sum(jnp.sin(m(x)) * jnp.arange(12.0))  # noqa: E731
    (gm, gx), (rm, rx) = jax.grad(loss, argnums=(0, 1))(bn, x), jax.grad(loss, argnums=(0, 1))(ref, x)
    assert_close(gx, rx)
    assert_close(gm.scale[...], rm.scale[...])
    assert_close(gm.bias[...], rm.bias[...])
    assert_close(bn(x), ref(x))  # also moves both running averages once more
    assert_close(bn.mean[...], ref.mean[...])
    assert_close(bn.var[...], ref.var[...])
    bn.eval(), ref.eval()
    np.testing.assert_array_equal(bn(x), ref(x))  # eval mode is flax's own code


def test_batch_norm_gradient_through_statistics() -> None:
    """The hand-written backward also carries cotangents of the returned batch statistics."""
    from flaxtumor.models.layers import batch_norm_train

    x = jax.random.normal(jax.random.key(6), (3, 4, 4, 5))
    scale, bias = jnp.full((5,), 1.5), jnp.full((5,), 0.2)

    def ours(x):
        y, mean, var = batch_norm_train(x, scale, bias, 1e-5, False)
        return jnp.sum(jnp.cos(y)) + jnp.sum(mean**2) + jnp.sum(jnp.sqrt(var))

    def reference(x):
        mean = x.mean((0, 1, 2))
        var = jnp.square(x - mean).mean((0, 1, 2))
        y = (x - mean) * lax.rsqrt(var + 1e-5) * scale + bias
        return jnp.sum(jnp.cos(y)) + jnp.sum(mean**2) + jnp.sum(jnp.sqrt(var))

    assert_close(jax.grad(ours)(x), jax.grad(reference)(x))


def test_3x3_and_dilated_paths_are_lax() -> None:
    conv = Conv(4, 6, (3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 16, 16, 4))
    np.testing.assert_array_equal(conv(x), lax_twin(conv)(x))


def _check_model(model: nnx.Module, x: jax.Array) -> None:
    ref = lax_twin(model)
    for train in (False, True):
        out, value, (gm, gx) = forward_and_grads(model, x, train)
        rout, rvalue, (rgm, rgx) = forward_and_grads(ref, x, train)
        if out is not None:
            assert_close(out, rout)
        assert_close(value, rvalue)
        assert_close(gx, rgx)
        grads = list(zip(nnx.to_flat_state(nnx.state(gm, nnx.Param)), nnx.to_flat_state(nnx.state(rgm, nnx.Param))))
        largest = max(float(np.abs(np.asarray(r[...])).max()) for _, (_, r) in grads)
        for (path, g), (_, r) in grads:
            scale = max(float(np.abs(np.asarray(r[...])).max()), 1e-12)
            if train and "conv" in str(path[-2]) and path[-1] == "bias":
                # A conv bias feeding a train-mode BatchNorm is removed by it: its true gradient is 0, both
                # implementations return round-off, so only the model's largest gradient sets the scale.
                scale = largest
            err = float(np.abs(np.asarray(g[...]) - np.asarray(r[...])).max())
            assert err <= RTOL * scale, f"{path}: gradient error {err:.3g} vs largest {scale:.3g}"
    # Training-mode BatchNorm statistics moved the same way too.
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.BatchStat)),
                                 nnx.to_flat_state(nnx.state(ref, nnx.BatchStat))):
        assert_close(a[...], b[...])


@pytest.mark.slow
def test_resnet50_and_classifier_equal_lax() -> None:
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    _check_model(ResNet50(rngs=nnx.Rngs(0)), x)
    _check_model(ResNet50(layout="keras", rngs=nnx.Rngs(0)), x)
    classifier = build_classifier(ModelConfig(dropout=0.0), nnx.Rngs(0))
    _check_model(classifier, x)


def test_resunet_equals_lax() -> None:
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    _check_model(ResUNet(rngs=nnx.Rngs(0)), x)
