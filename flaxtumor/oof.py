"""Out-of-fold predictions: one patient's probability volume by the fold model that held it out, predicted as the
pipeline predicts (`predict_fold`), stored and read back (`save_oof`, `load_oof`) and drawn as the pipeline's masks
at the slices' own size (`oof_masks`). Cross-validation (`crossval`), its seed ensembles (`crossval_ensemble`) and the
classifier gate's choice (`classifier_gate`) score them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from flaxtumor.data.augment import fill_with_flair
from flaxtumor.data.io import read_image, read_mask
from flaxtumor.data.lgg import Patient
from flaxtumor.data.preprocess import Box, crop_box, mask_at_input_size, preprocess

_BATCH = 8  # inference batch: one compiled shape per fold model


@dataclass(frozen=True)
class OutOfFold:
    """One patient's prediction by the fold model that held it out."""

    patient_id: str
    fold: int
    probabilities: np.ndarray  # seg: float16 (D, S, S) at the model's input size; cls: float32 (D,)
    slice_index: np.ndarray  # (D,) slice numbers, in order
    box: Box | None = None  # the crop the model saw, in input pixels (None: the whole slice)
    flipped: np.ndarray | None = None  # seg: with flip TTA (the pipeline's `tta`), like `probabilities`


def _predictor(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """Sigmoid outputs of `model` for (N, S, S, C) inputs, in fixed-size batches (the last one padded)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: jax.nn.sigmoid(nnx.merge(graphdef, state)(x).astype(jnp.float32)))

    def predict(x: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(x), _BATCH):
            chunk = x[start : start + _BATCH]
            pad = np.zeros((_BATCH - len(chunk), *chunk.shape[1:]), chunk.dtype)
            out.append(np.asarray(forward(state, np.concatenate([chunk, pad])))[: len(chunk)])
        return np.concatenate(out)

    return predict


def predict_fold(
    fold: int, checkpoint: Path, patients: Sequence[Patient], tta: bool = False, flair_only: bool = False
) -> tuple[list[OutOfFold], dict[str, Any]]:
    """The fold model's probability volumes for its held-out `patients` (whole volumes in slice order, normalised
    as in training; a 2.5D model's neighbours are the volume's slices, stacked by `preprocess`); with `tta` (seg)
    also flip-TTA volumes, averaged as the pipeline averages them (`compiled_model`: the sigmoid of the slice and of
    its horizontal flip, flipped back). With `flair_only`, each volume's pre- and post-contrast are first replaced by
    its FLAIR, as kaggle_3m stores a patient lacking both (a stress test: `compare_runs --flair-only`)."""
    from flaxtumor.checkpoints import load_inference

    model, metadata = load_inference(checkpoint)
    spec = metadata.preprocessing
    predict = _predictor(model)
    results = []
    for p in patients:
        volume = np.stack([read_image(s.image_path) for s in p.slices])
        volume = fill_with_flair(volume) if flair_only else volume
        box = crop_box(volume, spec.crop)  # kept, so masks go back through the crop the model saw
        x = preprocess(volume, spec, box=box)
        probs = predict(x)
        flipped = (probs + predict(x[:, :, ::-1])[:, :, ::-1]) / 2 if tta and probs.ndim == 4 else None
        # Volumes are stored (and so scored) in float16: a probability needs 3 digits, and the files stay small.
        probs, flipped = (v[..., 0].astype(np.float16) if v is not None and v.ndim == 4 else v
                          for v in (probs, flipped))
        results.append(OutOfFold(p.patient_id, fold, probs, np.array([s.slice_index for s in p.slices]), box,
                                 flipped))
    return results, metadata


def save_oof(result: OutOfFold, folder: Path) -> Path:
    path = Path(folder) / f"{result.patient_id}.npz"
    box = () if result.box is None else tuple(result.box)
    flipped = {} if result.flipped is None else {"flipped": result.flipped}
    np.savez_compressed(path, probabilities=result.probabilities, slice_index=result.slice_index, fold=result.fold,
                        box=np.array(box, np.int64), **flipped)
    return path


def load_oof(path: Path) -> OutOfFold:
    """An out-of-fold volume as `save_oof` wrote it (OUT/oof/<patient_id>.npz)."""
    with np.load(path) as f:
        box = tuple(int(v) for v in f["box"])
        return OutOfFold(Path(path).stem, int(f["fold"]), f["probabilities"], f["slice_index"],
                         Box(*box) if box else None, f["flipped"] if "flipped" in f.files else None)


def _truth(patient: Patient) -> list[np.ndarray]:
    return [read_mask(s.mask_path) if s.mask_path is not None else None for s in patient.slices]


def oof_masks(r: OutOfFold, patient: Patient, threshold: float, tta: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(predicted masks, truth) of one patient at the slices' own size, as the pipeline returns them (with `tta`,
    from the flip-TTA probabilities)."""
    if tta and r.flipped is None:
        raise ValueError(f"{r.patient_id}: no flip-TTA probabilities were saved (rerun crossval --resume)")
    probabilities = r.flipped if tta else r.probabilities
    truth = _truth(patient)
    truth = np.stack([t if t is not None else np.zeros(probabilities.shape[1:], bool) for t in truth])
    box = r.box or Box(0, 0, *truth.shape[1:])
    preds = np.stack([mask_at_input_size(p, threshold, box, t.shape) for p, t in zip(probabilities, truth)])
    return preds, truth
