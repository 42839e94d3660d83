"""ResNet v1 / v1.5 in Flax NNX, in the two layouts that published ImageNet weights use.

One module serves both layouts; they differ only in where a bottleneck's stride sits, conv biases and the BN epsilon:

- ``"torchvision"`` (torchvision and timm ``resnet50``, "v1.5"): stride on the 3x3 conv, convs without bias, eps 1e-5.
- ``"keras"`` (``keras.applications.ResNet50``, v1): stride on the first 1x1 conv, convs with bias, eps 1.001e-5.

Padding is explicit and symmetric, exactly as torch pads (and as Keras' ``ZeroPadding2D`` does); flax's ``"SAME"``
pads strided convs asymmetrically and would break parity with converted weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flaxtumor.models.layers import BatchNorm, Conv

LayoutName = Literal["torchvision", "keras"]
# flax's momentum weighs the old value: torch's momentum=0.1 (and Keras' 0.99 would be too slow to fine-tune) -> 0.9.
BN_MOMENTUM = 0.9
_PAD_3x3 = ((1, 1), (1, 1))
_PAD_STEM = ((3, 3), (3, 3))


@dataclass(frozen=True)
class Layout:
    name: LayoutName
    stride_on_3x3: bool
    conv_bias: bool
    bn_epsilon: float
    normalisation: Literal["imagenet", "caffe"]  # the input preprocessing that weights of this layout expect


LAYOUTS: dict[str, Layout] = {
    "torchvision": Layout(
        "torchvision", stride_on_3x3=True, conv_bias=False, bn_epsilon=1e-5, normalisation="imagenet"
    ),
    "keras": Layout("keras", stride_on_3x3=False, conv_bias=True, bn_epsilon=1.001e-5, normalisation="caffe"),
}


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown ResNet layout {name!r}; expected one of {sorted(LAYOUTS)}")
    return LAYOUTS[name]


def _conv_bn(layout: Layout, rngs: nnx.Rngs) -> tuple[partial, partial]:
    conv = partial(Conv, use_bias=layout.conv_bias, rngs=rngs)
    # Two-pass variance: the one-pass formula drifts from torch's in train mode.
    bn = partial(BatchNorm, momentum=BN_MOMENTUM, epsilon=layout.bn_epsilon, use_fast_variance=False, rngs=rngs)
    return conv, bn


class Bottleneck(nnx.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4), plus a projected shortcut when the shape changes."""

    expansion = 4

    def __init__(self, in_features: int, features: int, strides: int, layout: Layout, *, rngs: nnx.Rngs):
        conv, bn = _conv_bn(layout, rngs)
        out_features = features * self.expansion
        stride_1x1, stride_3x3 = (1, strides) if layout.stride_on_3x3 else (strides, 1)
        self.conv1 = conv(in_features, features, (1, 1), strides=stride_1x1, padding="VALID")
        self.bn1 = bn(features)
        self.conv2 = conv(features, features, (3, 3), strides=stride_3x3, padding=_PAD_3x3)
        self.bn2 = bn(features)
        self.conv3 = conv(features, out_features, (1, 1), padding="VALID")
        self.bn3 = bn(out_features)
        if strides != 1 or in_features != out_features:
            self.proj_conv = conv(in_features, out_features, (1, 1), strides=strides, padding="VALID")
            self.proj_bn = bn(out_features)
        else:
            self.proj_conv = self.proj_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.proj_conv is None else self.proj_bn(self.proj_conv(x))
        return nnx.relu(y + shortcut)


class ResNet(nnx.Module):
    """Bottleneck ResNet on NHWC input. ``__call__`` gives pooled features (N, 16*width) or, with a top, logits.

    Variable paths: ``conv_init``/``bn_init`` (stem), ``stages[i][j]`` (bottleneck j of stage i), ``fc`` (top).
    """

    def __init__(
        self,
        stage_sizes: Sequence[int],
        *,
        layout: LayoutName = "torchvision",
        width: int = 64,
        num_classes: int | None = None,
        rngs: nnx.Rngs,
    ):
        self.layout = get_layout(layout)
        self.stage_sizes = tuple(stage_sizes)
        conv, bn = _conv_bn(self.layout, rngs)
        self.conv_init = conv(3, width, (7, 7), strides=2, padding=_PAD_STEM)
        self.bn_init = bn(width)
        stages = []
        in_features = width
        for i, size in enumerate(self.stage_sizes):
            features = width * 2**i
            blocks = []
            for j in range(size):
                strides = 2 if i > 0 and j == 0 else 1
                blocks.append(Bottleneck(in_features, features, strides, self.layout, rngs=rngs))
                in_features = features * Bottleneck.expansion
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.num_features = in_features
        self.fc = nnx.Linear(in_features, num_classes, rngs=rngs) if num_classes else None

    def pyramid(self, x: jax.Array) -> list[jax.Array]:
        """The stem's activations (N, H/2, W/2, width) and every stage's output (stage i at H/2^(i+2)): the skips of an
        encoder-decoder, the last one what the classifier pools."""
        x = nnx.relu(self.bn_init(self.conv_init(x)))
        levels = [x]
        # After the ReLU, padding with -inf (torch) and with zeros (Keras' ZeroPadding2D) give the same max.
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=_PAD_3x3)
        for stage in self.stages:
            for block in stage:
                x = block(x)
            levels.append(x)
        return levels

    def run_stages(self, x: jax.Array, first: int) -> jax.Array:
        """Stages `first`.. applied to stage `first - 1`'s output: the rest of the network from an inner level."""
        for stage in self.stages[first:]:
            for block in stage:
                x = block(x)
        return x

    def feature_map(self, x: jax.Array) -> jax.Array:
        """The last stage's activations (N, H/32, W/32, C) for a 4-stage net: what Grad-CAM looks at."""
        return self.pyramid(x)[-1]

    def __call__(self, x: jax.Array) -> jax.Array:
        features = jnp.mean(self.feature_map(x), axis=(1, 2))
        return features if self.fc is None else self.fc(features)


def ResNet50(*, layout: LayoutName = "torchvision", num_classes: int | None = None, rngs: nnx.Rngs) -> ResNet:
    return ResNet((3, 4, 6, 3), layout=layout, num_classes=num_classes, rngs=rngs)


def _ResNet1(
    *, layout: LayoutName = "torchvision", width: int = 8, num_classes: int | None = None, rngs: nnx.Rngs
) -> ResNet:
    """A one-block ResNet for fast tests (as in google/flax examples/imagenet)."""
    return ResNet((1,), layout=layout, width=width, num_classes=num_classes, rngs=rngs)
