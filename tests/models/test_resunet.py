"""ResUNet shapes, parameter counts and the input-size check."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from flaxtumor.models.resunet import CLASSIC_WIDTHS, WIDE_WIDTHS, ResUNet


def n_params(module: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_param_counts():
    assert n_params(nnx.eval_shape(lambda: ResUNet(CLASSIC_WIDTHS, rngs=nnx.Rngs(0)))) == 2_248_977
    assert n_params(nnx.eval_shape(lambda: ResUNet(WIDE_WIDTHS, rngs=nnx.Rngs(0)))) == 8_985_121


def test_shapes_train_and_eval():
    model = ResUNet((4, 8, 16), rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, x: m(x))
    for train in (True, False):
        model.train() if train else model.eval()
        for batch in (1, 2):
            logits = forward(model, jnp.ones((batch, 16, 24, 3)))
            assert logits.shape == (batch, 16, 24, 1) and logits.dtype == jnp.float32


@pytest.mark.parametrize("size", [(30, 32), (32, 18)])
def test_indivisible_size_is_a_clear_error(size):
    model = nnx.eval_shape(lambda: ResUNet(CLASSIC_WIDTHS, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=f"divisible by 16; got an input of {size[0]}x{size[1]}"):
        model(jnp.zeros((1, *size, 3)))
