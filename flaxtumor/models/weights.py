"""ImageNet ResNet50 weights: read the formats people have, map them strictly onto `ResNet`, save and load them.

Sources (the layout follows from the format):
- torchvision / timm ``resnet50`` state dicts: ``.pth``/``.pt``/``.bin`` (needs torch, imported only here) or
  ``.safetensors`` (numpy API, no torch) -> layout ``"torchvision"``, ImageNet mean/std preprocessing.
- Keras ``ResNet50`` weights saved by Keras 2 ``.h5`` (the ``..._notop.h5`` downloads, or a whole-model ``.h5`` with a
  ``model_weights`` group) -> layout ``"keras"``, caffe preprocessing.

Loading is strict, after big_vision's ``merge_params``: every source tensor maps to exactly one variable and every
variable gets one tensor; only the classifier head (``fc.*`` / ``predictions/*``) may be absent from the source, or
dropped when the target has no head. torch's ``num_batches_tracked`` counters carry no weights and are skipped.
Any other missing, extra or misshapen tensor raises `WeightsError` naming it.

Converted weights (``python -m flaxtumor.convert_weights SRC DST``) are a directory::

    DST/weights.safetensors   flat float32 tensors keyed by the Flax variable path, e.g. "stages.3.2.conv1.kernel"
                              (HWIO conv kernels, (in, out) dense kernels, BN "scale"/"bias"/"mean"/"var")
    DST/metadata.json         {"format": "flaxtumor-resnet/1", "architecture": "resnet50", "layout", "normalisation",
                               "source", "source_format", "source_sha256", "has_top", "num_classes"}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from flax import nnx

from flaxtumor.models.resnet import ResNet, ResNet50, get_layout

FORMAT = "flaxtumor-resnet/1"
WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "metadata.json"
RESNET50_STAGES = (3, 4, 6, 3)
HEAD = "fc."  # Flax path prefix of the classifier head, the only part allowed to be missing or dropped

Transform = Callable[[np.ndarray], np.ndarray]


class WeightsError(ValueError):
    """Unreadable, incompatible or non-strictly-matching weights; the message starts with the path."""


# -- source naming schemes -------------------------------------------------------------------------------------------


def _oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else w


def _transpose(w: np.ndarray) -> np.ndarray:
    return w.T if w.ndim == 2 else w


@dataclass(frozen=True)
class _Scheme:
    """How one source format names ResNet tensors; `_mapping` turns it into source key -> (Flax key, transform)."""

    stem: tuple[str, str]  # source names of the stem conv and BN
    block: Callable[[int, int, str], str]  # (stage, block, Flax part e.g. "conv1"/"proj_bn") -> source module name
    top: str
    sep: str  # between module name and tensor name
    conv: dict[str, str]  # source tensor name -> Flax variable name
    bn: dict[str, str]
    dense: dict[str, str]
    conv_kernel: Transform | None  # layout change of conv kernels into HWIO
    dense_kernel: Transform | None
    skipped_suffix: str | None  # bookkeeping tensors without a Flax counterpart


_TORCH_PARTS = {"proj_conv": "downsample.0", "proj_bn": "downsample.1"}
_KERAS_PARTS = {"conv1": "1_conv", "bn1": "1_bn", "conv2": "2_conv", "bn2": "2_bn", "conv3": "3_conv", "bn3": "3_bn",
                "proj_conv": "0_conv", "proj_bn": "0_bn"}

_SCHEMES: dict[str, _Scheme] = {
    "torchvision": _Scheme(
        stem=("conv1", "bn1"),
        block=lambda i, j, part: f"layer{i + 1}.{j}.{_TORCH_PARTS.get(part, part)}",
        top="fc",
        sep=".",
        conv={"weight": "kernel"},
        bn={"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"},
        dense={"weight": "kernel", "bias": "bias"},
        conv_kernel=_oihw_to_hwio,
        dense_kernel=_transpose,
        skipped_suffix=".num_batches_tracked",
    ),
    "keras": _Scheme(
        stem=("conv1_conv", "conv1_bn"),
        block=lambda i, j, part: f"conv{i + 2}_block{j + 1}_{_KERAS_PARTS[part]}",
        top="predictions",
        sep="/",
        conv={"kernel": "kernel", "bias": "bias"},
        bn={"gamma": "scale", "beta": "bias", "moving_mean": "mean", "moving_variance": "var"},
        dense={"kernel": "kernel", "bias": "bias"},
        conv_kernel=None,  # Keras kernels are HWIO already
        dense_kernel=None,
        skipped_suffix=None,
    ),
}


def _mapping(layout: str, stage_sizes: tuple[int, ...]) -> dict[str, tuple[str, Transform | None]]:
    """Source key -> (Flax key, transform) for every tensor of a ResNet with a top."""
    scheme = _SCHEMES[layout]
    out: dict[str, tuple[str, Transform | None]] = {}

    def add(src: str, dst: str, names: dict[str, str], kernel: Transform | None) -> None:
        for s, d in names.items():
            out[f"{src}{scheme.sep}{s}"] = (f"{dst}.{d}", kernel if d == "kernel" else None)

    add(scheme.stem[0], "conv_init", scheme.conv, scheme.conv_kernel)
    add(scheme.stem[1], "bn_init", scheme.bn, None)
    for i, size in enumerate(stage_sizes):
        for j in range(size):
            parts = ("1", "2", "3") + (("proj",) if j == 0 else ())  # the first block of each stage projects
            for k in parts:
                conv, bn = ("proj_conv", "proj_bn") if k == "proj" else (f"conv{k}", f"bn{k}")
                add(scheme.block(i, j, conv), f"stages.{i}.{j}.{conv}", scheme.conv, scheme.conv_kernel)
                add(scheme.block(i, j, bn), f"stages.{i}.{j}.{bn}", scheme.bn, None)
    add(scheme.top, "fc", scheme.dense, scheme.dense_kernel)
    return out


# -- reading sources --------------------------------------------------------------------------------------------------

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_H5_SUFFIXES = (".h5", ".hdf5", ".keras5")


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch  # optional: only this format needs it
    except ImportError:
        raise WeightsError(f"{path}: reading .pth needs torch (pip install torch); .safetensors does not") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # training checkpoints nest the state dict
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict, got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key.removeprefix("module.")] = value.detach().cpu().numpy()  # DataParallel saves prefix "module."
    return out


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return {k.removeprefix("module."): v for k, v in load_file(str(path)).items()}


def _read_keras_h5(path: Path) -> dict[str, np.ndarray]:
    """Keras 2 HDF5: root attr ``layer_names``; each layer group's attr ``weight_names`` ("conv1_conv/kernel:0")."""
    import h5py

    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f  # whole-model .h5 vs save_weights .h5
        if "layer_names" not in root.attrs:
            raise WeightsError(f"{path}: not a Keras 2 HDF5 weights file (no 'layer_names' attribute)")
        out = {}
        for layer in (n.decode() if isinstance(n, bytes) else n for n in root.attrs["layer_names"]):
            group = root[layer]
            for weight in (n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]):
                name = weight.rsplit("/", 1)[-1].split(":")[0]  # "conv1_conv/kernel:0" -> "kernel"
                out[f"{layer}/{name}"] = np.asarray(group[weight])
        return out


