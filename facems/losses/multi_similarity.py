"""Multi-Similarity loss (Wang et al., "Multi-Similarity Loss with General Pair Weighting for Deep
Metric Learning", CVPR 2019), with the semantics of the paper's official code, vectorised.

For anchor ``i`` with cosine similarities ``S_ik`` to the references:

* positives ``P_i``: references with the anchor's label, the anchor itself excluded by index;
  negatives ``N_i``: references with another label.
* mining (optional): keep negative ``k`` when ``S_ik + epsilon > min_{p in P_i} S_ip``; keep positive
  ``k`` when ``S_ik - epsilon < max_{n in N_i} S_in`` (strict, computed without gradient, against
  the *unmined* extremes as in the official code).
* ``l_i = 1/alpha * log(1 + sum_{P_i'} exp(-alpha (S_ik - base)))
        + 1/beta  * log(1 + sum_{N_i'} exp( beta (S_ik - base)))``
  over the mined sets, or 0 when either mined set is empty (the official code skips the anchor);
* ``loss = sum_i l_i / A`` over all ``A`` anchors.

``log(1 + sum exp(z))`` is evaluated as a logsumexp with an appended zero, shifted by the row maximum,
so ``beta = 160`` with similarities near 1 stays finite in fp32.

Defaults are the official code's: alpha 2, beta 40, base (lambda) 0.5, epsilon 0.1.
pytorch-metric-learning's ``MultiSimilarityLoss`` defaults to alpha 2, beta 50, base 0.5 and its
``MultiSimilarityMiner`` to epsilon 0.1.

The forward pass computes the loss and its gradient with respect to the similarity matrix in one
sweep over the rows (optionally in chunks of anchors), so the backward pass is two matrix products,
as for the bare similarity matmul.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from facems.losses.pairs import PairLoss

AUTO_CHUNK_ELEMENTS = 1 << 20

__all__ = ["MultiSimilarityLoss", "ms_loss", "ms_mine"]


@torch.no_grad()
def ms_mine(sim: Tensor, pos: Tensor, neg: Tensor, epsilon: float = 0.1) -> tuple[Tensor, Tensor]:
    """Multi-Similarity pair mining.

    Args:
        sim: ``(A, R)`` cosine similarities.
        pos: ``(A, R)`` bool, positives of each anchor (self pair excluded).
        neg: ``(A, R)`` bool, negatives of each anchor.
        epsilon: mining margin.

    Returns:
        ``(pos_kept, neg_kept)``: bool ``(A, R)`` masks, subsets of ``pos`` and ``neg``. A negative is
        kept when ``S + epsilon > min(S over pos)``, a positive when ``S - epsilon < max(S over neg)``;
        an anchor with no positive keeps no negative and vice versa.
    """
    inf = torch.tensor(float("inf"), dtype=sim.dtype, device=sim.device)
    min_pos = torch.where(pos, sim, inf).amin(dim=1, keepdim=True)
    max_neg = torch.where(neg, sim, -inf).amax(dim=1, keepdim=True)
    neg_kept = neg & (sim + epsilon > min_pos)
    pos_kept = pos & (sim - epsilon < max_neg)
    return pos_kept, neg_kept


def _ms_rows(
    sim: Tensor,
    pos: Tensor,
    neg: Tensor,
    alpha: float,
    beta: float,
    base: float,
    epsilon: float,
    mining: bool,
    grad_out: Tensor | None,
) -> Tensor:
    """Per-anchor MS losses ``(A,)`` for a block of anchors; writes ``d l_i / d S_ik`` to ``grad_out``.

    Same result as applying :func:`ms_mine` and two masked logsumexps, in fewer passes over the
    ``(A, R)`` block: the negative term is computed densely and in place, the positive term on the
    (few, in P x K batches) positive pairs only, and "anything kept" per row is read off the row
    extremes (a negative survives mining iff the hardest one does, a positive iff the hardest one
    does).
    """
    neg_inf = float("-inf")
    rows_p, cols_p = pos.nonzero(as_tuple=True)
    s_pos = sim[rows_p, cols_p]
    n = sim.shape[0]
    min_pos = sim.new_full((n,), float("inf")).scatter_reduce(0, rows_p, s_pos, "amin")
    z = torch.where(neg, sim, neg_inf)  # negatives only; becomes the negative term in place
    max_neg = z.amax(dim=1)
    if mining:
        drop = torch.le(z + epsilon, min_pos.unsqueeze(1))  # complement of S + eps > min_pos
        keep_p = s_pos - epsilon < max_neg[rows_p]
        valid = (max_neg + epsilon > min_pos) & (min_pos - epsilon < max_neg)
    else:
        keep_p = torch.ones_like(s_pos, dtype=torch.bool)
        valid = torch.isfinite(min_pos) & (max_neg > neg_inf)

    # Negative term: 1/beta * log(1 + sum exp(beta (S - base))), shifted by max(0, row max).
    z.sub_(base).mul_(beta)
    if mining:
        z.masked_fill_(drop, neg_inf)
    shift_n = z.amax(dim=1, keepdim=True).clamp_min_(0.0)
    z.sub_(shift_n).exp_()
    total_n = z.sum(dim=1, keepdim=True).add_(torch.exp(-shift_n))
    loss_n = (shift_n + torch.log(total_n)).squeeze(1) / beta

    # Positive term on the positive pairs: 1/alpha * log(1 + sum exp(-alpha (S - base))).
    zp = torch.where(keep_p, (s_pos - base) * -alpha, neg_inf)
    shift_p = sim.new_zeros(n).scatter_reduce(0, rows_p, zp, "amax")  # include_self: the appended 0
    ep = torch.exp(zp - shift_p[rows_p])
    total_p = torch.exp(-shift_p).index_add_(0, rows_p, ep)
    loss_p = (shift_p + torch.log(total_p)) / alpha

    valid_f = valid.to(sim.dtype)
    if grad_out is not None:
        # d/dS: +softmax weights on kept negatives, -softmax weights on kept positives.
        torch.mul(z, valid_f.unsqueeze(1) / total_n, out=grad_out)
        grad_out[rows_p, cols_p] = -ep * (valid_f / total_p)[rows_p]
    return (loss_p + loss_n) * valid_f


class _MSFromSimilarity(torch.autograd.Function):
    """Sum of per-anchor MS losses from a similarity matrix; gradient computed in the forward."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        sim: Tensor,
        pos: Tensor,
        neg: Tensor,
        alpha: float,
        beta: float,
        base: float,
        epsilon: float,
        mining: bool,
        chunk_size: int | None,
    ) -> Tensor:
        n = sim.shape[0]
        if chunk_size is None:  # auto: blocks of about 2^20 similarities stay in cache
            chunk_size = max(1, AUTO_CHUNK_ELEMENTS // max(sim.shape[1], 1))
        step = n if chunk_size <= 0 else chunk_size
        total = sim.new_zeros(())
        grad = torch.empty_like(sim) if sim.requires_grad else None
        for start in range(0, n, max(step, 1)):
            rows = slice(start, min(start + step, n))
            block = grad[rows] if grad is not None else None
            losses = _ms_rows(sim[rows], pos[rows], neg[rows], alpha, beta, base, epsilon, mining, block)
            total = total + losses.sum()
        ctx.save_for_backward(grad if grad is not None else sim.new_empty(0))
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_out, None, None, None, None, None, None, None, None)


