"""Improved ResNet (iResNet) backbones, state-dict compatible with insightface ``arcface_torch``.

The layout, module names and initialisation follow insightface's ``backbones/iresnet.py`` so that
its released checkpoints load with ``load_state_dict(strict=True)``. Differences from insightface:

* There is no ``fp16`` argument. The body runs under whatever autocast context the caller set; the
  embedding head (``fc`` -> ``features``) always runs in fp32 with autocast disabled.
* Gradient checkpointing is a constructor argument (``grad_checkpoint``) instead of a module-level
  flag. Note that checkpointing recomputes each block's forward pass during backward, so BatchNorm
  running statistics receive a second (identical-input) momentum update per step in train mode.
* ``zero_init_residual`` zeroes ``bn3`` (the last BatchNorm before the residual sum) of every block.
* The input size is checked: the head expects a 7x7 map, i.e. a 112x112 input.

Input: ``(N, 3, 112, 112)`` float tensor normalised to ``[-1, 1]``. Output: un-normalised
``(N, num_features)`` fp32 embedding.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from facems.models.registry import check_face_input, register_model

__all__ = [
    "IBasicBlock",
    "IResNet",
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
    "iresnet200",
    "iresnet_nano_s2",
    "iresnet_tiny",
    "iresnet_tiny_s2",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution with no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation style basic block: BN-conv-BN-PReLU-conv-BN plus identity.

    Args:
        inplanes: Input channels.
        planes: Output channels.
        stride: Stride of the second convolution.
        downsample: Optional module applied to the identity branch (1x1 conv + BN).
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """iResNet backbone for 112x112 face crops.

    Args:
        block: Residual block class (``IBasicBlock``).
        layers: Number of blocks in each of the four stages.
        num_features: Embedding dimension.
        dropout: Dropout probability applied to the flattened feature map before ``fc``.
        zero_init_residual: Zero-initialise the last BatchNorm (``bn3``) of every block.
        grad_checkpoint: Checkpoint every block in train mode (saves activation memory).
        width_mult: Channel multiplier for the stem and the 64/128/256/512 stage widths
            (1.0 for the standard models; used by :func:`iresnet_tiny`).
        stem_stride: 1 (insightface's iResNets: a 7x7 final map) or 2 (the first convolution halves
            the input, about 4x less compute, a 4x4 final map; used by :func:`iresnet_tiny_s2`).
    """

    fc_scale = 7 * 7

    def __init__(
        self,
        block: type[IBasicBlock],
        layers: list[int],
        num_features: int = 512,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
        grad_checkpoint: bool = False,
        width_mult: float = 1.0,
        stem_stride: int = 1,
    ):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must have 4 entries, got {layers}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        widths = [max(1, round(w * width_mult)) for w in (64, 128, 256, 512)]
        self.grad_checkpoint = grad_checkpoint
        self.inplanes = widths[0]

        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-05)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(block, widths[0], layers[0], stride=2)
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        out_channels = widths[3] * block.expansion
        self.bn2 = nn.BatchNorm2d(out_channels, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        side = 112 // stem_stride
        for _ in range(4):  # each stage halves the side, rounding up (3x3 convolutions, stride 2, padding 1)
            side = (side + 1) // 2
        self.fc = nn.Linear(out_channels * side * side, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
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

    def _make_layer(self, block: type[IBasicBlock], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion, eps=1e-05),
            )
        stage = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        stage.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*stage)

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            for blk in stage:
                x = cast(torch.Tensor, checkpoint(blk, x, use_reentrant=False))
            return x
        return stage(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute embeddings.

        Args:
            x: ``(N, 3, 112, 112)`` float tensor normalised to ``[-1, 1]``.

        Returns:
            ``(N, num_features)`` fp32 un-normalised embeddings.

        Raises:
            ValueError: If ``x`` is not 4-D with a 112x112 spatial size.
        """
        check_face_input(x, "IResNet")
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.prelu(x)
        x = self._run_stage(self.layer1, x)
        x = self._run_stage(self.layer2, x)
        x = self._run_stage(self.layer3, x)
        x = self._run_stage(self.layer4, x)
        x = self.bn2(x)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self.fc(x.float())
            x = self.features(x)
        return x


@register_model
def iresnet18(**kwargs: Any) -> IResNet:
    """iResNet-18 (stage depths 2/2/2/2, ~24.0M parameters)."""
    return IResNet(IBasicBlock, [2, 2, 2, 2], **kwargs)


@register_model
def iresnet34(**kwargs: Any) -> IResNet:
    """iResNet-34 (stage depths 3/4/6/3, ~34.1M parameters)."""
    return IResNet(IBasicBlock, [3, 4, 6, 3], **kwargs)


@register_model
def iresnet50(**kwargs: Any) -> IResNet:
    """iResNet-50 (stage depths 3/4/14/3, ~43.6M parameters)."""
    return IResNet(IBasicBlock, [3, 4, 14, 3], **kwargs)


@register_model
def iresnet100(**kwargs: Any) -> IResNet:
    """iResNet-100 (stage depths 3/13/30/3, ~65.2M parameters)."""
    return IResNet(IBasicBlock, [3, 13, 30, 3], **kwargs)


@register_model
def iresnet200(**kwargs: Any) -> IResNet:
    """iResNet-200 (stage depths 6/26/60/6, ~118.8M parameters)."""
    return IResNet(IBasicBlock, [6, 26, 60, 6], **kwargs)


@register_model
def iresnet_tiny(**kwargs: Any) -> IResNet:
    """Quarter-width iResNet-18, the CPU test/demo model.

    Same depth as iresnet18 (2/2/2/2) with stem width 16 and stage widths 16/32/64/128
    (``fc`` input 128*7*7). A full iresnet18 trains at only about 10 img/s on 2 CPU cores; this
    model is meant for unit tests, smoke runs and demos, not for accuracy.
    """
    kwargs.setdefault("width_mult", 0.25)
    return IResNet(IBasicBlock, [2, 2, 2, 2], **kwargs)


@register_model
def iresnet_tiny_s2(**kwargs: Any) -> IResNet:
    """:func:`iresnet_tiny` with a stride-2 first convolution: the CPU demo model.

    The 112x112 input is halved by the stem, so every stage works at half the side of iresnet_tiny's
    (final map 4x4, ``fc`` input 128*4*4): 44 M multiply-adds per image against iresnet_tiny's 170 M, for a demo that must
    train within minutes on two CPU cores. Not an insightface architecture.
    """
    kwargs.setdefault("width_mult", 0.25)
    kwargs.setdefault("stem_stride", 2)
    return IResNet(IBasicBlock, [2, 2, 2, 2], **kwargs)


@register_model
def iresnet_nano_s2(**kwargs: Any) -> IResNet:
    """:func:`iresnet_tiny_s2` at half its width (stem 8, stages 8/16/32/64, ``fc`` input 64*4*4).

    12 M multiply-adds per image; on the 2-core CPU it trains about 2.1 times as fast as
    iresnet_tiny_s2 (the 2-process demo: 415 against 195 img/s) and, step for step, 2 to 3 points of
    synthetic cplfw behind it, so a CPU run of fixed length gets further with it. Not an insightface
    architecture.
    """
    kwargs.setdefault("width_mult", 0.125)
    kwargs.setdefault("stem_stride", 2)
    return IResNet(IBasicBlock, [2, 2, 2, 2], **kwargs)
