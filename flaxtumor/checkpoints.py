"""Inference checkpoints: what training exports and serving loads, with its typed metadata.

An inference checkpoint is a folder `<dir>/<name>/` holding `state/` (Orbax: params and BatchNorm statistics) and
`metadata.json` (an `InferenceMetadata`: the training config, preprocessing, the task's threshold, split, metrics).
`export_inference` writes one atomically (temporary folder, then rename), so a killed write never leaves something
that later loads; `load_inference` rebuilds the model from the recorded architecture; `init_from` copies one into a
live model (training's `--init-from`).

Serving (inference, predict, evaluate, tune, the app) imports this module, never `flaxtumor.train`. The metadata type
lives in `flaxtumor.checkpoint_metadata` (light: no flax, no Orbax) and is re-exported here.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from flaxtumor.checkpoint_metadata import CheckpointError, InferenceMetadata, first_line, read_metadata
from flaxtumor.models import build_model

__all__ = ["CheckpointError", "InferenceMetadata", "INFERENCE_STATE", "export_inference", "load_inference",
           "init_from", "read_metadata"]

INFERENCE_STATE = (nnx.Param, nnx.BatchStat)


def _abstract(tree: Any, dtype: Any = None) -> Any:
    """Restore target: shapes, dtypes and the shardings of the live arrays (so any device count restores)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=x.sharding), tree)


def _load_into(node: nnx.Module | nnx.Optimizer, pure: dict, filters: Any = ...) -> None:
    state = nnx.state(node, filters)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(node, state)


def _replicated() -> NamedSharding:
    """Every device holds the whole array (the same layout training's data-parallel mesh gives parameters)."""
    return NamedSharding(Mesh(np.asarray(jax.devices()), ("data",), axis_types=(AxisType.Auto,)), PartitionSpec())


VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")


def library_versions() -> dict[str, str]:
    """The Python and library versions an export records (metadata `versions`)."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def export_inference(path: Path, model: nnx.Module, metadata: InferenceMetadata | dict, bf16: bool = False) -> Path:
    """Writes params + batch stats and metadata.json to `path`, atomically (temp folder, then rename). A dict is
    checked by reading it as `InferenceMetadata` first, so nothing unloadable is written."""
    path = Path(path).absolute()
    if isinstance(metadata, dict):
        metadata = InferenceMetadata.from_dict(metadata)
    state = nnx.to_pure_dict(nnx.state(model, INFERENCE_STATE))
    if bf16:
        state = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
    metadata = dataclasses.replace(metadata, dtype="bfloat16" if bf16 else "float32").to_dict()
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


def load_inference(path: str | Path) -> tuple[nnx.Module, InferenceMetadata]:
    """Rebuilds the exported model (eval mode, float32, replicated over all devices) and returns it with its metadata.

    Raises CheckpointError (one line) for a missing folder, weights that do not match the recorded architecture, or a
    truncated/corrupt file.
    """
    path = Path(path).absolute()
    metadata = read_metadata(path)
    config = metadata.config
    try:
        saved_dtype = jnp.dtype(metadata.dtype)
    except TypeError as e:
        raise CheckpointError(f"{path / 'metadata.json'}: missing or corrupt metadata ({first_line(e)})") from None

    # Abstract build: a real random init of ResNet50 costs seconds of start-up only to be overwritten.
    graphdef, weights, rest = nnx.split(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))), INFERENCE_STATE, ...)
    rest = jax.tree.map(_materialise, rest)  # the small remainder (dropout RNG streams) needs real values
    replicated = _replicated()
    live = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        nnx.to_pure_dict(weights))
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            saved = checkpointer.metadata(path / "state").item_metadata.tree
        except Exception as e:  # noqa: BLE001 — Orbax raises many types for unreadable metadata; all mean "corrupt"
            raise CheckpointError(f"{path}: checkpoint is truncated or corrupt ({first_line(e)})") from None
        problems = _shape_mismatches(saved, live)
        if problems:
            raise CheckpointError(
                f"{path}: weights do not match the architecture in metadata.json "
                f"({len(problems)} difference(s), e.g. {problems[0]})"
            )
        try:
            restored = checkpointer.restore(path / "state", _abstract(live, saved_dtype))
        except Exception as e:  # noqa: BLE001 — tensorstore/zarr errors on damaged files come in many types
            raise CheckpointError(f"{path}: checkpoint is truncated or corrupt ({first_line(e)})") from None
    restored = jax.tree.map(lambda x, ref: x.astype(ref.dtype), restored, live)
    if not all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(restored)):
        raise CheckpointError(f"{path}: checkpoint holds NaN/Inf weights (corrupt)")
    nnx.replace_by_pure_dict(weights, restored)
    model = nnx.merge(graphdef, weights, rest)
    model.eval()
    return model, metadata


def init_from(model: nnx.Module, path: str | Path) -> InferenceMetadata:
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
