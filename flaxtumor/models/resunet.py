"""Residual U-Net for tumour masks: one logit channel at input resolution.

``widths`` gives the channels per level; ``len(widths) - 1`` poolings, so H and W must divide by ``2**(len(widths)-1)``.
`CLASSIC_WIDTHS` (16..256, ~2 M params) is the default; `WIDE_WIDTHS` (32..512, ~8 M) the wider variant.
The decoder upsamples with nearest resize + 3x3 conv: transposed convs are very slow on XLA:CPU (jax#23783).
``in_channels`` is 3 for one slice, 3(2K+1) for the 2.5D input (the slice and K neighbours on each side, see
`flaxtumor.data.preprocess.stack_context`); only the first block's input convolutions (conv1 and its projected
shortcut) depend on it.

Deep supervision (`deep_supervision=True`, off by default): a 1x1 head on each coarser decoder level, whose logits
`deep_logits` returns beside the full-resolution ones for the training loss (`flaxtumor.train.losses.deep_supervised`).
`__call__` is the same either way (full resolution only), so validation, export and serving never see the heads; and
without the option the module has no head at all, so its parameters are exactly those of checkpoints made before it.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flaxtumor.models.layers import BatchNorm, Conv
from flaxtumor.models.resnet import BN_MOMENTUM

CLASSIC_WIDTHS = (16, 32, 64, 128, 256)
WIDE_WIDTHS = (32, 64, 128, 256, 512)
_PAD = ((1, 1), (1, 1))


def _conv3x3(in_features: int, out_features: int, rngs: nnx.Rngs) -> nnx.Conv:
    return Conv(in_features, out_features, (3, 3), padding=_PAD, use_bias=False, rngs=rngs)


def _bn(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return BatchNorm(features, momentum=BN_MOMENTUM, rngs=rngs)


class ResidualBlock(nnx.Module):
    """conv-BN-ReLU -> conv-BN, plus a 1x1-conv-BN projected shortcut when the width changes, then ReLU."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.conv1 = _conv3x3(in_features, out_features, rngs)
        self.bn1 = _bn(out_features, rngs)
        self.conv2 = _conv3x3(out_features, out_features, rngs)
        self.bn2 = _bn(out_features, rngs)
        if in_features != out_features:
            self.proj_conv = Conv(in_features, out_features, (1, 1), use_bias=False, rngs=rngs)
            self.proj_bn = _bn(out_features, rngs)
        else:
            self.proj_conv = self.proj_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.proj_conv is None else self.proj_bn(self.proj_conv(x))
        return nnx.relu(y + shortcut)


class Upsample(nnx.Module):
    """x2 nearest resize -> 3x3 conv-BN-ReLU (instead of a transposed conv)."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.conv = _conv3x3(in_features, out_features, rngs)
        self.bn = _bn(out_features, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        x = jax.image.resize(x, (n, 2 * h, 2 * w, c), method="nearest")
        return nnx.relu(self.bn(self.conv(x)))


class ResUNet(nnx.Module):
    def __init__(self, widths: Sequence[int] = CLASSIC_WIDTHS, in_channels: int = 3, *, rngs: nnx.Rngs,
                 deep_supervision: bool = False):
        if len(widths) < 2:
            raise ValueError(f"ResUNet needs at least two widths (one pooling), got {tuple(widths)}")
        self.widths = tuple(widths)
        self.in_channels = in_channels
        *levels, bottom = self.widths
        ins = (in_channels, *levels[:-1])
        self.encoder = nnx.List([ResidualBlock(a, b, rngs=rngs) for a, b in zip(ins, levels)])
        self.bottleneck = ResidualBlock(levels[-1], bottom, rngs=rngs)
        # Decoder, deepest level first: upsample to the skip's width, concatenate, merge back to that width.
        ups = (bottom, *levels[:0:-1])
        self.upsamples = nnx.List([Upsample(a, b, rngs=rngs) for a, b in zip(ups, levels[::-1])])
        self.decoder = nnx.List([ResidualBlock(2 * b, b, rngs=rngs) for b in levels[::-1]])
        self.out = Conv(levels[0], 1, (1, 1), rngs=rngs)
        if deep_supervision:  # coarsest first, as the decoder runs; set only when on (old checkpoints have none)
            self.aux_heads = nnx.List([Conv(b, 1, (1, 1), rngs=rngs) for b in levels[:0:-1]])

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.widths) - 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Images (N, H, W, in_channels) -> mask logits (N, H, W, 1)."""
        return self.out(self._decode(x)[-1])

    def deep_logits(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """Training with deep supervision: the full-resolution logits (as `__call__`), then each coarser decoder level's
        from its head, finest first: (N, H, W, 1), (N, H/2, W/2, 1), ... down to 1/2**(len(widths)-2)."""
        if not hasattr(self, "aux_heads"):
            raise ValueError("this ResUNet was built without deep_supervision: it has no auxiliary heads")
        levels = self._decode(x)
        aux = [head(f) for head, f in zip(self.aux_heads, levels[:-1])]
        return (self.out(levels[-1]), *aux[::-1])

    def _decode(self, x: jax.Array) -> list[jax.Array]:
        """The decoder's output at every level, coarsest (H/2**(len(widths)-2)) first, full resolution last."""
        n, h, w, c = x.shape
        if h % self.divisor or w % self.divisor:
            raise ValueError(
                f"ResUNet with {len(self.widths) - 1} poolings needs H and W divisible by {self.divisor}; "
                f"got an input of {h}x{w}"
            )
        if c != self.in_channels:
            raise ValueError(f"ResUNet expects {self.in_channels} input channels, got {c}")
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = self.bottleneck(x)
        levels = []
        for up, block, skip in zip(self.upsamples, self.decoder, reversed(skips)):
            x = block(jnp.concatenate([up(x), skip], axis=-1))
            levels.append(x)
        return levels
