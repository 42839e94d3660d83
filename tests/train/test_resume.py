"""A run SIGKILLed mid-epoch and resumed ends with the same weights as an uninterrupted run with the same seed."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from flaxtumor.train import loop
from tests.train.helpers import tiny_config

REPO = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 20  # 80 synthetic training slices / batch 4
SETTINGS = {"train.epochs": 2, "train.batch_size": 4, "train.save_every_steps": 3, "data.augment": True}


def _train(config: Path, *extra: str) -> subprocess.Popen:
    # The same XLA settings as this test process (conftest), so both runs compile the same programs.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "--config", str(config), *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _steps(out: Path) -> list[int]:
    folder = out / "orbax"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def _latest_state(out: Path) -> tuple[int, dict]:
    step = _steps(out)[-1]
    with ocp.StandardCheckpointer() as c:
        return step, {item: c.restore(out / "orbax" / str(step) / item) for item in ("model", "opt")}


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    killed_out = tmp_path / "killed"
    config = tmp_path / "config.json"
    tiny_config(killed_out, "seg", **SETTINGS).to_json(config)

    proc = _train(config)
    deadline = time.time() + 240
    while not _steps(killed_out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _steps(killed_out)[-1]
    assert not (killed_out / "segmenter").exists(), "the run finished before the kill"
    assert killed_at % STEPS_PER_EPOCH != 0, f"killed at an epoch boundary (step {killed_at}); want mid-epoch"

    resumed = _train(config, "--resume")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert f"resuming from step {killed_at}" in output

    reference = loop.run(tiny_config(tmp_path / "reference", "seg", **SETTINGS))
    step_a, state_a = _latest_state(killed_out)
    step_b, state_b = _latest_state(tmp_path / "reference")
    assert step_a == step_b == reference["history"][-1]["step"]
    flat_b = dict(jax.tree_util.tree_leaves_with_path(state_b))
    for path, value in jax.tree_util.tree_leaves_with_path(state_a):
        np.testing.assert_allclose(value, flat_b[path], rtol=1e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
