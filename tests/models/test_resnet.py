"""ResNet shapes, parameter counts and the two layouts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxtumor.models.resnet import ResNet, ResNet50, _ResNet1


def n_params(module: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_resnet50_param_counts():
    torchvision = nnx.eval_shape(lambda: ResNet50(rngs=nnx.Rngs(0)))
    assert n_params(torchvision) == 23_508_032  # torchvision resnet50 without fc
    keras = nnx.eval_shape(lambda: ResNet50(layout="keras", rngs=nnx.Rngs(0)))
    assert n_params(keras) == 23_534_592  # + conv biases; Keras reports 23,587,712 with the BN statistics
    with_top = nnx.eval_shape(lambda: ResNet50(num_classes=1000, rngs=nnx.Rngs(0)))
    assert n_params(with_top) == 25_557_032  # torchvision resnet50


def test_layouts_differ_only_where_they_should():
    tv = nnx.eval_shape(lambda: ResNet((1, 1), width=8, rngs=nnx.Rngs(0)))
    keras = nnx.eval_shape(lambda: ResNet((1, 1), layout="keras", width=8, rngs=nnx.Rngs(0)))
    block_tv, block_keras = tv.stages[1][0], keras.stages[1][0]
    assert (block_tv.conv1.strides, block_tv.conv2.strides) == (1, 2)  # v1.5: stride on the 3x3
    assert (block_keras.conv1.strides, block_keras.conv2.strides) == (2, 1)  # v1: stride on the first 1x1
    assert block_tv.conv1.bias is None and block_keras.conv1.bias is not None
    assert (block_tv.bn1.epsilon, block_keras.bn1.epsilon) == (1e-5, 1.001e-5)
    assert block_tv.bn1.momentum == 0.9 and not block_tv.bn1.use_fast_variance
    assert block_tv.conv2.padding == ((1, 1), (1, 1)) and tv.conv_init.padding == ((3, 3), (3, 3))


@pytest.mark.parametrize("layout", ["torchvision", "keras"])
def test_tiny_shapes_train_and_eval(layout):
    model = _ResNet1(layout=layout, num_classes=5, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, x: (m(x), m.feature_map(x)))
    for train in (True, False):
        model.train() if train else model.eval()
        for batch in (1, 3):
            logits, fmap = forward(model, jnp.ones((batch, 32, 32, 3)))
            assert logits.shape == (batch, 5) and logits.dtype == jnp.float32
            assert fmap.shape == (batch, 8, 8, 32)
            assert np.isfinite(logits).all()

