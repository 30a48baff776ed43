"""The ResNet family built with torch.nn alone, module for module and parameter for parameter the network
torchvision builds (same state_dict keys, same forward ops, same random init draws under a seed).

Why: `import torchvision` pulls torch._dynamo in through torchvision.ops (about 2.5-3 s on a 2-core CPU,
more than the whole of `train-head`'s work), and every command that touches the default backbone paid it.
tests/test_resnet.py holds this module to torchvision: equal state_dicts from the same seed, bit-equal
outputs from the same weights, the same weights file names.
"""
from __future__ import annotations

import torch
from torch import nn

# arch -> (block, blocks per stage, file name of torchvision's IMAGENET1K_V1 weights in TORCH_HOME)
ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2), "resnet18-f37072fd.pth"),
    "resnet34": ("basic", (3, 4, 6, 3), "resnet34-b627a593.pth"),
    "resnet50": ("bottleneck", (3, 4, 6, 3), "resnet50-0676ba61.pth"),
    "resnet101": ("bottleneck", (3, 4, 23, 3), "resnet101-63fe2227.pth"),
    "resnet152": ("bottleneck", (3, 8, 36, 3), "resnet152-394f9c45.pth"),
}
WEIGHTS_URL = "https://download.pytorch.org/models/"


def _conv(cin: int, cout: int, k: int, stride: int = 1, device=None) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False, device=device)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (resnet18/34)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, device=None):
        super().__init__()
        # registration order = torchvision's, so modules() (and so the init order) is the same
        self.conv1 = _conv(cin, planes, 3, stride, device)
        self.bn1 = nn.BatchNorm2d(planes, device=device)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(planes, planes, 3, 1, device)
        self.bn2 = nn.BatchNorm2d(planes, device=device)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 down, 3x3 (carrying the stride), 1x1 up x4, and a shortcut (resnet50/101/152, "v1.5")."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, device=None):
        super().__init__()
        self.conv1 = _conv(cin, planes, 1, 1, device)
        self.bn1 = nn.BatchNorm2d(planes, device=device)
        self.conv2 = _conv(planes, planes, 3, stride, device)
        self.bn2 = nn.BatchNorm2d(planes, device=device)
        self.conv3 = _conv(planes, planes * 4, 1, 1, device)
        self.bn3 = nn.BatchNorm2d(planes * 4, device=device)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet(nn.Module):
    """images N x 3 x H x W (normalised) -> N x num_classes logits; `fc` is the classifier layer."""

    def __init__(self, block: type, layers: tuple[int, ...], num_classes: int = 1000, device=None):
        super().__init__()
        self._cin, self._device = 64, device
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False, device=device)
        self.bn1 = nn.BatchNorm2d(64, device=device)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._stage(block, 64, layers[0], 1)
        self.layer2 = self._stage(block, 128, layers[1], 2)
        self.layer3 = self._stage(block, 256, layers[2], 2)
        self.layer4 = self._stage(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes, device=device)
        if str(device) == "meta":  # no values to draw (and meta's normal_ would import torch._dynamo)
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _stage(self, block: type, planes: int, blocks: int, stride: int) -> nn.Sequential:
        out, dev = planes * block.expansion, self._device
        down = None
        if stride != 1 or self._cin != out:  # the shortcut changes shape: a strided 1x1 projection
            down = nn.Sequential(_conv(self._cin, out, 1, stride, dev), nn.BatchNorm2d(out, device=dev))
        layers = [block(self._cin, planes, stride, down, dev)]
        self._cin = out
        layers += [block(out, planes, device=dev) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(arch: str, num_classes: int = 1000, device=None) -> ResNet:
    """An ARCHS network with torchvision's random init (draws from torch's global RNG, as torchvision's do).
    device="meta": laid out without memory or init, for weights loaded with assign=True (a `with
    torch.device("meta")` block would do the same but imports torch._dynamo, seconds)."""
    block, layers, _ = ARCHS[arch]
    return ResNet(BasicBlock if block == "basic" else Bottleneck, layers, num_classes, device)
