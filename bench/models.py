"""The speed benchmark's networks, full standard widths, for 3x32x32 (CIFAR-sized) inputs; no
torchvision.

  vgg16     VGG-16 with BatchNorm: 13 conv3x3-BN-ReLU (64, 64, M, 128, 128, M, 256 x3, M,
            512 x3, M, 512 x3, M), then Linear 512 -> 10. 313.2 M MACs per image. The engine
            and ONNX Runtime fold the BN into the convs (the engine at load, ORT's optimizer);
            PyTorch eager runs it unfused.
  resnet18  CIFAR ResNet-18: conv3x3 64 stem (no max pool), 4 stages of 2 basic blocks (64, 128,
            256, 512; 1x1 stride-2 downsample shortcuts with BN), global average pool, Linear
            512 -> 10. 556.7 M MACs per image.

`basis(model)` is converters.to_basis with M = N // 5 basis filters in every conv but the first
(linear layers stay dense); `tt(model)` is converters.to_tt on every conv but the first.
Weights are seeded random (He init, randomized BN statistics): speed does not depend on them.
"""
from __future__ import annotations

import torch
import torch.nn as nn

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _randomize_bn(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + 0.5 * torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))


def _seeded(build, seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build()
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    _randomize_bn(model, seed + 1)
    return model.eval()


class VGG(nn.Module):
    def __init__(self, cfg=VGG16, num_classes: int = 10):
        super().__init__()
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        blocks, cin = [], 64
        for i, w in enumerate((64, 128, 256, 512)):
            for j in range(2):
                blocks.append(BasicBlock(cin, w, 2 if j == 0 and i > 0 else 1))
                cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def vgg16(seed: int = 0) -> nn.Module:
    return _seeded(VGG, seed)


def resnet18(seed: int = 0) -> nn.Module:
    return _seeded(ResNet18, seed)


def _convs_but_first(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if type(m) is nn.Conv2d][1:]


def basis(model: nn.Module, divisor: int = 5) -> nn.Module:
    """Every conv but the first as a BasisConv with M = N // divisor (SVD basis of its filters)."""
    from converters.basis_layers import to_basis
    paths = _convs_but_first(model)
    ranks = {p: model.get_submodule(p).out_channels // divisor for p in paths}
    new, _ = to_basis(model, rank=ranks, layers=paths, example_input=torch.zeros(1, 3, 32, 32))
    return new.eval()


def tt(model: nn.Module, max_rank: int = 16) -> nn.Module:
    """Every conv but the first as a TT conv (TT-SVD, ranks capped at max_rank)."""
    from converters.tt_layers import to_tt
    new, _ = to_tt(model, max_rank=max_rank, layers=_convs_but_first(model))
    return new.eval()


MODELS = {
    "vgg16": vgg16,
    "resnet18": resnet18,
}
