"""`python train.py`: flags -> Config -> `loop.run`.

Precedence: defaults < --config JSON (or, with --resume, the run folder's config.json) < --set KEY=VALUE < flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from flaxtumor.config import ALL_FOLDS, Config

EPILOG = """\
examples:
  python train.py --task seg --data /data/lgg                    # PATH or PATH/kaggle_3m holds the TCGA_* folders
  python train.py --task cls --data /data/lgg --backbone-weights weights/resnet50
  python train.py --task seg --data synthetic --epochs 2 --image-size 64   # smoke run, no download
  python train.py --task seg --data /data/lgg --resume          # continue runs/seg after an interruption
  python train.py --task seg --data /data/lgg --fold 0 --folds 5 --out runs/cv/fold_0   # one cross-validation fold
  python train.py --config runs/cv/config.json --fold all --epochs N --out runs/cv/fold_all   # every patient, the
                           # cross-validated recipe; N: crossval.json's recommended_epochs (crossval prints the command)
  python train.py --task seg --data /data/lgg --sampling tumour  # slices drawn by tumour area (Buda et al.)

data: download mateuszbuda/lgg-mri-segmentation from Kaggle and unzip it; --data is the folder holding kaggle_3m/
(or the TCGA_* patient folders themselves).

multi-host: start the same command on every host with --coordinator HOST:PORT --num-processes N --process-id I
(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); --batch-size is the global batch.
"""

# flag dest -> dotted config field; a flag left out keeps the config's value.
FIELDS = {
    "task": "train.task",
    "data": "data.root",
    "out": "train.out_dir",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "image_size": "data.image_size",
    "lr": "train.lr",
    "seed": "train.seed",
    "split": "data.split_file",
    "backbone_weights": "train.backbone_weights",
    "init_from": "train.init_from",
    "resume": "train.resume",
    "precision": "train.precision",
    "loss": "train.loss",
    "class_weight": "train.class_weight",
    "patience": "train.patience",
    "export_epoch": "train.export_epoch",
    "phase2_epochs": "train.phase2_epochs",
    "phase2_lr_factor": "train.phase2_lr_factor",
    "phase3_epochs": "train.phase3_epochs",
    "head_pool": "model.head_pool",
    "phase3_lr_factor": "train.phase3_lr_factor",
    "schedule": "train.schedule",
    "weight_decay": "train.weight_decay",
    "grad_clip": "train.grad_clip",
    "cls_threshold": "train.cls_threshold",
    "mask_threshold": "train.mask_threshold",
    "save_every": "train.save_every_steps",
    "export_dir": "train.export_dir",
    "save_bf16": "train.save_bf16",
    "plot": "train.plot",
    "workers": "data.num_workers",
    "normalisation": "data.normalisation",
    "augment": "data.augment",
    "backbone": "model.backbone",
    "widths": "model.resunet_widths",
    "segmenter": "model.segmenter",
    "deep_supervision": "model.deep_supervision",
    "crop": "data.crop",
    "context_slices": "data.context_slices",
    "train_patch": "data.train_patch",
    "missing_sequences": "data.missing_sequences",
    "mask_resize": "data.mask_resize",
    "sampling": "data.sampling",
    "uniform_share": "data.sampling_uniform_share",
    "samples_per_epoch": "data.samples_per_epoch",
    "fold": "data.fold",
    "folds": "data.folds",
}


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return widths


def _fold(text: str) -> int | str:
    if text == ALL_FOLDS:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fold number or '{ALL_FOLDS}', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train the tumour classifier (cls) or segmenter (seg) on LGG MRI slices. Research use only.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=None,
    )
    d = Config()  # defaults shown in --help come from the config itself
    a = p.add_argument
    a("--task", choices=["cls", "seg"],
      help="cls: slice-level tumour classifier (ResNet50); seg: tumour masks (--segmenter)")
    a("--segmenter", choices=["resunet", "resnet50_unet", "resnet_tiny_unet"],
      help=f"seg architecture (default {d.model.segmenter}); resnet50_unet's encoder is the classifier's ResNet50 "
           "and exports as in-domain backbone weights (python -m flaxtumor.convert_weights RUN/segmenter DST)")
    a("--data", metavar="PATH|synthetic",
      help="folder holding kaggle_3m/ or the TCGA_* folders; 'synthetic' makes a small fake set")
    a("--out", metavar="DIR",
      help="run folder: checkpoints, config.json, metrics.jsonl, curves.png (default runs/<task>)")
    a("--epochs", type=int, metavar="N", help=f"epochs (cls: of phase 1) (default {d.train.epochs})")
    a("--batch-size", type=int, metavar="B",
      help=f"global batch, split over all devices (default {d.train.batch_size})")
    a("--image-size", type=int, metavar="S", help=f"slices are resized to S x S (default {d.data.image_size})")
    a("--lr", type=float, help=f"peak learning rate (default {d.train.lr:g})")
    a("--seed", type=int, help=f"seed for init, shuffling, augmentation and dropout (default {d.train.seed})")
    a("--split", metavar="FILE", help="JSON of train/val/test patient ids (default: made from data.split_seed)")
    a("--backbone-weights", metavar="DIR|none",
      help="cls: converted ImageNet ResNet50 (python -m flaxtumor.convert_weights); with it cls trains the head on the "
      "frozen backbone, then also the last stage; 'none' trains a random network whole (default none)")
    a("--init-from", metavar="DIR",
      help="start from an exported inference checkpoint of the same architecture (e.g. runs/cls/classifier): a new run "
      "with a fresh optimizer and schedule, for fine-tuning or training longer")
    a("--resume", action="store_true", default=None,
      help="continue the run in --out exactly where its last checkpoint left off")
    a("--precision", choices=["fp32", "bf16"],
      help="bf16: bfloat16 compute, float32 master weights (GPUs) (default fp32)")
    a("--config", metavar="FILE", help="a config JSON (e.g. a run's config.json); flags override it")
    a("--set", action="append", default=[], metavar="KEY=VALUE",
      help="override any config field, e.g. data.rotate_degrees=10 (values are JSON)")
    _optimisation_args(p, d)
    _model_and_data_args(p, d)
    _run_args(p, d)
    return p


def _optimisation_args(p: argparse.ArgumentParser, d: Config) -> None:
    a = p.add_argument_group("losses and optimisation").add_argument
    a("--loss", choices=["bce_dice", "focal_tversky"], help=f"seg loss (default {d.train.loss})")
    a("--class-weight", type=float, metavar="W", help="cls: weight on tumour slices in the BCE (default unweighted)")
    a("--patience", type=int, metavar="N",
      help=f"early stopping: epochs without a better validation metric; none with --fold all (default "
           f"{d.train.patience})")
    a("--export-epoch", choices=["best", "last"],
      help="the epoch exported when validation patients exist: the best on them (with early stopping), or the last "
           f"of a fixed schedule, validation only reported (default {d.train.export_epoch})")
    a("--phase2-epochs", type=int, metavar="N",
      help=f"cls: epochs with the last stage unfrozen; 0 skips (default {d.train.phase2_epochs})")
    a("--phase2-lr-factor", type=float, metavar="F",
      help=f"cls: phase-2 LR = lr x F (default {d.train.phase2_lr_factor})")
    a("--head-pool", choices=["avg", "max", "avgmax"],
      help=f"cls: global pooling before the head; max suits 'a lesion anywhere' (default {d.model.head_pool})")
    a("--phase3-epochs", type=int, metavar="N",
      help="cls: then epochs with the whole backbone unfrozen; the best checkpoint over all phases is exported, so "
           f"phase 3 is kept only if validation improves (default {d.train.phase3_epochs}: off)")
    a("--phase3-lr-factor", type=float, metavar="F",
      help=f"cls: phase-3 LR = lr x F (default {d.train.phase3_lr_factor})")
    a("--schedule", choices=["cosine", "onecycle"],
      help=f"warmup + cosine decay, or one-cycle (default {d.train.schedule})")
    a("--weight-decay", type=float, metavar="WD", help=f"AdamW decay on kernels (default {d.train.weight_decay:g})")
    a("--grad-clip", type=float, metavar="NORM", help=f"global-norm gradient clipping (default {d.train.grad_clip})")
    a("--cls-threshold", type=float, metavar="T",
      help=f"cls: tumour-probability threshold for metrics and inference (default {d.train.cls_threshold})")
    a("--mask-threshold", type=float, metavar="T",
      help=f"seg: mask-probability threshold for metrics and inference (default {d.train.mask_threshold})")


def _model_and_data_args(p: argparse.ArgumentParser, d: Config) -> None:
    a = p.add_argument_group("model and data").add_argument
    a("--backbone", choices=["resnet50", "resnet_tiny"], help="cls backbone (resnet_tiny: tests only)")
    a("--widths", type=_widths, metavar="W1,W2,...",
      help=f"seg ResUNet widths per level (default {','.join(map(str, d.model.resunet_widths))})")
    a("--deep-supervision", action="store_true", default=None,
      help="seg ResUNet: 1x1 output heads on the coarser decoder levels, trained with nnU-Net's deep-supervision loss "
      "(weights halving per level, masks max-pooled); inference uses the full-resolution output only. A lever of "
      "issue 11, screened on fold 0 and not adopted (checkpoints/MODEL_CARD.md; default off)")
    a("--crop", choices=["none", "brain"],
      help="none: resize the whole slice to --image-size; brain: first crop each patient volume to the square around "
      "the head (pixels above a small intensity, plus a margin), recorded in the checkpoint so inference crops and "
      "maps masks back the same way. A lever of issue 11, screened on fold 0 (checkpoints/MODEL_CARD.md; default none)")
    a("--context-slices", type=int, metavar="K",
      help="seg ResUNet, 2.5D input: each slice with its K neighbouring slices on each side of the patient volume as "
      "extra channels (3(2K+1) in all; the nearest slice repeats at the volume's ends), recorded in the checkpoint "
      "so inference stacks the same neighbours; a lone slice is its own neighbours, with a warning. A lever of "
      f"issue 11, screened on fold 0 and not adopted (checkpoints/MODEL_CARD.md; default {d.data.context_slices}: the slice alone)")
    a("--train-patch", type=int, metavar="P",
      help="seg: train on P x P windows of the --image-size slices (around a tumour pixel when the slice has one, "
      "anywhere otherwise), so --image-size 256 --train-patch 128 costs per step what 128 did; validation and "
      "inference see whole slices. A lever of issue 11, screened on fold 0 and not adopted "
      "(checkpoints/MODEL_CARD.md; default 0: whole slices)")
    a("--missing-sequences", type=float, metavar="P",
      help="training augmentation: with probability P an example lacks pre-contrast, post-contrast or both, "
      "replaced by FLAIR as kaggle_3m fills a sequence a patient lacks (9 of its 81 patients here), so the model "
      "learns to read such patients. A lever of issue 11 (checkpoints/MODEL_CARD.md; default 0: off)")
    a("--mask-resize", choices=["nearest", "area"],
      help="how masks become training targets at --image-size: 'nearest' keeps one input pixel per model pixel, half "
      "a pixel off the resized images' centres at 2x, so models learn shifted outlines; 'area' gives each model "
      "pixel the share of it the mask covers (soft, unshifted). A lever of issue 11 "
      f"(checkpoints/MODEL_CARD.md; default {d.data.mask_resize}, the shipped recipe)")
    a("--normalisation", choices=["image_zscore", "volume_zscore", "imagenet", "caffe"],
      help=f"intensity normalisation (default {d.data.normalisation}; with --backbone-weights, the weights' own)")
    a("--no-augment", dest="augment", action="store_false", default=None, help="turn training augmentation off")
    a("--workers", type=int, metavar="N", help="grain worker processes decoding images (default 0: in-process)")
    a("--sampling", choices=["all", "tumour"],
      help="all: every training slice once per epoch, shuffled; tumour: draw slices with replacement with p = "
      "(1-u)*area/sum(area) + u/N (tumour pixels per slice) (default all)")
    a("--uniform-share", type=float, metavar="U",
      help=f"--sampling tumour: the uniform share u in [0, 1] (default {d.data.sampling_uniform_share:g})")
    a("--samples-per-epoch", type=int, metavar="N",
      help="--sampling tumour: slices drawn per epoch (default 0 = twice the number of training tumour slices)")


def _run_args(p: argparse.ArgumentParser, d: Config) -> None:
    """Cross-validation, checkpoints and output, multi-host."""
    a = p.add_argument_group("cross-validation").add_argument
    a("--fold", type=_fold, metavar="K|all",
      help="train fold K (0-based) of --folds patient-level folds stratified by tumour share: fold K's patients are "
      "the validation set, all others train (excludes --split); python -m flaxtumor.crossval runs every fold. "
      "'all' (nnU-Net's all fold): every patient trains and none validates, so there is no early stopping and no "
      "best epoch: the run trains exactly --epochs epochs and exports the last; take --epochs from the "
      "cross-validation (crossval.json's recommended_epochs)")
    a("--folds", type=int, metavar="N", help=f"number of folds for --fold (default {d.data.folds})")
    a = p.add_argument_group("checkpoints and output").add_argument
    a("--save-every", type=int, metavar="STEPS",
      help=f"also checkpoint every STEPS steps mid-epoch; 0 = per epoch only (default {d.train.save_every_steps})")
    a("--export-dir", metavar="DIR",
      help="write the inference checkpoint to DIR/{classifier,segmenter} (default: the run folder)")
    a("--save-bf16", action="store_true", default=None, help="export the inference weights in bfloat16")
    a("--no-plot", dest="plot", action="store_false", default=None, help="skip curves.png")
    a = p.add_argument_group("multi-host (jax.distributed)").add_argument
    a("--coordinator", metavar="HOST:PORT", help="address of process 0 (or JAX_COORDINATOR_ADDRESS)")
    a("--num-processes", type=int, metavar="N", help="processes in the run (or JAX_NUM_PROCESSES)")
    a("--process-id", type=int, metavar="I", help="this process's rank (or JAX_PROCESS_ID)")


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw  # a bare string, e.g. data.normalisation=imagenet
    return out


def make_config(args: argparse.Namespace) -> Config:
    """The run's config from the parsed flags (see the precedence in the module docstring)."""
    given = {FIELDS[k]: v for k, v in vars(args).items() if k in FIELDS and v is not None}
    base = Config.from_json(args.config) if args.config else Config()
    if args.resume and not args.config:
        task = given.get("train.task", base.train.task)
        out = Path(given.get("train.out_dir") or base.train.out_dir or f"runs/{task}")
        if (out / "config.json").is_file():
            base = Config.from_json(out / "config.json")
    config = base.override(**_parse_set(args.set), **given)
    _check_fold(config)
    if config.train.out_dir is None:
        config = config.override(**{"train.out_dir": f"runs/{config.train.task}"})
    if config.train.task == "cls" and config.train.backbone_weights != "none":
        from flaxtumor.models import read_metadata  # the weights say their layout and how their inputs were normalised

        weights = read_metadata(config.train.backbone_weights)
        config = config.override(**{"model.backbone_layout": weights["layout"]})
        if "data.normalisation" not in given:
            config = config.override(**{"data.normalisation": weights["normalisation"]})
    return config


