"""One typed config for the whole project.

A `Config` is saved as JSON beside every checkpoint, so inference, evaluation and the app rebuild exactly what training
used. CLI flags override fields with dotted names (`data.image_size=128`).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Normalisation = Literal["image_zscore", "volume_zscore", "imagenet", "caffe"]
Task = Literal["cls", "seg"]
ALL_FOLDS = "all"  # `data.fold` for nnU-Net's "all" fold: every patient trains, none validates


@dataclass
class DataConfig:
    root: str = "synthetic"  # a kaggle_3m folder (or its parent), or "synthetic"
    image_size: int = 128  # models see image_size x image_size; probabilities are resized back, then thresholded
    normalisation: Normalisation = "image_zscore"
    # "brain": crop each patient volume (a loose slice alone) to the square around the head before resizing, so
    # image_size pixels go to the head, not the black background (flaxtumor.data.preprocess.crop_box). Issue 11 lever.
    crop: Literal["none", "brain"] = "none"
    # 2.5D input, segmenter only: K neighbouring slices on each side of the patient volume as extra channels, slices
    # i-K..i+K each with its 3 channels (3(2K+1) in all), the nearest slice repeated at the volume's ends
    # (flaxtumor.data.preprocess.stack_context). 0: the slice alone. Issue 11 lever.
    context_slices: int = 0
    # Segmenter training in patches (nnU-Net's way): each augmented, normalised training example is a P x P window of
    # the image_size slice, around a tumour pixel when the slice has one (`augment.patch_window`). A step then costs
    # what a P x P input costs, while validation and inference see whole image_size slices (the ResUNet is fully
    # convolutional). 0: whole slices. Issue 11 lever: 256 slices at the CPU cost per step of 128.
    train_patch: int = 0
    # How the training and validation masks reach image_size. "nearest" (the shipped models' recipe) keeps one input
    # pixel per model pixel; at 2x that pixel lies half an input pixel below and right of the model pixel's centre,
    # while the images are resized centred, so the targets sit half a pixel up and left of the anatomy and a model
    # learns to draw its masks there (the horizontal flip averages the columns' shift away, not the rows').
    # "area": each model pixel's target is the share of it the mask covers (a box filter, centred as the images are):
    # soft, unshifted targets (`preprocess.mask_targets`). Issue 11 lever.
    mask_resize: Literal["nearest", "area"] = "nearest"
    split_file: str | None = None  # JSON of patient ids; made from the seed and fractions when absent
    split_seed: int = 0
    test_fraction: float = 0.15  # Buda et al.: 85/15 train/test by patient
    val_fraction: float = 0.15  # carved out of the train patients
    # Augmentation (train only), after Buda et al.: rotation, scaling, horizontal flip; plus intensity jitter.
    augment: bool = True
    rotate_degrees: float = 15.0
    scale_range: tuple[float, float] = (0.95, 1.05)
    flip_probability: float = 0.5
    intensity_jitter: float = 0.1
    # Missing sequences (`augment.drop_sequences`): the probability that a training example lacks pre-contrast,
    # post-contrast or both (equally likely), replaced by FLAIR as kaggle_3m fills a sequence a patient lacks.
    # 0: off. Issue 11 lever.
    missing_sequences: float = 0.0
    num_workers: int = 0  # grain worker processes; 0 decodes in the main process
    # Training sampler. "all": every slice once per epoch, shuffled. "tumour": slices drawn with replacement with
    # p = (1 - u) * area / sum(area) + u / N (Buda et al. 2019 use u ~ 0.09, per patient), u = sampling_uniform_share.
    sampling: Literal["all", "tumour"] = "all"
    sampling_uniform_share: float = 0.1
    samples_per_epoch: int = 0  # "tumour" only; 0 = twice the number of tumour slices among the training slices
    # Cross-validation: fold K of `folds` patient-level stratified folds; fold K's patients are the validation set.
    # ALL_FOLDS ("all"): every patient trains, with no validation; the run's last epoch is exported.
    fold: int | Literal["all"] | None = None
    folds: int = 5
    cache_decoded: bool = True  # keep decoded, resized uint8 slices in memory: epochs after the first skip TIFF decoding
    synthetic_patients: int = 6
    synthetic_slices: int = 20
    synthetic_seed: int = 0

    def __post_init__(self) -> None:
        k = self.context_slices
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"--context-slices (data.context_slices) must be a whole number >= 0, got {k!r}")
        p = self.train_patch
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= self.image_size:
            raise ValueError(f"--train-patch (data.train_patch) must be a whole number from 0 (whole slices) to "
                             f"--image-size {self.image_size}, got {p!r}")
        if not 0.0 <= self.missing_sequences <= 1.0:
            raise ValueError(f"--missing-sequences (data.missing_sequences) is a probability in [0, 1], got "
                             f"{self.missing_sequences!r}")


@dataclass
class ModelConfig:
    # Classifier: ResNet backbone + the seed's head.
    backbone: Literal["resnet50", "resnet_tiny"] = "resnet50"
    backbone_layout: Literal["torchvision", "keras"] = "torchvision"
    head_widths: tuple[int, ...] = (256, 256)
    head_pool: Literal["avg", "max", "avgmax"] = "avg"  # global pooling before the head (see TumourClassifier)
    dropout: float = 0.3
    unfreeze_last_layers: int = 30  # phase 2: the seed's "last 30 layers", rounded to whole blocks of the last stage
    # Segmenter: "resunet" (widths below), or "resnet50_unet": a U-Net on the classifier's ResNet50 (torchvision
    # layout), whose encoder exports as in-domain backbone weights; "resnet_tiny_unet" is its one-block test twin.
    segmenter: Literal["resunet", "resnet50_unet", "resnet_tiny_unet"] = "resunet"
    resunet_widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    # ResUNet only: 1x1 heads on the decoder's coarser levels, trained with nnU-Net's weighted deep-supervision loss;
    # inference uses the full-resolution output alone. Issue 11 lever.
    deep_supervision: bool = False


@dataclass
class TrainConfig:
    task: Task = "seg"
    out_dir: str | None = None  # run folder (checkpoints, logs); None = runs/<task>
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    schedule: Literal["cosine", "onecycle"] = "cosine"
    grad_clip: float = 1.0
    patience: int = 8  # early stopping, in epochs without a better validation metric
    # Which epoch is exported when the split holds validation patients: "best" on them (and early stopping), or
    # "last" (nnU-Net's fixed schedule: validation is reported, never selected on, so a fold's held-out patients
    # stay unseen by every choice). --fold all always exports the last epoch.
    export_epoch: Literal["best", "last"] = "best"
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    resume: bool = False
    save_every_steps: int = 50  # mid-epoch checkpoints, so a kill loses at most this many steps; 0 = per epoch only
    # Segmentation
    loss: Literal["bce_dice", "focal_tversky"] = "bce_dice"
    # Classification
    class_weight: float | None = None  # weight on the tumour class in BCE; None = unweighted
    backbone_weights: str = "none"  # converted weights (see flaxtumor.convert_weights) or "none" for random init
    init_from: str | None = None  # an exported inference checkpoint of the same architecture to start from
    phase2_epochs: int = 10  # last stage unfrozen; 0 skips phase 2
    phase2_lr_factor: float = 0.1
    phase3_epochs: int = 0  # whole backbone unfrozen after phase 2; the export keeps it only if validation improves
    phase3_lr_factor: float = 0.01
    # Two thresholds, one per task (the old single `threshold` meant either; config files with it still load).
    cls_threshold: float = 0.5  # cls: a slice is called tumour when its tumour probability is >= this
    mask_threshold: float = 0.5  # seg: a pixel is tumour when its probability is >= this
    save_bf16: bool = False  # inference export in bfloat16
    export_dir: str | None = None  # inference checkpoint goes to <export_dir>/{classifier,segmenter}; None = the run folder
    plot: bool = True


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        k = self.data.context_slices
        if k and self.train.task == "cls":
            raise ValueError(f"--context-slices {k}: neighbouring slices are a segmenter input (--task seg); the "
                             "classifier reads one slice, so it must be 0 with --task cls")
        if (p := self.data.train_patch) and self.train.task == "cls":
            raise ValueError(f"--train-patch {p}: patches are a segmenter lever (--task seg); the classifier labels "
                             "whole slices, and a patch may miss the tumour that made its slice's label")
        if p and self.model.segmenter == "resunet" and p % (step := 2 ** (len(self.model.resunet_widths) - 1)):
            raise ValueError(f"--train-patch {p} must be a multiple of {step}: the ResUNet halves it "
                             f"{len(self.model.resunet_widths) - 1} times")
        if k and self.model.segmenter != "resunet":
            raise ValueError(f"--context-slices {k} needs --segmenter resunet: the {self.model.segmenter!r} encoder "
                             "is the classifier's ResNet, whose first convolution takes 3 channels")

    # -- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        return _from_dict(cls, _upgrade(d), "config")

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "Config":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read config JSON ({e})") from None
        return cls.from_dict(raw)

    def override(self, **dotted: Any) -> "Config":
        """Returns a copy with fields replaced, e.g. `override(**{"data.image_size": 64})`."""
        d = self.to_dict()
        for key, value in dotted.items():
            section, _, name = key.partition(".")
            if section not in d or name not in d[section]:
                raise KeyError(f"unknown config field {key!r}")
            d[section][name] = value
        return Config.from_dict(d)


def _upgrade(d: Any) -> Any:
    """A config written before `train.threshold` was split: its value becomes the threshold of the run's task."""
    train = d.get("train") if isinstance(d, dict) else None
    if not isinstance(train, dict) or "threshold" not in train:
        return d
    train = dict(train)
    legacy = train.pop("threshold")
    name = "cls_threshold" if train.get("task", TrainConfig.task) == "cls" else "mask_threshold"
    if name in train and train[name] != legacy:
        raise ValueError(f"config.train: 'threshold' ({legacy}) contradicts {name!r} ({train[name]})")
    train[name] = legacy
    return {**d, "train": train}


def _from_dict(cls: type, d: dict[str, Any], where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
    kwargs = {}
    for name in names & set(d):
        kwargs[name] = _coerce(hints[name], d[name], f"{where}.{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None) and value is None:
                return None
        return value
    if origin is Literal and value not in typing.get_args(tp):
        raise ValueError(f"{where}: {value!r} is not one of {typing.get_args(tp)}")
    return value
