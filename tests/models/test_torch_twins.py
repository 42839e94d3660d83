"""The PyTorch twins that the benchmarks time (tests/models/torch_reference.py) compute the same functions as the Flax
models: same weights copied across, eval-mode forward within 1e-4 of the largest output. (The ResNet50 backbone twin is
checked by the weight-conversion parity tests in test_weights.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from flaxtumor.config import ModelConfig
from flaxtumor.models import ResUNet, build_classifier
from flaxtumor.models.weights import convert_tensors

torch = pytest.importorskip("torch", reason="torch is the benchmarks' reference (pip install torch==2.13.0)")


def _copy_conv(conv: nnx.Conv, weight, bias=None) -> None:
    conv.kernel[...] = np.transpose(weight.detach().numpy(), (2, 3, 1, 0))  # OIHW -> HWIO
    if bias is not None:
        conv.bias[...] = bias.detach().numpy()


def _copy_bn(bn: nnx.BatchNorm, tbn) -> None:
    bn.scale[...], bn.bias[...] = tbn.weight.detach().numpy(), tbn.bias.detach().numpy()
    bn.mean[...], bn.var[...] = tbn.running_mean.numpy(), tbn.running_var.numpy()


def _copy_block(block, tblock) -> None:
    body = tblock.body
    _copy_conv(block.conv1, body[0].weight), _copy_bn(block.bn1, body[1])
    _copy_conv(block.conv2, body[3].weight), _copy_bn(block.bn2, body[4])
    if block.proj_conv is not None:
        _copy_conv(block.proj_conv, tblock.proj[0].weight), _copy_bn(block.proj_bn, tblock.proj[1])


def _assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    scale = float(np.abs(theirs).max())
    assert np.abs(ours - theirs).max() <= 1e-4 * scale, f"max diff {np.abs(ours - theirs).max():.3g} vs {scale:.3g}"


def test_resunet_twin_matches() -> None:
    from tests.models.torch_reference import TorchResUNet, randomise_bn

    torch.manual_seed(0)
    twin = TorchResUNet()
    randomise_bn(twin)
    twin.eval()
    model = ResUNet(rngs=nnx.Rngs(0))
    for ours, theirs in zip([*model.encoder, model.bottleneck, *model.decoder],
                            [*twin.encoder, twin.bottleneck, *twin.decoder]):
        _copy_block(ours, theirs)
    for up, tup in zip(model.upsamples, twin.upsamples):
        _copy_conv(up.conv, tup[1].weight), _copy_bn(up.bn, tup[2])
    _copy_conv(model.out, twin.out.weight, twin.out.bias)
    model.eval()
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        theirs = twin(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    _assert_close(np.asarray(model(x)), theirs)


def test_classifier_twin_matches() -> None:
    from tests.models.torch_reference import randomise_bn, torch_classifier

    torch.manual_seed(1)
    twin = torch_classifier()
    randomise_bn(twin)
    twin.eval()
    model = build_classifier(ModelConfig(), nnx.Rngs(0))
    backbone = {k: v.numpy() for k, v in twin[0].state_dict().items()}
    flat = convert_tensors(backbone, "torchvision", "torch twin")
    from flaxtumor.models.weights import assign

    assign(model.backbone, flat, "torch twin")
    linears = [m for m in twin if isinstance(m, torch.nn.Linear)]
    for dense, linear in zip([*model.hidden, model.logit], linears):
        dense.kernel[...] = linear.weight.detach().numpy().T
        dense.bias[...] = linear.bias.detach().numpy()
    model.eval()
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        theirs = twin(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    _assert_close(np.asarray(model(x)), theirs)
