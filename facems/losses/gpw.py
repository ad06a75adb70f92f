"""The "general pair weighting" (GPW) family of pair-based losses, for comparison runs.

Wang et al., *Multi-Similarity Loss with General Pair Weighting for Deep Metric Learning* (CVPR 2019)
analyse classic pair-based losses as functions of the cosine similarity matrix. This module implements
those losses with the same conventions as :mod:`facems.losses.multi_similarity`: every loss is a pure
function of ``sim`` (``(A, R)`` cosine similarities ``S_ik`` in ``[-1, 1]`` of anchor ``i`` and
reference ``k``) and the boolean ``(A, R)`` masks ``pos`` / ``neg`` (``pos`` excludes the anchor's own
pair, by index), and a thin :class:`torch.nn.Module` computes those from embeddings and labels.

With ``P_i`` / ``N_i`` the positives / negatives of anchor ``i`` and ``[x]_+ = max(x, 0)``:

* contrastive: ``l_i = sum_{k in P_i} [m_p - S_ik]_+ + sum_{k in N_i} [S_ik - m_n]_+``
  (positives pulled up to ``m_p = pos_margin``, negatives pushed below ``m_n = neg_margin``);
* triplet, batch hard: ``l_i = [max_{n in N_i} S_in - min_{p in P_i} S_ip + margin]_+``;
* triplet, all: ``l_i = mean_{p in P_i, n in N_i} [S_in - S_ip + margin]_+``;
* generalised lifted structure:
  ``l_i = [log sum_{k in P_i} exp(margin - S_ik) + log sum_{k in N_i} exp(S_ik)]_+``;
* binomial deviance (Yi et al. 2014):
  ``l_i = mean_{k in P_i} softplus(-alpha (S_ik - base)) + mean_{k in N_i} softplus(beta (S_ik - base))``
  with ``softplus(x) = log(1 + exp(x))``.

Every loss is ``(1 / A) sum_i l_i``: anchors that have nothing to contribute (no positive, no negative,
no valid triplet) count in the denominator and contribute 0. The result is always connected to the
autograd graph of ``sim`` (zero gradients when nothing contributes), never ``NaN`` for degenerate
anchors, and the log-sum-exp / softplus terms use stable forms, so large scales (``beta = 160``) do not
overflow in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from facems.losses.pairs import PairLoss

__all__ = [
    "BinomialDevianceLoss",
    "ContrastiveLoss",
    "LiftedStructureLoss",
    "TripletLoss",
    "binomial_deviance_loss",
    "contrastive_loss",
    "lifted_structure_loss",
    "triplet_all_loss",
    "triplet_batch_hard_loss",
]

_TRIPLET_MINING = ("batch_hard", "all")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _check_inputs(sim: Tensor, pos: Tensor, neg: Tensor) -> None:
    if sim.dim() != 2:
        raise ValueError(f"sim must be (anchors, refs), got shape {tuple(sim.shape)}")
    if pos.shape != sim.shape or neg.shape != sim.shape:
        raise ValueError(
            f"pos and neg must have the shape of sim {tuple(sim.shape)}, "
            f"got {tuple(pos.shape)} and {tuple(neg.shape)}"
        )
    if pos.dtype != torch.bool or neg.dtype != torch.bool:
        raise ValueError(f"pos and neg must be boolean masks, got {pos.dtype} and {neg.dtype}")


def _mean_over_anchors(per_anchor: Tensor, sim: Tensor) -> Tensor:
    """``sum_i l_i / A``; ``(sim * 0).sum()`` (0, still in the graph) when there is no anchor."""
    num_anchors = sim.shape[0]
    if num_anchors == 0:
        return (sim * 0).sum()
    return per_anchor.sum() / num_anchors


def _masked_logsumexp(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise ``log sum_{k: mask_ik} exp(x_ik)`` and whether the row has any entry.

    Rows without entries get a finite placeholder value (not ``-inf``), so neither the forward nor the
    backward pass produces ``NaN``; callers must discard them with the returned ``(A,)`` mask.
    """
    has_any = mask.any(dim=1)
    # Masked entries are -inf (weight 0); all-masked rows are replaced by zeros so that the
    # softmax in the backward pass of logsumexp is not exp(-inf - (-inf)).
    filled = x.masked_fill(~mask, -math.inf).masked_fill(~has_any.unsqueeze(1), 0.0)
    return torch.logsumexp(filled, dim=1), has_any


