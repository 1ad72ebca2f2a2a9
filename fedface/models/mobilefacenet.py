"""MobileFaceNet (Chen et al., 2018, "MobileFaceNets: Efficient CNNs for
Accurate Real-Time Face Verification on Mobile Devices").

Architecture (Table 1 of the paper, 112x112 input)::

    conv3x3 s2 64 -> dwconv3x3 64
    -> bottleneck(t=2, c=64,  n=5, s=2)
    -> bottleneck(t=4, c=128, n=1, s=2) -> bottleneck(t=2, c=128, n=6, s=1)
    -> bottleneck(t=4, c=128, n=1, s=2) -> bottleneck(t=2, c=128, n=2, s=1)
    -> conv1x1 512 -> linear GDConv (k x k) -> linear conv1x1 embedding_size

The global depthwise convolution (GDC) kernel ``k`` is the final feature-map
side, derived from ``input_size`` (7 at 112, 4 at 64). About 1.0M parameters at
112x112 with a 128-d embedding.

``norm="group"`` and ``act="relu"`` give a variant that passes Opacus'
``ModuleValidator`` (the paper's BatchNorm is incompatible with per-sample
gradient clipping).
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import feature_size, register_backbone

__all__ = ["MobileFaceNet", "mobilefacenet", "mobilefacenet_dp"]

# (expansion t, output channels c, repeats n, first stride s)
_SETTINGS = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)


def _norm(kind: str, channels: int, max_groups: int = 32) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    g = min(max_groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


def _act(kind: str, channels: int) -> nn.Module:
    return nn.PReLU(channels) if kind == "prelu" else nn.ReLU()


class ConvBlock(nn.Sequential):
    """``Conv2d(bias=False) -> norm [-> act]``.

    Parameters
    ----------
    in_ch, out_ch : int
        Input / output channels.
    kernel, stride, padding, groups : int
        Convolution geometry.
    norm : {"batch", "group"}
        Normalization layer.
    act : {"prelu", "relu"} or None
        Activation; ``None`` makes the block linear.
    norm_groups : int, default 32
        Maximum GroupNorm groups (``norm="group"`` only).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        norm: str = "batch",
        act: str | None = "prelu",
        norm_groups: int = 32,
    ):
        layers = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
            _norm(norm, out_ch, norm_groups),
        ]
        if act is not None:
            layers.append(_act(act, out_ch))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    """MobileNetV2 inverted residual: expand 1x1 -> depthwise 3x3 -> linear 1x1.

    Parameters
    ----------
    in_ch, out_ch : int
        Input / output channels.
    stride : int
        Depthwise stride; the residual is used iff ``stride == 1`` and
        ``in_ch == out_ch``.
    expansion : int
        Hidden width multiplier ``t``.
    norm, act : str
        See :class:`MobileFaceNet`.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int, norm: str, act: str):
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        self.block = nn.Sequential(
            ConvBlock(in_ch, hidden, 1, norm=norm, act=act),
            ConvBlock(hidden, hidden, 3, stride, 1, groups=hidden, norm=norm, act=act),
            ConvBlock(hidden, out_ch, 1, norm=norm, act=None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet backbone.

    Parameters
    ----------
    embedding_size : int, default 128
        Output embedding dimension.
    input_size : int, default 112
        Side of the square input; sets the GDC kernel (``input_size / 16``,
        rounded up).
    norm : {"batch", "group"}, default "batch"
        BatchNorm as in the paper, or GroupNorm (DP-compatible; up to 32 groups
        on feature maps, one group on the 1x1 GDC / embedding outputs).
    act : {"prelu", "relu"}, default "prelu"
        PReLU as in the paper, or ReLU.

    Notes
    -----
    Output shape is ``(N, embedding_size)``, unnormalized (after the final
    linear 1x1 conv and its normalization layer, as in the paper).
    """

    def __init__(
        self,
        embedding_size: int = 128,
        input_size: int = 112,
        norm: str = "batch",
        act: str = "prelu",
    ):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
        if act not in ("prelu", "relu"):
            raise ValueError(f"act must be 'prelu' or 'relu', got {act!r}")
        self.embedding_size = embedding_size
        self.input_size = input_size
        k = feature_size(input_size, 4)

        self.stem = nn.Sequential(
            ConvBlock(3, 64, 3, 2, 1, norm=norm, act=act),
            ConvBlock(64, 64, 3, 1, 1, groups=64, norm=norm, act=act),
        )
        blocks = []
        in_ch = 64
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                blocks.append(Bottleneck(in_ch, c, s if i == 0 else 1, t, norm, act))
                in_ch = c
        self.blocks = nn.Sequential(*blocks)
        self.conv_expand = ConvBlock(in_ch, 512, 1, norm=norm, act=act)
        # The last two layers act on 1x1 maps, where GroupNorm with many small
        # groups would pin every few channels to zero mean / unit variance; use
        # a single group (LayerNorm over channels) there instead.
        self.gdc = ConvBlock(512, 512, k, groups=512, norm=norm, act=None, norm_groups=1)
        self.embedding = ConvBlock(512, embedding_size, 1, norm=norm, act=None, norm_groups=1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, 3, H, W)`` images to ``(N, embedding_size)`` embeddings."""
        x = self.blocks(self.stem(x))
        x = self.gdc(self.conv_expand(x))
        return torch.flatten(self.embedding(x), 1)


@register_backbone("mobilefacenet")
def mobilefacenet(embedding_size: int = 128, input_size: int = 112, **kwargs) -> MobileFaceNet:
    """Build :class:`MobileFaceNet` (``norm="batch"``, ``act="prelu"`` by default)."""
    return MobileFaceNet(embedding_size=embedding_size, input_size=input_size, **kwargs)


@register_backbone("mobilefacenet-dp")
def mobilefacenet_dp(embedding_size: int = 128, input_size: int = 112, **kwargs) -> MobileFaceNet:
    """:class:`MobileFaceNet` for DP-SGD: GroupNorm and ReLU (passes Opacus' validator)."""
    kwargs = {"norm": "group", "act": "relu", **kwargs}
    return MobileFaceNet(embedding_size=embedding_size, input_size=input_size, **kwargs)
