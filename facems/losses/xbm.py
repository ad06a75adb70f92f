"""Cross-batch memory (XBM; Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020).

A ring buffer of the most recent ``size`` embeddings (detached, L2-normalised, fp32) and their
labels. From a start step on, the local anchors of each step are also compared with the memory, so
a pair loss sees many more negatives (and positives) than one batch holds:

    total = batch_loss + weight * xbm_loss(loss_fn, memory, embeddings, labels)

Order of operations in a training step (facems):

1. the batch loss of the local anchors against the gathered global batch;
2. the memory loss of the local anchors against the memory (when the memory is not empty and the
   step has reached the start step);
3. only then ``memory.enqueue(all_gathered_embeddings.detach(), all_gathered_labels)``.

So the memory never holds the current anchors and no anchor is ever compared with its own copy:
self pairs are excluded *structurally*, which is why the memory loss is called with
``anchor_index=None``. The official research-xbm code enqueues first and then drops pairs whose
similarity is above ``1 - 1e-5`` to remove the self pairs; facems's rule is "self pairs excluded by
index, never by value", and an exact duplicate image in the memory stays a positive here.

The official code also resets its pointer to 0 when a batch would run past the end of the buffer
(overwriting the last rows instead of wrapping); this buffer is a true ring. The memory is
identical on every rank (it is filled with the all-gathered batch), its loss is the mean over the
local anchors and its references carry no gradient, so DDP's gradient average over ranks already
equals one process on the whole batch: no world-size scaling is needed, unlike
:class:`facems.losses.CrossRankLoss`.

The buffers ``feats``, ``labels``, ``ptr`` and ``filled`` are registered as module buffers, so
``state_dict()`` / ``load_state_dict()`` carry the memory in a checkpoint and a resumed run
continues with exactly the same memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CrossBatchMemory", "xbm_loss"]


class CrossBatchMemory(nn.Module):
    """Ring buffer of detached, L2-normalised fp32 embeddings and their int64 labels.

    Args:
        size: number of rows the memory holds (> 0).
        dim: embedding dimension (> 0).

    Buffers (saved in ``state_dict``):
        feats: ``(size, dim)`` fp32 rows; only the first ``filled`` slots are valid.
        labels: ``(size,)`` int64 labels of the rows.
        ptr: scalar int64, the slot the next row is written to.
        filled: scalar int64, the number of valid rows (at most ``size``).

    Move the memory to the training device with ``.to(device)``; :meth:`enqueue` copies its inputs
    there.
    """

    feats: Tensor
    labels: Tensor
    ptr: Tensor
    filled: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.size = size
        self.dim = dim
        self.register_buffer("feats", torch.zeros(size, dim, dtype=torch.float32))
        self.register_buffer("labels", torch.zeros(size, dtype=torch.int64))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"

    def __len__(self) -> int:
        """Number of valid rows (synchronises with the device when the memory is on a GPU)."""
        return int(self.filled)

    @torch.no_grad()
    def enqueue(self, feats: Tensor, labels: Tensor) -> None:
        """Append a batch, overwriting the oldest rows once the memory is full.

        Args:
            feats: ``(n, dim)`` embeddings, any float dtype and device, not necessarily normalised;
                stored detached, L2-normalised and in fp32 on the memory's device.
            labels: ``(n,)`` integer labels of the rows.

        A batch with more than ``size`` rows keeps its last ``size`` rows (what appending the
        rows one by one would leave).

        Raises:
            ValueError: when ``feats`` is not ``(n, dim)``, ``labels`` is not ``(n,)``, or a dtype
                is not floating (``feats``) / integer (``labels``).
        """
        if feats.dim() != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"feats must be (batch, {self.dim}), got shape {tuple(feats.shape)}")
        if not feats.is_floating_point():
            raise ValueError(f"feats must be a floating-point tensor, got dtype {feats.dtype}")
        n = feats.shape[0]
        if labels.dim() != 1 or labels.shape[0] != n:
            raise ValueError(f"labels must be ({n},) to match feats, got shape {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if n == 0:
            return
        # Same slots as a row-by-row append: row j goes to (ptr + j) % size, and of a batch longer
        # than the memory only the last `size` rows survive.
        skip = max(n - self.size, 0)
        feats, labels = feats[skip:], labels[skip:]
        keep = n - skip
        device = self.feats.device
        rows = F.normalize(feats.detach().to(device=device, dtype=torch.float32), dim=1)
        # Slot indices computed on the device: no host synchronisation per step.
        slots = torch.remainder(self.ptr + torch.arange(skip, n, device=device), self.size)
        self.feats.index_copy_(0, slots, rows)
        self.labels.index_copy_(0, slots, labels.detach().to(device=device, dtype=torch.int64))
        self.ptr.add_(n).remainder_(self.size)
        self.filled.add_(keep).clamp_(max=self.size)

    def get(self) -> tuple[Tensor, Tensor]:
        """The valid rows, in slot order (deterministic; not the order of insertion once wrapped).

        Returns:
            ``(feats, labels)``: ``(filled, dim)`` fp32 unit rows and ``(filled,)`` int64 labels.
            They are views of the buffers: the next :meth:`enqueue` overwrites them in place, so
            clone them to keep them longer.
        """
        n = len(self)
        return self.feats[:n], self.labels[:n]

    def reset(self) -> None:
        """Empty the memory (the rows are zeroed, pointer and count set to 0)."""
        self.feats.zero_()
        self.labels.zero_()
        self.ptr.zero_()
        self.filled.zero_()


def xbm_loss(
    loss_fn: Callable[..., Tensor], memory: CrossBatchMemory, embeddings: Tensor, labels: Tensor
) -> Tensor:
    """Pair loss of the local anchors against the cross-batch memory.

    Args:
        loss_fn: a facems pair loss (a :class:`facems.losses.PairLoss`, not wrapped in
            :class:`facems.losses.CrossRankLoss`) accepting
            ``(embeddings, labels, ref_embeddings, ref_labels, anchor_index)`` and averaging over the
            anchors (e.g. :class:`facems.losses.MultiSimilarityLoss`).
        memory: the memory; it must not contain the current anchors (call this *before*
            :meth:`CrossBatchMemory.enqueue` of the current batch; see the module docstring).
        embeddings: ``(A, D)`` local anchor embeddings (with gradient).
        labels: ``(A,)`` their labels.

    Returns:
        Scalar loss (fp32, or fp64 for fp64 embeddings), gradient to ``embeddings`` only. With an
        empty memory it is 0, still connected to the graph so DDP's hooks fire on every rank.
    """
    if embeddings.dim() != 2 or embeddings.shape[1] != memory.dim:
        raise ValueError(
            f"embeddings must be (batch, {memory.dim}) to match the memory, got shape {tuple(embeddings.shape)}"
        )
    refs, ref_labels = memory.get()
    if refs.shape[0] == 0:
        out_dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        return (embeddings.sum() * 0).to(out_dtype)
    if refs.device != embeddings.device:
        raise ValueError(
            f"memory is on {refs.device} but embeddings are on {embeddings.device}; move it with memory.to(device)"
        )
    if embeddings.dtype == torch.float64:  # fp64 anchors (tests, gradcheck): match the references
        refs = refs.double()
    # The anchors are never in the memory (enqueued after this loss): no self pair to exclude.
    return loss_fn(embeddings, labels, refs, ref_labels, None)
