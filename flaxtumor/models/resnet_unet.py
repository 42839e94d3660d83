"""A U-Net whose encoder is the project's ResNet50: in-domain pretraining for the classifier's backbone.

The encoder is the very `ResNet` module the classifier uses (same variable names, torchvision layout), so after
training on the tumour masks its weights export as backbone weights (`flaxtumor.models.weights.export_encoder`) and
the classifier's two-phase transfer recipe starts from them. The decoder is light: at each level a x2 nearest resize,
the encoder skip concatenated, a 1x1 conv-BN-ReLU that narrows the channels (a matmul: cheap on CPU) and a 3x3
conv-BN-ReLU; skips from the stem (H/2) and stages 1-3; one logit channel at input resolution.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flaxtumor.models.layers import BatchNorm, Conv
from flaxtumor.models.resnet import BN_MOMENTUM, ResNet, ResNet50, _ResNet1

DECODER_WIDTHS = (256, 128, 64, 32, 16)  # H/16, H/8, H/4, H/2, H
_PAD = ((1, 1), (1, 1))


class DecoderBlock(nnx.Module):
    """x2 nearest resize -> concat skip -> 1x1 conv-BN-ReLU -> 3x3 conv-BN-ReLU."""

    def __init__(self, in_features: int, skip_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.reduce = Conv(in_features + skip_features, out_features, (1, 1), use_bias=False, rngs=rngs)
        self.bn1 = BatchNorm(out_features, momentum=BN_MOMENTUM, rngs=rngs)
        self.conv = Conv(out_features, out_features, (3, 3), padding=_PAD, use_bias=False, rngs=rngs)
        self.bn2 = BatchNorm(out_features, momentum=BN_MOMENTUM, rngs=rngs)

    def __call__(self, x: jax.Array, skip: jax.Array | None) -> jax.Array:
        n, h, w, c = x.shape
        x = jax.image.resize(x, (n, 2 * h, 2 * w, c), method="nearest")
        if skip is not None:
            x = jnp.concatenate([x, skip], axis=-1)
        x = nnx.relu(self.bn1(self.reduce(x)))
        return nnx.relu(self.bn2(self.conv(x)))


class ResNetUNet(nnx.Module):
    """Images (N, H, W, 3), H and W divisible by 2^(stages+1) -> mask logits (N, H, W, 1)."""

    def __init__(self, encoder: ResNet, decoder_widths: Sequence[int] = DECODER_WIDTHS, *, rngs: nnx.Rngs):
        if encoder.fc is not None:
            raise ValueError("the encoder must have no top (build it with num_classes=None)")
        self.encoder = encoder
        stages = len(encoder.stage_sizes)
        width = encoder.conv_init.out_features
        # Skip widths, deepest first: stages stages-2..0, then the stem.
        skips = [width * 2**i * 4 for i in range(stages - 1)][::-1] + [width]
        widths = tuple(decoder_widths)[-(stages + 1):]
        if len(widths) != stages + 1:
            raise ValueError(f"need {stages + 1} decoder widths for a {stages}-stage encoder, got {decoder_widths}")
        ins = (encoder.num_features, *widths[:-1])
        self.decoder = nnx.List(
            [DecoderBlock(a, s, b, rngs=rngs) for a, s, b in zip(ins, [*skips, 0], widths)]
        )
        self.out = Conv(widths[-1], 1, (1, 1), rngs=rngs)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.encoder.stage_sizes) + 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        if h % self.divisor or w % self.divisor:
            raise ValueError(f"ResNetUNet needs H and W divisible by {self.divisor}; got an input of {h}x{w}")
        stem, *stages = self.encoder.pyramid(x)
        skips = [*stages[:-1][::-1], stem, None]
        x = stages[-1]
        for block, skip in zip(self.decoder, skips):
            x = block(x, skip)
        return self.out(x)


def ResNet50UNet(*, rngs: nnx.Rngs) -> ResNetUNet:
    return ResNetUNet(ResNet50(layout="torchvision", rngs=rngs), rngs=rngs)


def _ResNet1UNet(*, rngs: nnx.Rngs) -> ResNetUNet:
    """A one-block encoder for fast tests: input sides divisible by 4."""
    return ResNetUNet(_ResNet1(layout="torchvision", rngs=rngs), (16, 8), rngs=rngs)
