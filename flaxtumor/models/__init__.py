"""Models: the ResNet backbone (two layouts) and its ImageNet weights, the tumour classifier, the ResUNet, Grad-CAM."""

from __future__ import annotations

from flax import nnx

from flaxtumor.config import Config, ModelConfig
from flaxtumor.models.classifier import TumourClassifier, load_backbone, set_phase
from flaxtumor.models.gradcam import gradcam
from flaxtumor.models.resnet import ResNet, ResNet50, _ResNet1
from flaxtumor.models.resunet import ResUNet
from flaxtumor.models.weights import WeightsError, load_resnet50, read_metadata

__all__ = [
    "ResNet", "ResNet50", "ResUNet", "TumourClassifier", "WeightsError", "build_classifier", "build_model",
    "build_segmenter", "gradcam", "load_backbone", "load_resnet50", "read_metadata", "set_phase",
]


def build_classifier(model_cfg: ModelConfig, rngs: nnx.Rngs) -> TumourClassifier:
    """Random-init classifier; load ImageNet weights into it with `load_backbone`."""
    if model_cfg.backbone == "resnet50":
        backbone = ResNet50(layout=model_cfg.backbone_layout, rngs=rngs)
    elif model_cfg.backbone == "resnet_tiny":
        backbone = _ResNet1(layout=model_cfg.backbone_layout, rngs=rngs)
    else:
        raise ValueError(f"unknown backbone {model_cfg.backbone!r}; expected 'resnet50' or 'resnet_tiny'")
    return TumourClassifier(backbone, model_cfg.head_widths, model_cfg.dropout, rngs=rngs)


def build_segmenter(model_cfg: ModelConfig, rngs: nnx.Rngs) -> ResUNet:
    return ResUNet(model_cfg.resunet_widths, rngs=rngs)


def build_model(cfg: Config, rngs: nnx.Rngs) -> TumourClassifier | ResUNet:
    """The model `cfg.train.task` trains: "cls" -> TumourClassifier, "seg" -> ResUNet."""
    if cfg.train.task == "cls":
        return build_classifier(cfg.model, rngs)
    if cfg.train.task == "seg":
        return build_segmenter(cfg.model, rngs)
    raise ValueError(f"unknown task {cfg.train.task!r}; expected 'cls' or 'seg'")
