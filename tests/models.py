"""Small architecture families for the export and whole-network tests.

FAMILIES: name -> (factory, input_shape); input_shape includes a batch of 1. Factories are
deterministic (seeded init) and give every BatchNorm non-trivial running statistics and affine
parameters, so BN folding is really exercised. Widths are small (fast on 2 cores) and spatial
sizes are not powers of two.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

FAMILIES: dict[str, tuple[Callable[..., nn.Module], tuple[int, ...]]] = {}


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Seeded running_mean/var, weight and bias for every BatchNorm that has them."""
    g = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            c = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            if m.affine:
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))


def family(name: str, input_shape: tuple[int, ...]):
    """Register `build` (no arguments) as family `name`; the factory takes an optional seed."""
    def deco(build: Callable[[], nn.Module]):
        def factory(seed: int = 0) -> nn.Module:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = build()
            randomize_batchnorm(model, seed)
            return model.eval()
        factory.__name__, factory.__doc__ = build.__name__, build.__doc__
        FAMILIES[name] = (factory, input_shape)
        return factory
    return deco


def as_list(y) -> list:
    """A model's outputs as a list: a dict's values in order, a tuple's items, or [tensor]."""
    return list(y.values()) if isinstance(y, dict) else list(y) if isinstance(y, (tuple, list)) else [y]


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act=nn.ReLU) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act(inplace=True)) if act else nn.Sequential(*layers)


# --- VGG ---------------------------------------------------------------------------------------

class VGG(nn.Module):
    def __init__(self, cfg, num_classes: int = 10):
        super().__init__()
        layers, cin = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(cin * 4, 32), nn.ReLU(True), nn.Dropout(),
            nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, num_classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@family("vgg16_bn", (1, 3, 36, 36))
def vgg16_bn():
    """VGG-16 with BatchNorm: 13 convs, 5 max pools, adaptive pool, 3 linears."""
    return VGG([8, 8, "M", 16, 16, "M", 24, 24, 24, "M", 32, 32, 32, "M", 32, 32, 32, "M"])


# --- ResNets -----------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = (conv_bn(cin, planes, 1, stride, act=None)
                           if stride != 1 or cin != planes else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity          # torchvision style; fx records an out-of-place add
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.body = nn.Sequential(conv_bn(cin, planes, 1), conv_bn(planes, planes, 3, stride),
                                  conv_bn(planes, out, 1, act=None))
        self.downsample = conv_bn(cin, out, 1, stride, act=None) if stride != 1 or cin != out else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(torch.add(self.body(x), identity))


class ResNet(nn.Module):
    def __init__(self, block, widths, depths, stem: nn.Module, stem_width: int, num_classes: int = 10):
        super().__init__()
        self.stem = stem
        cin, stages = stem_width, []
        for i, (w, d) in enumerate(zip(widths, depths)):
            blocks = []
            for j in range(d):
                blocks.append(block(cin, w, 2 if j == 0 and i > 0 else 1))
                cin = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.avgpool(self.layers(self.stem(x)))
        return self.fc(x.view(x.size(0), -1))


@family("resnet18", (1, 3, 36, 36))
def resnet18():
    """ResNet-18: 7x7/2 stem + max pool, 4 stages of 2 basic blocks, 1x1 downsample shortcuts."""
    stem = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, 2, 1))
    return ResNet(BasicBlock, (8, 16, 24, 32), (2, 2, 2, 2), stem, 8)


@family("resnet_bottleneck", (1, 3, 36, 36))
def resnet_bottleneck():
    """Bottleneck ResNet (1x1-3x3-1x1, expansion 4), 3x3 stem, torch.add shortcuts."""
    return ResNet(Bottleneck, (4, 8, 12), (1, 2, 1), conv_bn(3, 8), 8)


# --- DenseNet ----------------------------------------------------------------------------------

