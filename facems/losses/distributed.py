"""Pair losses over the global batch of a distributed run.

Each of W ranks holds ``b_r`` embeddings. :func:`all_gather_with_grad` concatenates them on every
rank with a backward pass that returns to each rank the summed gradient of its own rows, and
:class:`CrossRankLoss` evaluates a pair loss with the local embeddings as anchors against the
gathered global batch as references (mining on that same matrix). It scales the local loss so that
after DDP *averages* gradients over the ranks, the update equals that of one process computing the
loss on the concatenated batch:

    loss_r = W / N * sum_{i local} l_i,   N = sum_r b_r,

whose sum over ranks is ``W`` times the single-process loss ``sum_i l_i / N``; the gather's backward
sums every rank's contribution to each embedding and DDP divides by ``W``. The value returned on
each rank is therefore the single-process loss only after averaging it over the ranks (what a logger
should report).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

__all__ = ["CrossRankLoss", "all_gather_no_grad", "all_gather_with_grad", "world_info"]


def world_info(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of the process group, ``(0, 1)`` when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _gather_sizes(n: int, device: torch.device, group: dist.ProcessGroup | None) -> list[int]:
    world = dist.get_world_size(group)
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    return [int(s) for s in sizes]


def _gather_padded(x: Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """All-gather rows of possibly different counts: pad to the largest, gather, trim, concatenate."""
    longest = max(sizes)
    x = x.contiguous()
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, group: Any, sizes: list[int]) -> Tensor:
        rank = dist.get_rank(group)
        ctx.group = group  # type: ignore[attr-defined]
        ctx.rows = (sum(sizes[:rank]), sizes[rank])  # type: ignore[attr-defined]
        return _gather_padded(x, sizes, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        # Every rank's loss depends on every rank's rows: sum the gradients, keep our own rows.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start, count = ctx.rows
        return grad[start : start + count], None, None


def all_gather_with_grad(
    x: Tensor, group: dist.ProcessGroup | None = None, sizes: list[int] | None = None
) -> Tensor:
    """Concatenate ``x`` (rows may differ in number) from every rank, in rank order, differentiably.

    The backward pass all-reduces the incoming gradient and returns this rank's rows, so every
    rank's use of the gathered tensor reaches the rank that owns the rows. All ranks must call
    backward. Without an initialised process group this returns ``x``. ``sizes`` (every rank's row
    count, when the caller already gathered them) saves one collective.
    """
    if world_info(group)[1] == 1:
        return x
    if sizes is None:
        sizes = _gather_sizes(x.shape[0], x.device, group)
    return _AllGatherWithGrad.apply(x, group, sizes)


@torch.no_grad()
def all_gather_no_grad(
    x: Tensor, group: dist.ProcessGroup | None = None, sizes: list[int] | None = None
) -> Tensor:
    """Concatenate ``x`` from every rank in rank order, without gradient (labels, indices)."""
    if world_info(group)[1] == 1:
        return x
    if sizes is None:
        sizes = _gather_sizes(x.shape[0], x.device, group)
    return _gather_padded(x, sizes, group)


class CrossRankLoss(nn.Module):
    """Evaluate a pair loss on the global batch: local anchors against references from all ranks.

    Args:
        loss: a facems pair loss (``MultiSimilarityLoss``, a GPW loss) that averages over anchors and
            accepts ``(embeddings, labels, ref_embeddings, ref_labels, anchor_index)``.
        group: process group (default: the world).

    Without a process group (or with one rank) this is ``loss(embeddings, labels)``. With W ranks,
    the returned value is scaled as described in the module docstring so that DDP's gradient
    average equals single-process training on the concatenated batch.
    """

    def __init__(self, loss: nn.Module, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.group = group

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        rank, world = world_info(self.group)
        if world == 1:
            return self.loss(embeddings, labels)
        sizes = _gather_sizes(embeddings.shape[0], embeddings.device, self.group)
        refs = all_gather_with_grad(embeddings, self.group, sizes)
        ref_labels = all_gather_no_grad(labels, self.group, sizes)
        offset = sum(sizes[:rank])
        local_mean = self.loss(embeddings, labels, refs, ref_labels, offset)
        # local_mean = sum_local l_i / b_r; we want W * sum_local l_i / N.
        return local_mean * (embeddings.shape[0] * world / max(sum(sizes), 1))
