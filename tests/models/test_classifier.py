"""TumourClassifier shapes and counts, the phase-2 layer mapping, and freezing (kernels and BN statistics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flaxtumor.config import Config, ModelConfig
from flaxtumor.models import TumourClassifier, build_classifier, build_model, set_phase
from flaxtumor.models.classifier import trainable_blocks
from flaxtumor.models.resnet import ResNet, _ResNet1
from flaxtumor.models.resunet import ResUNet

RESNET50_STAGES = (3, 4, 6, 3)


def n_params(module: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_param_count_resnet50_plus_head():
    model = nnx.eval_shape(lambda: build_classifier(ModelConfig(), nnx.Rngs(0)))
    head = (2048 * 256 + 256) + (256 * 256 + 256) + (256 + 1)
    assert head == 590_593
    assert n_params(model) == 23_508_032 + head


def test_build_model_by_task():
    assert isinstance(nnx.eval_shape(lambda: build_model(Config(), nnx.Rngs(0))), ResUNet)
    cfg = Config().override(**{"train.task": "cls", "model.backbone": "resnet_tiny"})
    assert isinstance(build_model(cfg, nnx.Rngs(0)), TumourClassifier)


def test_shapes_train_and_eval():
    model = TumourClassifier(_ResNet1(rngs=nnx.Rngs(0)), (16, 8), 0.3, rngs=nnx.Rngs(1))
    forward = nnx.jit(lambda m, x: m(x))
    for train in (True, False):
        model.train() if train else model.eval()
        for batch in (1, 4):
            logits = forward(model, jnp.ones((batch, 32, 32, 3)))
            assert logits.shape == (batch,) and logits.dtype == jnp.float32


@pytest.mark.parametrize(
    "layers, blocks",
    [(0, []), (10, [(3, 2)]), (11, [(3, 1), (3, 2)]), (20, [(3, 1), (3, 2)]), (21, [(3, 0), (3, 1), (3, 2)]),
     (30, [(3, 0), (3, 1), (3, 2)]), (32, [(3, 0), (3, 1), (3, 2)]), (33, [(2, 5), (3, 0), (3, 1), (3, 2)])],
)
def test_phase2_layer_mapping(layers, blocks):
    assert trainable_blocks(RESNET50_STAGES, layers) == blocks


def _flat(model: nnx.Module, kind: type) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.array(v[...]) for p, v in nnx.iter_graph(model) if type(v) is kind}


def _step_and_compare(model: TumourClassifier, trainable) -> tuple[dict, dict, dict, dict]:
    """One Adam step on the `trainable` params in train mode: (params, stats) before, then after."""
    model.train()  # must not thaw the frozen parts' BatchNorm
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=trainable)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss = lambda m: optax.sigmoid_binary_cross_entropy(m(x), y).mean()  # noqa: E731
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, trainable))(model)
        optimizer.update(model, grads)

    params, stats = _flat(model, nnx.Param), _flat(model, nnx.BatchStat)
    step(model, optimizer, jax.random.normal(jax.random.key(0), (4, 32, 32, 3)), jnp.array([0.0, 1.0, 1.0, 0.0]))
    return params, stats, _flat(model, nnx.Param), _flat(model, nnx.BatchStat)


@pytest.mark.parametrize("phase", [1, 2])
def test_frozen_kernels_and_bn_stats_are_bit_identical(phase):
    model = TumourClassifier(ResNet((1, 2), width=8, rngs=nnx.Rngs(0)), (16,), 0.3, rngs=nnx.Rngs(1))
    trainable = set_phase(model, phase, unfreeze_last_layers=10)  # phase 2: the last block, stages.1.1
    params, stats, params_after, stats_after = _step_and_compare(model, trainable)

    unfrozen = "backbone.stages.1.1." if phase == 2 else "head only"
    for key in params:
        moved = not np.array_equal(params[key], params_after[key])
        should_move = not key.startswith("backbone.") or key.startswith(unfrozen)
        assert moved == should_move, key
    for key in stats:
        assert np.array_equal(stats[key], stats_after[key]) == (not key.startswith(unfrozen)), key


def test_phase3_after_phase2_thaws_every_kernel_and_bn_stat():
    # Phase 3 follows phase 2 on the same model: what phase 2 froze (and put in eval mode) must train again.
    model = TumourClassifier(ResNet((1, 2), width=8, rngs=nnx.Rngs(0)), (16,), 0.3, rngs=nnx.Rngs(1))
    set_phase(model, 2, unfreeze_last_layers=10)
    params, stats, params_after, stats_after = _step_and_compare(model, set_phase(model, 3))
    assert [k for k in params if np.array_equal(params[k], params_after[k])] == []
    assert [k for k in stats if np.array_equal(stats[k], stats_after[k])] == []


def test_unknown_phase_is_refused():
    model = TumourClassifier(ResNet((1, 2), width=8, rngs=nnx.Rngs(0)), (16,), 0.3, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="0, 1, 2 or 3"):
        set_phase(model, 4)


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
def test_head_pool_is_the_named_global_pool(pool):
    model = TumourClassifier(ResNet((1, 2), width=8, rngs=nnx.Rngs(0)), (16,), 0.3, rngs=nnx.Rngs(1), pool=pool)
    model.eval()
    x = jax.random.normal(jax.random.key(2), (3, 32, 32, 3))
    fmap = model.backbone.feature_map(x)
    avg, peak = jnp.mean(fmap, axis=(1, 2)), jnp.max(fmap, axis=(1, 2))
    expected = {"avg": avg, "max": peak, "avgmax": jnp.concatenate([avg, peak], axis=-1)}[pool]
    np.testing.assert_allclose(model.pool(fmap), expected)
    np.testing.assert_allclose(model(x), model.head(expected), rtol=1e-6)
    assert model.hidden[0].in_features == expected.shape[-1]


def test_unknown_head_pool_is_refused():
    with pytest.raises(ValueError, match="pool must be one of"):
        TumourClassifier(ResNet((1, 2), width=8, rngs=nnx.Rngs(0)), (16,), 0.3, rngs=nnx.Rngs(1), pool="sum")
