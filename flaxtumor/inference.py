"""End-to-end inference: classify every slice, segment the slices the classifier calls tumour, post-process.

`Pipeline.from_checkpoints("checkpoints")` loads the `classifier` and `segmenter` inference checkpoints and preprocesses
exactly as recorded in their metadata (image size, normalisation), so predict, evaluate and the app cannot drift from
training. A segmenter folder may hold a fold ensemble (`flaxtumor.ensemble`): its members' probabilities are averaged.

Input conventions (the same as `flaxtumor.data.io.read_image`, for arrays already in memory):
- uint8 arrays of any height and width; (H, W) and (H, W, 1) gray is replicated to 3 channels, (H, W, 4) RGBA drops
  alpha. Read files with `read_image`, which also rescales uint16.
- Every slice is resized (bilinear) to each model's size; the segmenter's probabilities come back at the INPUT size
  (bilinear) and are thresholded there (`mask_at_input_size`). A checkpoint whose preprocessing crops ("brain") sees
  its crop box resized instead; its masks go back into that box and are empty outside it. A volume has one box, a
  loose slice its own.

Normalisation `volume_zscore` needs a patient volume: `predict_volume` uses the stats of the whole stack, as training
did. `predict_slices` treats each slice as a volume of one (per-slice stats), the documented fallback for loose slices.

A segmenter trained on 2.5D input (its metadata's `context_slices` K > 0) sees each slice with K neighbours on each
side: in a volume, the slices as given (in order, the nearest repeated past either end); a loose slice, or a volume of
one, is its own neighbours, with a `ContextWarning` (`LONE_SLICE_WARNING`) saying the result is less reliable.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flaxtumor.checkpoint_metadata import CheckpointError, InferenceMetadata, read_metadata
from flaxtumor.compiled_model import CompiledModel, cache_entry
from flaxtumor.data.preprocess import (
    SEQUENCE_NAMES, Background, Box, Preprocessing, crop_box, grey_background, mask_at_input_size, preprocess,
    uncrop_probabilities,
)
from flaxtumor.ensemble import ENSEMBLE_KEY, EnsembleModel, check_members, member_paths
from flaxtumor.operating_point import (
    OPERATING_POINT_FILE, OperatingPoint, gate_and_postprocess, largest_connected_component, needs_segmenting,
    read_operating_point, slice_calls, verdicts,
)

__all__ = [
    "SlicePrediction", "Pipeline", "as_rgb", "gate_and_postprocess", "largest_connected_component",
    "read_operating_point", "slice_calls", "OperatingPoint", "OPERATING_POINT_FILE", "input_warning",
    "looks_like_mask", "GRAY_WARNING", "MASK_REFUSAL", "ContextWarning", "LONE_SLICE_WARNING", "context_warning",
    "background_warning", "slice_warnings",
]

if TYPE_CHECKING:  # flax and Orbax load only when a model must be built (a warm serving cache needs neither)
    from flax import nnx

DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class SlicePrediction:
    tumour_probability: float  # classifier's P(tumour) for the slice, in [0, 1]
    classifier_call: bool  # the classifier flags the slice (`OperatingPoint.flags`)
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


GRAY_WARNING = ("all three channels are equal: a grayscale image, or a patient whose pre- and post-contrast "
                "sequences are missing and stored as copies of FLAIR (kaggle_3m's convention). The model reads the "
                "3-channel pre-contrast/FLAIR/post-contrast composite and is much less accurate without the "
                "contrasts (see the model card), so this result is unreliable")


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


class ContextWarning(UserWarning):
    """A 2.5D segmenter (context slices) given a slice without its neighbours."""


LONE_SLICE_WARNING = ("the segmenter expects each slice with its neighbouring slices of the volume (2.5D input); a "
                      "lone slice is used as its own neighbours, so its mask is less reliable: upload the patient's "
                      "whole volume for a full result")


def context_warning(spec: Preprocessing, n_slices: int, volume: bool) -> str | None:
    """`LONE_SLICE_WARNING` when a 2.5D segmenter (`spec.context_slices` > 0) would see slices without their
    neighbours: loose slices, or a volume of one."""
    return LONE_SLICE_WARNING if spec.context_slices and (not volume or n_slices == 1) else None


def background_warning(background: Background) -> str | None:
    """What a report says of a grey background that preprocessing made black (`grey_background`), else None."""
    if not background:
        return None
    what = " and ".join(f"{SEQUENCE_NAMES[c]} reads {level}" for c, level in background)
    return (f"a grey background: outside the head the {what} (about 0 in the training data); it was made black "
            "before the models read it (see the model card), so check the result")


def slice_warnings(images: Sequence[np.ndarray], spec: Preprocessing, volume: bool) -> list[str]:
    """What a report says of each input slice ("" when nothing): `input_warning`, `background_warning` (decided over
    the volume, or each loose slice, as `preprocess` decides it) and `context_warning`."""
    images = [as_rgb(im) for im in images]
    shared = background_warning(grey_background(images)) if volume else None
    return ["; ".join(w for w in (input_warning(im), shared if volume else background_warning(grey_background([im])),
                                  context_warning(spec, len(images), volume)) if w)
            for im in images]


MASK_REFUSAL = ("looks like a segmentation mask, not an MRI slice (only two values: 0 and one other); upload the "
                "slice itself (files named *_mask.* are masks)")


# Grad-CAM from the last-but-one stage (ResNet50 conv4, H/16): on the 16 validation patients it points at the tumour
# more often than the last stage (pointing score 0.204 vs 0.163 for the shipped classifier, 196 slices), and its map is
# twice as fine (8x8 instead of 4x4 at 128x128).
GRADCAM_STAGE = -2

def _loader(path: Path):
    def load() -> nnx.Module:
        from flaxtumor.checkpoints import load_inference  # flax, Orbax and the model builders: only to build a model

        return load_inference(path)[0]

    return load


def _runner(path: Path, metadata: InferenceMetadata, batch_size: int) -> CompiledModel | EnsembleModel:
    """The checkpoint at `path` as a callable model: one `CompiledModel`, or an `EnsembleModel` of its members (each
    with its own serving-cache entry) when its metadata names members."""
    from flaxtumor.runtime import serving_cache_dir

    spec = metadata.preprocessing
    members = member_paths(path, metadata)
    if members:
        check_members(path, metadata, [read_metadata(m) for m in members])
    compiled = [CompiledModel(_loader(p), batch_size, spec.image_size, cache_entry(p, serving_cache_dir()),
                              channels=spec.channels) for p in members or [path]]
    return EnsembleModel(compiled) if members else compiled[0]


def _compiled(model: nnx.Module | CompiledModel | EnsembleModel, batch_size: int, spec: Preprocessing
              ) -> CompiledModel | EnsembleModel:
    """A model given in memory compiles as usual, without the serving cache (it has no checkpoint to key it by)."""
    if isinstance(model, (CompiledModel, EnsembleModel)):
        return model
    return CompiledModel(lambda: model, batch_size, spec.image_size, channels=spec.channels)


def _check_volume(images: list[np.ndarray]) -> None:
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f"a volume needs slices of one size, got {sorted(shapes)}")


def _boxes(images: list[np.ndarray], spec: Preprocessing, volume: bool) -> list[Box]:
    """Each slice's crop box as `spec` says: a volume's one box (slices stay aligned), or per loose slice."""
    if volume:
        _check_volume(images)
        return [crop_box(images, spec.crop)] * len(images)
    return [crop_box([im], spec.crop) for im in images]


def _check_task(path: Path, metadata: InferenceMetadata, task: str, role: str) -> None:
    """A classifier folder given as the segmenter (or the reverse) fails here, in words, not deep in a model call."""
    if metadata.task != task:
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
        classifier: nnx.Module | CompiledModel,
        segmenter: nnx.Module | CompiledModel | EnsembleModel,
        classifier_metadata: InferenceMetadata,
        segmenter_metadata: InferenceMetadata,
        *,
        point: OperatingPoint | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        record: dict[str, Any] | None = None,
    ):
        self.metadata = {"classifier": classifier_metadata, "segmenter": segmenter_metadata}
        self.classifier_spec = classifier_metadata.preprocessing
        self.segmenter_spec = segmenter_metadata.preprocessing
        self.point = point or self.checkpoint_point(classifier_metadata, segmenter_metadata)
        self.record = record or {}  # pipeline.json as read (provenance, validation, ablation), for the model card
        self.sources: dict[str, Path] = {}  # model -> the folder it was loaded from (set by from_checkpoints)
        self._classify = _compiled(classifier, batch_size, self.classifier_spec)
        self._segment = _compiled(segmenter, batch_size, self.segmenter_spec)

    @property
    def classifier(self) -> nnx.Module:
        """The classifier as an nnx model; from a warm serving cache it is restored on first use."""
        return self._classify.model

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
        dir = Path(dir)
        sources = {"classifier": Path(classifier or dir / "classifier"),
                   "segmenter": Path(segmenter or dir / "segmenter")}
        metadata = {name: read_metadata(path) for name, path in sources.items()}
        _check_task(sources["classifier"], metadata["classifier"], "cls", "classifier")
        _check_task(sources["segmenter"], metadata["segmenter"], "seg", "segmenter")
        point, record = read_operating_point(dir, cls.checkpoint_point(metadata["classifier"], metadata["segmenter"]))
        point = point.override(**overrides)
        models = {name: _runner(path, metadata[name], batch_size) for name, path in sources.items()}
        for model in models.values():
            model.prepare(point.tta)  # a cache miss restores the model now: a bad checkpoint fails here
        pipeline = cls(models["classifier"], models["segmenter"], metadata["classifier"], metadata["segmenter"],
                       point=point, batch_size=batch_size, record=record)
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
            if ENSEMBLE_KEY in meta.extra:
                models[name]["ensemble"] = {k: meta.extra[ENSEMBLE_KEY].get(k)
                                            for k in ("members", "describe", "combine")}
        return {"models": models, "pipeline": dataclasses.asdict(self.point), "operating_point": self.record}

    def warm_up(self, point: OperatingPoint | None = None) -> float:
        """Compiles both models at the fixed batch shape, with the point's TTA setting (nothing to do when the serving
        cache had them); returns seconds. Inputs are resized to the checkpoints' size and batches padded to a fixed
        size, so later calls never compile again."""
        tta = (point or self.point).tta
        start = time.perf_counter()
        for runner in (self._classify, self._segment):
            runner.compile(tta)
        return time.perf_counter() - start

    # -- raw model outputs -----------------------------------------------------------------------------------------
    def tumour_probabilities(self, images: Sequence[np.ndarray], volume: bool = False,
                             point: OperatingPoint | None = None) -> np.ndarray:
        """(N,) classifier probabilities; `volume=True` normalises the stack as one patient volume. Only the point's
        `tta` matters here."""
        tta = (point or self.point).tta
        return self._classify(self._prepare(images, self.classifier_spec, volume), tta).reshape(-1)

    def segment(self, images: Sequence[np.ndarray], volume: bool = False, point: OperatingPoint | None = None,
                only: np.ndarray | None = None) -> list[np.ndarray]:
        """Ungated segmenter masks, bool (H, W) at each input size, at the point's mask threshold (and TTA). With
        `only` ((N,) bool) the segmenter runs on those slices alone and the others come back empty; a volume is
        still normalised as a whole, so a slice's mask does not depend on which others were segmented."""
        point = point or self.point
        images = [as_rgb(im) for im in images]
        if only is not None:
            return self._segment_selected(images, np.flatnonzero(np.asarray(only, bool)), volume, point)
        boxes = _boxes(images, self.segmenter_spec, volume) if images else []
        probs = self._segment(self._prepare(images, self.segmenter_spec, volume, boxes), point.tta)
        return [mask_at_input_size(p[..., 0], point.mask_threshold, box, im.shape[:2])
                for p, box, im in zip(probs, boxes, images)]

    def _prepare(self, images: Sequence[np.ndarray], spec: Preprocessing, volume: bool,
                 boxes: list[Box] | None = None) -> np.ndarray:
        """Model inputs; `boxes` (from `_boxes`, which computes them when not given) are the crops to map back to.
        With context slices a volume's neighbours are its slices in the given order; a loose slice is its own."""
        images = [as_rgb(im) for im in images]
        if not images:
            return np.zeros((0, spec.image_size, spec.image_size, spec.channels), np.float32)
        if message := context_warning(spec, len(images), volume):
            warnings.warn(message, ContextWarning, stacklevel=3)
        boxes = boxes or _boxes(images, spec, volume)
        if volume:
            return preprocess(np.stack(images), spec, box=boxes[0])
        return np.concatenate([preprocess(im[None], spec, box=box) for im, box in zip(images, boxes)])

    # -- the pipeline ----------------------------------------------------------------------------------------------
    def predict_slices(self, images: Sequence[np.ndarray], point: OperatingPoint | None = None
                       ) -> list[SlicePrediction]:
        """Independent slices (any sizes, a batch or a list of one). No post-processing: there is no volume to run
        it over (the point's `postprocess` is ignored). A 2.5D segmenter sees each slice as its own neighbours and
        warns (`ContextWarning`)."""
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
        # The segmenter runs where its mask can matter (`needs_segmenting`). Where that is every slice (no gate, or the
        # fused gate) it does not wait for the classifier: both run at once (on 2 CPU cores, 1.26 s instead of 1.7 s
        # for 40 slices).
        if point.needs_every_mask:
            with ThreadPoolExecutor(1) as pool:
                segmented = pool.submit(self._segment_selected, images, np.arange(len(images)), volume, point)
                probs = self.tumour_probabilities(images, volume, point)
                masks = segmented.result()
        else:
            probs = self.tumour_probabilities(images, volume, point)
            masks = self.segment(images, volume, point, only=needs_segmenting(probs, point))
        _, final = gate_and_postprocess(probs, np.stack(masks) if volume else masks, point)
        classifier_calls = point.flags(probs)
        return [
            SlicePrediction(tumour_probability=float(p), classifier_call=bool(c), mask=m, verdict=v)
            for p, c, m, v in zip(probs, classifier_calls, final, verdicts(classifier_calls, final))
        ]

    def _segment_selected(self, images: list[np.ndarray], selected: np.ndarray, volume: bool, point: OperatingPoint
                          ) -> list[np.ndarray]:
        """Masks at the input sizes: the segmenter's on the `selected` slices, empty elsewhere."""
        masks = [np.zeros(im.shape[:2], bool) for im in images]
        if not selected.size:
            return masks
        if volume:  # normalise with the whole volume's stats (and crop to its box), then keep the selected slices
            boxes = _boxes(images, self.segmenter_spec, volume=True)
            x = self._prepare(images, self.segmenter_spec, True, boxes)[selected]
            for i, p in zip(selected, self._segment(x, point.tta)):
                masks[i] = mask_at_input_size(p[..., 0], point.mask_threshold, boxes[i],
                                              images[i].shape[:2])
        else:
            for i, m in zip(selected, self.segment([images[i] for i in selected], point=point)):
                masks[i] = m
        return masks

    # -- explanation -----------------------------------------------------------------------------------------------
    def gradcam(self, image: np.ndarray, stage: int = GRADCAM_STAGE) -> np.ndarray:
        """Grad-CAM of the classifier's tumour logit from backbone stage `stage`, float32 (H, W) in [0, 1] at the
        input size (bilinear; zero outside the crop box of a classifier that crops)."""
        image = as_rgb(image)
        [box] = _boxes([image], self.classifier_spec, volume=False)
        x = self._prepare([image], self.classifier_spec, False, [box])
        heat = self._classify.gradcam(x, stage)[0]
        return np.clip(uncrop_probabilities(heat, box, image.shape[:2]), 0.0, 1.0).astype(np.float32)
