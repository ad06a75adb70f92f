"""MobileFaceNet (``mbf``), state-dict compatible with insightface ``arcface_torch``.

Follows insightface's ``backbones/mobilefacenet.py`` (itself adapted from cavaface):
``get_mbf(fp16, num_features, blocks=(1, 4, 6, 2), scale=2)``. Module names match so its
checkpoints load with ``strict=True``:

* ``layers`` (``nn.ModuleList``):
  ``[0]`` ConvBlock 3 -> 64s, 3x3 stride 2;
  ``[1]`` ConvBlock 64s -> 64s, 3x3, ``groups=64`` when ``blocks[0] == 1``, otherwise
  Residual(64s, blocks[0], groups=128);
  ``[2]`` DepthWise 64s -> 64s stride 2, expansion 128; ``[3]`` Residual(64s, blocks[1], groups=128);
  ``[4]`` DepthWise 64s -> 128s stride 2, expansion 256; ``[5]`` Residual(128s, blocks[2], groups=256);
  ``[6]`` DepthWise 128s -> 128s stride 2, expansion 512; ``[7]`` Residual(128s, blocks[3], groups=256);
  where ``s`` is ``scale``.
* ``conv_sep``: ConvBlock 128s -> 512, 1x1.
* ``features`` (GDC): ``layers`` = [LinearBlock 512 -> 512 7x7 depthwise, Flatten, Linear(512,
  num_features, bias=False), BatchNorm1d(num_features)].

ConvBlock = ``layers`` Sequential(Conv2d(bias=False), BatchNorm2d, PReLU); LinearBlock =
``layers`` Sequential(Conv2d(bias=False), BatchNorm2d); DepthWise = ``layers`` Sequential(
ConvBlock 1x1 expand, ConvBlock kxk depthwise (stride), LinearBlock 1x1 project), with an identity
shortcut when used inside Residual. All BatchNorms use PyTorch's default eps (1e-5), as in
insightface.

Choices made here (where insightface differs or where this reimplementation was unsure):

* No ``fp16`` argument. The body runs under whatever autocast context the caller set; like
  insightface's fp16 path, ``conv_sep`` and the GDC head (``features``) run in fp32 with autocast
  disabled.
* Initialisation: kaiming-normal (fan_out, relu) for Conv2d and Linear weights, zero biases, BN
  weight 1 / bias 0 (as insightface's ``_initialize_weights``). BatchNorm1d keeps PyTorch defaults.
* ``Flatten`` is ``nn.Flatten`` (no parameters, so the state-dict keys are unchanged).
* The input size is checked: the GDC 7x7 depthwise conv needs a 112x112 input.

Input: ``(N, 3, 112, 112)`` float tensor normalised to ``[-1, 1]``. Output: un-normalised
``(N, num_features)`` fp32 embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from facems.models.registry import check_face_input, register_model

__all__ = ["GDC", "ConvBlock", "DepthWise", "LinearBlock", "MobileFaceNet", "Residual", "mbf"]

_Pair = tuple[int, int]


class ConvBlock(nn.Module):
    """Conv2d (no bias) + BatchNorm2d + PReLU, held in ``self.layers`` (insightface's key layout)."""

    activation = True

    def __init__(
        self,
        in_c: int,
        out_c: int,
        kernel: _Pair = (1, 1),
        stride: _Pair = (1, 1),
        padding: _Pair = (0, 0),
        groups: int = 1,
    ):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        ]
        if self.activation:
            layers.append(nn.PReLU(out_c))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        return self.layers(x)


class LinearBlock(ConvBlock):
    """Conv2d (no bias) + BatchNorm2d without activation, held in ``self.layers``."""

    activation = False


class DepthWise(nn.Module):
    """Inverted-residual unit: 1x1 expand -> kxk depthwise -> 1x1 linear projection.

    Args:
        in_c: Input channels.
        out_c: Output channels.
        residual: Add the input to the output (requires ``in_c == out_c`` and stride 1).
        kernel: Depthwise kernel size.
        stride: Depthwise stride.
        padding: Depthwise padding.
        groups: Expanded channel count (also the depthwise group count).
    """

    def __init__(
        self,
        in_c: int,
        out_c: int,
        residual: bool = False,
        kernel: _Pair = (3, 3),
        stride: _Pair = (2, 2),
        padding: _Pair = (1, 1),
        groups: int = 1,
    ):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, groups, kernel=(1, 1), stride=(1, 1), padding=(0, 0)),
            ConvBlock(groups, groups, kernel=kernel, stride=stride, padding=padding, groups=groups),
            LinearBlock(groups, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the unit (plus the shortcut when ``residual``)."""
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """A stack of ``num_block`` residual :class:`DepthWise` units with ``c`` channels."""

    def __init__(
        self,
        c: int,
        num_block: int,
        groups: int,
        kernel: _Pair = (3, 3),
        stride: _Pair = (1, 1),
        padding: _Pair = (1, 1),
    ):
        super().__init__()
        self.layers = nn.Sequential(
            *[DepthWise(c, c, True, kernel, stride, padding, groups) for _ in range(num_block)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the units in sequence."""
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise convolution head: 7x7 depthwise LinearBlock, flatten, linear, BN1d."""

    def __init__(self, embedding_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, kernel=(7, 7), stride=(1, 1), padding=(0, 0), groups=512),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a ``(N, 512, 7, 7)`` feature map to ``(N, embedding_size)``."""
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet backbone for 112x112 face crops.

    Args:
        num_features: Embedding dimension.
        blocks: Number of residual units in the four Residual stages (the first entry equal to 1
            means a single grouped ConvBlock instead of a Residual stage).
        scale: Channel multiplier (64*scale and 128*scale stage widths).
    """

    def __init__(self, num_features: int = 512, blocks: Sequence[int] = (1, 4, 6, 2), scale: int = 2):
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"blocks must have 4 entries, got {tuple(blocks)}")
        self.scale = scale
        c1, c2 = 64 * scale, 128 * scale
        self.layers = nn.ModuleList()
        self.layers.append(ConvBlock(3, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1)))
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c1, c1, kernel=(3, 3), stride=(1, 1), padding=(1, 1), groups=64))
        else:
            self.layers.append(Residual(c1, num_block=blocks[0], groups=128))
        self.layers.extend(
            [
                DepthWise(c1, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=128),
                Residual(c1, num_block=blocks[1], groups=128),
                DepthWise(c1, c2, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=256),
                Residual(c2, num_block=blocks[2], groups=256),
                DepthWise(c2, c2, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=512),
                Residual(c2, num_block=blocks[3], groups=256),
            ]
        )
        self.conv_sep = ConvBlock(c2, 512, kernel=(1, 1), stride=(1, 1), padding=(0, 0))
        self.features = GDC(num_features)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute embeddings.

        Args:
            x: ``(N, 3, 112, 112)`` float tensor normalised to ``[-1, 1]``.

        Returns:
            ``(N, num_features)`` fp32 un-normalised embeddings.

        Raises:
            ValueError: If ``x`` is not 4-D with a 112x112 spatial size.
        """
        check_face_input(x, "MobileFaceNet")
        for layer in self.layers:
            x = layer(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self.conv_sep(x.float())
            x = self.features(x)
        return x


@register_model
def mbf(**kwargs: Any) -> MobileFaceNet:
    """MobileFaceNet as insightface ``get_mbf`` (blocks (1, 4, 6, 2), scale 2; ~0.45 GMACs)."""
    return MobileFaceNet(**kwargs)
