"""The classifier (dropout on, two phases from "pretrained" weights) SIGKILLed mid-epoch, in phase 1 and inside phase 2,
and resumed with --resume, ends with the same weights, BatchNorm statistics, RNG counters and optimizer state as an
uninterrupted run with the same seed.

The kill is a real SIGKILL, sent by the training process to itself right after it has issued the mid-epoch save of a
chosen step (Orbax may still be writing it: then --resume starts from the save before, which must be exact too).

Tolerance: none; every float, RNG counter and step count must be bit-identical. A correct resume replays the same
compiled steps on the same data in the same order, and nothing in a run depends on thread timing (XLA:CPU's in-process
all-reduce sums the devices' parts in rank order), so it comes out bit-identical here in both phases, also on the code
before this test existed. Any difference is a bug, or code that changed between the runs. A wrong resume is far off
anyway: without the RNG counters the dropout masks differ and BatchNorm biases are off by ~1e-3 (relative error ~15).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from flaxtumor.models import build_model
from flaxtumor.models.weights import FORMAT, _variables, save_converted
from flaxtumor.train import loop
from tests.train.helpers import tiny_config

REPO = Path(__file__).resolve().parents[2]
STEPS_PER_EPOCH = 10  # 80 synthetic training slices / batch 8
SETTINGS = {
    "train.epochs": 2, "train.phase2_epochs": 2, "train.save_every_steps": 3, "data.augment": True,
    "model.dropout": 0.5, "data.normalisation": "imagenet",
}
# Runs the training CLI and SIGKILLs itself right after the save of step KILL_AT is issued.
KILLER = """
import os, signal, sys
from flaxtumor.train.checkpoint import TrainCheckpoints
save, kill_at = TrainCheckpoints.save, int(os.environ["KILL_AT"])
def killing_save(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
TrainCheckpoints.save = killing_save
from flaxtumor.train.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env(**extra: str) -> dict:
    # The same XLA settings as this test process (conftest), so all runs compile the same programs.
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "true", **extra}


def _weights(root: Path) -> Path:
    """The tiny backbone's own random weights as a converted-weights folder: the two-phase recipe runs for real."""
    model = build_model(tiny_config(root, "cls"), nnx.Rngs(7))
    flat = {k: np.asarray(v[...]) for k, v in _variables(model.backbone).items()}
    metadata = {"format": FORMAT, "architecture": "resnet_tiny", "layout": "torchvision", "normalisation": "imagenet"}
    return save_converted(flat, metadata, root / "weights")


def _latest(out: Path) -> tuple[int, dict]:
    step = max(int(p.name) for p in (out / "orbax").iterdir() if p.name.isdigit())
    with ocp.StandardCheckpointer() as c:
        return step, {item: c.restore(out / "orbax" / str(step) / item) for item in ("model", "opt")}


def _assert_same_state(a: dict, b: dict) -> None:
    flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
    assert set(flat_b) == {p for p, _ in jax.tree_util.tree_leaves_with_path(a)}
    for path, value in jax.tree_util.tree_leaves_with_path(a):
        np.testing.assert_array_equal(value, flat_b[path], err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls-resume")
    cfg = tiny_config(root / "reference", "cls", **SETTINGS, **{"train.backbone_weights": str(_weights(root))})
    summary = loop.run(cfg)
    assert [(h["phase"], h["epoch"]) for h in summary["history"]] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    return root, cfg, _latest(root / "reference")


@pytest.mark.parametrize("kill_at", [6, 24], ids=["phase1", "phase2"])  # mid-epoch: epoch 1 step 6; epoch 3 step 4
def test_sigkill_then_resume_matches_uninterrupted_run(reference, kill_at):
    root, cfg, (ref_step, ref_state) = reference
    out = root / f"killed-{kill_at}"
    config = root / f"config-{kill_at}.json"
    cfg.override(**{"train.out_dir": str(out)}).to_json(config)

    killed = subprocess.run([sys.executable, "-c", KILLER, "--config", str(config)], cwd=REPO,
                            env=_env(KILL_AT=str(kill_at)), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert not (out / "classifier").exists()
    progress = json.loads((out / "orbax").joinpath(str(_latest(out)[0]), "meta", "metadata").read_text())["progress"]
    assert progress["step_in_epoch"] != 0 and progress["phase_index"] == (kill_at > 2 * STEPS_PER_EPOCH)

    resumed = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(config), "--resume"], cwd=REPO,
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from step" in resumed.stdout
    step, state = _latest(out)
    assert step == ref_step == 4 * STEPS_PER_EPOCH
    _assert_same_state(state, ref_state)
    trained = json.loads((out / "classifier" / "metadata.json").read_text())["trained_patients"]
    assert trained == json.loads((root / "reference" / "classifier" / "metadata.json").read_text())["trained_patients"]


def test_the_checkpoint_holds_the_dropout_rng_counters(reference):
    """What makes the test above sensitive to dropout: the counters are saved and move with every step."""
    root, _, (_, state) = reference
    counts = {jax.tree_util.keystr(p): int(v) for p, v in jax.tree_util.tree_leaves_with_path(state["model"])
              if "count" in jax.tree_util.keystr(p)}
    assert counts and max(counts.values()) > 0, counts
