"""End-to-end inference: classify every slice, segment the slices the classifier calls tumour, post-process.

`Pipeline.from_checkpoints("checkpoints")` loads the `classifier` and `segmenter` inference checkpoints and preprocesses
exactly as recorded in their metadata (image size, normalisation), so predict, evaluate and the app cannot drift from
training.

Input conventions (the same as `flaxtumor.data.io.read_image`, for arrays already in memory):
- uint8 arrays of any height and width; (H, W) and (H, W, 1) gray is replicated to 3 channels, (H, W, 4) RGBA drops
  alpha. Read files with `read_image`, which also rescales uint16.
- Every slice is resized (bilinear) to each model's size; masks come back at the INPUT size with nearest-neighbour.

Normalisation `volume_zscore` needs a patient volume: `predict_volume` uses the stats of the whole stack, as training
did. `predict_slices` treats each slice as a volume of one (per-slice stats), the documented fallback for loose slices.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from scipy import ndimage

from flaxtumor.data.preprocess import Preprocessing, preprocess, resize_mask

__all__ = [
    "SlicePrediction", "Pipeline", "as_rgb", "gate_and_postprocess", "largest_connected_component",
    "read_operating_point", "slice_calls", "OPERATING_POINT_FILE",
]

DEFAULT_BATCH_SIZE = 8
# The pair's operating point (threshold, LCC, flip-TTA), chosen on validation patients and stored beside the two
# checkpoints: it belongs to neither model alone.
OPERATING_POINT_FILE = "pipeline.json"
_OPERATING_KEYS = {
    "threshold": float, "mask_threshold": float, "lcc": bool, "tta": bool, "gate": bool, "min_tumour_area": float,
}


@dataclass(frozen=True)
class SlicePrediction:
    tumour_probability: float  # classifier's P(tumour) for the slice, in [0, 1]
    has_tumour: bool  # the pipeline's call: tumour_probability >= threshold, or (fused gate) enough segmented area
    mask: np.ndarray  # bool (H, W) at the input size; empty when gated out (or removed by LCC)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) from uint8 gray (H, W) / (H, W, 1), RGB or RGBA (alpha dropped)."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {a.dtype} (read files with flaxtumor.data.io.read_image)")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=-1)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        return np.ascontiguousarray(a[..., :3])
    raise ValueError(f"unsupported image shape {a.shape} (expected HxW, HxWx1, HxWx3 or HxWx4)")


def largest_connected_component(volume: np.ndarray) -> np.ndarray:
    """Keeps the largest 3D component of a (D, H, W) bool volume (26-connectivity: slices are thick, so a tumour
    may only touch its neighbour slice diagonally)."""
    labels, n = ndimage.label(volume, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return volume.astype(bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def slice_calls(probabilities: np.ndarray, masks: Sequence[np.ndarray], threshold: float, min_tumour_area: float
                ) -> np.ndarray:
    """(N,) bool: the classifier's probability clears `threshold`, or (fused gate, `min_tumour_area` > 0) the
    segmenter's mask covers at least that fraction of the slice. Sizes may differ between slices."""
    calls = np.asarray(probabilities) >= threshold
    if min_tumour_area > 0:
        calls |= np.array([m.mean() >= min_tumour_area for m in masks], bool)
    return calls