def ms_loss(
    sim: Tensor,
    pos: Tensor,
    neg: Tensor,
    alpha: float = 2.0,
    beta: float = 40.0,
    base: float = 0.5,
    epsilon: float = 0.1,
    mining: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """Multi-Similarity loss averaged over the anchors (the rows of ``sim``).

    Args:
        sim: ``(A, R)`` cosine similarities in [-1, 1]; the loss is computed in fp32 (half-precision
            inputs are upcast, also under autocast) or fp64 for fp64 inputs.
        pos: ``(A, R)`` bool positives (self pairs excluded by the caller).
        neg: ``(A, R)`` bool negatives.
        alpha: positive scale.
        beta: negative scale.
        base: similarity margin ``lambda``.
        epsilon: mining margin.
        mining: apply MS mining before weighting.
        chunk_size: process this many anchors at a time (0: all at once; None: blocks of about
            2^20 similarities, which measured fastest on CPU); bounds the temporaries to
            ``chunk_size x R`` without changing the result.

    Returns:
        Scalar ``sum_i l_i / A``, differentiable with respect to ``sim``. Anchors that mine nothing
        count in the denominator; with no rows the loss is 0, still connected to ``sim``.
    """
    if sim.shape != pos.shape or sim.shape != neg.shape:
        raise ValueError(
            f"sim, pos, neg must share a shape, got {tuple(sim.shape)}, {tuple(pos.shape)}, {tuple(neg.shape)}"
        )
    with torch.autocast(device_type=sim.device.type, enabled=False):
        s = sim if sim.dtype in (torch.float32, torch.float64) else sim.float()
        total = _MSFromSimilarity.apply(
            s, pos.bool(), neg.bool(), alpha, beta, base, epsilon, mining, chunk_size
        )
    return total / max(sim.shape[0], 1)


def _check_hparams(alpha: float, beta: float, epsilon: float, chunk_size: int | None) -> None:
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if chunk_size is not None and chunk_size < 0:
        raise ValueError(f"chunk_size must be None (auto), 0 (no chunking) or positive, got {chunk_size}")


class MultiSimilarityLoss(PairLoss):
    """Multi-Similarity loss with MS mining (official semantics, vectorised).

    Args:
        alpha: scale of the positive term (official 2; pytorch-metric-learning 2).
        beta: scale of the negative term (official 40; pytorch-metric-learning 50).
        base: similarity margin lambda (official 0.5; pytorch-metric-learning 0.5).
        epsilon: mining margin (official 0.1; pytorch-metric-learning's miner 0.1).
        mining: mine pairs before weighting them.
        chunk_size: anchors per chunk (None: auto, about 2^20 similarities per chunk; 0: all at
            once); bounds the temporaries to ``chunk_size x references``.

    Call as ``loss(embeddings, labels)`` for a batch against itself, or
    ``loss(embeddings, labels, ref_embeddings, ref_labels, anchor_index)`` for local anchors against
    gathered references (``anchor_index``: the anchors' positions among the references, a ``(A,)``
    tensor or an int offset; ``None`` when the references do not contain the anchors, e.g. a
    memory bank). Returns the fp32 mean over anchors.
    """

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 40.0,
        base: float = 0.5,
        epsilon: float = 0.1,
        mining: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        _check_hparams(alpha, beta, epsilon, chunk_size)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.base = float(base)
        self.epsilon = float(epsilon)
        self.mining = bool(mining)
        self.chunk_size = chunk_size

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, base={self.base}, epsilon={self.epsilon}, "
            f"mining={self.mining}, chunk_size={self.chunk_size}"
        )

    def _loss(self, sim: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        return ms_loss(
            sim, pos, neg, self.alpha, self.beta, self.base, self.epsilon, self.mining, self.chunk_size
        )