def _check_fold(config: Config) -> None:
    fold, folds = config.data.fold, config.data.folds
    if folds < 2:
        raise ValueError(f"--folds must be at least 2, got {folds}")
    if fold is not None and fold != ALL_FOLDS and not 0 <= fold < folds:
        raise ValueError(f"--fold {fold} is outside 0..{folds - 1} (folds are numbered from 0)")
    if fold is not None and config.data.split_file:
        raise ValueError("--fold and --split exclude each other: a fold makes its own split")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.resume and not args.config and (args.task is None or args.data is None):
        parser.error("--task and --data are required (unless --config or --resume supplies them)")
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flaxtumor").setLevel(logging.INFO)

    # Imported here so `--help` and flag errors stay instant (no jax start-up).
    import jax

    from flaxtumor.runtime import enable_compilation_cache

    enable_compilation_cache()  # a resumed or repeated run skips compiling its train and eval steps
    from flaxtumor.data.io import DataError
    from flaxtumor.data.lgg import resolve_root
    from flaxtumor.models import WeightsError
    from flaxtumor.train import loop
    from flaxtumor.checkpoints import CheckpointError
    from flaxtumor.train.sharding import initialize_distributed

    try:
        config = make_config(args)
    except (ValueError, KeyError) as e:  # bad --config file, --set key or value
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if config.data.root != "synthetic":
            resolve_root(config.data.root)  # fail before any compile when the data is missing
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        loop.run(config)
    except (DataError, WeightsError, CheckpointError, loop.RunExists) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except loop.NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
