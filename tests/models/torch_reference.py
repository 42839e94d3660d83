"""Independent PyTorch versions of the models: the parity reference in tests and the baseline in bench/models.py.

`TorchResNet` uses torchvision's module names, so its `state_dict()` is a torchvision/timm ``resnet50`` checkpoint.
Import only where torch is installed (tests skip otherwise).
"""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Module):
    def __init__(self, in_features: int, features: int, stride: int):
        super().__init__()
        out = features * 4
        self.conv1 = nn.Conv2d(in_features, features, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(features)
        self.conv2 = nn.Conv2d(features, features, 3, stride=stride, padding=1, bias=False)  # v1.5: stride here
        self.bn2 = nn.BatchNorm2d(features)
        self.conv3 = nn.Conv2d(features, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or in_features != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_features, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
    def __init__(self, stage_sizes=(3, 4, 6, 3), width: int = 64, num_classes: int | None = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_features = width
        for i, size in enumerate(stage_sizes):
            blocks = []
            for j in range(size):
                blocks.append(Bottleneck(in_features, width * 2**i, 2 if i > 0 and j == 0 else 1))
                in_features = width * 2**i * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.stages = [getattr(self, f"layer{i + 1}") for i in range(len(stage_sizes))]
        self.fc = nn.Linear(in_features, num_classes) if num_classes else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW images -> pooled features."""
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for stage in self.stages:
            x = stage(x)
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        return features if self.fc is None else self.fc(features)


class TorchResUNetBlock(nn.Module):
    def __init__(self, a: int, b: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
            nn.Conv2d(b, b, 3, padding=1, bias=False), nn.BatchNorm2d(b),
        )
        self.proj = nn.Sequential(nn.Conv2d(a, b, 1, bias=False), nn.BatchNorm2d(b)) if a != b else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.proj(x))


class TorchResUNet(nn.Module):
    """The same architecture as flaxtumor.models.ResUNet (nearest upsample + conv-BN-ReLU, concat, residual block)."""

    def __init__(self, widths=(16, 32, 64, 128, 256), in_channels: int = 3):
        super().__init__()
        *levels, bottom = widths
        ins = (in_channels, *levels[:-1])
        self.encoder = nn.ModuleList(TorchResUNetBlock(a, b) for a, b in zip(ins, levels))
        self.bottleneck = TorchResUNetBlock(levels[-1], bottom)
        ups = (bottom, *levels[:0:-1])
        self.upsamples = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(a, b, 3, padding=1, bias=False),
                          nn.BatchNorm2d(b), nn.ReLU())
            for a, b in zip(ups, levels[::-1])
        )
        self.decoder = nn.ModuleList(TorchResUNetBlock(2 * b, b) for b in levels[::-1])
        self.out = nn.Conv2d(levels[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.upsamples, self.decoder, reversed(skips)):
            x = block(torch.cat([up(x), skip], 1))
        return self.out(x)


def randomise_bn(model: nn.Module) -> nn.Module:
    """Real-looking BatchNorm parameters and statistics instead of the 1/0 defaults, so a parity test can fail."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return model


def torch_classifier(head_widths: tuple[int, ...] = (256, 256), dropout: float = 0.3) -> nn.Module:
    """The TumourClassifier's architecture in torch: ResNet50 features + the seed's head, one logit per image."""
    layers: list[nn.Module] = [TorchResNet(num_classes=None)]
    width = 2048
    for w in head_widths:
        layers += [nn.Linear(width, w), nn.ReLU(), nn.Dropout(dropout)]
        width = w
    return nn.Sequential(*layers, nn.Linear(width, 1), nn.Flatten(0))
