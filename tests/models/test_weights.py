"""Conversion parity of random-weight ResNet50 checkpoints in every supported format, and strict loading."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from flax import nnx
from numpy.lib.stride_tricks import sliding_window_view

from flaxtumor import convert_weights
from flaxtumor.models import TumourClassifier, WeightsError, load_backbone, load_resnet50
from flaxtumor.models.resnet import ResNet50
from flaxtumor.models.weights import convert_tensors, read_metadata

TOL = 1e-4
SIZES = ((2, 224), (1, 256))  # (batch, side)
STAGES = (3, 4, 6, 3)


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


@nnx.jit
def features_and_logits(model, x):
    features = model.feature_map(x).mean(axis=(1, 2))
    return features, model.fc(features)


def images(batch: int, side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, side, side, 3)).astype(np.float32)


# -- torchvision layout: torch reference ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_resnet():
    torch = pytest.importorskip("torch", reason="torch is the torchvision-layout reference (pip install torch==2.13.0)")
    from tests.models.torch_reference import TorchResNet, randomise_bn

    torch.manual_seed(0)
    return randomise_bn(TorchResNet()).eval()


@pytest.fixture(scope="module")
def torch_checkpoints(torch_resnet, tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("torch")
    state = torch_resnet.state_dict()
    torch.save(state, root / "resnet50.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "resnet50.safetensors"))
    return root


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_parity(torch_resnet, torch_checkpoints, suffix):
    import torch

    dst = torch_checkpoints / f"converted{suffix.replace('.', '-')}"
    assert convert_weights.main([str(torch_checkpoints / f"resnet50{suffix}"), str(dst)]) == 0
    metadata = json.loads((dst / "metadata.json").read_text())
    assert metadata["layout"] == "torchvision" and metadata["normalisation"] == "imagenet" and metadata["has_top"]
    model = load_resnet50(dst, top=True)
    for i, (batch, side) in enumerate(SIZES):
        x = images(batch, side, seed=i)
        with torch.no_grad():
            ref_x = torch.from_numpy(x).permute(0, 3, 1, 2)
            ref_features = torch_resnet.features(ref_x).numpy()
            ref_logits = torch_resnet.fc(torch.from_numpy(ref_features)).numpy()
        features, logits = features_and_logits(model, x)
        assert features.shape == (batch, 2048) and logits.shape == (batch, 1000)
        assert rel_err(features, ref_features) <= TOL
        assert rel_err(logits, ref_logits) <= TOL


def test_backbone_from_converted_and_raw(torch_checkpoints):
    raw = load_resnet50(torch_checkpoints / "resnet50.safetensors")  # pooled features, head dropped
    converted = load_resnet50(torch_checkpoints / "converted-safetensors")
    assert raw.fc is None
    features = nnx.jit(lambda m, x: m(x))(raw, images(1, 32, seed=0))
    assert features.shape == (1, 2048) and features.dtype == np.float32
    a, b = nnx.state(raw), nnx.state(converted)
    assert all(np.array_equal(x, y) for x, y in zip(nnx.to_flat_state(a).leaves, nnx.to_flat_state(b).leaves))


def test_load_backbone_into_classifier(torch_checkpoints):
    model = TumourClassifier(ResNet50(rngs=nnx.Rngs(0)), (8,), 0.0, rngs=nnx.Rngs(1))
    metadata = load_backbone(model, torch_checkpoints / "converted-pth")
    assert metadata["normalisation"] == "imagenet"
    reference = load_resnet50(torch_checkpoints / "converted-pth")
    kernel = model.backbone.stages[3][2].conv3.kernel[...]
    assert np.array_equal(kernel, reference.stages[3][2].conv3.kernel[...])
    assert np.array_equal(model.backbone.bn_init.var[...], reference.bn_init.var[...])
    keras_model = TumourClassifier(ResNet50(layout="keras", rngs=nnx.Rngs(0)), (8,), 0.0, rngs=nnx.Rngs(1))
    with pytest.raises(WeightsError, match="layout 'torchvision'"):
        load_backbone(keras_model, torch_checkpoints / "converted-pth")


# -- Keras layout: numpy reference following Keras semantics -----------------------------------------------------------


def keras_names(top: bool) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Layer name -> [(weight name, shape)] of keras.applications.ResNet50, in Keras' own order."""
    layers = {"conv1_conv": _conv(7, 3, 64)}
    layers["conv1_bn"] = _bn(64)
    in_features = 64
    for i, size in enumerate(STAGES):
        features = 64 * 2**i
        for j in range(size):
            name = f"conv{i + 2}_block{j + 1}"
            if j == 0:
                layers[f"{name}_0_conv"] = _conv(1, in_features, 4 * features)
                layers[f"{name}_0_bn"] = _bn(4 * features)
            convs = [(1, in_features, features), (3, features, features), (1, features, 4 * features)]
            for k, (ksize, a, b) in enumerate(convs):
                layers[f"{name}_{k + 1}_conv"] = _conv(ksize, a, b)
                layers[f"{name}_{k + 1}_bn"] = _bn(b)
            in_features = 4 * features
    if top:
        layers["predictions"] = [("kernel", (2048, 1000)), ("bias", (1000,))]
    return layers


