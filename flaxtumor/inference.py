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
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from flaxtumor.data.preprocess import Preprocessing, preprocess, resize_mask
from flaxtumor.operating_point import (
    OPERATING_POINT_FILE, OperatingPoint, gate_and_postprocess, largest_connected_component, read_operating_point,
    slice_calls, verdicts,
)

__all__ = [
    "SlicePrediction", "Pipeline", "as_rgb", "gate_and_postprocess", "largest_connected_component",
    "read_operating_point", "slice_calls", "OperatingPoint", "OPERATING_POINT_FILE", "input_warning",
    "looks_like_mask", "GRAY_WARNING", "MASK_REFUSAL",
]

if TYPE_CHECKING:  # orbax loads only with the checkpoints (start-up time)
    from flaxtumor.checkpoints import InferenceMetadata

DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class SlicePrediction:
    tumour_probability: float  # classifier's P(tumour) for the slice, in [0, 1]
    classifier_call: bool  # the classifier flags the slice: tumour_probability >= the operating point's threshold
    mask: np.ndarray  # bool (H, W) at the input size: the final mask (gated and post-processed)
    verdict: str  # "tumour" (a region is outlined) / "suspicious" (classifier flags, nothing outlined) / "no tumour"

    @property
    def has_tumour(self) -> bool:
        """A tumour region is drawn: exactly when the mask is not empty (the verdict is "tumour")."""
        return bool(self.mask.any())


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


GRAY_WARNING = ("all three channels are equal (a grayscale image): the model expects the 3-channel "
                "pre-contrast/FLAIR/post-contrast composite, so this result is unreliable")


def input_warning(image: np.ndarray) -> str | None:
    """A warning for a slice the model cannot read as intended (all channels equal, e.g. one FLAIR image), else
    None. Gray inputs are replicated to 3 channels and still predicted; the warning says the result is unreliable."""
    a = np.asarray(image)
    if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 1):
        return GRAY_WARNING
    if a.ndim == 3 and a.shape[-1] >= 3 and np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2]):
        return GRAY_WARNING
    return None


def looks_like_mask(image: np.ndarray) -> bool:
    """A binary mask rather than an MRI slice: only 0 and one other value (in every channel), with both present."""
    values = np.unique(np.asarray(image)[..., :3] if np.asarray(image).ndim == 3 else np.asarray(image))
    return len(values) == 2 and values[0] == 0


MASK_REFUSAL = ("looks like a segmentation mask, not an MRI slice (only two values: 0 and one other); upload the "
                "slice itself (files named *_mask.* are masks)")


# Grad-CAM from the last-but-one stage (ResNet50 conv4, H/16): on the 16 validation patients it points at the tumour
# more often than the last stage (pointing score 0.204 vs 0.163 for the shipped classifier, 196 slices), and its map is
# twice as fine (8x8 instead of 4x4 at 128x128).
GRADCAM_STAGE = -2

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


def _check_task(path: Path, metadata: InferenceMetadata, task: str, role: str) -> None:
    """A classifier folder given as the segmenter (or the reverse) fails here, in words, not deep in a model call."""
    if metadata.task != task:
        from flaxtumor.checkpoints import CheckpointError

        raise CheckpointError(f"{Path(path).absolute()}: a {metadata.task!r} checkpoint, but the {role} must be a "
                              f"{task!r} one")