def gate_and_postprocess(
    probabilities: np.ndarray, masks: np.ndarray, threshold: float, gate: bool, lcc: bool,
    min_tumour_area: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The pipeline's post-processing of a volume: (D,) tumour probabilities and (D, H, W) ungated segmenter masks
    → (slice calls (D,), masks (D, H, W)): slices not called tumour are emptied when `gate`, then optional 3D
    largest connected component."""
    masks = np.asarray(masks, bool)
    calls = slice_calls(probabilities, masks, threshold, min_tumour_area)
    if gate:
        masks = masks & calls[:, None, None]
    return calls, (largest_connected_component(masks) if lcc else masks)


class _Runner:
    """A model in eval mode behind one jitted function of a fixed batch shape (the last batch is padded), so it
    compiles once (per flip-TTA setting)."""

    def __init__(self, model: nnx.Module, batch_size: int):
        model.eval()
        self.graphdef, self.state = nnx.split(model)
        self.batch_size = batch_size
        graphdef = self.graphdef

        def forward(state, x, tta: bool):
            out = jax.nn.sigmoid(nnx.merge(graphdef, state)(x).astype(jnp.float32))
            if tta:  # horizontal flip: W is axis 2 of NHWC inputs (and of the segmenter's NHW1 outputs)
                flipped = jax.nn.sigmoid(nnx.merge(graphdef, state)(x[:, :, ::-1]).astype(jnp.float32))
                out = (out + (flipped[:, :, ::-1] if out.ndim == 4 else flipped)) / 2
            return out

        self._forward = jax.jit(forward, static_argnames="tta")

    def __call__(self, x: np.ndarray, tta: bool) -> np.ndarray:
        n, b = len(x), self.batch_size
        out = []
        for start in range(0, n, b):
            chunk = x[start : start + b]
            pad = b - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            out.append(np.asarray(self._forward(self.state, jnp.asarray(chunk), tta))[: b - pad])
        return np.concatenate(out) if out else np.zeros((0,), np.float32)


def _spec(metadata: dict, name: str) -> Preprocessing:
    try:
        return Preprocessing.from_dict(metadata["preprocessing"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{name} checkpoint metadata has no usable 'preprocessing' ({e})") from None


class Pipeline:
    """Classifier → gate → segmenter → (optional) 3D LCC, on slices of any size.

    threshold: tumour-probability gate (default: the classifier checkpoint's); a slice with probability >= threshold
      is called tumour. mask_threshold: per-pixel segmenter probability (default: the segmenter checkpoint's).
    gate=False runs the segmenter on every slice (has_tumour still reports the classifier's call).
    tta=True averages the probabilities of the image and its horizontal flip, for both models.
    lcc=True keeps the largest 3D connected component of each volume (`predict_volume` only).
    min_tumour_area > 0 fuses the gate: the segmenter runs on every slice, and a slice is also called tumour when its
      mask covers at least that fraction of the slice (the segmenter's evidence rescues the classifier's misses).
    """

    def __init__(
        self,
        classifier: nnx.Module,
        segmenter: nnx.Module,
        classifier_metadata: dict[str, Any],
        segmenter_metadata: dict[str, Any],
        *,
        threshold: float | None = None,
        mask_threshold: float | None = None,
        gate: bool = True,
        tta: bool = False,
        lcc: bool = False,
        min_tumour_area: float = 0.0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        operating_point: dict[str, Any] | None = None,
    ):
        self.classifier = classifier
        self.metadata = {"classifier": classifier_metadata, "segmenter": segmenter_metadata}
        self.classifier_spec = _spec(classifier_metadata, "classifier")
        self.segmenter_spec = _spec(segmenter_metadata, "segmenter")
        self.threshold = float(classifier_metadata.get("threshold", 0.5) if threshold is None else threshold)
        self.mask_threshold = float(
            segmenter_metadata.get("threshold", 0.5) if mask_threshold is None else mask_threshold
        )
        self.gate = gate
        self.tta = tta
        self.lcc = lcc
        self.min_tumour_area = float(min_tumour_area)
        self.operating_point = operating_point or {}  # where the defaults came from, for the model card
        self._classify = _Runner(classifier, batch_size)
        self._segment = _Runner(segmenter, batch_size)

    @classmethod
    def from_checkpoints(cls, dir: str | Path = "checkpoints", **options: Any) -> "Pipeline":
        """Loads DIR/classifier and DIR/segmenter (raises CheckpointError with one clear line when either is bad),
        with DIR/pipeline.json's operating point as defaults when it exists. `options` are the keyword options of
        `Pipeline` (threshold, mask_threshold, gate, tta, lcc, min_tumour_area, batch_size); an option given as None keeps the default."""
        from flaxtumor.train.checkpoint import load_inference  # the training stack is only needed when loading

        dir = Path(dir)
        classifier, classifier_metadata = load_inference(dir / "classifier")
        segmenter, segmenter_metadata = load_inference(dir / "segmenter")
        operating_point = read_operating_point(dir)
        settings = {k: operating_point[k] for k in _OPERATING_KEYS if k in operating_point}
        settings.update({k: v for k, v in options.items() if v is not None})
        return cls(
            classifier, segmenter, classifier_metadata, segmenter_metadata, operating_point=operating_point, **settings
        )

    # -- model card ------------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What a model-card panel shows: per model its preprocessing, init, dtype, threshold, split sizes and
        validation metrics, plus the pipeline's operating settings."""
        models = {}
        for name, meta in self.metadata.items():
            split = meta.get("split") or {}
            models[name] = {
                "task": meta.get("task"),
                "preprocessing": meta.get("preprocessing"),
                "backbone_init": meta.get("backbone_init"),
                "dtype": meta.get("dtype"),
                "threshold": meta.get("threshold"),
                "split_sizes": {k: len(v) for k, v in split.items() if isinstance(v, (list, tuple))},
                "metrics": meta.get("metrics", {}),
            }
        settings = dict(
            threshold=self.threshold, mask_threshold=self.mask_threshold, gate=self.gate, tta=self.tta, lcc=self.lcc,
            min_tumour_area=self.min_tumour_area,
        )
        return {"models": models, "pipeline": settings, "operating_point": self.operating_point}

    def warm_up(self) -> float:
        """Compiles both models at the fixed batch shape, with the pipeline's TTA setting; returns seconds. Inputs are
        resized to the checkpoints' size and batches padded to a fixed size, so later calls never compile again."""
        start = time.perf_counter()
        for runner, spec in ((self._classify, self.classifier_spec), (self._segment, self.segmenter_spec)):
            runner(np.zeros((1, spec.image_size, spec.image_size, 3), np.float32), self.tta)
        return time.perf_counter() - start

    # -- raw model outputs -----------------------------------------------------------------------------------------
    def tumour_probabilities(self, images: Sequence[np.ndarray], volume: bool = False) -> np.ndarray:
        """(N,) classifier probabilities; `volume=True` normalises the stack as one patient volume."""
        return self._classify(self._prepare(images, self.classifier_spec, volume), self.tta).reshape(-1)

    def segment(self, images: Sequence[np.ndarray], volume: bool = False) -> list[np.ndarray]:
        """Ungated segmenter masks, bool (H, W) at each input size."""
        images = [as_rgb(im) for im in images]
        probs = self._segment(self._prepare(images, self.segmenter_spec, volume), self.tta)
        return [resize_mask(p[..., 0] >= self.mask_threshold, im.shape[:2]) for p, im in zip(probs, images)]

    def _prepare(self, images: Sequence[np.ndarray], spec: Preprocessing, volume: bool) -> np.ndarray:
        images = [as_rgb(im) for im in images]
        if not images:
            return np.zeros((0, spec.image_size, spec.image_size, 3), np.float32)
        if volume:
            shapes = {im.shape for im in images}
            if len(shapes) != 1:
                raise ValueError(f"a volume needs slices of one size, got {sorted(shapes)}")
            return preprocess(np.stack(images), spec)
        return np.concatenate([preprocess(im[None], spec) for im in images])

    # -- the pipeline ----------------------------------------------------------------------------------------------
    def predict_slices(self, images: Sequence[np.ndarray]) -> list[SlicePrediction]:
        """Independent slices (any sizes, a batch or a list of one). No LCC: there is no volume to take it over."""
        return self._predict(images, volume=False, lcc=False, gate=self.gate)

    def predict_volume(
        self, images: Sequence[np.ndarray], lcc: bool | None = None, gate: bool | None = None
    ) -> list[SlicePrediction]:
        """One patient's slices in slice order (all one size): volume normalisation, then optional 3D LCC over the
        stacked gated masks. `lcc` and `gate` override the pipeline's settings for this call."""
        return self._predict(
            images, volume=True, lcc=self.lcc if lcc is None else lcc, gate=self.gate if gate is None else gate
        )

    def _predict(self, images: Sequence[np.ndarray], volume: bool, lcc: bool, gate: bool) -> list[SlicePrediction]:
        images = [as_rgb(im) for im in images]
        if not images:
            return []
        probs = self.tumour_probabilities(images, volume)
        # The segmenter runs where its mask can matter: everywhere without a gate or with the fused gate.
        everywhere = not gate or self.min_tumour_area > 0
        selected = np.arange(len(images)) if everywhere else np.flatnonzero(probs >= self.threshold)
        masks = [np.zeros(im.shape[:2], bool) for im in images]
        if selected.size:
            if volume:  # normalise with the whole volume's stats, then keep the selected slices
                x = self._prepare(images, self.segmenter_spec, volume=True)[selected]
                for i, p in zip(selected, self._segment(x, self.tta)):
                    masks[i] = resize_mask(p[..., 0] >= self.mask_threshold, images[i].shape[:2])
            else:
                for i, m in zip(selected, self.segment([images[i] for i in selected])):
                    masks[i] = m
        calls = slice_calls(probs, masks, self.threshold, self.min_tumour_area)
        if gate:
            masks = [m if call else np.zeros_like(m) for m, call in zip(masks, calls)]
        if lcc:
            masks = list(largest_connected_component(np.stack(masks)))
        return [
            SlicePrediction(tumour_probability=float(p), has_tumour=bool(call), mask=m)
            for p, call, m in zip(probs, calls, masks)
        ]

    # -- explanation -----------------------------------------------------------------------------------------------
    def gradcam(self, image: np.ndarray) -> np.ndarray:
        """Grad-CAM of the classifier's tumour logit, float32 (H, W) in [0, 1] at the input size (bilinear)."""
        from flaxtumor.models.gradcam import gradcam

        image = as_rgb(image)
        heat = np.asarray(gradcam(self.classifier, self._prepare([image], self.classifier_spec, False)))[0]
        h, w = image.shape[:2]
        resized = np.asarray(Image.fromarray(heat.astype(np.float32)).resize((w, h), Image.BILINEAR))
        return np.clip(resized, 0.0, 1.0).astype(np.float32)


def read_operating_point(dir: str | Path) -> dict[str, Any]:
    """DIR/pipeline.json (empty when absent): threshold, mask_threshold, lcc, tta, gate, plus free-form provenance
    such as `tuned_on`. A malformed file is an error naming it, never silently ignored."""
    path = Path(dir) / OPERATING_POINT_FILE
    if not path.is_file():
        return {}
    import json

    try:
        point = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the operating point ({e})") from None
    if not isinstance(point, dict):
        raise ValueError(f"{path}: expected a JSON object")
    for key, kind in _OPERATING_KEYS.items():
        if key in point and (not isinstance(point[key], (int, float) if kind is float else bool)
                             or kind is float and isinstance(point[key], bool)):
            raise ValueError(f"{path}: {key!r} must be a {kind.__name__}, got {point[key]!r}")
    return point
