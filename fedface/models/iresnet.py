"""Improved ResNet (IResNet) backbones, following insightface ``arcface_torch``.

``iresnet18`` uses layers ``[2, 2, 2, 2]`` and ``iresnet50`` ``[3, 4, 14, 3]``.
Blocks are BN-Conv-BN-PReLU-Conv-BN with a stride-2 first block per stage;
the head is ``BN2d -> flatten -> dropout -> Linear -> BatchNorm1d`` (the
BatchNorm1d scale is fixed to 1, as in arcface_torch). The final feature map
side is ``input_size / 16`` (rounded up), so the ``fc`` layer adapts to the
input size. Not DP-compatible (BatchNorm).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .registry import feature_size, register_backbone

__all__ = ["IBasicBlock", "IResNet", "iresnet18", "iresnet50"]


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class IBasicBlock(nn.Module):
    """IResNet basic block: ``BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN``.

    Parameters
    ----------
    inplanes, planes : int
        Input / output channels.
    stride : int, default 1
        Stride of the second convolution.
    downsample : nn.Module, optional
        Projection for the identity path when shape changes.
    """

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        return out + identity


class IResNet(nn.Module):
    """IResNet backbone (arcface_torch flavour).

    Parameters
    ----------
    layers : sequence of 4 int
        Number of blocks per stage (widths 64, 128, 256, 512).
    embedding_size : int, default 128
        Output embedding dimension (``num_features`` in arcface_torch).
    input_size : int, default 112
        Side of the square input; the fc layer takes
        ``512 * ceil(input_size / 16) ** 2`` features.
    dropout : float, default 0.0
        Dropout before the fc layer.
    zero_init_residual : bool, default False
        Zero-init the last BN of every block (identity-start residuals).
    """

    def __init__(
        self,
        layers: Sequence[int],
        embedding_size: int = 128,
        input_size: int = 112,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must have 4 entries, got {layers!r}")
        self.embedding_size = embedding_size
        self.input_size = input_size
        fsize = feature_size(input_size, 4)

        self.inplanes = 64
        self.conv1 = conv3x3(3, self.inplanes)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-05)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(64, layers[0], stride=2)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(512 * IBasicBlock.expansion, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * IBasicBlock.expansion * fsize * fsize, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.constant_(m.bn3.weight, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * IBasicBlock.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * IBasicBlock.expansion, stride),
                nn.BatchNorm2d(planes * IBasicBlock.expansion, eps=1e-05),
            )
        layers = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * IBasicBlock.expansion
        layers += [IBasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, 3, H, W)`` images to ``(N, embedding_size)`` embeddings."""
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        x = self.fc(self.dropout(x))
        return self.features(x)


@register_backbone("iresnet18")
def iresnet18(embedding_size: int = 128, input_size: int = 112, **kwargs) -> IResNet:
    """IResNet-18: layers ``[2, 2, 2, 2]``."""
    return IResNet([2, 2, 2, 2], embedding_size=embedding_size, input_size=input_size, **kwargs)


@register_backbone("iresnet50")
def iresnet50(embedding_size: int = 128, input_size: int = 112, **kwargs) -> IResNet:
    """IResNet-50: layers ``[3, 4, 14, 3]``."""
    return IResNet([3, 4, 14, 3], embedding_size=embedding_size, input_size=input_size, **kwargs)