class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list):
        x = torch.cat(features, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseBlock(nn.ModuleList):
    def forward(self, x):
        features = [x]
        for layer in self:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self, growth: int = 6, blocks=(3, 3), bn_size: int = 2, num_classes: int = 10):
        super().__init__()
        c = 2 * growth
        layers = [nn.Conv2d(3, c, 3, padding=1, bias=False)]
        for i, n in enumerate(blocks):
            layers.append(DenseBlock([DenseLayer(c + j * growth, growth, bn_size) for j in range(n)]))
            c += n * growth
            if i < len(blocks) - 1:
                layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c // 2, 1, bias=False),
                           nn.AvgPool2d(2)]
                c //= 2
        self.features = nn.Sequential(*layers, nn.BatchNorm2d(c))
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        x = F.relu(self.features(x), inplace=True)
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        return self.classifier(x)


@family("densenet", (1, 3, 36, 36))
def densenet():
    """DenseNet-BC: concatenating dense blocks (growth 6), 1x1 + avg-pool transitions."""
    return DenseNet()


# --- AlexNet -----------------------------------------------------------------------------------

@family("alexnet", (1, 3, 67, 67))
def alexnet():
    """AlexNet: 11x11/4 first conv, overlapping 3/2 max pools with ceil_mode, adaptive pool, dropout."""
    class AlexNet(nn.Module):
        def __init__(self, num_classes: int = 10):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
                nn.Conv2d(16, 24, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
                nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(32, 24, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True))
            self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
            self.classifier = nn.Sequential(
                nn.Dropout(0.5), nn.Linear(24 * 9, 48), nn.ReLU(inplace=True),
                nn.Dropout(0.5), nn.Linear(48, 48), nn.ReLU(inplace=True), nn.Linear(48, num_classes))

        def forward(self, x):
            x = self.avgpool(self.features(x))
            return self.classifier(torch.flatten(x, 1))
    return AlexNet()


# --- MobileNetV2 -------------------------------------------------------------------------------

class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   conv_bn(hidden, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


@family("mobilenet_v2", (1, 3, 36, 36))
def mobilenet_v2():
    """MobileNetV2: depthwise 3x3, inverted residuals with ReLU6, linear 1x1 projections."""
    class MobileNetV2(nn.Module):
        def __init__(self, num_classes: int = 10):
            super().__init__()
            layers, cin = [conv_bn(3, 8, 3, 2, act=nn.ReLU6)], 8
            for t, c, n, s in ((1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 3, 2), (4, 24, 1, 1)):
                for i in range(n):
                    layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers.append(conv_bn(cin, 64, 1, act=nn.ReLU6))
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

        def forward(self, x):
            x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
            return self.classifier(torch.flatten(x, 1))
    return MobileNetV2()


# --- several outputs ---------------------------------------------------------------------------

class Backbone(nn.Sequential):
    def __init__(self):
        super().__init__(conv_bn(3, 8), nn.MaxPool2d(2), conv_bn(8, 16, stride=2))


@family("two_outputs", (1, 3, 36, 36))
def two_outputs():
    """Tuple output: classification logits (Linear-BatchNorm1d head) and a sigmoid score map."""
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Backbone()
            self.cls = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 24),
                                     nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 10))
            self.seg = nn.Sequential(nn.Conv2d(16, 2, 1), nn.Sigmoid())

        def forward(self, x):
            f = self.backbone(x)
            return self.cls(f), self.seg(f)
    return TwoHeads()


@family("dict_outputs", (1, 3, 36, 36))
def dict_outputs():
    """Dict output {"logits", "embedding", "probs"}; module activations and dropout kinds."""
    class DictHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = Backbone()
            self.drop = nn.Dropout2d(0.3)
            self.pool = nn.Sequential(nn.AvgPool2d(3, 2, 1, count_include_pad=False), nn.Identity(),
                                      nn.AdaptiveAvgPool2d((1, None)), nn.Flatten(1, -1))
            self.embed = nn.Sequential(nn.Linear(16 * 5, 32), nn.BatchNorm1d(32, affine=False),
                                       nn.Hardtanh(-0.5, 0.5), nn.AlphaDropout(0.1), nn.Tanh())
            self.head = nn.Sequential(nn.Linear(32, 10), nn.LeakyReLU(0.2))
            self.log_softmax, self.softmax = nn.LogSoftmax(dim=1), nn.Softmax(dim=-1)

        def forward(self, x):
            e = self.embed(self.pool(self.drop(self.backbone(x))))
            z = self.head(e)
            return {"logits": self.log_softmax(z), "embedding": e, "probs": self.softmax(z)}
    return DictHeads()