class Pipeline:
    """Classifier → gate → segmenter → post-processing, on slices of any size.

    What turns probabilities into calls and masks is an `OperatingPoint` (`flaxtumor.operating_point`), given per
    call to `predict_slices` / `predict_volume`; `self.point` is the default: DIR/pipeline.json's point over the
    checkpoints' own thresholds. A pipeline is never changed after it is made: to try another point, pass one (e.g.
    `dataclasses.replace(pipeline.point, threshold=0.3)`). The models compile once per TTA setting.
    """

    def __init__(
        self,
        classifier: nnx.Module,
        segmenter: nnx.Module,
        classifier_metadata: InferenceMetadata,
        segmenter_metadata: InferenceMetadata,
        *,
        point: OperatingPoint | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        record: dict[str, Any] | None = None,
    ):
        self.classifier = classifier
        self.metadata = {"classifier": classifier_metadata, "segmenter": segmenter_metadata}
        self.classifier_spec = classifier_metadata.preprocessing
        self.segmenter_spec = segmenter_metadata.preprocessing
        self.point = point or self.checkpoint_point(classifier_metadata, segmenter_metadata)
        self.record = record or {}  # pipeline.json as read (provenance, validation, ablation), for the model card
        self.sources: dict[str, Path] = {}  # model -> the folder it was loaded from (set by from_checkpoints)
        self._classify = _Runner(classifier, batch_size)
        self._segment = _Runner(segmenter, batch_size)

    @staticmethod
    def checkpoint_point(classifier_metadata: InferenceMetadata, segmenter_metadata: InferenceMetadata
                         ) -> OperatingPoint:
        """The checkpoints' own operating point: the classifier's and the segmenter's recorded thresholds."""
        return OperatingPoint(threshold=classifier_metadata.threshold, mask_threshold=segmenter_metadata.threshold)

    @classmethod
    def from_checkpoints(cls, dir: str | Path = "checkpoints", batch_size: int = DEFAULT_BATCH_SIZE, *,
                         classifier: str | Path | None = None, segmenter: str | Path | None = None,
                         **overrides: Any) -> "Pipeline":
        """Loads DIR/classifier and DIR/segmenter (raises CheckpointError with one clear line when either is bad).
        `classifier` / `segmenter` load that model from another folder instead (pairing a newly trained model with a
        shipped one); each must hold a checkpoint of its task. The default point is DIR/pipeline.json's over the
        loaded checkpoints' thresholds, then `overrides` (OperatingPoint fields, or `lcc`; None keeps the value). An
        invalid point raises ValueError naming the field."""
        from flaxtumor.checkpoints import load_inference  # orbax and the model builders: only needed when loading

        dir = Path(dir)
        sources = {"classifier": Path(classifier or dir / "classifier"),
                   "segmenter": Path(segmenter or dir / "segmenter")}
        classifier_model, classifier_metadata = load_inference(sources["classifier"])
        segmenter_model, segmenter_metadata = load_inference(sources["segmenter"])
        _check_task(sources["classifier"], classifier_metadata, "cls", "classifier")
        _check_task(sources["segmenter"], segmenter_metadata, "seg", "segmenter")
        point, record = read_operating_point(dir, cls.checkpoint_point(classifier_metadata, segmenter_metadata))
        pipeline = cls(classifier_model, segmenter_model, classifier_metadata, segmenter_metadata,
                       point=point.override(**overrides), batch_size=batch_size, record=record)
        pipeline.sources = sources
        return pipeline

    # -- model card ------------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What a model-card panel shows: per model its preprocessing, init, dtype, threshold, split sizes,
        validation metrics (and the folder it was loaded from, when known), plus the default operating point and
        pipeline.json's record."""
        models = {}
        for name, meta in self.metadata.items():
            split = meta.split or {}
            models[name] = {
                "task": meta.task,
                "preprocessing": meta.preprocessing.to_dict(),
                "backbone_init": meta.backbone_init,
                "dtype": meta.dtype,
                "threshold": meta.threshold,
                "split_sizes": {k: len(v) for k, v in split.items() if isinstance(v, (list, tuple))},
                "metrics": meta.metrics,
            }
            if name in self.sources:
                models[name]["source"] = str(self.sources[name])
        return {"models": models, "pipeline": dataclasses.asdict(self.point), "operating_point": self.record}

    def warm_up(self, point: OperatingPoint | None = None) -> float:
        """Compiles both models at the fixed batch shape, with the point's TTA setting; returns seconds. Inputs are
        resized to the checkpoints' size and batches padded to a fixed size, so later calls never compile again."""
        tta = (point or self.point).tta
        start = time.perf_counter()
        for runner, spec in ((self._classify, self.classifier_spec), (self._segment, self.segmenter_spec)):
            runner(np.zeros((1, spec.image_size, spec.image_size, 3), np.float32), tta)
        return time.perf_counter() - start

    # -- raw model outputs -----------------------------------------------------------------------------------------
    def tumour_probabilities(self, images: Sequence[np.ndarray], volume: bool = False,
                             point: OperatingPoint | None = None) -> np.ndarray:
        """(N,) classifier probabilities; `volume=True` normalises the stack as one patient volume. Only the point's
        `tta` matters here."""
        tta = (point or self.point).tta
        return self._classify(self._prepare(images, self.classifier_spec, volume), tta).reshape(-1)

    def segment(self, images: Sequence[np.ndarray], volume: bool = False,
                point: OperatingPoint | None = None) -> list[np.ndarray]:
        """Ungated segmenter masks, bool (H, W) at each input size, at the point's mask threshold (and TTA)."""
        point = point or self.point
        images = [as_rgb(im) for im in images]
        probs = self._segment(self._prepare(images, self.segmenter_spec, volume), point.tta)
        return [resize_mask(p[..., 0] >= point.mask_threshold, im.shape[:2]) for p, im in zip(probs, images)]

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
    def predict_slices(self, images: Sequence[np.ndarray], point: OperatingPoint | None = None
                       ) -> list[SlicePrediction]:
        """Independent slices (any sizes, a batch or a list of one). No post-processing: there is no volume to run
        it over (the point's `postprocess` is ignored)."""
        point = dataclasses.replace(point or self.point, postprocess="none")
        return self._predict(images, volume=False, point=point)

    def predict_volume(self, images: Sequence[np.ndarray], point: OperatingPoint | None = None
                       ) -> list[SlicePrediction]:
        """One patient's slices in slice order (all one size): volume normalisation, then the point's
        post-processing over the stacked gated masks."""
        return self._predict(images, volume=True, point=point or self.point)

    def _predict(self, images: Sequence[np.ndarray], volume: bool, point: OperatingPoint) -> list[SlicePrediction]:
        images = [as_rgb(im) for im in images]
        if not images:
            return []
        probs = self.tumour_probabilities(images, volume, point)
        # The segmenter runs where its mask can matter: everywhere without a gate or with the fused gate. Elsewhere
        # the mask is gated out anyway, so leaving it empty gives what segmenting every slice would.
        everywhere = not point.gate or point.min_tumour_area > 0
        selected = np.arange(len(images)) if everywhere else np.flatnonzero(probs >= point.threshold)
        masks = [np.zeros(im.shape[:2], bool) for im in images]
        if selected.size:
            if volume:  # normalise with the whole volume's stats, then keep the selected slices
                x = self._prepare(images, self.segmenter_spec, volume=True)[selected]
                for i, p in zip(selected, self._segment(x, point.tta)):
                    masks[i] = resize_mask(p[..., 0] >= point.mask_threshold, images[i].shape[:2])
            else:
                for i, m in zip(selected, self.segment([images[i] for i in selected], point=point)):
                    masks[i] = m
        _, final = gate_and_postprocess(probs, np.stack(masks) if volume else masks, point)
        classifier_calls = probs >= point.threshold
        return [
            SlicePrediction(tumour_probability=float(p), classifier_call=bool(c), mask=m, verdict=v)
            for p, c, m, v in zip(probs, classifier_calls, final, verdicts(classifier_calls, final))
        ]

    # -- explanation -----------------------------------------------------------------------------------------------
    def gradcam(self, image: np.ndarray, stage: int = GRADCAM_STAGE) -> np.ndarray:
        """Grad-CAM of the classifier's tumour logit from backbone stage `stage`, float32 (H, W) in [0, 1] at the
        input size (bilinear)."""
        from flaxtumor.models.gradcam import gradcam

        image = as_rgb(image)
        x = self._prepare([image], self.classifier_spec, False)
        stage = max(stage, -len(self.classifier.backbone.stages))  # a one-stage (test) backbone has only the last
        heat = np.asarray(gradcam(self.classifier, x, stage=stage))[0]
        h, w = image.shape[:2]
        resized = np.asarray(Image.fromarray(heat.astype(np.float32)).resize((w, h), Image.BILINEAR))
        return np.clip(resized, 0.0, 1.0).astype(np.float32)
