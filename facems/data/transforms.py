"""Model input from uint8 face batches, shared by training, evaluation and the benchmarks."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["normalize_faces"]


def normalize_faces(images: Tensor, flip: Tensor | None = None, channels_last: bool = False) -> Tensor:
    """uint8 RGB ``(N, 3, H, W)`` -> float32 ``(x / 255 - 0.5) / 0.5`` in [-1, 1], on ``images``' device.

    The arithmetic is insightface's (``ToTensor`` then ``Normalize(0.5, 0.5)`` in training, ``((img /
    255) - 0.5) / 0.5`` in its evaluation), in that order, so values match its to the last bit.

    Args:
        images: uint8 images, any memory format (move them to the device first: 4x fewer bytes).
        flip: bool ``(N,)`` on the same device: the rows to mirror horizontally; ``None`` for none.
        channels_last: return the channels_last memory format.

    Raises:
        ValueError: ``images`` is not a uint8 4-D tensor, or ``flip`` has not one entry per image.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"normalize_faces: images of dtype {images.dtype} and shape {tuple(images.shape)}: "
            "expected a uint8 (N, 3, H, W) tensor"
        )
    if flip is not None:
        if flip.shape != images.shape[:1]:
            raise ValueError(
                f"normalize_faces: flip of shape {tuple(flip.shape)}: expected ({images.shape[0]},), one per image"
            )
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)  # on 1-byte pixels
    x = images.float().div_(255.0).sub_(0.5).div_(0.5)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt)
