"""Two processes on localhost (gloo CPU collectives, 2 devices each) train like one process with 4 devices."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import orbax.checkpoint as ocp

from flaxtumor.train import loop
from tests.train.helpers import tiny_config

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {"train.epochs": 1, "data.augment": True}  # augmented rows must match across the sharding too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _model(out: Path, like: dict | None = None) -> dict:
    """The latest model state; `like` gives the restore target (the 2-process topology differs from this one)."""
    step = max(int(p.name) for p in (out / "orbax").iterdir() if p.name.isdigit())
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = None if like is None else jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like)
    with ocp.StandardCheckpointer() as c:
        return c.restore(out / "orbax" / str(step) / "model", target)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    config = tmp_path / "config.json"
    tiny_config(tmp_path / "multi", "seg", **SETTINGS).to_json(config)
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_DISABLE_MOST_OPTIMIZATIONS": "true",
        "JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}",  # the env route; flags work the same way
        "JAX_NUM_PROCESSES": "2",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), "--config", str(config)],
            cwd=REPO, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:]
    assert "4 device(s)" in outputs[0] and "in 2 process(es)" in outputs[0]
    assert "4 rows loaded per process" in outputs[0]  # each process reads only its half of every batch of 8
    assert (tmp_path / "multi" / "segmenter" / "metadata.json").is_file()

    loop.run(tiny_config(tmp_path / "single", "seg", **SETTINGS))  # this process: 4 devices, 1 process
    single = _model(tmp_path / "single")
    multi = _model(tmp_path / "multi", like=single)
    flat = dict(jax.tree_util.tree_leaves_with_path(single))
    for path, value in jax.tree_util.tree_leaves_with_path(multi):
        np.testing.assert_allclose(value, flat[path], rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
