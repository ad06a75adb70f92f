"""Additive margin softmax heads: ArcFace and CosFace, for hybrid training with a pair loss.

With ``cos_j = <x / |x|, W_j / |W_j|>`` (clamped to [-1, 1]) and the label ``y``:

* ArcFace (Deng et al., CVPR 2019): the target logit ``cos_y`` becomes ``cos(theta_y + m)``;
* CosFace (Wang et al., CVPR 2018): it becomes ``cos_y - m``;

every logit is multiplied by the scale ``s`` and the loss is the mean cross-entropy.

ArcFace past ``theta + m > pi``: ``cos(theta + m)`` would rise again there (the target would be
*rewarded* for moving away from its class), so, as insightface's arcface_torch ``ArcFace`` /
``CombinedMarginLoss`` with ``easy_margin=False`` (the older ``th``/``mm`` form), for
``cos_y <= cos(pi - m)`` the target logit is ``cos_y - m * sin(m)`` (the first-order expansion of
``cos(theta + m)`` at ``theta = pi - m``, written ``sin(pi - m) * m`` there). The target logit is
then strictly decreasing in ``theta`` over ``[0, pi]``: it falls to ``-1`` at ``theta = pi - m``,
steps down to ``-cos(m) - m sin(m) <= -1`` (which holds for ``0 <= m <= pi/2``, hence the margin's
allowed range) and keeps falling to ``-1 - m sin(m)``. The "easy margin" variant (no margin when
``cos_y <= 0``) is not offered. (insightface's oldest arcface_torch applied ``cos(acos(c) + m)``
everywhere, which is not monotonic.)

``sin(theta) = sqrt(1 - cos^2)`` is evaluated as ``sqrt(max(1 - cos^2, 1e-20))``: its derivative is
infinite at ``cos = +-1``, and ``torch.where`` sends a zero gradient into the unused branch, so an
exact ``cos = -1`` would otherwise give ``0 * inf = nan`` gradients (whether the clamp to [-1, 1]
passes a gradient at its bounds is then no longer relevant). The floor changes
the target only where ``sin(theta) < 1e-10``, by at most ``1e-10 * sin(m)``.

The head is computed in fp32 with autocast disabled (fp64 when the embeddings are fp64, for
gradient checks). Its weight is initialised from N(0, 0.01^2), as arcface_torch's partial FC.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MARGIN_KINDS", "MarginHead", "margin_logits", "margin_softmax_loss"]

MARGIN_KINDS = ("arcface", "cosface")
_SIN_SQ_FLOOR = 1e-20


def _check_margin(kind: str, scale: float, margin: float) -> None:
    if kind not in MARGIN_KINDS:
        raise ValueError(f"kind must be one of {MARGIN_KINDS}, got {kind!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    if kind == "arcface" and not 0 <= margin <= math.pi / 2:
        raise ValueError(
            f"arcface margin must lie in [0, pi/2] radians (the target logit is monotonic in the angle "
            f"only there), got {margin}"
        )
    if kind == "cosface" and not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"cosface margin must be a finite number >= 0, got {margin}")


def _check_labels(labels: Tensor, n: int, num_classes: int) -> None:
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must be ({n},) to match the embeddings, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if n and bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got values in [{int(labels.min())}, {int(labels.max())}]"
        )


def margin_logits(cosine: Tensor, labels: Tensor, kind: str, scale: float, margin: float) -> Tensor:
    """Scaled logits with the additive margin applied to each sample's target class.

    Args:
        cosine: ``(N, C)`` cosine similarities in [-1, 1] (fp32 or fp64).
        labels: ``(N,)`` int64 target classes in ``[0, C)`` (not checked here).
        kind: ``"arcface"`` (angular margin ``cos(theta + m)``) or ``"cosface"`` (``cos - m``).
        scale: logit scale ``s``.
        margin: ``m``, in radians for ArcFace.

    Returns:
        ``(N, C)`` logits ``s * cos`` with the target entries replaced by ``s * target(cos_y)``.
    """
    index = labels.view(-1, 1).long()
    target = cosine.gather(1, index)
    if kind == "arcface":
        sin_t = torch.sqrt((1.0 - target * target).clamp_min(_SIN_SQ_FLOOR))
        shifted = target * math.cos(margin) - sin_t * math.sin(margin)  # cos(theta + m)
        # cos_y > cos(pi - m)  <=>  theta + m < pi; past it, the monotonic linear continuation.
        target = torch.where(target > math.cos(math.pi - margin), shifted, target - margin * math.sin(margin))
    elif kind == "cosface":
        target = target - margin
    else:
        raise ValueError(f"kind must be one of {MARGIN_KINDS}, got {kind!r}")
    return cosine.scatter(1, index, target) * scale


def margin_softmax_loss(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    kind: str = "arcface",
    scale: float = 64.0,
    margin: float = 0.5,
) -> Tensor:
    """Mean ArcFace / CosFace cross-entropy of embeddings against class centres.

    Args:
        embeddings: ``(N, D)`` embeddings, any float dtype, not necessarily normalised.
        weight: ``(C, D)`` class centres, not necessarily normalised.
        labels: ``(N,)`` integer classes in ``[0, C)``.
        kind: ``"arcface"`` or ``"cosface"``.
        scale: logit scale ``s`` (> 0).
        margin: ``m`` (radians in [0, pi/2] for ArcFace, >= 0 for CosFace).

    Returns:
        Scalar fp32 loss (fp64 when ``embeddings`` are fp64), computed with autocast disabled. An
        empty batch gives 0, connected to the graph.

    Raises:
        ValueError: on a bad kind, scale or margin, mismatched shapes, or labels outside ``[0, C)``.
    """
    _check_margin(kind, scale, margin)
    if embeddings.dim() != 2 or weight.dim() != 2 or embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embeddings must be (batch, D) and weight (classes, D), got shapes "
            f"{tuple(embeddings.shape)} and {tuple(weight.shape)}"
        )
    _check_labels(labels, embeddings.shape[0], weight.shape[0])
    dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x = F.normalize(embeddings.to(dtype), dim=1)
        w = F.normalize(weight.to(dtype), dim=1)
        cosine = (x @ w.t()).clamp(-1.0, 1.0)
        if embeddings.shape[0] == 0:
            return cosine.sum() * 0
        logits = margin_logits(cosine, labels, kind, scale, margin)
        return F.cross_entropy(logits, labels.long())


class MarginHead(nn.Module):
    """ArcFace or CosFace classification head: its own class centres and the margin cross-entropy.

    Args:
        num_features: embedding dimension ``D``.
        num_classes: number of identities ``C``.
        kind: ``"arcface"`` (additive angular margin) or ``"cosface"`` (additive cosine margin).
        scale: logit scale ``s`` (insightface: 64).
        margin: ``m`` (insightface: 0.5 rad for ArcFace, 0.4 for CosFace).

    ``weight`` is a ``(num_classes, num_features)`` parameter initialised from N(0, 0.01^2).
    Call as ``head(embeddings, labels)``: the scalar mean cross-entropy (fp32, also under autocast).
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        kind: str = "arcface",
        scale: float = 64.0,
        margin: float = 0.5,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        _check_margin(kind, scale, margin)
        self.num_features = num_features
        self.num_classes = num_classes
        self.kind = kind
        self.scale = float(scale)
        self.margin = float(margin)
        self.weight = nn.Parameter(torch.empty(num_classes, num_features))
        nn.init.normal_(self.weight, mean=0.0, std=0.01)

    def extra_repr(self) -> str:
        return (
            f"num_features={self.num_features}, num_classes={self.num_classes}, kind={self.kind!r}, "
            f"scale={self.scale}, margin={self.margin}"
        )

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean margin cross-entropy of ``(N, num_features)`` embeddings with ``(N,)`` labels."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.num_features:
            raise ValueError(
                f"embeddings must be (batch, {self.num_features}), got shape {tuple(embeddings.shape)}"
            )
        return margin_softmax_loss(embeddings, self.weight, labels, self.kind, self.scale, self.margin)
