"""Similarity matrices and label masks shared by every pair-based loss.

Every loss in :mod:`facems.losses` is a function of three tensors of the same shape ``(A, R)``:
``sim`` (cosine similarity of anchor ``i`` and reference ``j``, in fp32), and the boolean masks
``pos`` / ``neg`` that say which references are positives / negatives of each anchor. Anchors are
usually a subset of the references (the local batch inside the gathered global batch), so self
pairs are removed by *index* (``anchor_index``), never by comparing similarities with 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PairLoss", "cosine_similarity_matrix", "label_masks", "resolve_references"]


def cosine_similarity_matrix(embeddings: Tensor, references: Tensor) -> Tensor:
    """Cosine similarity of every anchor with every reference, in fp32.

    Args:
        embeddings: ``(A, D)`` anchor embeddings, any float dtype, not necessarily normalised.
        references: ``(R, D)`` reference embeddings.

    Returns:
        ``(A, R)`` tensor in ``[-1, 1]``, fp32 (fp64 for fp64 inputs). Half-precision inputs are
        upcast to fp32, also under autocast, and L2-normalised with gradients flowing through the normalisation.
    """
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x = F.normalize(_at_least_fp32(embeddings), dim=1)
        r = x if references is embeddings else F.normalize(_at_least_fp32(references), dim=1)
        return x @ r.t()


def _at_least_fp32(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def label_masks(labels: Tensor, ref_labels: Tensor, anchor_index: Tensor | None) -> tuple[Tensor, Tensor]:
    """Positive and negative masks of anchors against references.

    Args:
        labels: ``(A,)`` integer labels of the anchors.
        ref_labels: ``(R,)`` integer labels of the references.
        anchor_index: ``(A,)`` position of each anchor among the references (its self pair is not a
            positive), or ``None`` when the anchors are not among the references (a memory bank).

    Returns:
        ``(pos, neg)``: boolean ``(A, R)`` masks; ``pos`` has the same label and is not the anchor
        itself, ``neg`` has another label.
    """
    same = labels.view(-1, 1) == ref_labels.view(1, -1)
    neg = ~same
    pos = same
    if anchor_index is not None:
        pos = same.clone()
        rows = torch.arange(labels.numel(), device=labels.device)
        pos[rows, anchor_index.to(labels.device)] = False
    return pos, neg


def resolve_references(
    embeddings: Tensor,
    labels: Tensor,
    ref_embeddings: Tensor | None,
    ref_labels: Tensor | None,
    anchor_index: Tensor | int | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Check and complete the (anchors, references, anchor positions) arguments of a loss.

    With no references the anchors are their own references (``anchor_index = arange(A)``). An
    integer ``anchor_index`` is the offset of a contiguous block of anchors among the references
    (rank ``r``'s slice of a gathered batch).

    Returns:
        ``(ref_embeddings, ref_labels, anchor_index)`` with ``anchor_index`` a ``(A,)`` long tensor
        or ``None``.

    Raises:
        ValueError: on mismatched shapes or positions outside the references.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (batch, dim), got shape {tuple(embeddings.shape)}")
    if labels.dim() != 1 or labels.numel() != embeddings.shape[0]:
        raise ValueError(
            f"labels must be (batch,) = ({embeddings.shape[0]},), got shape {tuple(labels.shape)}"
        )
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError("ref_embeddings and ref_labels must be given together")
    n = embeddings.shape[0]
    if ref_embeddings is None or ref_labels is None:
        if anchor_index is not None and not (isinstance(anchor_index, int) and anchor_index == 0):
            raise ValueError("anchor_index needs ref_embeddings (anchors are their own references)")
        return embeddings, labels, torch.arange(n, device=labels.device)
    if ref_embeddings.dim() != 2 or ref_embeddings.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"ref_embeddings must be (refs, {embeddings.shape[1]}), got shape {tuple(ref_embeddings.shape)}"
        )
    if ref_labels.dim() != 1 or ref_labels.numel() != ref_embeddings.shape[0]:
        raise ValueError(
            f"ref_labels must be ({ref_embeddings.shape[0]},), got shape {tuple(ref_labels.shape)}"
        )
    if anchor_index is None:
        return ref_embeddings, ref_labels, None
    m = ref_embeddings.shape[0]
    if isinstance(anchor_index, int):
        if anchor_index < 0 or anchor_index + n > m:
            raise ValueError(f"anchor_index offset {anchor_index} + {n} anchors exceeds {m} references")
        idx = torch.arange(anchor_index, anchor_index + n, device=labels.device)
    else:
        idx = anchor_index.to(device=labels.device, dtype=torch.long).view(-1)
        if idx.numel() != n:
            raise ValueError(f"anchor_index must have {n} entries, got {idx.numel()}")
        if n and (int(idx.min()) < 0 or int(idx.max()) >= m):
            raise ValueError(
                f"anchor_index values must lie in [0, {m}), got [{int(idx.min())}, {int(idx.max())}]"
            )
    if n and not torch.equal(ref_labels[idx].to(labels.device), labels):
        raise ValueError(
            "labels differ from ref_labels at anchor_index: anchors must be their own references"
        )
    return ref_embeddings, ref_labels, idx


class PairLoss(nn.Module):
    """Base of the pair-loss modules: embeddings and labels -> (sim, pos, neg) -> :meth:`_loss`.

    Subclasses implement ``_loss(sim, pos, neg)`` as a call to their pure tensor function.
    """

    def _loss(self, sim: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
        anchor_index: Tensor | int | None = None,
    ) -> Tensor:
        """Loss of the anchors against the references.

        Args:
            embeddings: ``(A, D)`` anchor embeddings (any float dtype, need not be normalised;
                similarities are cosine similarities computed in fp32).
            labels: ``(A,)`` integer labels of the anchors.
            ref_embeddings: ``(R, D)`` reference embeddings (e.g. the gathered global batch or a
                memory bank); ``None`` uses the anchors themselves.
            ref_labels: ``(R,)`` labels of the references; given together with ``ref_embeddings``.
            anchor_index: position of the anchors among the references, to exclude self pairs:
                a ``(A,)`` tensor, an ``int`` offset of a contiguous block, or ``None`` when the
                anchors are not among the references.

        Returns:
            Scalar fp32 loss.
        """
        refs, ref_labels, idx = resolve_references(
            embeddings, labels, ref_embeddings, ref_labels, anchor_index
        )
        sim = cosine_similarity_matrix(embeddings, refs)
        pos, neg = label_masks(labels, ref_labels, idx)
        return self._loss(sim, pos, neg)