def _softplus(x: Tensor) -> Tensor:
    """Exact, overflow-free ``log(1 + exp(x))`` (``F.softplus`` linearises above a threshold)."""
    return torch.logaddexp(x, torch.zeros_like(x))


# ----------------------------------------------------------------------------------------------
# pure functions
# ----------------------------------------------------------------------------------------------
def contrastive_loss(
    sim: Tensor, pos: Tensor, neg: Tensor, pos_margin: float = 1.0, neg_margin: float = 0.5
) -> Tensor:
    """Cosine-similarity contrastive loss.

    ``l_i = sum_{k in P_i} [pos_margin - S_ik]_+ + sum_{k in N_i} [S_ik - neg_margin]_+``, averaged
    over all ``A`` anchors (the per-anchor terms are *sums* over pairs, as in the MS-loss paper).

    Args:
        sim: ``(A, R)`` cosine similarities in ``[-1, 1]`` of anchors and references (fp32).
        pos: ``(A, R)`` bool mask of positive pairs (same label, self pair excluded).
        neg: ``(A, R)`` bool mask of negative pairs (different label).
        pos_margin: similarity positives are pulled up to (cosine units; 1.0 pulls them all the way).
        neg_margin: similarity negatives are pushed below (cosine units).

    Returns:
        Scalar loss with the dtype of ``sim``.
    """
    _check_inputs(sim, pos, neg)
    zero = sim.new_zeros(())
    pos_term = torch.where(pos, F.relu(pos_margin - sim), zero).sum(dim=1)
    neg_term = torch.where(neg, F.relu(sim - neg_margin), zero).sum(dim=1)
    return _mean_over_anchors(pos_term + neg_term, sim)


def triplet_batch_hard_loss(sim: Tensor, pos: Tensor, neg: Tensor, margin: float = 0.1) -> Tensor:
    """Batch-hard triplet loss on cosine similarities.

    ``l_i = [max_{n in N_i} S_in - min_{p in P_i} S_ip + margin]_+`` for anchors with at least one
    positive and one negative, 0 for the others; averaged over all ``A`` anchors.

    Args:
        sim: ``(A, R)`` cosine similarities in ``[-1, 1]`` of anchors and references (fp32).
        pos: ``(A, R)`` bool mask of positive pairs (same label, self pair excluded).
        neg: ``(A, R)`` bool mask of negative pairs (different label).
        margin: required gap (cosine units) between the hardest positive and the hardest negative.

    Returns:
        Scalar loss with the dtype of ``sim``.
    """
    _check_inputs(sim, pos, neg)
    valid = pos.any(dim=1) & neg.any(dim=1)
    # Rows without a positive (negative) get a finite dummy; they are discarded by ``valid``.
    hardest_neg = sim.masked_fill(~neg, -math.inf).masked_fill(~valid.unsqueeze(1), 0.0).amax(dim=1)
    hardest_pos = sim.masked_fill(~pos, math.inf).masked_fill(~valid.unsqueeze(1), 0.0).amin(dim=1)
    per_anchor = torch.where(valid, F.relu(hardest_neg - hardest_pos + margin), sim.new_zeros(()))
    return _mean_over_anchors(per_anchor, sim)


