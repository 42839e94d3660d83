"""tools/data_pack.py: a run served from the pack trains exactly as the run from the dataset folder."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from flaxtumor.data import pipeline
from flaxtumor.data.lgg import load_dataset
from flaxtumor.train import cli, loop

_spec = importlib.util.spec_from_file_location("data_pack", Path(__file__).resolve().parents[1] / "tools" / "data_pack.py")
data_pack = sys.modules.setdefault("data_pack", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(data_pack)  # registered first: its dataclasses look their module up


def _serve_without_files(pack, monkeypatch) -> None:
    """Serves the pack and makes every read of a dataset file fail, so nothing can come from the folder."""
    def no_file(path, *args, **kwargs):
        raise AssertionError(f"read {path} although the pack serves the data")

    monkeypatch.setattr(pipeline, "read_image", no_file)
    monkeypatch.setattr(pipeline, "read_mask", no_file)
    monkeypatch.setattr(loop, "load_dataset", no_file)  # serve replaces it
    data_pack.serve(pack, monkeypatch.setattr)


def _config(out: Path):
    from tests.train.helpers import tiny_config

    return tiny_config(out, "seg", **{
        "data.augment": True, "data.missing_sequences": 0.3, "data.sampling": "tumour", "data.samples_per_epoch": 32,
        "data.fold": 0, "data.folds": 3, "train.epochs": 2,
    })


@pytest.mark.parametrize("crop, context, mask_resize", [("none", 0, "nearest"), ("brain", 1, "nearest"),
                                                        ("none", 0, "area")])
def test_pack_round_trip_and_batches_match_the_dataset(tmp_path, monkeypatch, crop, context, mask_resize):
    cfg = _config(tmp_path / "run")
    cfg = cfg.override(**{"data.crop": crop, "data.context_slices": context, "data.mask_resize": mask_resize})
    path = data_pack.save(data_pack.build(cfg.data), tmp_path / "lgg.pack")
    pack = data_pack.load(path)
    assert [p.patient_id for p in pack.patients] == [p.patient_id for p in load_dataset(cfg.data)]
    assert pack.crop == crop and pack.images.shape[1:] == (32, 32, 3) and pack.masks.any()
    assert pack.mask_resize == mask_resize and pack.masks.dtype == (bool if mask_resize == "nearest" else np.float16)
    assert (pack.areas > 0).sum() == pack.masks.any(axis=(1, 2)).sum()

    slices = [s for p in pack.patients[:3] for s in p.slices]  # whole patients, as training passes them
    monkeypatch.setattr(pipeline, "_memo", {})
    from_folder = list(pipeline.train_batches(slices, cfg.data, 8, seed=0, epoch=1))
    monkeypatch.setattr(pipeline, "_memo", {})  # else the pack run would reuse the folder run's decoded slices
    _serve_without_files(pack, monkeypatch)
    from_pack = list(pipeline.train_batches(slices, cfg.data, 8, seed=0, epoch=1))
    assert len(from_pack) == len(from_folder) == 4
    for a, b in zip(from_folder, from_pack):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_run_from_the_pack_equals_the_run_from_the_folder(tmp_path, monkeypatch):
    cfg = _config(tmp_path / "folder")
    pack = data_pack.load(data_pack.save(data_pack.build(cfg.data), tmp_path / "lgg.pack"))
    monkeypatch.setattr(pipeline, "_memo", {})
    folder = loop.run(cfg)
    monkeypatch.setattr(pipeline, "_memo", {})
    _serve_without_files(pack, monkeypatch)
    # Through train.py, as on the lent machine: there the dataset folder does not exist.
    config_file = tmp_path / "config.json"
    cfg.override(**{"data.root": str(tmp_path / "no-such-folder")}).to_json(config_file)
    assert cli.main(["--config", str(config_file), "--out", str(tmp_path / "pack")]) == 0
    packed = json.loads((tmp_path / "pack" / "segmenter" / "metadata.json").read_text())
    assert [h["val_volumetric_dice"] for h in packed["history"]] == [h["val_volumetric_dice"] for h in folder["history"]]
    assert [h["train_loss"] for h in packed["history"]] == [h["train_loss"] for h in folder["history"]]


def test_a_pack_refuses_runs_that_read_slices_otherwise(tmp_path, monkeypatch):
    cfg = _config(tmp_path / "run")
    pack = data_pack.load(data_pack.save(data_pack.build(cfg.data), tmp_path / "lgg.pack"))
    data_pack.serve(pack, monkeypatch.setattr)
    with pytest.raises(ValueError, match="32² slices with crop 'none' and 'nearest' masks; this run reads 64²"):
        loop.load_dataset(dataclasses.replace(cfg.data, image_size=64))
    with pytest.raises(ValueError, match="this run reads 32² slices with crop 'brain'"):
        loop.load_dataset(dataclasses.replace(cfg.data, crop="brain"))
    with pytest.raises(ValueError, match="this run reads 32² slices with crop 'none' and 'area' masks"):
        loop.load_dataset(dataclasses.replace(cfg.data, mask_resize="area"))
