"""torchvision's ResNet-50 as a retrieval trunk: 2048-d globally pooled features, ImageNet weights from disk.

The trunk is ``torchvision.models.resnet50(weights=None)`` without its classifier; its ``state_dict``
keys are torchvision's (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...) minus ``fc.*``, so a
torchvision ImageNet file loads strictly apart from ``fc``. Weights come only from disk:

* ``pretrained=PATH``: that file (``torch.load(weights_only=True)``);
* ``pretrained="torchvision"``: torchvision's ``IMAGENET1K_V1`` file, but only if it is already in
  torchvision's cache (``$TORCH_HOME/hub/checkpoints``, by default ``~/.cache/torch/hub/checkpoints``);
  these are the weights ``resnet50(pretrained=True)`` gave the official MS-loss code. Nothing is
  downloaded: a missing file is an error that says where to put it.

Input: RGB in [0, 1] normalised with the ImageNet mean and std (:func:`imagenet_preprocess`).
"""

from __future__ import annotations

import os
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from facems.models.heads import RetrievalNet, load_pretrained, prepare_uint8_batch
from facems.models.loading import WeightsError
from facems.models.registry import register_model

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ResNet50Trunk",
    "imagenet_preprocess",
    "resnet50",
    "torchvision_resnet50_weights",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Older name of the same IMAGENET1K_V1 file (torchvision < 0.13, ``resnet50(pretrained=True)``).
_LEGACY_V1_FILE = "resnet50-19c8e357.pth"
_CLASSIFIER_KEYS = ("fc.weight", "fc.bias")


def imagenet_preprocess(images: Tensor, flip: Tensor | None = None, channels_last: bool = False) -> Tensor:
    """uint8 RGB ``(N, 3, H, W)`` -> float32 ``(x / 255 - mean) / std`` with the ImageNet mean/std.

    torchvision's ``ToTensor`` + ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``, done on ``images``' device.

    Args:
        images: uint8 RGB images.
        flip: bool ``(N,)`` on the same device: the rows to mirror horizontally; ``None`` for none.
        channels_last: return the channels_last memory format.

    Raises:
        ValueError: ``images`` is not a uint8 ``(N, 3, H, W)`` tensor, or ``flip`` has not one entry per image.
    """
    images = prepare_uint8_batch(images, flip, "imagenet_preprocess")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    x = images.float().div_(255.0).sub_(mean).div_(std)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


def torchvision_resnet50_weights() -> str:
    """Path of torchvision's ImageNet ResNet-50 (IMAGENET1K_V1) file in its cache; never downloads.

    Looks in ``torch.hub.get_dir()/checkpoints`` for ``resnet50-0676ba61.pth`` (torchvision >= 0.13's
    name), then ``resnet50-19c8e357.pth`` (the older name).

    Raises:
        WeightsError: neither file is there; the message gives the directory and the URL to fetch by hand.
    """
    from torchvision.models import ResNet50_Weights

    url = ResNet50_Weights.IMAGENET1K_V1.url
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    names = (os.path.basename(url), _LEGACY_V1_FILE)
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise WeightsError(
        f"pretrained='torchvision': none of {', '.join(names)} is in {folder}; facems downloads nothing. "
        f"Fetch {url} yourself and put it in that folder (or set TORCH_HOME), or pass the file's path as "
        "pretrained"
    )


class ResNet50Trunk(nn.Module):
    """torchvision ResNet-50 without ``fc``, globally pooled: ``(N, 3, H, W)`` -> ``(N, 2048)``.

    23,508,032 parameters.

    Args:
        pool: global pooling of the final map, ``"avg"`` (torchvision's and the MS-loss code's) or ``"max"``.
        grad_checkpoint: recompute each bottleneck block in the backward pass (train mode only).
        pretrained: ``None`` (torchvision's random init), a local torchvision-layout file, or
            ``"torchvision"`` (the cached IMAGENET1K_V1 file, see :func:`torchvision_resnet50_weights`).

    Raises:
        ValueError: unknown ``pool``.
        WeightsError: the weights are missing, unreadable or do not match (message names the keys).
    """

    out_features = 2048

    def __init__(
        self,
        pool: Literal["avg", "max"] = "avg",
        grad_checkpoint: bool = False,
        pretrained: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        from torchvision.models import resnet50 as tv_resnet50  # imported here: torchvision is slow to import

        if pool not in ("avg", "max"):
            raise ValueError(f"ResNet50Trunk: pool={pool!r}: expected 'avg' or 'max'")
        self.pool = pool
        self.grad_checkpoint = grad_checkpoint
        net = tv_resnet50(weights=None)
        self.conv1 = net.conv1
        self.bn1 = net.bn1
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        self.layer4 = net.layer4
        if pretrained is not None:
            path = torchvision_resnet50_weights() if pretrained == "torchvision" else pretrained
            load_pretrained(self, path, ignore=_CLASSIFIER_KEYS, what="torchvision ResNet-50 weights")

    def _run_stage(self, stage: nn.Sequential, x: Tensor) -> Tensor:
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            for blk in stage:
                x = cast(Tensor, checkpoint(blk, x, use_reentrant=False))
            return x
        return stage(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """Preprocessed ``(N, 3, H, W)`` -> the ``(N, 2048, H/32, W/32)`` map (7x7 for 224 inputs)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"ResNet50Trunk expects a (N, 3, H, W) input, got {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = self._run_stage(stage, x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Preprocessed ``(N, 3, H, W)`` -> ``(N, 2048)`` pooled features."""
        f = self.forward_features(x)
        v = F.adaptive_avg_pool2d(f, 1) if self.pool == "avg" else F.adaptive_max_pool2d(f, 1)
        return torch.flatten(v, 1)


@register_model
def resnet50(
    num_features: int = 512,
    dropout: float = 0.0,
    grad_checkpoint: bool = False,
    pretrained: str | os.PathLike[str] | None = None,
    freeze_bn: bool = True,
    pool: Literal["avg", "max"] = "avg",
    normalize: bool = True,
) -> RetrievalNet:
    """torchvision ResNet-50 + 512-d L2-normalised embedding (the MS-loss code's ResNet-50 variant).

    Args:
        num_features: embedding size.
        dropout: dropout before the embedding layer.
        grad_checkpoint: recompute each bottleneck block in the backward pass.
        pretrained: ``None``, a local file, or ``"torchvision"`` (cached file only; see :class:`ResNet50Trunk`).
        freeze_bn: keep BatchNorm statistics frozen in training (the official code always does for ResNet-50).
        pool: global pooling, ``"avg"`` (default) or ``"max"``.
        normalize: L2-normalise the embedding.

    Returns:
        A :class:`RetrievalNet` whose ``preprocess`` is :func:`imagenet_preprocess` and ``input_size`` 224.
    """
    backbone = ResNet50Trunk(pool=pool, grad_checkpoint=grad_checkpoint, pretrained=pretrained)
    return RetrievalNet(
        backbone,
        num_features,
        preprocess=imagenet_preprocess,
        input_size=224,
        dropout=dropout,
        normalize=normalize,
        freeze_bn=freeze_bn,
    )
