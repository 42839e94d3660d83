"""Inference export/restore across device counts, and one-line errors for bad checkpoints."""

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from flaxtumor.models import build_model
from flaxtumor.train import sharding
from flaxtumor.checkpoints import CheckpointError, export_inference, load_inference
from tests.train.helpers import tiny_config


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny segmenter exported from ONE device (the loader then restores it onto all four)."""
    root = tmp_path_factory.mktemp("export")
    cfg = tiny_config(root / "run")
    model = build_model(cfg, nnx.Rngs(3))
    nnx.update(model, sharding.replicate(nnx.state(model), sharding.make_mesh(jax.devices()[:1])))
    path = export_inference(root / "segmenter", model, {"config": cfg.to_dict(), "task": "seg"})
    return path, model


def _copy(path, tmp_path):
    return shutil.copytree(path, tmp_path / "segmenter")


def test_export_restores_on_another_device_count(exported):
    path, model = exported
    restored, metadata = load_inference(path)
    assert metadata["dtype"] == "float32" and metadata["task"] == "seg"
    leaf = jax.tree.leaves(nnx.state(restored, nnx.Param))[0]
    assert leaf.sharding.num_devices == len(jax.devices()) == 4
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    model.eval()
    np.testing.assert_allclose(np.asarray(restored(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)
    assert not list(path.parent.glob(".segmenter.*"))  # no temporary folders left behind


def _one_line_error(path) -> str:
    with pytest.raises(CheckpointError) as err:
        load_inference(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path.absolute()))
    return message


def test_missing_directory(tmp_path):
    assert "no such checkpoint folder" in _one_line_error(tmp_path / "nope")


def test_architecture_mismatch(exported, tmp_path):
    path = _copy(exported[0], tmp_path)
    metadata = json.loads((path / "metadata.json").read_text())
    metadata["config"]["model"]["resunet_widths"] = [4, 16]
    (path / "metadata.json").write_text(json.dumps(metadata))
    assert "do not match the architecture" in _one_line_error(path)


def test_truncated_weights(exported, tmp_path):
    path = _copy(exported[0], tmp_path)
    for f in (path / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 64 and "metadata" not in f.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert "truncated or corrupt" in _one_line_error(path)


def test_corrupt_metadata(exported, tmp_path):
    path = _copy(exported[0], tmp_path)
    (path / "metadata.json").write_text('{"config": {')
    assert "corrupt metadata" in _one_line_error(path)


def test_missing_weights_folder(exported, tmp_path):
    path = _copy(exported[0], tmp_path)
    shutil.rmtree(path / "state")
    assert "truncated or corrupt" in _one_line_error(path)


def test_export_replaces_atomically_and_ignores_a_killed_write(exported, tmp_path):
    path, model = exported
    target = tmp_path / "segmenter"
    junk = tmp_path / ".segmenter.tmp"  # what a write killed half-way leaves: never loaded, cleared by the next export
    (junk / "state").mkdir(parents=True)
    (junk / "metadata.json").write_text("{")
    metadata = json.loads((path / "metadata.json").read_text())
    export_inference(target, model, metadata)
    export_inference(target, model, {**metadata, "threshold": 0.25})  # replaces the previous export
    assert load_inference(target)[1]["threshold"] == 0.25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["segmenter"]


def test_init_from_copies_weights_and_refuses_another_architecture(tmp_path):
    from flax import nnx

    from flaxtumor.config import Config
    from flaxtumor.models import build_model
    from flaxtumor.checkpoints import CheckpointError, export_inference, init_from

    cfg = Config().override(**{"train.task": "seg", "model.resunet_widths": (4, 8)})
    source = build_model(cfg, nnx.Rngs(1))
    export_inference(tmp_path / "segmenter", source, {"config": cfg.to_dict(), "task": "seg"})
    target = build_model(cfg, nnx.Rngs(2))
    init_from(target, tmp_path / "segmenter")
    for a, b in zip(jax.tree.leaves(nnx.state(source, nnx.Param)), jax.tree.leaves(nnx.state(target, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    wider = build_model(cfg.override(**{"model.resunet_widths": (8, 16)}), nnx.Rngs(3))
    with pytest.raises(CheckpointError, match="cannot initialise this model"):
        init_from(wider, tmp_path / "segmenter")
