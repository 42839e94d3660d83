import json
import subprocess
import sys
from pathlib import Path

import pytest

from flaxtumor.train.cli import FIELDS, build_parser, main, make_config

REPO = Path(__file__).resolve().parents[2]


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
    for flag in ("--task", "--data", "--out", "--epochs", "--batch-size", "--image-size", "--lr", "--seed", "--split",
                 "--backbone-weights", "--resume", "--precision", "--config", "--loss", "--workers", "--patience"):
        assert flag in text


def test_missing_data_is_one_clear_line_and_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--task", "seg", "--data", str(tmp_path / "nowhere")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "mateuszbuda/lgg-mri-segmentation" in line and "--data synthetic" in line


def test_task_and_data_are_required(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--task", "seg"])
    assert exit_.value.code == 2
    assert "--data" in capsys.readouterr().err


def test_flags_override_the_config_file(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"train": {"epochs": 7, "lr": 0.5, "task": "cls"}, "data": {"image_size": 64}}))
    args = build_parser().parse_args(["--config", str(config), "--epochs", "3", "--no-augment", "--widths", "8,16",
                                      "--set", "data.rotate_degrees=5"])
    cfg = make_config(args)
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.task, cfg.data.image_size) == (3, 0.5, "cls", 64)
    assert cfg.data.augment is False and cfg.model.resunet_widths == (8, 16) and cfg.data.rotate_degrees == 5
    assert cfg.train.out_dir == "runs/cls"
    assert set(FIELDS.values()) <= {f"{s}.{k}" for s, d in cfg.to_dict().items() for k in d}


def test_bad_config_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"train": {"epochz": 7}}))
    assert main(["--config", str(config)]) == 2
    assert "unknown field" in capsys.readouterr().err


@pytest.mark.parametrize(("layout", "normalisation"), [("keras", "caffe"), ("torchvision", "imagenet")])
def test_converted_weights_set_layout_and_normalisation(tmp_path, layout, normalisation):
    from flaxtumor.models.weights import FORMAT, METADATA_FILE

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / METADATA_FILE).write_text(json.dumps({"format": FORMAT, "layout": layout, "normalisation": normalisation}))
    args = build_parser().parse_args(["--task", "cls", "--data", "synthetic", "--backbone-weights", str(weights)])
    cfg = make_config(args)
    assert (cfg.model.backbone_layout, cfg.data.normalisation) == (layout, normalisation)
    # An explicit --normalisation still wins; the layout never can differ from the weights'.
    args = build_parser().parse_args(["--task", "cls", "--data", "synthetic", "--backbone-weights", str(weights),
                                      "--normalisation", "image_zscore"])
    assert make_config(args).data.normalisation == "image_zscore"


def test_fold_and_sampling_flags_set_the_config(capsys):
    args = build_parser().parse_args(["--task", "seg", "--data", "synthetic", "--fold", "2", "--folds", "3",
                                      "--sampling", "tumour", "--uniform-share", "0.2", "--samples-per-epoch", "64"])
    cfg = make_config(args)
    assert (cfg.data.fold, cfg.data.folds) == (2, 3)
    assert (cfg.data.sampling, cfg.data.sampling_uniform_share, cfg.data.samples_per_epoch) == ("tumour", 0.2, 64)
    assert make_config(build_parser().parse_args(["--task", "seg", "--data", "synthetic"])).data.fold is None
    for bad, message in ((["--fold", "3", "--folds", "3"], "outside 0..2"), (["--fold", "0", "--split", "s.json"],
                         "exclude each other"), (["--folds", "1"], "at least 2")):
        assert main(["--task", "seg", "--data", "synthetic", *bad]) == 2
        assert message in capsys.readouterr().err
    assert make_config(build_parser().parse_args(["--task", "seg", "--data", "synthetic", "--fold", "all"])).data.fold \
        == "all"  # nnU-Net's all fold: every patient trains (tests/train/test_selection.py)
    assert main(["--task", "seg", "--data", "synthetic", "--fold", "all", "--split", "s.json"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--task", "seg", "--data", "synthetic", "--fold", "every"])
    assert "a fold number or 'all'" in capsys.readouterr().err


def test_deep_supervision_and_crop_flags_set_the_config_and_default_off():
    def parse(*argv):
        return make_config(build_parser().parse_args(["--task", "seg", "--data", "synthetic", *argv]))

    plain = parse()
    assert plain.model.deep_supervision is False and plain.data.crop == "none"
    on = parse("--deep-supervision", "--crop", "brain")
    assert on.model.deep_supervision is True and on.data.crop == "brain"
    with pytest.raises(SystemExit):
        parse("--crop", "skull")


def test_context_slices_flag_sets_the_config_defaults_to_zero_and_is_refused_where_it_cannot_apply(capsys):
    def parse(*argv):
        return make_config(build_parser().parse_args(["--data", "synthetic", *argv]))

    assert parse("--task", "seg").data.context_slices == 0
    assert parse("--task", "seg", "--context-slices", "2").data.context_slices == 2
    with pytest.raises(ValueError, match="--context-slices"):
        parse("--task", "seg", "--context-slices", "-1")
    for bad in (["--task", "cls"], ["--task", "seg", "--segmenter", "resnet50_unet"]):
        assert main(["--data", "synthetic", "--context-slices", "1", *bad]) == 2
        assert "--context-slices 1" in capsys.readouterr().err
