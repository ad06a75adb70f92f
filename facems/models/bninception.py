"""BN-Inception (Ioffe & Szegedy, 2015), state-dict compatible with ``bn_inception-52deb4733.pth``.

That file holds the ImageNet weights of the Caffe-trained BN-Inception that Cadene's ``pretrainedmodels``
distributes (``bninception``) and that the official MS-loss code (``msight-tech/research-ms-loss``)
starts from. The layer names, shapes and the order of the forward pass here are those of its
definition there: every convolution has a bias and is followed by an affine BatchNorm2d
(``<conv>_bn``, eps 1e-5) and a ReLU; pooling uses ``ceil_mode=True`` as Caffe does; ten inception
blocks (``inception_3a`` ... ``inception_5b``), two of which (3c, 4e) halve the map. BatchNorm momentum
is PyTorch's default 0.1 (as in the MS-loss code; Cadene's ``momentum=0.9`` is a port of Caffe's
``moving_average_fraction`` and has the opposite meaning in PyTorch), which only matters when the
statistics are not frozen.

Weights are loaded only from a local file (``pretrained=PATH``), strictly, with
``torch.load(weights_only=True)``: the file's ``last_linear.*`` (the ImageNet classifier) is skipped
unless ``num_classes`` is set; Caffe ports that store BatchNorm vectors as ``(1, C)`` load as well.

Input: BGR, 0..255, minus the per-channel mean ``[104, 117, 128]`` (B, G, R) — what
:func:`caffe_preprocess` makes from uint8 RGB. A 224x224 (or 227x227) image gives a 7x7x1024 map;
global max pooling (the MS-loss code's choice) gives the 1024-d feature.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from facems.models.heads import RetrievalNet, load_pretrained, prepare_uint8_batch
from facems.models.registry import register_model

__all__ = [
    "CAFFE_BGR_MEAN",
    "INCEPTION_BLOCKS",
    "BNInception",
    "InceptionSpec",
    "bninception",
    "caffe_preprocess",
]

#: Per-channel mean subtracted from 0..255 BGR pixels, in B, G, R order.
CAFFE_BGR_MEAN: tuple[float, float, float] = (104.0, 117.0, 128.0)

Pool = Literal["max", "avg"]


@dataclass(frozen=True)
class InceptionSpec:
    """One inception block: output channels of each branch.

    Attributes:
        name: block name (``"3a"``); its layers are ``inception_<name>_<branch>``.
        in_channels: input channels.
        c1x1: 1x1 branch (0: the block has none).
        c3x3_reduce: 1x1 reduction before the 3x3 branch.
        c3x3: 3x3 branch.
        double_reduce: 1x1 reduction before the two stacked 3x3 convolutions.
        double: each of the two stacked 3x3 convolutions.
        pool_proj: 1x1 projection after the pooling branch (0: the pooled input passes unchanged).
        pool: pooling of the pooling branch, 3x3 ``"avg"`` (count_include_pad) or ``"max"``.
        stride: 2 for the blocks that halve the map (3x3 convolutions and the max pooling strided).
    """

    name: str
    in_channels: int
    c1x1: int
    c3x3_reduce: int
    c3x3: int
    double_reduce: int
    double: int
    pool_proj: int
    pool: Pool
    stride: int

    @property
    def out_channels(self) -> int:
        """Channels of the concatenated output."""
        pooled = self.pool_proj if self.pool_proj else self.in_channels
        return self.c1x1 + self.c3x3 + self.double + pooled


INCEPTION_BLOCKS: tuple[InceptionSpec, ...] = (
    InceptionSpec("3a", 192, 64, 64, 64, 64, 96, 32, "avg", 1),
    InceptionSpec("3b", 256, 64, 64, 96, 64, 96, 64, "avg", 1),
    InceptionSpec("3c", 320, 0, 128, 160, 64, 96, 0, "max", 2),
    InceptionSpec("4a", 576, 224, 64, 96, 96, 128, 128, "avg", 1),
    InceptionSpec("4b", 576, 192, 96, 128, 96, 128, 128, "avg", 1),
    InceptionSpec("4c", 576, 160, 128, 160, 128, 160, 128, "avg", 1),
    InceptionSpec("4d", 608, 96, 128, 192, 160, 192, 128, "avg", 1),
    InceptionSpec("4e", 608, 0, 128, 192, 192, 256, 0, "max", 2),
    InceptionSpec("5a", 1056, 352, 192, 320, 160, 224, 128, "avg", 1),
    InceptionSpec("5b", 1024, 352, 192, 320, 192, 224, 128, "max", 1),
)

_CLASSIFIER_KEYS = ("last_linear.weight", "last_linear.bias")


def caffe_preprocess(images: Tensor, flip: Tensor | None = None, channels_last: bool = False) -> Tensor:
    """uint8 RGB ``(N, 3, H, W)`` -> float32 BGR in 0..255 minus :data:`CAFFE_BGR_MEAN`, on ``images``' device.

    This is the input ``bn_inception-52deb4733.pth`` expects (``input_space`` BGR, ``input_range``
    [0, 255], ``mean`` [104, 117, 128], ``std`` [1, 1, 1] in pretrainedmodels' settings).

    Args:
        images: uint8 RGB images (move them to the device first: 4x fewer bytes than float).
        flip: bool ``(N,)`` on the same device: the rows to mirror horizontally; ``None`` for none.
        channels_last: return the channels_last memory format.

    Raises:
        ValueError: ``images`` is not a uint8 ``(N, 3, H, W)`` tensor, or ``flip`` has not one entry per image.
    """
    images = prepare_uint8_batch(images, flip, "caffe_preprocess")
    mean = torch.tensor(CAFFE_BGR_MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    x = images.flip(1).float().sub_(mean)  # channel order RGB -> BGR
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


class BNInception(nn.Module):
    """BN-Inception trunk with global pooling: ``(N, 3, H, W)`` -> ``(N, 1024)`` (or class scores).

    Its ``state_dict`` is that of ``bn_inception-52deb4733.pth`` without ``last_linear.*`` (with them
    when ``num_classes`` is set), plus PyTorch's ``num_batches_tracked`` counters. 10,270,240 trainable
    parameters without the classifier (11,295,240 with the 1000-class one).

    Args:
        pool: global pooling of the final map, ``"max"`` (the MS-loss code) or ``"avg"`` (the ImageNet
            classifier's).
        num_classes: add the classifier ``last_linear`` (``Linear(1024, num_classes)``) after pooling;
            ``None`` (default) for the 1024-d feature.
        grad_checkpoint: recompute each inception block in the backward pass (train mode only).
        pretrained: a local weights file to load (e.g. ``~/.torch/models/bn_inception-52deb4733.pth``);
            ``None`` keeps PyTorch's default initialisation. Nothing is downloaded.

    Raises:
        ValueError: unknown ``pool`` or ``num_classes`` < 1.
        WeightsError: ``pretrained`` is missing, unreadable or does not match (message names the keys).
    """

    out_features = 1024

    def __init__(
        self,
        pool: Pool = "max",
        num_classes: int | None = None,
        grad_checkpoint: bool = False,
        pretrained: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"BNInception: pool={pool!r}: expected 'max' or 'avg'")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"BNInception: num_classes={num_classes}: expected None or an integer >= 1")
        self.pool = pool
        self.grad_checkpoint = grad_checkpoint
        self._add_conv("conv1_7x7_s2", 3, 64, 7, stride=2)
        self._add_conv("conv2_3x3_reduce", 64, 64, 1)
        self._add_conv("conv2_3x3", 64, 192, 3)
        channels = 192
        for spec in INCEPTION_BLOCKS:
            if spec.in_channels != channels:  # the table is self-consistent; this guards edits to it
                raise ValueError(
                    f"inception_{spec.name}: in_channels {spec.in_channels}, previous block gives {channels}"
                )
            self._add_block(spec)
            channels = spec.out_channels
        self.last_linear: nn.Linear | None = nn.Linear(channels, num_classes) if num_classes else None
        if pretrained is not None:
            load_pretrained(
                self,
                pretrained,
                ignore=_CLASSIFIER_KEYS if self.last_linear is None else (),
                what="BN-Inception ImageNet weights (bn_inception-52deb4733.pth layout)",
            )

    def _add_conv(self, name: str, cin: int, cout: int, k: int, stride: int = 1) -> None:
        # Registration order (conv, then its BatchNorm) is the file's key order.
        self.add_module(name, nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=k // 2, bias=True))
        self.add_module(f"{name}_bn", nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1, affine=True))

    def _add_block(self, s: InceptionSpec) -> None:
        p = f"inception_{s.name}"
        if s.c1x1:
            self._add_conv(f"{p}_1x1", s.in_channels, s.c1x1, 1)
        self._add_conv(f"{p}_3x3_reduce", s.in_channels, s.c3x3_reduce, 1)
        self._add_conv(f"{p}_3x3", s.c3x3_reduce, s.c3x3, 3, stride=s.stride)
        self._add_conv(f"{p}_double_3x3_reduce", s.in_channels, s.double_reduce, 1)
        self._add_conv(f"{p}_double_3x3_1", s.double_reduce, s.double, 3)
        self._add_conv(f"{p}_double_3x3_2", s.double, s.double, 3, stride=s.stride)
        if s.pool_proj:
            self._add_conv(f"{p}_pool_proj", s.in_channels, s.pool_proj, 1)

    def _cbr(self, name: str, x: Tensor) -> Tensor:
        """Convolution ``name``, its BatchNorm ``name_bn``, ReLU."""
        # Looked up by name on every call so that replaced layers (e.g. SyncBatchNorm conversion) are used.
        x = self.get_submodule(name)(x)
        return F.relu(self.get_submodule(f"{name}_bn")(x), inplace=True)

    def stem(self, x: Tensor) -> Tensor:
        """Preprocessed ``(N, 3, H, W)`` -> the ``(N, 192, ~H/8, ~W/8)`` input of ``inception_3a``."""
        x = self._cbr("conv1_7x7_s2", x)
        x = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
        x = self._cbr("conv2_3x3_reduce", x)
        x = self._cbr("conv2_3x3", x)
        return F.max_pool2d(x, 3, stride=2, ceil_mode=True)

    def inception(self, spec: InceptionSpec, x: Tensor) -> Tensor:
        """One inception block: branches 1x1, 3x3, double 3x3, pooling, concatenated in that order."""
        p = f"inception_{spec.name}"
        branches = []
        if spec.c1x1:
            branches.append(self._cbr(f"{p}_1x1", x))
        branches.append(self._cbr(f"{p}_3x3", self._cbr(f"{p}_3x3_reduce", x)))
        double = self._cbr(f"{p}_double_3x3_reduce", x)
        double = self._cbr(f"{p}_double_3x3_2", self._cbr(f"{p}_double_3x3_1", double))
        branches.append(double)
        if spec.pool == "avg":
            pooled = F.avg_pool2d(x, 3, stride=spec.stride, padding=1, ceil_mode=True, count_include_pad=True)
        elif spec.stride == 1:
            pooled = F.max_pool2d(x, 3, stride=1, padding=1, ceil_mode=True)
        else:
            pooled = F.max_pool2d(x, 3, stride=spec.stride, ceil_mode=True)
        branches.append(self._cbr(f"{p}_pool_proj", pooled) if spec.pool_proj else pooled)
        if pooled.shape[-2:] != branches[0].shape[-2:]:
            # Caffe's rounded-up pooling and the strided 3x3 convolutions disagree on odd map sides.
            raise ValueError(
                f"inception_{spec.name}: a {tuple(x.shape[-2:])} input map gives branches of sizes "
                f"{tuple(branches[0].shape[-2:])} and {tuple(pooled.shape[-2:])}; use input sides whose "
                "map before inception_3c is a multiple of 4 (e.g. 224 or 227)"
            )
        return torch.cat(branches, 1)

    def forward_features(self, x: Tensor) -> Tensor:
        """Preprocessed ``(N, 3, H, W)`` -> the final ``(N, 1024, h, w)`` map (7x7 for 224 or 227 inputs)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"BNInception expects a (N, 3, H, W) input, got {tuple(x.shape)}")
        x = self.stem(x)
        use_ckpt = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for spec in INCEPTION_BLOCKS:
            block = functools.partial(self.inception, spec)
            x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Preprocessed ``(N, 3, H, W)`` -> ``(N, 1024)`` pooled features, or ``(N, num_classes)`` scores."""
        f = self.forward_features(x)
        v = F.adaptive_max_pool2d(f, 1) if self.pool == "max" else F.adaptive_avg_pool2d(f, 1)
        v = torch.flatten(v, 1)
        return self.last_linear(v) if self.last_linear is not None else v


@register_model
def bninception(
    num_features: int = 512,
    dropout: float = 0.0,
    grad_checkpoint: bool = False,
    pretrained: str | os.PathLike[str] | None = None,
    freeze_bn: bool = True,
    pool: Pool = "max",
    normalize: bool = True,
) -> RetrievalNet:
    """BN-Inception + 512-d L2-normalised embedding: the MS-loss paper's retrieval network.

    Args:
        num_features: embedding size.
        dropout: dropout before the embedding layer (0 in the official code).
        grad_checkpoint: recompute each inception block in the backward pass.
        pretrained: local ``bn_inception-52deb4733.pth`` (or a file with the same keys); ``None``: random init.
        freeze_bn: keep BatchNorm statistics frozen in training (official behaviour).
        pool: global pooling, ``"max"`` (official) or ``"avg"``.
        normalize: L2-normalise the embedding.

    Returns:
        A :class:`RetrievalNet` whose ``preprocess`` is :func:`caffe_preprocess` and ``input_size`` 227.
    """
    backbone = BNInception(pool=pool, grad_checkpoint=grad_checkpoint, pretrained=pretrained)
    return RetrievalNet(
        backbone,
        num_features,
        preprocess=caffe_preprocess,
        input_size=227,
        dropout=dropout,
        normalize=normalize,
        freeze_bn=freeze_bn,
    )
