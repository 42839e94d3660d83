"""Checkpoints: the training manager (latest + best, for resume) and the inference export (params + batch stats).

Training checkpoints live in `<run>/orbax/<step>/{model,opt,meta}`; the inference export is `<dir>/<name>/` with
`state/` (Orbax) and `metadata.json`. Orbax finalises a step atomically (a half-written step is never listed), and the
export is written to a temporary folder and renamed, so a killed write never leaves something that later loads.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from flaxtumor.config import Config
from flaxtumor.models import build_model
from flaxtumor.train import sharding

# RNG keys are rebuilt from the seed; their counters (RngCount) are saved, which is the whole RNG state.
TRAIN_STATE = nnx.Not(nnx.RngKey)
INFERENCE_STATE = (nnx.Param, nnx.BatchStat)


class _NoMetricsWarning(logging.Filter):
    """Mid-epoch saves have no validation metrics by design; Orbax warns about each one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoMetricsWarning())


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message is one line starting with the path."""


def _abstract(tree: Any, dtype: Any = None) -> Any:
    """Restore target: shapes, dtypes and the shardings of the live arrays (so any device count restores)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=x.sharding), tree)


def _load_into(node: nnx.Module | nnx.Optimizer, pure: dict, filters: Any = ...) -> None:
    state = nnx.state(node, filters)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(node, state)


# ---------------------------------------------------------------------------------------------------------------------
# Training checkpoints
# ---------------------------------------------------------------------------------------------------------------------


class TrainCheckpoints:
    """Keeps the latest step (resume) and the best step by `metric` (higher is better).

    Mid-epoch saves carry no metrics: they are kept only while they are the latest.
    """

    def __init__(self, directory: Path, metric: str):
        self.metric = metric
        best = lambda metrics: float(metrics[metric])  # noqa: E731
        options = ocp.CheckpointManagerOptions(
            best_fn=best,
            best_mode="max",
            preservation_policy=AnyPreservationPolicy(
                [LatestN(n=1), BestN(get_metric_fn=best, n=1, keep_checkpoints_without_metrics=False)]
            ),
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(), options=options, item_names=("model", "opt", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(
        self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, meta: dict, metrics: dict | None = None
    ) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model, TRAIN_STATE))),
                opt=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer))),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics=metrics,
            force=True,
        )

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer | None = None) -> None:
        """Loads step `step` into the live (already placed) model, and the optimizer when given."""
        self.manager.wait_until_finished()
        items = {"model": ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(nnx.state(model, TRAIN_STATE))))}
        if optimizer is not None:
            items["opt"] = ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(nnx.state(optimizer))))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        _load_into(model, restored.model, TRAIN_STATE)
        if optimizer is not None:
            _load_into(optimizer, restored.opt)

    def path(self, step: int) -> Path:
        return Path(self.manager.directory) / str(step)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ---------------------------------------------------------------------------------------------------------------------
# Inference export
# ---------------------------------------------------------------------------------------------------------------------


def export_inference(path: Path, model: nnx.Module, metadata: dict, bf16: bool = False) -> Path:
    """Writes params + batch stats and metadata.json to `path`, atomically (temp folder, then rename)."""
    path = Path(path).absolute()
    state = nnx.to_pure_dict(nnx.state(model, INFERENCE_STATE))
    if bf16:
        state = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    metadata = {**metadata, "dtype": "bfloat16" if bf16 else "float32"}
    tmp, old = path.parent / f".{path.name}.tmp", path.parent / f".{path.name}.old"
    leader = jax.process_index() == 0
    if leader:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    multihost_utils.sync_global_devices("export:start")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp / "state", state)
        checkpointer.wait_until_finished()
    if leader:
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    multihost_utils.sync_global_devices("export:done")
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _shape_mismatches(saved: Any, expected: dict) -> list[str]:
    """Differences between the saved tree (Orbax metadata, string keys) and the model's state."""
    def flat(tree: Any) -> dict[str, Any]:
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        return {jax.tree_util.keystr(k, simple=True, separator="/"): v for k, v in leaves}

    flat_saved, flat_expected = flat(saved), flat(expected)
    problems = [f"{k} is missing from the weights" for k in sorted(flat_expected.keys() - flat_saved.keys())]
    problems += [f"{k} is not in the model" for k in sorted(flat_saved.keys() - flat_expected.keys())]
    for k in sorted(flat_expected.keys() & flat_saved.keys()):
        if tuple(flat_saved[k].shape) != tuple(flat_expected[k].shape):
            saved_shape, expected_shape = tuple(flat_saved[k].shape), tuple(flat_expected[k].shape)
            problems.append(f"{k} has shape {saved_shape}, the model expects {expected_shape}")
    return problems


