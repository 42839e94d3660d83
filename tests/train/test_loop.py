"""End-to-end runs on synthetic data with tiny models: training, checkpoints, export, NaN stop, bf16."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from flaxtumor.data.lgg import load_dataset, select
from flaxtumor.data.pipeline import eval_batches
from flaxtumor.train import loop
from flaxtumor.checkpoints import load_inference
from tests.train.helpers import tiny_config


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("seg")
    cfg = tiny_config(out, "seg", **{"train.epochs": 3, "train.save_every_steps": 4})
    return cfg, loop.run(cfg)


def _first_losses_drop(history):
    return history[-1]["train_loss"] < history[0]["train_loss"]


def test_seg_trains_checkpoints_and_exports(seg_run):
    cfg, summary = seg_run
    out = cfg.train.out_dir
    assert _first_losses_drop(summary["history"])
    lines = [json.loads(l) for l in open(f"{out}/metrics.jsonl")]
    assert [l["epoch"] for l in lines] == [1, 2, 3] and "val_volumetric_dice" in lines[0]
    assert all(l["seconds"] > 0 for l in lines)  # each epoch's wall time, for the compute a recipe costs
    assert json.load(open(f"{out}/config.json"))["train"]["task"] == "seg"
    steps = sorted(int(p.name) for p in (Path(out) / "orbax").iterdir() if p.name.isdigit())
    assert summary["best_step"] in steps and max(steps) == summary["history"][-1]["step"]
    assert len(steps) <= 2  # latest + best only; mid-epoch saves are pruned
    assert summary["checkpoint"].endswith("segmenter")


def test_best_seg_checkpoint_restores_and_predicts(seg_run):
    cfg, summary = seg_run
    model, metadata = load_inference(summary["checkpoint"])
    assert metadata["task"] == "seg" and metadata["preprocessing"]["image_size"] == 32
    assert metadata["dtype"] == "float32" and metadata["threshold"] == 0.5
    assert set(metadata["split"]) == {"seed", "train", "val", "test"} and metadata["versions"]["jax"] == jax.__version__
    assert metadata["metrics"]["volumetric_dice"] == pytest.approx(summary["best_metric"])
    # Same validation score as during training, so the restored weights are the best ones.
    val = select(load_dataset(cfg.data), metadata["split"]["val"])
    from flaxtumor.train import sharding

    metrics = loop.evaluate(model, loop.make_eval_step(np.float32), val, cfg, 8, sharding.make_mesh())
    assert metrics["volumetric_dice"] == pytest.approx(summary["best_metric"], abs=1e-6)
    batch = next(iter(eval_batches([s for p in val for s in p.slices], cfg.data, 8)))
    probs = np.asarray(jax.nn.sigmoid(model(batch["image"])))
    assert probs.shape == (8, 32, 32, 1) and np.isfinite(probs).all()


def test_existing_run_needs_resume(seg_run):
    cfg, _ = seg_run
    with pytest.raises(loop.RunExists, match="--resume"):
        loop.run(cfg)


def test_cls_runs_both_phases_and_exports(tmp_path, monkeypatch):
    # No ResNet50 weights here: a no-op loader stands in, so the frozen-then-unfrozen schedule runs on a tiny backbone.
    monkeypatch.setattr(loop, "load_backbone", lambda model, path: {})
    cfg = tiny_config(tmp_path, "cls", **{"train.backbone_weights": "fake", "train.epochs": 2, "train.phase2_epochs": 1})
    summary = loop.run(cfg)
    assert [(h["phase"], h["epoch"]) for h in summary["history"]] == [(1, 1), (1, 2), (2, 1)]
    assert {"val_auc", "val_f1", "val_accuracy", "val_precision", "val_recall"} <= set(summary["history"][0])
    model, metadata = load_inference(summary["checkpoint"])
    assert metadata["task"] == "cls" and summary["checkpoint"].endswith("classifier")
    logits = model(np.zeros((2, 32, 32, 3), np.float32))
    assert logits.shape == (2,)


def test_cls_phase3_runs_after_phase2_and_the_export_is_the_best_over_all_phases(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "load_backbone", lambda model, path: {})
    cfg = tiny_config(tmp_path, "cls", **{
        "train.backbone_weights": "fake", "train.epochs": 1, "train.phase2_epochs": 1, "train.phase3_epochs": 2,
    })
    summary = loop.run(cfg)
    history = summary["history"]
    assert [(h["phase"], h["epoch"]) for h in history] == [(1, 1), (2, 1), (3, 1), (3, 2)]
    # "kept only if validation says so": the exported checkpoint is the first epoch with the best AUC of any phase
    best = max(history, key=lambda h: h["val_auc"])
    assert (summary["best_phase"], summary["best_step"]) == (best["phase"], best["step"])


def test_cls_random_init_trains_whole_network_and_loss_drops(tmp_path):
    summary = loop.run(tiny_config(tmp_path, "cls", **{"train.epochs": 3}))
    assert [h["phase"] for h in summary["history"]] == [0, 0, 0]
    assert _first_losses_drop(summary["history"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, "seg", **{"train.lr": 1e38, "train.grad_clip": 1e38, "train.save_every_steps": 1})
    with pytest.raises(loop.NonFiniteLoss, match=r"at step \d+") as err:
        loop.run(cfg)
    assert "Last good checkpoint" in str(err.value)
    from flaxtumor.train.checkpoint import TrainCheckpoints
    import orbax.checkpoint as ocp

    latest = TrainCheckpoints(tmp_path / "orbax", "volumetric_dice").latest_step()
    if latest is not None:  # whatever was saved holds finite weights
        state = ocp.StandardCheckpointer().restore(tmp_path / "orbax" / str(latest) / "model")
        assert all(np.isfinite(np.asarray(x, np.float64)).all() for x in jax.tree.leaves(state) if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_bf16_runs_on_cpu(tmp_path):
    summary = loop.run(tiny_config(tmp_path, "seg", **{"train.precision": "bf16", "train.epochs": 1, "train.save_bf16": True}))
    model, metadata = load_inference(summary["checkpoint"])
    assert metadata["dtype"] == "bfloat16"
    assert np.isfinite(summary["history"][0]["train_loss"])


def test_tumour_sampling_sets_the_steps_per_epoch(tmp_path):
    cfg = tiny_config(tmp_path, "seg", **{"train.epochs": 1, "data.sampling": "tumour", "data.samples_per_epoch": 24})
    summary = loop.run(cfg)
    assert [h["step"] for h in summary["history"]] == [24 // 8]  # not the 80 // 8 of a whole shuffled epoch


def test_resume_with_fewer_epochs_stops_the_run_and_exports_its_best(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "seg", **{"train.epochs": 5})
    finish, calls = loop._finish_epoch, []

    def stop_after_two(*args, **kwargs):
        over = finish(*args, **kwargs)  # validates and checkpoints the epoch first
        calls.append(1)
        if len(calls) == 2:
            args[0].checkpoints.manager.wait_until_finished()  # its checkpoint written (saves are asynchronous)
            raise KeyboardInterrupt  # the run is killed after its second epoch
        return over

    monkeypatch.setattr(loop, "_finish_epoch", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        loop.run(cfg)
    monkeypatch.setattr(loop, "_finish_epoch", finish)
    trained = []
    monkeypatch.setattr(loop, "train_epoch", lambda *a, **k: trained.append(1))
    summary = loop.run(cfg.override(**{"train.epochs": 2, "train.resume": True}))
    assert trained == [] and len(summary["history"]) == 2  # no epoch added
    best = max(summary["history"], key=lambda h: h["val_volumetric_dice"])
    assert summary["best_step"] == best["step"]
    model, metadata = load_inference(summary["checkpoint"])
    assert metadata["best"]["step"] == best["step"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_deep_supervision_train_step_trains_the_heads_too(tmp_path, precision):
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from flaxtumor.models import build_model
    from flaxtumor.train.losses import make_loss

    cfg = tiny_config(tmp_path, "seg", **{"model.resunet_widths": (4, 8, 16), "model.deep_supervision": True})
    model = build_model(cfg, nnx.Rngs(0))
    model.train()
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    step = loop.make_train_step(make_loss(cfg.train, deep_supervision=True), nnx.Param,
                                loop.compute_dtype(precision), deep=True)
    head = np.asarray(model.aux_heads[0].kernel[...]).copy()
    mask = np.zeros((4, 16, 16, 1), np.float32)
    mask[:, 5:9, 6:10] = 1.0
    batch = {"image": jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)), jnp.float32),
             "mask": jnp.asarray(mask), "label": jnp.ones((4,))}
    result = step(model, optimizer, batch)
    assert np.isfinite(float(result["loss"])) and float(result["grad_norm"]) > 0
    assert not np.array_equal(np.asarray(model.aux_heads[0].kernel[...]), head)  # the auxiliary loss reached its head


def test_bound_train_step_updates_the_model_as_the_plain_step_does(tmp_path):
    """The loop calls the step through `bind_train_step` (nnx.cached_partial): the weights, BatchNorm statistics and
    optimizer state it leaves in the model must be exactly those of the plain step, donation included."""
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from flaxtumor.models import build_model
    from flaxtumor.train.losses import make_loss

    cfg = tiny_config(tmp_path, "seg", **{"model.resunet_widths": (4, 8, 16)})
    step = loop.make_train_step(make_loss(cfg.train), nnx.Param, loop.compute_dtype("fp32"))
    rng = np.random.default_rng(0)
    batches = [{"image": jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32),
                "mask": jnp.asarray(rng.random((2, 16, 16, 1)) > 0.8, jnp.float32), "label": jnp.ones((2,))}
               for _ in range(3)]
    states = []
    for bound in (False, True):
        model = build_model(cfg, nnx.Rngs(0))
        model.train()
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        call = loop.bind_train_step(step, model, optimizer) if bound else lambda b: step(model, optimizer, b)
        losses = [float(call(b)["loss"]) for b in batches]
        states.append((losses, nnx.state(model), nnx.state(optimizer)))
    (plain_losses, *plain), (bound_losses, *bound_state) = states
    assert bound_losses == plain_losses and plain_losses[0] != plain_losses[-1]
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(bound_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_deep_supervision_and_brain_crop_run_export_and_serve(tmp_path):
    from flaxtumor.data.io import read_image
    from flaxtumor.data.preprocess import crop_box
    from flaxtumor.inference import Pipeline

    cfg = tiny_config(tmp_path, "seg", **{"train.epochs": 1, "model.resunet_widths": (4, 8, 16),
                                          "model.deep_supervision": True, "data.crop": "brain"})
    summary = loop.run(cfg)
    assert np.isfinite(summary["history"][0]["train_loss"])
    model, metadata = load_inference(summary["checkpoint"])
    assert metadata["preprocessing"]["crop"] == "brain" and metadata["config"]["model"]["deep_supervision"]
    assert len(model.aux_heads) == 1  # restored with its head; serving calls the full-resolution output only
    pipeline = Pipeline(model, model, metadata, metadata)  # the segmenter as both: only `segment` is used
    val = select(load_dataset(cfg.data), metadata["split"]["val"])[0]
    images = [read_image(s.image_path) for s in val.slices]
    box = crop_box(images, "brain")
    masks = pipeline.segment(images, volume=True, point=pipeline.point.override(mask_threshold=0.0))
    assert all(m.shape == images[0].shape[:2] and m[box.rows, box.cols].all() and m.sum() == box.height * box.width
               for m in masks)  # threshold 0: the whole box, nothing outside it
