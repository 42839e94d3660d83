"""Tumour / no-tumour classifier: a ResNet backbone plus the seed's head, trained in two phases.

Phase 1 trains the head only; phase 2 also unfreezes the last ``unfreeze_last_layers`` *Keras layers* of the backbone,
rounded up to whole bottleneck blocks counted from the end. Keras (the seed's framework) lists 10 layers per bottleneck
block (3 x conv/BN/ReLU, add, out-ReLU) and 12 for the first block of a stage (plus shortcut conv and BN), so:

    unfreeze_last_layers  0 -> head only;  1..10 -> conv5_block3;  11..20 -> conv5_block2-3;
                          21..32 -> all of conv5 (the seed's 30);  33..42 -> conv5 + conv4_block6;  ...

The stem (conv1) unfreezes only once every block has (ResNet50: more than 156 layers). Frozen parts stay in eval mode
(see `TumourClassifier.train`) so their BatchNorm statistics do not move.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flaxtumor.models.resnet import ResNet
from flaxtumor.models.weights import WeightsError, assign, read_weights

_KERAS_LAYERS_PER_BLOCK = 10  # conv, bn, relu x3 + add + relu
_KERAS_LAYERS_PROJECTION = 2  # the first block of a stage adds the shortcut conv and BN


POOLS = ("avg", "max", "avgmax")


class TumourClassifier(nnx.Module):
    """Backbone -> global pool -> [Dense -> ReLU -> Dropout] x len(head_widths) -> one tumour logit.

    The pool is the seed's average ("avg"), the maximum ("max": "is there a lesion anywhere", which an average over a
    mostly tumour-free slice dilutes), or both concatenated ("avgmax", twice the features)."""

    def __init__(self, backbone: ResNet, head_widths: Sequence[int], dropout: float, *, rngs: nnx.Rngs,
                 pool: str = "avg"):
        if backbone.fc is not None:
            raise ValueError("the classifier's backbone must have no top (build it with num_classes=None)")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.backbone = backbone
        self.pool_kind = pool
        widths = (backbone.num_features * (2 if pool == "avgmax" else 1), *head_widths)
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.dropouts = nnx.List([nnx.Dropout(dropout, rngs=rngs) for _ in head_widths])
        self.logit = nnx.Linear(widths[-1], 1, rngs=rngs)
        self.frozen: tuple[tuple[Any, ...], ...] = ()  # backbone sub-paths held in eval mode; set by `set_phase`

    def head(self, features: jax.Array) -> jax.Array:
        """Pooled features (N, C) -> tumour logits (N,)."""
        for dense, dropout in zip(self.hidden, self.dropouts):
            features = dropout(nnx.relu(dense(features)))
        return self.logit(features)[:, 0]

    def pool(self, feature_map: jax.Array) -> jax.Array:
        """(N, h, w, C) -> pooled features (N, C), or (N, 2C) for "avgmax"."""
        if self.pool_kind == "avg":
            return jnp.mean(feature_map, axis=(1, 2))
        if self.pool_kind == "max":
            return jnp.max(feature_map, axis=(1, 2))
        return jnp.concatenate([jnp.mean(feature_map, axis=(1, 2)), jnp.max(feature_map, axis=(1, 2))], axis=-1)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.pool(self.backbone.feature_map(x)))

    def _frozen_modules(self) -> list[nnx.Module]:
        modules = []
        for path in self.frozen:
            node: Any = self.backbone
            for key in path:
                node = node[key] if isinstance(key, int) else getattr(node, key)
            modules.append(node)
        return modules

    def train(self, **attributes: Any) -> None:
        """Train mode for everything but the frozen parts of the backbone."""
        super().train(**attributes)
        for module in self._frozen_modules():
            module.eval()


@dataclass(frozen=True)
class _Trainable:
    """nnx filter: Params outside the frozen backbone sub-paths (hashable, so jit can key on it)."""

    frozen: tuple[tuple[Any, ...], ...]

    def __call__(self, path: tuple[Any, ...], value: Any) -> bool:
        if not isinstance(value, nnx.Param):
            return False
        return not any(path[: len(p) + 1] == ("backbone", *p) for p in self.frozen)


def trainable_blocks(stage_sizes: Sequence[int], unfreeze_last_layers: int) -> list[tuple[int, int]]:
    """(stage, block) indices unfrozen by the last `unfreeze_last_layers` Keras-counted layers (whole blocks)."""
    blocks = [(i, j) for i, size in enumerate(stage_sizes) for j in range(size)]
    chosen, remaining = [], unfreeze_last_layers
    for i, j in reversed(blocks):
        if remaining <= 0:
            break
        chosen.append((i, j))
        remaining -= _KERAS_LAYERS_PER_BLOCK + (_KERAS_LAYERS_PROJECTION if j == 0 else 0)
    return chosen[::-1]


def set_phase(model: TumourClassifier, phase: int, unfreeze_last_layers: int = 30) -> _Trainable:
    """Freezes for a training phase and returns the nnx filter of trainable params (for `nnx.Optimizer(wrt=...)`
    and `nnx.DiffState`).

    phase 0: everything trains (random init); 1: head only; 2: head + the blocks `trainable_blocks` picks;
    3: everything trains again, from pretrained weights (the optional whole-backbone fine-tune at a low rate).
    Frozen parts are put in eval mode now and stay there through `model.train()`; parts unfrozen by a later phase
    keep their mode until the caller's next `model.train()`.
    """
    stage_sizes = model.backbone.stage_sizes
    if phase in (0, 3):
        frozen: list[tuple[Any, ...]] = []
    elif phase in (1, 2):
        unfrozen = set(trainable_blocks(stage_sizes, unfreeze_last_layers if phase == 2 else 0))
        every_block = [(i, j) for i, size in enumerate(stage_sizes) for j in range(size)]
        frozen = [("conv_init",), ("bn_init",)] if len(unfrozen) < len(every_block) else []
        frozen += [("stages", i, j) for i, j in every_block if (i, j) not in unfrozen]
    else:
        raise ValueError(f"phase must be 0, 1, 2 or 3, got {phase!r}")
    model.frozen = tuple(frozen)
    for module in model._frozen_modules():
        module.eval()
    return _Trainable(model.frozen)


def load_backbone(model: TumourClassifier, path: str | Path) -> dict[str, Any]:
    """Loads converted (or raw source) ResNet50 weights into the classifier's backbone, strictly, dropping the source's
    ImageNet head. Returns the weights' metadata; ``metadata["normalisation"]`` is the preprocessing they expect."""
    flat, metadata = read_weights(path)
    if metadata["layout"] != model.backbone.layout.name:
        raise WeightsError(
            f"{path}: weights have layout {metadata['layout']!r} but the backbone was built as "
            f"{model.backbone.layout.name!r} (set model.backbone_layout={metadata['layout']})"
        )
    assign(model.backbone, flat, str(path))
    return metadata