# --- shapes and functional ops -----------------------------------------------------------------

@family("permute_view", (1, 3, 22, 18))
def permute_view():
    """Channels-last flatten before a linear layer, plus a linear applied to a rank-3 tensor."""
    class PermuteView(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv_bn(3, 8, 3, 2)                 # -> 8 x 11 x 9
            self.tokens = nn.Linear(8, 6)
            self.fc = nn.Linear(8 * 11 * 9 + 6 * 99, 10)

        def forward(self, x):
            x = self.conv(x)
            flat = x.permute(0, 2, 3, 1).reshape(x.size(0), -1)
            t = self.tokens(x.flatten(2).transpose(1, 2).contiguous())   # (B, HW, 6)
            t = t.view(t.shape[0], t.size(1) * t.size(2))
            return self.fc(torch.cat((flat, t), dim=-1))
    return PermuteView()


@family("functional", (1, 3, 30, 26))
def functional():
    """Functional ops: silu, hardswish, leaky_relu, prelu (module and F.prelu), sigmoid, tanh,
    relu6, hardtanh, pools, squeeze-excite mean, cat, scalar add/mul, softmax / log_softmax."""
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.conv3, self.prelu = nn.Conv2d(8, 8, 1), nn.PReLU(8)
            self.alpha = nn.Parameter(torch.tensor([0.25]))
            self.se = nn.Conv2d(24, 24, 1)
            self.fc = nn.Linear(24, 10)

        def forward(self, x):
            x = F.silu(self.conv1(x))
            a = F.hardswish(self.conv2(x))
            b = self.prelu(F.leaky_relu(self.conv3(x), 0.1))
            x = torch.cat([torch.sigmoid(a), torch.tanh(b), F.prelu(x, self.alpha)], dim=-3)
            x = 2.0 * (0.5 + x * 0.75) + 1
            x = F.max_pool2d(x, 3, stride=2, padding=1)
            x = F.avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False)
            s = x.mean(dim=(-2, -1), keepdim=True)
            x = torch.mul(x, self.se(s).sigmoid())          # broadcast (B,C,H,W) * (B,C,1,1)
            x = F.hardtanh(F.relu6(x), -0.5, 2.0)
            x = F.dropout(x, 0.3, self.training)
            z = self.fc(torch.mean(x, [2, 3]))
            return torch.cat([F.softmax(z, dim=-1), F.log_softmax(z, 1), torch.relu(z).add(1)], dim=1)
    return Functional()


@family("conv_variants", (1, 3, 21, 19))
def conv_variants():
    """Conv2d corner cases: padding='same' with an even, dilated kernel, 'valid', reflect /
    replicate / circular padding, stride (2,1), groups, no bias; BatchNorm without affine."""
    return nn.Sequential(
        nn.Conv2d(3, 6, (4, 3), padding="same", dilation=(1, 2)), nn.BatchNorm2d(6, affine=False), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=2, padding_mode="reflect", groups=3), nn.Hardswish(),
        nn.Conv2d(6, 8, 3, stride=(2, 1), padding=(1, 2), padding_mode="replicate", bias=False), nn.SiLU(),
        nn.Conv2d(8, 8, (3, 5), padding=(1, 2), padding_mode="circular"), nn.ReLU6(),
        nn.Conv2d(8, 4, 3, padding="valid", dilation=2), nn.BatchNorm2d(4),
        nn.Flatten(), nn.Linear(4 * 8 * 19, 10))
