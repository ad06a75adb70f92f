"""Batched feature extraction with the flip test, on one process or sharded across ranks.

:func:`embed_images` turns uint8 RGB images into raw (not normalised) embeddings the way insightface's
evaluation does: ``x = (x / 255 - 0.5) / 0.5`` on the device, ``emb(x) + emb(mirror(x))`` with the
flip test. Under ``torchrun`` every rank embeds one contiguous shard and the shards are gathered by
index, so each rank gets the whole ``(N, D)`` array in input order, without the duplicates that a
padding sampler would add.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from facems.data.transforms import normalize_faces

__all__ = ["PRECISIONS", "embed_images", "embed_views"]

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _is_channels_last(model: nn.Module) -> bool:
    """True when the model's first 4-D weight whose layouts differ is stored channels_last."""
    for p in model.parameters():
        if p.dim() != 4:
            continue
        plain = p.is_contiguous()
        last = p.is_contiguous(memory_format=torch.channels_last)
        if plain != last:
            return last
    return False


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own train/eval flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _shard(n: int, rank: int, world: int) -> tuple[int, int]:
    return rank * n // world, (rank + 1) * n // world


def _as_images(images: np.ndarray | Tensor) -> Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, Tensor):
        raise TypeError(f"images: expected a numpy array or a torch.Tensor, got {type(images).__name__}")
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3 or x.shape[0] == 0:
        raise ValueError(
            f"images: expected uint8 (N, 3, H, W) RGB with N >= 1, got {x.dtype} {tuple(x.shape)}"
        )
    return x


def _gather_rows(local: Tensor, n: int, rank: int, world: int, device: torch.device) -> Tensor:
    """All-gather each rank's contiguous rows of an (n, F) array; every rank returns all n rows, in order."""
    # Width first: a rank with an empty shard never ran the model and does not know it.
    comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    width = torch.tensor([local.shape[1] if local.shape[0] else -1], dtype=torch.int64, device=comm_device)
    widths = [torch.empty_like(width) for _ in range(world)]
    dist.all_gather(widths, width)
    f = int(max(int(w.item()) for w in widths))
    sizes = [_shard(n, r, world)[1] - _shard(n, r, world)[0] for r in range(world)]
    longest = max(sizes)
    padded = torch.zeros(longest, f, dtype=torch.float32, device=comm_device)
    if local.shape[0]:
        padded[: local.shape[0]] = local.to(comm_device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    # Cut each rank's padding by its known shard size: no duplicated or invented rows.
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).cpu()


def embed_views(
    model: nn.Module,
    images: np.ndarray | Tensor,
    batch_size: int = 256,
    flip: bool = True,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    distributed: bool = True,
) -> np.ndarray:
    """The raw embedding of each image and, with ``flip``, of its horizontal mirror, kept apart.

    Same arguments as :func:`embed_images`, which sums the views. Keeping them apart lets a caller
    compute insightface's XNorm (the mean norm over both views) and sum the views in float64 as
    insightface does.

    Returns:
        float32 ``(V, N, D)``: ``V = 2`` (image, mirror) with ``flip``, else 1.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {sorted(PRECISIONS)}, got {precision!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    x_all = _as_images(images)
    n = x_all.shape[0]
    # DDP may sync buffers inside forward; ranks run different numbers of batches, so use the module.
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    dev = _model_device(model) if device is None else torch.device(device)
    channels_last = _is_channels_last(model)
    amp_dtype = PRECISIONS[precision]
    world = dist.get_world_size() if distributed and dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    start, stop = _shard(n, rank, world)
    n_views = 2 if flip else 1

    chunks: list[Tensor] = []
    with _eval_mode(model), torch.inference_mode():
        for b in range(start, stop, batch_size):
            x = x_all[b : min(b + batch_size, stop)].to(dev, non_blocking=True)
            views = [normalize_faces(x, channels_last=channels_last)]
            if flip:
                views.append(normalize_faces(x.flip(3), channels_last=channels_last))
            outs = []
            for v in views:
                with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out = model(v)
                outs.append(out.float().reshape(out.shape[0], -1))
            chunks.append(torch.cat(outs, dim=1))
        if chunks:
            local = torch.cat(chunks)
        else:
            local = torch.zeros(0, 0, dtype=torch.float32, device=dev)
        if world > 1:
            rows = _gather_rows(local, n, rank, world, dev)
        else:
            rows = local.cpu()
    d = rows.shape[1] // n_views
    return rows.reshape(n, n_views, d).permute(1, 0, 2).contiguous().numpy()


def embed_images(
    model: nn.Module,
    images: np.ndarray | Tensor,
    batch_size: int = 256,
    flip: bool = True,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    distributed: bool = True,
) -> np.ndarray:
    """Raw (not normalised) embeddings of uint8 RGB images, with insightface's flip test.

    Each batch crosses to the device as uint8 and is normalised there to ``(x / 255 - 0.5) / 0.5``
    (channels_last when the model's weights are). The model runs in eval mode under
    ``torch.inference_mode`` and every submodule's train/eval flag is restored afterwards.

    With ``distributed`` and an initialised process group of ``W > 1`` ranks, rank ``r`` embeds images
    ``[r * N // W, (r + 1) * N // W)`` and the shards are all-gathered (padded to equal length, then
    cut by index): **every rank must call this** and every rank returns the full array. A model wrapped
    in ``DistributedDataParallel`` is run through its ``.module``.

    Args:
        model: maps float ``(B, 3, H, W)`` in [-1, 1] to ``(B, D)`` embeddings.
        images: uint8 ``(N, 3, H, W)`` RGB, numpy or torch (any device).
        batch_size: images per forward pass (per view).
        flip: add the embedding of the horizontally mirrored image (insightface: ``emb + flip_emb``).
        device: where the batches go (the model must already be there); default the device of the
            model's parameters.
        precision: ``"fp32"``, or ``"bf16"`` / ``"fp16"`` autocast; outputs are float32 either way.
        distributed: shard across the ranks of an initialised process group (see above).

    Returns:
        float32 ``(N, D)``, in input order.

    Raises:
        ValueError: on images that are not uint8 (N, 3, H, W) with N >= 1, an unknown precision or a
            batch size below 1.
    """
    views = embed_views(model, images, batch_size, flip, device, precision, distributed)
    return views.sum(axis=0, dtype=np.float32) if views.shape[0] > 1 else views[0]
