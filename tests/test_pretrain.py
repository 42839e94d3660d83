"""In-domain pretraining end to end (tiny): a ResNet-encoder U-Net trained on masks -> its encoder exported as backbone
weights -> the two-phase classifier from them; strict loading and the validation-patient guard."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from flaxtumor.config import ModelConfig
from flaxtumor.convert_weights import main as convert_main
from flaxtumor.models import build_classifier, load_backbone
from flaxtumor.models.weights import WeightsError, read_weights
from flaxtumor.train.loop import run
from tests.train.helpers import tiny_config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("pretrain")
    seg_cfg = tiny_config(root / "seg", "seg", **{"model.segmenter": "resnet_tiny_unet", "train.epochs": 1})
    summary = run(seg_cfg)
    checkpoint = root / "seg" / "segmenter"
    assert checkpoint.is_dir(), summary
    assert convert_main([str(checkpoint), str(root / "encoder")]) == 0
    return root, root / "encoder", json.loads((checkpoint / "metadata.json").read_text())


def test_encoder_export_records_provenance(pretrained) -> None:
    _, encoder, seg_meta = pretrained
    flat, meta = read_weights(encoder)
    assert meta["source"].startswith("in-domain segmentation pretraining")
    assert meta["normalisation"] == seg_meta["preprocessing"]["normalisation"]
    assert meta["image_size"] == seg_meta["preprocessing"]["image_size"]
    assert meta["patients"] == sorted(seg_meta["split"]["train"])
    assert not set(meta["patients"]) & set(meta["validation_patients"])
    assert meta["has_top"] is False and not any(k.startswith("fc.") for k in flat)


def test_exported_backbone_loads_strictly_and_equals_the_encoder(pretrained) -> None:
    _, encoder, _ = pretrained
    from flaxtumor.checkpoints import load_inference

    segmenter, _ = load_inference(pretrained[0] / "seg" / "segmenter")
    classifier = build_classifier(ModelConfig(backbone="resnet_tiny", head_widths=(8,)), nnx.Rngs(1))
    load_backbone(classifier, encoder)
    ours = nnx.to_flat_state(nnx.state(classifier.backbone, nnx.Param))
    theirs = dict(nnx.to_flat_state(nnx.state(segmenter.encoder, nnx.Param)))
    assert len(ours) == len(theirs)
    for path, value in ours:
        np.testing.assert_array_equal(np.asarray(value[...]), np.asarray(jax.device_get(theirs[path][...])))
    # Strict: one tensor too many (or a missing one) is refused by name.
    flat, meta = read_weights(encoder)
    from flaxtumor.models.weights import assign

    with pytest.raises(WeightsError, match="unexpected tensor 'extra.kernel'"):
        assign(classifier.backbone, {**flat, "extra.kernel": np.zeros(1)}, "x")
    with pytest.raises(WeightsError, match="missing tensor"):
        assign(classifier.backbone, {k: v for k, v in flat.items() if k != "conv_init.kernel"}, "x")


def test_two_phase_classifier_from_pretrained_encoder(pretrained) -> None:
    root, encoder, seg_meta = pretrained
    cfg = tiny_config(root / "cls", "cls", **{
        "train.backbone_weights": str(encoder), "train.epochs": 1, "train.phase2_epochs": 1,
        "data.split_file": str(root / "seg" / "split.json"),
    })
    summary = run(cfg)
    history = [json.loads(line) for line in (root / "cls" / "metrics.jsonl").read_text().splitlines()]
    assert {h.get("phase") for h in history} == {1, 2}, history
    meta = json.loads((root / "cls" / "classifier" / "metadata.json").read_text())
    assert meta["backbone_init"] == str(encoder)
    # the classifier carries its backbone's provenance: the pretraining's patients are this split's training patients
    provenance = meta["backbone_provenance"]
    assert provenance == json.loads((encoder / "metadata.json").read_text())
    assert set(provenance["patients"]) <= set(meta["split"]["train"])
    # ... and keeps it through --init-from (e.g. a third phase run as its own fine-tune)
    longer = run(cfg.override(**{"train.backbone_weights": "none", "train.init_from": summary["checkpoint"],
                                 "train.out_dir": str(root / "cls_longer"), "train.epochs": 1}))
    assert json.loads((Path(longer["checkpoint"]) / "metadata.json").read_text())["backbone_provenance"] == provenance


def test_backbone_trained_on_validation_patients_is_refused(pretrained, tmp_path) -> None:
    root, encoder, seg_meta = pretrained
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    meta = json.loads((encoder / "metadata.json").read_text())
    meta["patients"] = meta["patients"] + seg_meta["split"]["val"][:1]
    (leaky / "metadata.json").write_text(json.dumps(meta))
    (leaky / "weights.safetensors").write_bytes((encoder / "weights.safetensors").read_bytes())
    cfg = tiny_config(tmp_path / "cls", "cls", **{
        "train.backbone_weights": str(leaky), "data.split_file": str(root / "seg" / "split.json"),
    })
    with pytest.raises(ValueError, match="validation/test patients"):
        run(cfg)


def test_convert_weights_refuses_a_resunet_checkpoint(tmp_path, capsys) -> None:
    cfg = tiny_config(tmp_path / "seg", "seg", **{"train.epochs": 1})
    run(cfg)
    assert convert_main([str(tmp_path / "seg" / "segmenter"), str(tmp_path / "enc")]) == 1
    assert "not a resnet50_unet segmenter checkpoint" in capsys.readouterr().err
