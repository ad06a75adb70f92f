"""Pair verification on insightface ``.bin`` files (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW, ...).

The protocol is insightface's (``recognition/arcface_torch/eval/verification.py``, ``test`` and
``evaluate``): embed every image and its mirror, sum the two raw embeddings in float64, L2-normalise
(``sklearn.preprocessing.normalize``), then 10-fold accuracy on the squared L2 distance
(:func:`facems.metrics.kfold_accuracy`). XNorm is the mean L2 norm of the raw embeddings of every
view, as insightface logs it. insightface's VAL@FAR (which fails with scipy >= 1.9) is replaced by
TAR at FAR 1e-3 on the pairs' cosine scores, read out both ways (:func:`facems.metrics.tar_at_far`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn

from facems.data.binfile import load_bin
from facems.embed import embed_views
from facems.metrics import kfold_accuracy, tar_at_far

__all__ = ["PairResult", "evaluate_pairs", "verify_bin"]

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class PairResult:
    """Verification result on one pair set.

    Attributes:
        accuracy: mean k-fold accuracy (fraction in [0, 1]; insightface's "Accuracy-Flip").
        std: standard deviation of the per-fold accuracies (ddof 0).
        threshold: mean of the per-fold best thresholds, on the squared L2 distance of normalised
            embeddings (in [0, 4]; insightface's "best_threshold").
        xnorm: mean L2 norm of the raw (un-normalised) embeddings.
        tar_at_far_1e3: TAR (fraction) at FAR 1e-3 on the pairs' cosine scores, keyed by read-out mode:
            ``{"nearest": ..., "conservative": ...}``.
        num_pairs: number of pairs.
        fold_accuracies: accuracy on each test fold.
        fold_thresholds: best threshold of each fold.
    """

    accuracy: float
    std: float
    threshold: float
    xnorm: float
    tar_at_far_1e3: dict[str, float]
    num_pairs: int
    fold_accuracies: tuple[float, ...]
    fold_thresholds: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (tuples become lists)."""
        out = asdict(self)
        out["fold_accuracies"] = list(self.fold_accuracies)
        out["fold_thresholds"] = list(self.fold_thresholds)
        return out


def evaluate_pairs(
    embeddings: np.ndarray, issame: np.ndarray, nfolds: int = 10, xnorm: float | None = None
) -> PairResult:
    """Evaluate raw pair embeddings with insightface's protocol.

    Args:
        embeddings: [2n, D] raw (flip-summed, not normalised) embeddings; pair ``i`` is rows ``2i``
            and ``2i + 1``. Converted to float64 and L2-normalised here.
        issame: [n] bool or 0/1, True for genuine pairs.
        nfolds: folds of the k-fold accuracy.
        xnorm: the XNorm to report; default the mean L2 norm of the rows of ``embeddings``
            (:func:`verify_bin` passes insightface's, the mean over the un-summed views).

    Returns:
        A :class:`PairResult`.

    Raises:
        ValueError: on shapes that do not match or non-finite embeddings.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    flags = np.asarray(issame)
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[0] % 2 != 0:
        raise ValueError(
            f"embeddings: expected [2n, D] with n >= 1 (interleaved pairs), got shape {emb.shape}"
        )
    if flags.shape != (emb.shape[0] // 2,):
        raise ValueError(
            f"issame: expected [{emb.shape[0] // 2}] flags for {emb.shape[0]} embeddings, got shape {flags.shape}"
        )
    if not np.all(np.isfinite(emb)):
        row = int(np.flatnonzero(~np.all(np.isfinite(emb), axis=1))[0])
        raise ValueError(f"embeddings: expected finite values, row {row} is not (the model output NaN/inf?)")
    norm = float(np.mean(np.linalg.norm(emb, axis=1))) if xnorm is None else float(xnorm)
    import sklearn.preprocessing  # imported here: sklearn adds ~2 s to every process start

    normed = sklearn.preprocessing.normalize(emb)
    kfold = kfold_accuracy(normed, flags, nfolds=nfolds)
    labels = flags.astype(bool)
    scores = np.sum(normed[0::2] * normed[1::2], axis=1)
    tar = {
        mode: tar_at_far(labels, scores, fars=(1e-3,), mode=mode)[1e-3]
        for mode in ("nearest", "conservative")
    }
    return PairResult(
        accuracy=kfold.accuracy,
        std=kfold.std,
        threshold=float(np.mean(kfold.fold_thresholds)),
        xnorm=norm,
        tar_at_far_1e3=tar,
        num_pairs=int(flags.shape[0]),
        fold_accuracies=tuple(float(a) for a in kfold.fold_accuracies),
        fold_thresholds=tuple(float(t) for t in kfold.fold_thresholds),
    )


def verify_bin(
    model: nn.Module,
    bin_path_or_loaded: PathLike | tuple[np.ndarray | Tensor, np.ndarray],
    batch_size: int = 256,
    flip: bool = True,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    distributed: bool = True,
    nfolds: int = 10,
) -> PairResult:
    """Embed a ``.bin`` pair set with ``model`` and evaluate it (insightface's ``verification.test``).

    Under an initialised process group with ``distributed`` (the default), every rank must call this;
    the images are sharded across ranks and every rank returns the same result.

    Args:
        model: backbone mapping [-1, 1] float images to raw embeddings (its train/eval mode is kept).
        bin_path_or_loaded: a ``.bin`` path, or ``(images, issame)`` as
            :func:`facems.data.binfile.load_bin` returns it (uint8 [2n, 3, H, W], bool [n]).
        batch_size: images per forward pass.
        flip: flip test (embedding of the image plus that of its mirror).
        device: where to run the model; default the device of its parameters.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast).
        distributed: shard the embedding across ranks (see :func:`facems.embed.embed_images`).
        nfolds: folds of the k-fold accuracy.

    Returns:
        A :class:`PairResult`.
    """
    if isinstance(bin_path_or_loaded, (tuple, list)):
        if len(bin_path_or_loaded) != 2:
            raise ValueError(
                f"bin_path_or_loaded: expected a path or (images, issame), got a sequence of {len(bin_path_or_loaded)}"
            )
        images, issame = bin_path_or_loaded
    else:
        images, issame = load_bin(bin_path_or_loaded)
    views = embed_views(model, images, batch_size, flip, device, precision, distributed)
    views64 = views.astype(np.float64)
    # insightface stores the float32 outputs in float64 arrays, then sums and measures norms there.
    xnorm = float(np.mean(np.linalg.norm(views64, axis=2)))
    embeddings = views64.sum(axis=0)
    return evaluate_pairs(embeddings, np.asarray(issame), nfolds=nfolds, xnorm=xnorm)