def _conv(k: int, a: int, b: int):
    return [("kernel", (k, k, a, b)), ("bias", (b,))]


def _bn(c: int):
    return [("gamma", (c,)), ("beta", (c,)), ("moving_mean", (c,)), ("moving_variance", (c,))]


def write_keras_h5(path, top: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """A Keras 2 `save_weights` HDF5 file of random weights; returns them as {"layer/weight": array}."""
    rng = np.random.default_rng(seed)
    weights = {}
    with h5py.File(path, "w") as f:
        names = ["input_1", "conv1_pad"]  # weightless layers are listed too
        f.create_group("input_1").attrs["weight_names"] = []
        f.create_group("conv1_pad").attrs["weight_names"] = []
        for layer, specs in keras_names(top).items():
            group = f.create_group(layer)
            group.attrs["weight_names"] = [f"{layer}/{w}:0".encode() for w, _ in specs]
            for w, shape in specs:
                if w == "kernel":
                    value = rng.normal(0, np.sqrt(1.0 / np.prod(shape[:-1])), shape)
                elif w in ("gamma", "moving_variance"):
                    value = rng.uniform(0.5, 1.5, shape)
                else:
                    value = rng.normal(0, 0.1, shape)
                weights[f"{layer}/{w}"] = value.astype(np.float32)
                group.create_dataset(f"{layer}/{w}:0", data=weights[f"{layer}/{w}"])
            names.append(layer)
        f.attrs["layer_names"] = [n.encode() for n in names]
        f.attrs["backend"] = b"tensorflow"
    return weights


def np_conv(x, kernel, bias, stride, pad):
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    windows = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # (N, Ho, Wo, C, kh, kw)
    return np.tensordot(windows, kernel, axes=([4, 5, 3], [0, 1, 2])) + bias


def keras_reference(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """keras.applications.resnet.ResNet50 (v1) forward in float64, inference mode: pooled features."""
    w = {k: v.astype(np.float64) for k, v in w.items()}

    def conv_bn(x, name, stride=1, pad=0):
        y = np_conv(x, w[f"{name}_conv/kernel"], w[f"{name}_conv/bias"], stride, pad)
        bn = f"{name}_bn/"
        scale = w[bn + "gamma"] / np.sqrt(w[bn + "moving_variance"] + 1.001e-5)
        return (y - w[bn + "moving_mean"]) * scale + w[bn + "beta"]

    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    x = relu(conv_bn(x.astype(np.float64), "conv1", stride=2, pad=3))  # ZeroPadding2D(3) + valid 7x7/2
    x = sliding_window_view(np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), axis=(1, 2))[:, ::2, ::2].max((4, 5))
    for i, size in enumerate(STAGES):
        for j in range(size):
            name, stride = f"conv{i + 2}_block{j + 1}", (2 if i > 0 and j == 0 else 1)
            shortcut = conv_bn(x, f"{name}_0", stride) if j == 0 else x
            y = relu(conv_bn(x, f"{name}_1", stride))  # v1: stride on the first 1x1
            y = relu(conv_bn(y, f"{name}_2", pad=1))
            x = relu(conv_bn(y, f"{name}_3") + shortcut)
    return x.mean((1, 2))


def test_keras_parity(tmp_path):
    weights = write_keras_h5(tmp_path / "resnet50.h5", top=True)
    dst = tmp_path / "converted"
    assert convert_weights.main([str(tmp_path / "resnet50.h5"), str(dst)]) == 0
    assert read_metadata(dst)["normalisation"] == "caffe"
    model = load_resnet50(dst, top=True)
    assert model.layout.name == "keras"
    for i, (batch, side) in enumerate(SIZES):
        x = images(batch, side, seed=10 + i)
        ref_features = keras_reference(weights, x)
        ref_logits = ref_features @ weights["predictions/kernel"].astype(np.float64) + weights["predictions/bias"]
        features, logits = features_and_logits(model, x)
        assert rel_err(features, ref_features) <= TOL
        assert rel_err(logits, ref_logits) <= TOL


def test_keras_notop_and_whole_model_h5(tmp_path):
    write_keras_h5(tmp_path / "notop.h5", top=False)
    metadata = read_metadata(tmp_path / "notop.h5")
    assert metadata["layout"] == "keras" and not metadata["has_top"] and metadata["num_classes"] is None
    with pytest.raises(WeightsError, match="no classifier head"):
        load_resnet50(tmp_path / "notop.h5", top=True)
    with h5py.File(tmp_path / "notop.h5") as src, h5py.File(tmp_path / "model.h5", "w") as dst:
        src.copy(src["/"], dst, "model_weights")  # model.save() nests the weights
        dst["model_weights"].attrs.update(src.attrs)
    assert read_metadata(tmp_path / "model.h5")["has_top"] is False


# -- strict loading ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_tensors(tmp_path_factory):
    from flaxtumor.models.weights import read_source

    path = tmp_path_factory.mktemp("keras") / "w.h5"
    write_keras_h5(path, top=False)
    return read_source(path)[0]


def test_strict_missing_key(keras_tensors):
    tensors = dict(keras_tensors)
    del tensors["conv4_block3_2_bn/moving_variance"]
    with pytest.raises(WeightsError, match="missing tensor 'conv4_block3_2_bn/moving_variance'"):
        convert_tensors(tensors, "keras", "src")


def test_strict_extra_key(keras_tensors):
    tensors = {**keras_tensors, "conv5_block4_1_conv/kernel": np.zeros((1, 1, 2048, 512), np.float32)}
    with pytest.raises(WeightsError, match="unexpected tensor 'conv5_block4_1_conv/kernel'"):
        convert_tensors(tensors, "keras", "src")


def test_strict_wrong_shape(keras_tensors):
    tensors = {**keras_tensors, "conv2_block1_0_conv/kernel": np.zeros((1, 1, 64, 128), np.float32)}
    with pytest.raises(WeightsError, match=r"'conv2_block1_0_conv/kernel' has shape \(1, 1, 64, 128\)"):
        convert_tensors(tensors, "keras", "src")


def test_strict_torchvision_names(keras_tensors):
    """torchvision keys: num_batches_tracked is skipped, a partial head is a missing key, a resnet101 key is extra."""
    shapes = {"conv1.weight": (64, 3, 7, 7), "bn1.num_batches_tracked": ()}
    tensors = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    with pytest.raises(WeightsError, match="missing tensor 'bn1.bias'"):
        convert_tensors(tensors, "torchvision", "src")
    with pytest.raises(WeightsError, match="unexpected tensor 'layer3.6.conv1.weight'"):
        convert_tensors({**tensors, "layer3.6.conv1.weight": np.zeros(1)}, "torchvision", "src")


def test_strict_converted_directory(tmp_path, keras_tensors):
    from flaxtumor.models.weights import save_converted

    flat = convert_tensors(keras_tensors, "keras", "src")
    metadata = {"format": "flaxtumor-resnet/1", "layout": "keras", "has_top": False, "num_classes": None}
    del flat["stages.1.0.proj_bn.mean"]
    save_converted(flat, metadata, tmp_path / "dst")
    with pytest.raises(WeightsError, match="missing tensor 'stages.1.0.proj_bn.mean'"):
        load_resnet50(tmp_path / "dst")


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        convert_weights.main(["--help"])
    assert exit_.value.code == 0 and "metadata.json" in capsys.readouterr().out
    (tmp_path / "w.npz").write_bytes(b"")
    assert convert_weights.main([str(tmp_path / "w.npz"), str(tmp_path / "dst")]) == 1
    assert "unknown weights format '.npz'" in capsys.readouterr().err
    (tmp_path / "w.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="w.safetensors: cannot read as safetensors"):
        load_resnet50(tmp_path / "w.safetensors")
