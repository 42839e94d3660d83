"""ResUNet shapes, parameter counts, the input-size check, and the deep-supervision option."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
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


# -- deep supervision ---------------------------------------------------------------------------------------------


def test_deep_logits_are_full_resolution_then_each_coarser_decoder_level():
    model = ResUNet((4, 8, 16, 32), rngs=nnx.Rngs(0), deep_supervision=True)
    x = jax.random.normal(jax.random.key(1), (2, 16, 24, 3))
    outs = model.deep_logits(x)
    assert [o.shape for o in outs] == [(2, 16, 24, 1), (2, 8, 12, 1), (2, 4, 6, 1)]
    np.testing.assert_array_equal(outs[0], model(x))  # the first is exactly what inference sees
    assert len(model.aux_heads) == 2 and model.aux_heads[0].kernel.shape == (1, 1, 16, 1)


def _paths(module: nnx.Module) -> dict:
    return {k: v.shape for k, v in nnx.to_flat_state(nnx.state(module))}


def test_without_the_option_nothing_changes():
    from flaxtumor.config import Config
    from flaxtumor.models import build_model

    default = build_model(Config(), nnx.Rngs(0))
    assert Config().model.deep_supervision is False and not hasattr(default, "aux_heads")
    assert _paths(default) == _paths(ResUNet(CLASSIC_WIDTHS, rngs=nnx.Rngs(0)))  # the tree checkpoints were made of
    with pytest.raises(ValueError, match="without deep_supervision"):
        default.deep_logits(jnp.zeros((1, 16, 16, 3)))
    # With it, only the heads are added (after every other parameter, so the rest initialise identically).
    deep = ResUNet(CLASSIC_WIDTHS, rngs=nnx.Rngs(0), deep_supervision=True)
    added = set(_paths(deep)) - set(_paths(default))
    assert added and all(p[0] == "aux_heads" for p in added) and set(_paths(default)) <= set(_paths(deep))
    x = jax.random.normal(jax.random.key(2), (1, 32, 32, 3))
    default.eval(), deep.eval()
    np.testing.assert_array_equal(default(x), deep(x))


def test_deep_supervision_is_refused_for_other_segmenters():
    from flaxtumor.config import Config
    from flaxtumor.models import build_model

    cfg = Config().override(**{"model.segmenter": "resnet_tiny_unet", "model.deep_supervision": True})
    with pytest.raises(ValueError, match="'resunet' segmenter only"):
        build_model(cfg, nnx.Rngs(0))
