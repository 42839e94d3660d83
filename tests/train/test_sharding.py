"""One train step on 4 virtual CPU devices equals the 1-device step (tests/conftest.py sets 4 devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxtumor.config import TrainConfig
from flaxtumor.train import sharding
from flaxtumor.train.loop import make_optimizer, make_train_step
from flaxtumor.train.losses import make_loss
from tests.train.helpers import ConvBN


def _one_step(devices, batch):
    mesh = sharding.make_mesh(devices)
    model = ConvBN(nnx.Rngs(0))
    cfg = TrainConfig(task="seg", lr=1e-2, warmup_epochs=0.0)
    optimizer = nnx.Optimizer(model, make_optimizer(cfg, cfg.lr, 10, 10), wrt=nnx.Param)
    nnx.update(model, sharding.replicate(nnx.state(model), mesh))
    nnx.update(optimizer, sharding.replicate(nnx.state(optimizer), mesh))
    step = make_train_step(make_loss(cfg), nnx.Param, jnp.float32)
    global_batch = sharding.shard_batch(batch, mesh)
    assert global_batch["image"].sharding.num_devices == len(devices)
    result = step(model, optimizer, global_batch)
    return float(result["loss"]), jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def test_four_devices_match_one():
    assert len(jax.devices()) >= 4, "tests/conftest.py should give 4 virtual CPU devices"
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
        "mask": (rng.random((8, 16, 16, 1)) > 0.7).astype(np.float32),
    }
    loss1, state1 = _one_step(jax.devices()[:1], batch)
    loss4, state4 = _one_step(jax.devices()[:4], batch)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
    flat1 = dict(jax.tree_util.tree_leaves_with_path(state1))
    for path, value in jax.tree_util.tree_leaves_with_path(state4):
        np.testing.assert_allclose(value, flat1[path], rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    # The step moved the weights and the BN statistics (so the comparison is not vacuous).
    fresh = ConvBN(nnx.Rngs(0))
    assert not np.allclose(state4["bn"]["mean"], np.asarray(fresh.bn.mean[...]))
    assert not np.allclose(state4["conv"]["kernel"], np.asarray(fresh.conv.kernel[...]))


@pytest.mark.parametrize("batch,expected", [(16, 16), (10, 8), (3, 4)])
def test_batch_size_is_fitted_to_the_device_count(batch, expected, caplog):
    mesh = sharding.make_mesh(jax.devices()[:4])
    assert sharding.fit_batch_size(batch, mesh) == expected
    assert (batch != expected) == ("does not divide" in caplog.text)
