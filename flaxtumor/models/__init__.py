"""Models: the ResNet backbone (two layouts) and its ImageNet weights, the tumour classifier, the segmenters (ResUNet,
ResNet50-UNet), Grad-CAM."""

from __future__ import annotations

from flax import nnx

from flaxtumor.config import Config, ModelConfig
from flaxtumor.data.preprocess import CHANNELS, input_channels
from flaxtumor.models.classifier import TumourClassifier, load_backbone, set_phase
from flaxtumor.models.gradcam import gradcam
from flaxtumor.models.resnet import ResNet, ResNet50, _ResNet1
from flaxtumor.models.resnet_unet import ResNet50UNet, ResNetUNet, _ResNet1UNet
from flaxtumor.models.resunet import ResUNet
from flaxtumor.models.weights import WeightsError, load_resnet50, read_metadata

__all__ = [
    "ResNet", "ResNet50", "ResNetUNet", "ResUNet", "TumourClassifier", "WeightsError", "build_classifier", "build_model",
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
    return TumourClassifier(backbone, model_cfg.head_widths, model_cfg.dropout, rngs=rngs, pool=model_cfg.head_pool)


def build_segmenter(model_cfg: ModelConfig, rngs: nnx.Rngs, in_channels: int = CHANNELS) -> ResUNet | ResNetUNet:
    """`in_channels`: 3, or 3(2K+1) for K context slices (2.5D input; the ResUNet only)."""
    if model_cfg.segmenter == "resunet":
        return ResUNet(model_cfg.resunet_widths, in_channels, rngs=rngs, deep_supervision=model_cfg.deep_supervision)
    if model_cfg.deep_supervision:
        raise ValueError(f"deep supervision is built for the 'resunet' segmenter only, not {model_cfg.segmenter!r}")
    if in_channels != CHANNELS:  # its encoder's stem is the classifier's ResNet: 3 input channels
        raise ValueError(f"context slices ({in_channels} input channels) are built for the 'resunet' segmenter only, "
                         f"not {model_cfg.segmenter!r}")
    if model_cfg.segmenter == "resnet50_unet":
        return ResNet50UNet(rngs=rngs)
    if model_cfg.segmenter == "resnet_tiny_unet":
        return _ResNet1UNet(rngs=rngs)
    raise ValueError(f"unknown segmenter {model_cfg.segmenter!r}; expected 'resunet', 'resnet50_unet' or 'resnet_tiny_unet'")


def build_model(cfg: Config, rngs: nnx.Rngs) -> TumourClassifier | ResUNet | ResNetUNet:
    """The model `cfg.train.task` trains: "cls" -> TumourClassifier, "seg" -> the configured segmenter."""
    if cfg.train.task == "cls":
        return build_classifier(cfg.model, rngs)
    if cfg.train.task == "seg":
        return build_segmenter(cfg.model, rngs, input_channels(cfg.data.context_slices))
    raise ValueError(f"unknown task {cfg.train.task!r}; expected 'cls' or 'seg'")
