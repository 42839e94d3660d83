"""Coverage mask targets (`--mask-resize area`, issue 11): the flag reaches the config and the checkpoint, augmentation
keeps coverage soft and binary masks binary, and a run trains on them. Why they exist (nearest-neighbour targets sit
half a pixel off the images): tests/data/test_preprocess.py."""

import json

import numpy as np
import pytest

from flaxtumor.config import Config, DataConfig
from flaxtumor.data.augment import augment
from flaxtumor.data.preprocess import mask_targets
from flaxtumor.train.cli import build_parser, make_config
from flaxtumor.train.cli import main as train_main


def test_the_cli_flag_lands_in_the_config_and_bad_values_are_refused(tmp_path):
    cfg = make_config(build_parser().parse_args(["--task", "seg", "--data", "synthetic", "--mask-resize", "area",
                                                 "--out", str(tmp_path / "run")]))
    assert cfg.data.mask_resize == "area" and Config.from_dict(cfg.to_dict()).data.mask_resize == "area"
    assert Config.from_dict({"data": {}}).data.mask_resize == "nearest"  # configs before the option: the old recipe
    with pytest.raises(ValueError, match="mask_resize: 'bilinear' is not one of"):
        Config.from_dict({"data": {"mask_resize": "bilinear"}})


@pytest.mark.parametrize("mode", ["nearest", "area"])
def test_augmentation_keeps_coverage_soft_and_binary_masks_binary(mode):
    truth = np.zeros((64, 64), bool)
    truth[20:41, 15:36] = True
    mask = mask_targets(truth, (32, 32), mode).astype(np.float32)[..., None]
    image = np.random.default_rng(0).uniform(0, 255, (32, 32, 3)).astype(np.float32)
    cfg = DataConfig(mask_resize=mode, rotate_degrees=15.0)
    for seed in range(4):
        _, moved = augment(image, mask, np.random.default_rng(seed), cfg)
        assert moved.dtype == np.float32 and 0.0 <= moved.min() and moved.max() <= 1.0
        soft = ((moved > 0.01) & (moved < 0.99)).any()
        assert soft if mode == "area" else set(np.unique(moved)) <= {0.0, 1.0}
        # about the same tumour area either way (scaling 0.95-1.05)
        assert abs(moved.sum() - mask.sum()) < 0.15 * mask.sum()


def test_a_run_trains_on_coverage_targets_and_records_them(tmp_path):
    out = tmp_path / "run"
    assert train_main(["--task", "seg", "--data", "synthetic", "--image-size", "32", "--mask-resize", "area",
                       "--widths", "4,8", "--epochs", "1", "--batch-size", "4", "--no-plot", "--out", str(out)]) == 0
    meta = json.loads((out / "segmenter" / "metadata.json").read_text())
    assert meta["config"]["data"]["mask_resize"] == "area"
    assert np.isfinite(meta["history"][-1]["train_loss"])


def test_the_ceiling_tool_scores_perfect_models_of_each_target(synthetic_patients, tmp_path):
    """tools/mask_target_ceiling.py: on the synthetic patients' round blobs, a perfect model of coverage targets
    reaches what nearest-neighbour targets cannot, and the report holds every tumour patient once."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "mask_target_ceiling.py"
    spec = importlib.util.spec_from_file_location("mask_target_ceiling", path)
    tool = sys.modules.setdefault("mask_target_ceiling", importlib.util.module_from_spec(spec))
    spec.loader.exec_module(tool)
    root = synthetic_patients[0].slices[0].image_path.parents[1]
    assert tool.main(["--data", str(root), "--size", "128", "--out", str(tmp_path / "c.json")]) == 0
    report = json.loads((tmp_path / "c.json").read_text())
    with_tumour = sorted(p.patient_id for p in synthetic_patients if any(s.has_tumour for s in p.slices))
    for mode in ("nearest", "area"):
        assert sorted(report[mode]["per_patient_dice"]) == with_tumour
    assert report["area"]["mean"] > 0.98 and report["area"]["mean"] > report["nearest"]["mean"] + 0.01
    assert report["area"]["tumour_slice_dice"] > report["nearest"]["tumour_slice_dice"]