def load_inference(path: str | Path) -> tuple[nnx.Module, dict]:
    """Rebuilds the exported model (eval mode, float32, replicated over all devices) and returns it with its metadata.

    Raises CheckpointError (one line) for a missing folder, weights that do not match the recorded architecture, or a
    truncated/corrupt file.
    """
    path = Path(path).absolute()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder (train one with `python train.py`)")
    meta_file = path / "metadata.json"
    try:
        metadata = json.loads(meta_file.read_text())
        config = Config.from_dict(metadata["config"])
        saved_dtype = jnp.dtype(metadata.get("dtype", "float32"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_file}: missing or corrupt metadata ({_first_line(e)})") from None

    # Abstract build: a real random init of ResNet50 costs seconds of start-up only to be overwritten.
    graphdef, weights, rest = nnx.split(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))), INFERENCE_STATE, ...)
    rest = jax.tree.map(_materialise, rest)  # the small remainder (dropout RNG streams) needs real values
    mesh = sharding.make_mesh()
    replicated = sharding.replicated(mesh)
    live = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        nnx.to_pure_dict(weights))
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            saved = checkpointer.metadata(path / "state").item_metadata.tree
        except Exception as e:  # noqa: BLE001 — Orbax raises many types for unreadable metadata; all mean "corrupt"
            raise CheckpointError(f"{path}: checkpoint is truncated or corrupt ({_first_line(e)})") from None
        problems = _shape_mismatches(saved, live)
        if problems:
            raise CheckpointError(
                f"{path}: weights do not match the architecture in metadata.json "
                f"({len(problems)} difference(s), e.g. {problems[0]})"
            )
        try:
            restored = checkpointer.restore(path / "state", _abstract(live, saved_dtype))
        except Exception as e:  # noqa: BLE001 — tensorstore/zarr errors on damaged files come in many types
            raise CheckpointError(f"{path}: checkpoint is truncated or corrupt ({_first_line(e)})") from None
    restored = jax.tree.map(lambda x, ref: x.astype(ref.dtype), restored, live)
    if not all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(restored)):
        raise CheckpointError(f"{path}: checkpoint holds NaN/Inf weights (corrupt)")
    nnx.replace_by_pure_dict(weights, restored)
    model = nnx.merge(graphdef, weights, rest)
    model.eval()
    return model, metadata


def init_from(model: nnx.Module, path: str | Path) -> dict:
    """Copies an exported inference checkpoint's params and BatchNorm statistics into `model`, whose architecture
    must match (CheckpointError otherwise). Returns the source's metadata, for the record."""
    source, metadata = load_inference(path)
    weights = jax.device_get(nnx.to_pure_dict(nnx.state(source, INFERENCE_STATE)))
    problems = _shape_mismatches(weights, nnx.to_pure_dict(nnx.state(model, INFERENCE_STATE)))
    if problems:
        raise CheckpointError(
            f"{path}: cannot initialise this model from it ({len(problems)} difference(s), e.g. {problems[0]})"
        )
    _load_into(model, weights, INFERENCE_STATE)
    return metadata


def _materialise(x: jax.ShapeDtypeStruct) -> jax.Array:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.split(jax.random.key(0), x.shape) if x.shape else jax.random.key(0)
    return jnp.zeros(x.shape, x.dtype)
