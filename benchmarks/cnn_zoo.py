"""Standard convolutional networks in plain torch (no torchvision), for benchmarks.

Every builder returns ``(module, input_shape)``: an eval-mode ``torch.nn.Module`` with random
weights (fixed seed) and batch-norm layers whose running statistics and affine parameters are
non-trivial, and the input shape with its batch axis, e.g. ``(1, 3, 32, 32)``.

    from cnn_zoo import ZOO, resnet18_cifar
    module, shape = resnet18_cifar(width=64)
    for name, build in ZOO.items(): module, shape = build()

The architectures follow the usual definitions (He et al. 2016; Simonyan & Zisserman 2015;
Sandler et al. 2018): CIFAR ResNets with a 3x3 stride-1 stem, ImageNet ResNet-50 with a 7x7
stride-2 stem and max-pooling, VGG with batch-norm, MobileNetV2 with inverted residuals and
depthwise convolutions. Weights use He initialisation, so the networks' scales are those of an
untrained network.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Shape = tuple[int, ...]


def _randomise_bn(module: nn.Module, gen: torch.Generator) -> None:
    """Random weights everywhere; batch-norm statistics and affine parameters away from identity."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        elif isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)


def _finish(module: nn.Module, seed: int) -> nn.Module:
    _randomise_bn(module, torch.Generator().manual_seed(seed))
    return module.eval()


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]


# ---------------------------------------------------------------------------------------------
# ResNets
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, c: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(c_in, c, 3, stride), nn.ReLU(), *_conv_bn(c, c, 3))
        self.shortcut = nn.Sequential(*_conv_bn(c_in, c, 1, stride)) if stride != 1 or c_in != c else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, c: int, stride: int) -> None:
        super().__init__()
        c_out = c * self.expansion
        self.body = nn.Sequential(
            *_conv_bn(c_in, c, 1), nn.ReLU(), *_conv_bn(c, c, 3, stride), nn.ReLU(), *_conv_bn(c, c_out, 1)
        )
        self.shortcut = nn.Sequential(*_conv_bn(c_in, c_out, 1, stride)) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block: type, blocks: list[int], width: int, classes: int, imagenet_stem: bool) -> None:
        super().__init__()
        if imagenet_stem:
            self.stem = nn.Sequential(*_conv_bn(3, width, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(*_conv_bn(3, width, 3), nn.ReLU())
        layers: list[nn.Module] = []
        c_in = width
        for stage, n in enumerate(blocks):
            c = width * 2**stage
            for i in range(n):
                layers.append(block(c_in, c, 2 if (i == 0 and stage > 0) else 1))
                c_in = c * block.expansion
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet18_cifar(width: int = 64, seed: int = 0) -> tuple[nn.Module, Shape]:
    """ResNet-18 for CIFAR-10: 3x3 stride-1 stem, stages of width, 2, 4, 8 x width."""
    return _finish(ResNet(BasicBlock, [2, 2, 2, 2], width, 10, imagenet_stem=False), seed), (1, 3, 32, 32)


def resnet34_cifar(width: int = 64, seed: int = 0) -> tuple[nn.Module, Shape]:
    """ResNet-34 for CIFAR-10 (blocks 3, 4, 6, 3)."""
    return _finish(ResNet(BasicBlock, [3, 4, 6, 3], width, 10, imagenet_stem=False), seed), (1, 3, 32, 32)


def resnet50_imagenet(width: int = 64, size: int = 224, seed: int = 0) -> tuple[nn.Module, Shape]:
    """ResNet-50 for ImageNet: 7x7 stride-2 stem, max-pooling, bottleneck blocks 3, 4, 6, 3."""
    return _finish(ResNet(Bottleneck, [3, 4, 6, 3], width, 1000, imagenet_stem=True), seed), (1, 3, size, size)


# ---------------------------------------------------------------------------------------------
# VGG
# ---------------------------------------------------------------------------------------------

_VGG = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def vgg_cifar(depth: int = 11, width: int = 64, seed: int = 0) -> tuple[nn.Module, Shape]:
    """VGG-11 or VGG-16 with batch-norm for CIFAR-10 (32x32 input, one linear classifier);
    width scales every stage (64 is the usual network)."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in _VGG[depth]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            c = int(v) * width // 64
            layers += [*_conv_bn(c_in, c, 3), nn.ReLU()]
            c_in = c
    module = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in, 10))
    return _finish(module, seed), (1, 3, 32, 32)


def vgg11_cifar(width: int = 64, seed: int = 0) -> tuple[nn.Module, Shape]:
    return vgg_cifar(11, width, seed)


def vgg16_cifar(width: int = 64, seed: int = 0) -> tuple[nn.Module, Shape]:
    return vgg_cifar(16, width, seed)


# ---------------------------------------------------------------------------------------------
# MobileNetV2
# ---------------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(c_in, hidden, 1), nn.ReLU6()]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(), *_conv_bn(hidden, c_out, 1)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


# (expansion, channels, repeats, first stride) as in Sandler et al.; CIFAR variant keeps 32x32
# resolution longer (strides 1 in the stem and the second stage).
_MBV2 = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenetv2_cifar(width_mult: float = 1.0, seed: int = 0) -> tuple[nn.Module, Shape]:
    """MobileNetV2 for CIFAR-10: depthwise 3x3 convolutions in inverted residual blocks."""
    c_in = int(32 * width_mult)
    layers: list[nn.Module] = [*_conv_bn(3, c_in, 3, 1), nn.ReLU6()]
    for t, c, n, s in _MBV2:
        c_out = int(c * width_mult)
        for i in range(n):
            layers.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
            c_in = c_out
    last = int(1280 * max(1.0, width_mult))
    layers += [*_conv_bn(c_in, last, 1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, 10)]
    return _finish(nn.Sequential(*layers), seed), (1, 3, 32, 32)


# ---------------------------------------------------------------------------------------------

ZOO: dict[str, Callable[[], tuple[nn.Module, Shape]]] = {
    "resnet18_cifar": resnet18_cifar,
    "resnet34_cifar": resnet34_cifar,
    "resnet50_imagenet": resnet50_imagenet,
    "vgg11_cifar": vgg11_cifar,
    "vgg16_cifar": vgg16_cifar,
    "mobilenetv2_cifar": mobilenetv2_cifar,
}