def read_source(path: str | Path) -> tuple[dict[str, np.ndarray], str, str]:
    """Raw tensors of a source checkpoint plus its layout and format name."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    suffix = path.suffix.lower()
    readers = {**dict.fromkeys(_TORCH_SUFFIXES, (_read_torch, "torchvision", "torch")),
               ".safetensors": (_read_safetensors, "torchvision", "safetensors"),
               **dict.fromkeys(_H5_SUFFIXES, (_read_keras_h5, "keras", "keras-h5"))}
    if suffix not in readers:
        raise WeightsError(
            f"{path}: unknown weights format {suffix!r}; expected .pth/.pt/.bin, .safetensors, .h5, "
            "or a directory written by `python -m flaxtumor.convert_weights`"
        )
    reader, layout, source_format = readers[suffix]
    try:
        return reader(path), layout, source_format
    except WeightsError:
        raise
    except Exception as e:  # torch, safetensors and h5py each raise their own types for truncated or foreign files
        raise WeightsError(f"{path}: cannot read as {source_format} ({type(e).__name__}: {e})") from e


# -- strict mapping -------------------------------------------------------------------------------------------------


def _expected_shapes(layout: str, num_classes: int | None) -> dict[str, tuple[int, ...]]:
    abstract = nnx.eval_shape(lambda: ResNet50(layout=layout, num_classes=num_classes, rngs=nnx.Rngs(0)))
    return {k: tuple(v.shape) for k, v in _variables(abstract).items()}


def convert_tensors(tensors: dict[str, np.ndarray], layout: str, source: str) -> dict[str, np.ndarray]:
    """Maps source tensors onto ResNet50 Flax keys, strictly; the head is kept when the source has one."""
    scheme = _SCHEMES[layout]
    mapping = _mapping(layout, RESNET50_STAGES)
    head = {k for k, (dst, _) in mapping.items() if dst.startswith(HEAD)}
    skipped = {k for k in tensors if scheme.skipped_suffix and k.endswith(scheme.skipped_suffix)}
    extra = sorted(set(tensors) - set(mapping) - skipped)
    if extra:
        raise WeightsError(
            f"{source}: unexpected tensor {extra[0]!r} (no ResNet50 {layout} variable; {len(extra)} extra in all)"
        )
    has_top = bool(head & set(tensors))
    missing = sorted(set(mapping) - set(tensors) - (set() if has_top else head))
    if missing:
        raise WeightsError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    num_classes = None
    if has_top:
        top_bias = next(k for k in head if mapping[k][0] == "fc.bias")
        num_classes = int(np.size(tensors[top_bias]))  # a misshapen bias is then reported by the shape check
    shapes = _expected_shapes(layout, num_classes)
    out = {}
    for key in sorted(set(tensors) - skipped):
        dst, transform = mapping[key]
        value = np.asarray(tensors[key], dtype=np.float32)
        value = transform(value) if transform else value
        if value.shape != shapes[dst]:
            raise WeightsError(
                f"{source}: tensor {key!r} has shape {tuple(tensors[key].shape)}; {dst} needs {shapes[dst]}"
                + (" after transposing" if transform else "")
            )
        out[dst] = np.ascontiguousarray(value)
    return out


def _variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    return {
        ".".join(map(str, path)): v
        for path, v in nnx.iter_graph(model)
        if isinstance(v, (nnx.Param, nnx.BatchStat))
    }


def assign(model: ResNet, flat: dict[str, np.ndarray], source: str) -> None:
    """Writes Flax-keyed tensors into `model`, strictly. A source head is dropped when `model` has none (the
    classifier's backbone); a model head is left as initialised when the source has none."""
    variables = _variables(model)
    if model.fc is None:
        flat = {k: v for k, v in flat.items() if not k.startswith(HEAD)}
    optional = {k for k in variables if k.startswith(HEAD)} - set(flat)
    extra = sorted(set(flat) - set(variables))
    if extra:
        raise WeightsError(f"{source}: unexpected tensor {extra[0]!r} for this model ({len(extra)} extra in all)")
    missing = sorted(set(variables) - set(flat) - optional)
    if missing:
        raise WeightsError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    for key, value in flat.items():
        if tuple(value.shape) != tuple(variables[key].shape):
            raise WeightsError(
                f"{source}: tensor {key!r} has shape {tuple(value.shape)}; the model needs {variables[key].shape}"
            )
    for key, value in flat.items():
        variables[key][...] = np.asarray(value, dtype=variables[key].dtype)


# -- converted weights on disk -------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_source(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A source checkpoint as (Flax-keyed tensors, metadata)."""
    path = Path(path)
    tensors, layout, source_format = read_source(path)
    flat = convert_tensors(tensors, layout, str(path))
    has_top = "fc.bias" in flat
    metadata = {
        "format": FORMAT,
        "architecture": "resnet50",
        "layout": layout,
        "normalisation": get_layout(layout).normalisation,
        "source": str(path),
        "source_format": source_format,
        "source_sha256": _sha256(path),
        "has_top": has_top,
        "num_classes": int(flat["fc.bias"].shape[0]) if has_top else None,
    }
    return flat, metadata


def save_converted(flat: dict[str, np.ndarray], metadata: dict[str, Any], dst: str | Path) -> Path:
    from safetensors.numpy import save_file

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(dst / WEIGHTS_FILE))
    (dst / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return dst


def export_encoder(encoder: ResNet, dst: str | Path, provenance: dict[str, Any]) -> Path:
    """Writes a trained encoder (a ResNet50 without top, e.g. a ResNet50-UNet's) as backbone weights in the converted
    format, so `train.py --task cls --backbone-weights DST` and `load_resnet50(DST)` take it like ImageNet weights.

    `provenance` must say how the encoder was trained: ``normalisation`` (the preprocessing it saw), ``image_size``,
    ``source`` and the ``patients`` whose slices trained it; it is recorded in metadata.json.
    """
    missing = {"normalisation", "image_size", "source", "patients"} - set(provenance)
    if missing:
        raise ValueError(f"export_encoder needs provenance fields {sorted(missing)}")
    if encoder.fc is not None:
        raise WeightsError(f"{dst}: only a ResNet without top exports as backbone weights")
    flat = {key: np.asarray(v[...], dtype=np.float32) for key, v in _variables(encoder).items()}
    metadata = {
        "format": FORMAT,
        "architecture": "resnet50" if encoder.stage_sizes == RESNET50_STAGES else "resnet_tiny",
        "layout": encoder.layout.name,
        "source_format": "flaxtumor-encoder",
        "source_sha256": None,
        "has_top": False,
        "num_classes": None,
        **provenance,
    }
    return save_converted(flat, metadata, dst)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of converted weights (a DST directory); for a raw source, what converting it would record."""
    path = Path(path)
    if not path.is_dir():
        return convert_source(path)[1]
    try:
        metadata = json.loads((path / METADATA_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(
            f"{path}: cannot read {METADATA_FILE} ({e}); convert with `python -m flaxtumor.convert_weights`"
        ) from None
    if metadata.get("format") != FORMAT:
        raise WeightsError(f"{path}: {METADATA_FILE} has format {metadata.get('format')!r}, expected {FORMAT!r}")
    get_layout(metadata["layout"])
    return metadata


def read_weights(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(Flax-keyed tensors, metadata) from a converted directory or straight from a source file."""
    path = Path(path)
    if not path.is_dir():
        return convert_source(path)
    from safetensors.numpy import load_file

    metadata = read_metadata(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise WeightsError(f"{path}: no {WEIGHTS_FILE}")
    return load_file(str(weights)), metadata


def load_resnet50(path: str | Path, *, top: bool = False) -> ResNet:
    """The ImageNet ResNet50 from converted weights (or a raw .pth/.safetensors/.h5), in eval mode.

    Without `top` it returns pooled features (N, 2048) for NHWC float input normalised as
    ``read_metadata(path)["normalisation"]`` says; with `top` (the source must have one) the class logits.
    """
    flat, metadata = read_weights(path)
    if top and not metadata["has_top"]:
        raise WeightsError(f"{path}: top=True but these weights have no classifier head")
    num_classes = metadata["num_classes"] if top else None
    model = ResNet50(layout=metadata["layout"], num_classes=num_classes, rngs=nnx.Rngs(0))
    assign(model, flat, str(path))
    model.eval()
    return model