def _triplet_all_chunk(sim: Tensor, pos: Tensor, neg: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """Hinges ``[S_cn - S_cp + margin]_+`` of a chunk of anchors, shape ``(C, R, R)``, and their mask."""
    # diff[c, p, n] = S_cn - S_cp + margin, valid[c, p, n] = pos[c, p] & neg[c, n]
    diff = sim.unsqueeze(1) - sim.unsqueeze(2) + margin
    valid = pos.unsqueeze(2) & neg.unsqueeze(1)
    return diff, valid


class _TripletAllHingeSum(torch.autograd.Function):
    """Per-anchor sum of the hinges of all valid triplets, computed ``chunk_size`` anchors at a time.

    Only ``sim`` and the masks are saved; the backward pass recomputes each chunk, so neither pass
    holds more than one ``(chunk_size, R, R)`` block (autograd on the chunks would keep all of them).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        sim: Tensor,
        pos: Tensor,
        neg: Tensor,
        margin: float,
        chunk_size: int,
    ) -> Tensor:
        ctx.save_for_backward(sim, pos, neg)
        ctx.margin = margin  # type: ignore[attr-defined]
        ctx.chunk_size = chunk_size  # type: ignore[attr-defined]
        out = sim.new_zeros(sim.shape[0])
        for start in range(0, sim.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            diff, valid = _triplet_all_chunk(sim[chunk], pos[chunk], neg[chunk], margin)
            out[chunk] = torch.where(valid, diff.clamp_min(0.0), 0.0).sum(dim=(1, 2))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, None, None, None, None]:
        sim, pos, neg = ctx.saved_tensors  # type: ignore[attr-defined]
        if not ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            return None, None, None, None, None
        chunk_size: int = ctx.chunk_size  # type: ignore[attr-defined]
        grad = torch.zeros_like(sim)
        for start in range(0, sim.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            diff, valid = _triplet_all_chunk(sim[chunk], pos[chunk], neg[chunk], ctx.margin)  # type: ignore[attr-defined]
            # d hinge / d S_cn = +1 and d hinge / d S_cp = -1 where the triplet is valid and active
            active = (valid & (diff > 0)).to(sim.dtype)
            g = grad_out[chunk].unsqueeze(1)
            grad[chunk] = (active.sum(dim=1) - active.sum(dim=2)) * g
        return grad, None, None, None, None


def triplet_all_loss(
    sim: Tensor, pos: Tensor, neg: Tensor, margin: float = 0.1, chunk_size: int = 64
) -> Tensor:
    """Triplet loss over all valid triplets of each anchor.

    ``l_i = mean_{p in P_i, n in N_i} [S_in - S_ip + margin]_+`` (the mean is over all
    ``|P_i| * |N_i|`` triplets, active or not); anchors without a valid triplet contribute 0. The
    result is averaged over all ``A`` anchors.

    The ``(A, R, R)`` triplet tensor is never materialised: anchors are processed ``chunk_size`` at
    a time by a custom autograd function that saves only ``sim`` and the masks and recomputes each
    chunk in the backward pass, so peak memory is ``O(A * R + chunk_size * R**2)`` in both passes
    (no double backward).

    Args:
        sim: ``(A, R)`` cosine similarities in ``[-1, 1]`` of anchors and references (fp32).
        pos: ``(A, R)`` bool mask of positive pairs (same label, self pair excluded).
        neg: ``(A, R)`` bool mask of negative pairs (different label).
        margin: required gap (cosine units) between each positive and each negative.
        chunk_size: number of anchors processed at once (> 0).

    Returns:
        Scalar loss with the dtype of ``sim``.

    Raises:
        ValueError: if ``chunk_size`` is not positive.
    """
    _check_inputs(sim, pos, neg)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    hinge_sum = _TripletAllHingeSum.apply(sim, pos, neg, float(margin), int(chunk_size))
    num_triplets = pos.sum(dim=1) * neg.sum(dim=1)
    per_anchor = hinge_sum / num_triplets.clamp(min=1).to(sim.dtype)
    return _mean_over_anchors(per_anchor, sim)


def lifted_structure_loss(sim: Tensor, pos: Tensor, neg: Tensor, margin: float = 1.0) -> Tensor:
    """Generalised lifted structure loss, as written in the MS-loss paper.

    ``l_i = [log sum_{k in P_i} exp(margin - S_ik) + log sum_{k in N_i} exp(S_ik)]_+`` for anchors
    with at least one positive and one negative, 0 for the others; averaged over all ``A`` anchors.
    Both sums are evaluated with a masked log-sum-exp.

    Args:
        sim: ``(A, R)`` cosine similarities in ``[-1, 1]`` of anchors and references (fp32).
        pos: ``(A, R)`` bool mask of positive pairs (same label, self pair excluded).
        neg: ``(A, R)`` bool mask of negative pairs (different label).
        margin: the margin ``lambda`` (cosine units) inside the positive log-sum-exp.

    Returns:
        Scalar loss with the dtype of ``sim``.
    """
    _check_inputs(sim, pos, neg)
    pos_lse, has_pos = _masked_logsumexp(margin - sim, pos)
    neg_lse, has_neg = _masked_logsumexp(sim, neg)
    valid = has_pos & has_neg
    per_anchor = torch.where(valid, F.relu(pos_lse + neg_lse), sim.new_zeros(()))
    return _mean_over_anchors(per_anchor, sim)


def binomial_deviance_loss(
    sim: Tensor, pos: Tensor, neg: Tensor, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5
) -> Tensor:
    """Binomial deviance loss (Yi et al. 2014, as written in the MS-loss paper).

    ``l_i = mean_{k in P_i} softplus(-alpha (S_ik - base)) + mean_{k in N_i} softplus(beta (S_ik - base))``,
    each mean being 0 when its set is empty; averaged over all ``A`` anchors. The paper's cost ``C``
    of the negative term is folded into ``beta``. ``softplus`` is evaluated exactly and without
    overflow (``logaddexp(x, 0)``), so large ``beta`` is safe in fp32.

    Args:
        sim: ``(A, R)`` cosine similarities in ``[-1, 1]`` of anchors and references (fp32).
        pos: ``(A, R)`` bool mask of positive pairs (same label, self pair excluded).
        neg: ``(A, R)`` bool mask of negative pairs (different label).
        alpha: scale of the positive term (per cosine unit).
        beta: scale of the negative term (per cosine unit).
        base: similarity (cosine units) at which both terms are centred.

    Returns:
        Scalar loss with the dtype of ``sim``.
    """
    _check_inputs(sim, pos, neg)
    zero = sim.new_zeros(())
    centred = sim - base
    pos_sum = torch.where(pos, _softplus(-alpha * centred), zero).sum(dim=1)
    neg_sum = torch.where(neg, _softplus(beta * centred), zero).sum(dim=1)
    pos_mean = pos_sum / pos.sum(dim=1).clamp(min=1).to(sim.dtype)
    neg_mean = neg_sum / neg.sum(dim=1).clamp(min=1).to(sim.dtype)
    return _mean_over_anchors(pos_mean + neg_mean, sim)


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------
class ContrastiveLoss(PairLoss):
    """Module form of :func:`contrastive_loss`.

    Args:
        pos_margin: similarity positives are pulled up to (cosine units).
        neg_margin: similarity negatives are pushed below (cosine units).
    """

    def __init__(self, pos_margin: float = 1.0, neg_margin: float = 0.5) -> None:
        super().__init__()
        self.pos_margin = float(pos_margin)
        self.neg_margin = float(neg_margin)

    def _loss(self, sim: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        return contrastive_loss(sim, pos, neg, pos_margin=self.pos_margin, neg_margin=self.neg_margin)

    def extra_repr(self) -> str:
        return f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}"


class TripletLoss(PairLoss):
    """Module form of :func:`triplet_batch_hard_loss` / :func:`triplet_all_loss`.

    Args:
        margin: required gap (cosine units) between positive and negative similarities.
        mining: ``"batch_hard"`` (hardest positive and negative of each anchor) or ``"all"`` (mean
            over all valid triplets of each anchor).
        chunk_size: anchors processed at once by ``mining="all"``.

    Raises:
        ValueError: on an unknown ``mining``.
    """

    def __init__(self, margin: float = 0.1, mining: str = "batch_hard", chunk_size: int = 64) -> None:
        super().__init__()
        if mining not in _TRIPLET_MINING:
            raise ValueError(f"mining must be one of {', '.join(map(repr, _TRIPLET_MINING))}, got {mining!r}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.margin = float(margin)
        self.mining = mining
        self.chunk_size = int(chunk_size)

    def _loss(self, sim: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        if self.mining == "all":
            return triplet_all_loss(sim, pos, neg, margin=self.margin, chunk_size=self.chunk_size)
        return triplet_batch_hard_loss(sim, pos, neg, margin=self.margin)

    def extra_repr(self) -> str:
        extra = f", chunk_size={self.chunk_size}" if self.mining == "all" else ""
        return f"margin={self.margin}, mining={self.mining!r}{extra}"


class LiftedStructureLoss(PairLoss):
    """Module form of :func:`lifted_structure_loss`.

    Args:
        margin: the margin ``lambda`` (cosine units) inside the positive log-sum-exp.
    """

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = float(margin)

    def _loss(self, sim: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        return lifted_structure_loss(sim, pos, neg, margin=self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class BinomialDevianceLoss(PairLoss):
    """Module form of :func:`binomial_deviance_loss`.

    Args:
        alpha: scale of the positive term (per cosine unit).
        beta: scale of the negative term (per cosine unit).
        base: similarity (cosine units) at which both terms are centred.
    """

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.base = float(base)

    def _loss(self, sim: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        return binomial_deviance_loss(sim, pos, neg, alpha=self.alpha, beta=self.beta, base=self.base)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, base={self.base}"
