"""Verification metrics: pure numpy functions on labels, scores and embeddings.

Conventions:

* ``labels``: 1-D, bool or 0/1; True (1) marks a genuine pair (same identity).
* ``scores``: 1-D similarity scores, higher means more alike (e.g. cosine similarity in [-1, 1]).
* FPR (false accept rate, FAR) and TPR (true accept rate, TAR) are fractions in [0, 1].
* Pair embeddings for :func:`kfold_accuracy` are interleaved: pair ``i`` is rows ``2i`` and ``2i + 1``.

:func:`roc` reproduces scikit-learn's ``roc_curve`` with its defaults; :func:`tar_at_far` reads TAR
off that curve the way insightface's IJB evaluation does ("nearest") or with the FAR bound respected
("conservative"); :func:`kfold_accuracy` is insightface's ``.bin`` pair-accuracy protocol
(``recognition/arcface_torch/eval/verification.py``, ``calculate_roc``), computed for every threshold
at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import KFold

__all__ = ["DEFAULT_FARS", "KFoldResult", "kfold_accuracy", "roc", "tar_at_far"]

DEFAULT_FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

_TAR_MODES = ("nearest", "conservative")


def _check_labels_scores(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to (bool labels, float scores), both 1-D of equal length."""
    y = np.asarray(labels)
    s = np.asarray(scores)
    if y.ndim != 1 or s.ndim != 1 or y.shape[0] != s.shape[0]:
        raise ValueError(
            f"labels and scores: expected two 1-D arrays of equal length, got shapes {y.shape} and {s.shape}"
        )
    if y.shape[0] == 0:
        raise ValueError("labels and scores: expected at least one pair, got none")
    if y.dtype != np.bool_:
        if y.dtype.kind not in "biuf" or not np.all((y == 0) | (y == 1)):
            raise ValueError(
                f"labels: expected bool or 0/1 values, got dtype {y.dtype} with values "
                f"{np.unique(y)[:5].tolist()}"
            )
        y = y == 1
    if s.dtype.kind not in "biuf":
        raise ValueError(f"scores: expected real numbers, got dtype {s.dtype}")
    if not np.all(np.isfinite(s)):
        bad = int(np.flatnonzero(~np.isfinite(s))[0])
        raise ValueError(f"scores: expected finite values, got {s[bad]} at index {bad}")
    return y, s


def _roc_counts(
    labels: np.ndarray, scores: np.ndarray, drop_intermediate: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (false positives, true positives, thresholds) at each distinct score, descending.

    Counts are int64; element ``k`` counts the pairs with ``score >= thresholds[k]``. A leading
    point (0, 0) at threshold ``+inf`` is included, as in scikit-learn.
    """
    y, s = _check_labels_scores(labels, scores)
    order = np.argsort(s, kind="stable")[::-1]
    s_sorted = s[order]
    y_sorted = y[order]
    # Last position of each run of equal scores: the count there includes the whole tie group.
    ends = np.concatenate([np.flatnonzero(np.diff(s_sorted)), [s_sorted.shape[0] - 1]])
    tps = np.cumsum(y_sorted, dtype=np.int64)[ends]
    fps = ends.astype(np.int64) + 1 - tps
    thresholds = s_sorted[ends].astype(np.float64)
    if drop_intermediate and fps.shape[0] > 2:
        # Keep the end points and every corner; drop points collinear with their two neighbours.
        corner = (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0)
        keep = np.concatenate([[True], corner, [True]])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    zero = np.zeros(1, dtype=np.int64)
    return (
        np.concatenate([zero, fps]),
        np.concatenate([zero, tps]),
        np.concatenate([[np.inf], thresholds]),
    )


def roc(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve, as ``sklearn.metrics.roc_curve(labels, scores)`` with its defaults.

    The operating point ``k`` accepts the pairs with ``score >= thresholds[k]``. Points that lie on a
    straight segment between their neighbours are dropped (scikit-learn's ``drop_intermediate=True``);
    the curve starts at (0, 0) with threshold ``+inf``.

    Args:
        labels: [n] bool or 0/1, True for genuine pairs.
        scores: [n] similarity scores, higher = more alike (any finite real unit, e.g. cosine).

    Returns:
        ``(fpr, tpr, thresholds)``: float64 arrays of equal length; fpr and tpr are fractions in
        [0, 1], non-decreasing; thresholds are in the unit of ``scores``, decreasing.

    Raises:
        ValueError: on mismatched or empty inputs, labels that are not bool/0-1, non-finite scores, or
            labels without both a genuine and an impostor pair (scikit-learn warns and returns NaN).
    """
    fps, tps, thresholds = _roc_counts(labels, scores, drop_intermediate=True)
    fpr, tpr = _rates(fps, tps)
    return fpr, tpr, thresholds


def _rates(fps: np.ndarray, tps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if fps[-1] == 0 or tps[-1] == 0:
        raise ValueError(
            f"labels: the ROC needs genuine and impostor pairs, got {int(tps[-1])} genuine and "
            f"{int(fps[-1])} impostor"
        )
    return fps / fps[-1].astype(np.float64), tps / tps[-1].astype(np.float64)


def tar_at_far(
    labels: np.ndarray,
    scores: np.ndarray,
    fars: Sequence[float] = DEFAULT_FARS,
    mode: str = "nearest",
) -> dict[float, float]:
    """True accept rate at each target false accept rate.

    * ``"nearest"`` (insightface's IJB read-out): on :func:`roc` (scikit-learn defaults), the point whose
      FPR is closest to the target; among equally close points the one with the higher FPR/TPR (the
      later one on the curve), as insightface's ``min`` over the flipped curve picks it. Its FPR may
      exceed the target.
    * ``"conservative"``: the highest TPR among all operating points (every distinct score, nothing
      dropped) whose FPR does not exceed the target, i.e. the lowest threshold the FAR bound allows;
      0.0 when even the strictest finite threshold exceeds it.

    Args:
        labels: [n] bool or 0/1, True for genuine pairs.
        scores: [n] similarity scores, higher = more alike.
        fars: target false accept rates, fractions in (0, 1].
        mode: ``"nearest"`` or ``"conservative"``.

    Returns:
        ``{far: tar}`` for each target in ``fars`` (TAR as a fraction in [0, 1]).

    Raises:
        ValueError: on an unknown mode, a target outside (0, 1], or inputs :func:`roc` refuses.
    """
    if mode not in _TAR_MODES:
        raise ValueError(f"mode: expected one of {_TAR_MODES}, got {mode!r}")
    targets = [float(f) for f in fars]
    for f in targets:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"fars: expected false accept rates in (0, 1], got {f}")
    fps, tps, _ = _roc_counts(labels, scores, drop_intermediate=(mode == "nearest"))
    fpr, tpr = _rates(fps, tps)
    out: dict[float, float] = {}
    for f in targets:
        if mode == "nearest":
            gap = np.abs(fpr - f)
            # argmin on the reversed curve: the last of the equally close points wins.
            k = fpr.shape[0] - 1 - int(np.argmin(gap[::-1]))
        else:
            # fpr is non-decreasing and starts at 0, so k >= 0.
            k = int(np.searchsorted(fpr, f, side="right")) - 1
        out[f] = float(tpr[k])
    return out


@dataclass(frozen=True)
class KFoldResult:
    """Outcome of :func:`kfold_accuracy`.

    Attributes:
        accuracy: mean of the per-fold test accuracies (fraction in [0, 1]).
        std: their standard deviation (``np.std``, ddof 0).
        fold_accuracies: float64 [nfolds], accuracy on each test fold.
        fold_thresholds: float64 [nfolds], the squared-L2-distance threshold chosen on each fold's
            training part (pairs with ``distance < threshold`` are called genuine).
    """

    accuracy: float
    std: float
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray


def _fold_splits(num_pairs: int, nfolds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """insightface's ``LFold``: sklearn ``KFold(nfolds, shuffle=False)``; one fold trains and tests on all."""
    indices = np.arange(num_pairs)
    if nfolds == 1:
        return [(indices, indices)]
    return list(KFold(n_splits=nfolds, shuffle=False).split(indices))


def _correct_counts(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of correct decisions (``dist < t`` for genuine, ``not dist < t`` for impostor) per threshold."""
    # float64 holds every float32 distance exactly, and np.less(float32, float64) compares in float64.
    d = dist.astype(np.float64)
    same = np.sort(d[issame])
    diff = np.sort(d[~issame])
    # searchsorted(side="left") counts the elements strictly below t (NaN sorts last, never below).
    tp = np.searchsorted(same, thresholds, side="left")
    fp = np.searchsorted(diff, thresholds, side="left")
    return tp + (diff.shape[0] - fp)


def kfold_accuracy(
    embeddings: np.ndarray,
    issame: np.ndarray,
    nfolds: int = 10,
    thresholds: np.ndarray | None = None,
) -> KFoldResult:
    """insightface's k-fold pair accuracy (``verification.evaluate`` / ``calculate_roc``, no PCA).

    Protocol: squared L2 distance of each pair; a pair is called genuine when ``distance < t``; the
    pairs are split into ``nfolds`` contiguous folds (sklearn ``KFold(nfolds, shuffle=False)``; with
    ``nfolds == 1`` all pairs both train and test, as insightface's ``LFold``); on each fold, ``t`` is
    the first threshold (``np.argmax``) with the highest accuracy on the other folds, and the fold's
    accuracy is measured with it. The distance is computed in the dtype of ``embeddings``, exactly as
    insightface does, so equal inputs give equal results to the last digit.

    Args:
        embeddings: [2n, D] float, already flip-summed and L2-normalised by the caller; pair ``i`` is
            rows ``2i`` and ``2i + 1``.
        issame: [n] bool or 0/1, True for genuine pairs.
        nfolds: number of folds (1 <= nfolds <= n).
        thresholds: candidate thresholds on the squared distance; default ``np.arange(0, 4, 0.01)``.

    Returns:
        A :class:`KFoldResult` (accuracies as fractions in [0, 1]).

    Raises:
        ValueError: on shapes that do not match, fewer pairs than folds, or empty thresholds.
    """
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[0] % 2 != 0:
        raise ValueError(
            f"embeddings: expected [2n, D] with n >= 1 (interleaved pairs), got shape {emb.shape}"
        )
    if emb.dtype.kind not in "f":
        emb = emb.astype(np.float64)
    flags = np.asarray(issame)
    num_pairs = emb.shape[0] // 2
    if flags.ndim != 1 or flags.shape[0] != num_pairs:
        raise ValueError(
            f"issame: expected [{num_pairs}] flags for {emb.shape[0]} embeddings, got shape {flags.shape}"
        )
    if flags.dtype != np.bool_:
        if flags.dtype.kind not in "biu" or not np.all((flags == 0) | (flags == 1)):
            raise ValueError(f"issame: expected bool or 0/1 values, got dtype {flags.dtype}")
        flags = flags.astype(np.bool_)
    if isinstance(nfolds, bool) or not isinstance(nfolds, (int, np.integer)) or not 1 <= nfolds <= num_pairs:
        raise ValueError(f"nfolds: expected an int in [1, {num_pairs}] (number of pairs), got {nfolds!r}")
    thr = np.arange(0, 4, 0.01) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    if thr.ndim != 1 or thr.shape[0] == 0:
        raise ValueError(f"thresholds: expected a non-empty 1-D array, got shape {thr.shape}")

    # The same expression as insightface, so the distances are bitwise equal.
    dist = np.sum(np.square(np.subtract(emb[0::2], emb[1::2])), 1)

    splits = _fold_splits(num_pairs, int(nfolds))
    fold_acc = np.zeros(len(splits))
    fold_thr = np.zeros(len(splits))
    if nfolds == 1:
        train_correct = [_correct_counts(dist, flags, thr)]
    else:
        # The test folds partition the pairs: training counts = all counts - test-fold counts.
        test_correct = [_correct_counts(dist[te], flags[te], thr) for _, te in splits]
        total = np.sum(test_correct, axis=0)
        train_correct = [total - c for c in test_correct]
    for k, (train, test) in enumerate(splits):
        # float(correct) / size, as insightface computes it, so ties in accuracy are ties here too.
        acc_train = train_correct[k] / float(train.shape[0])
        best = int(np.argmax(acc_train))
        fold_thr[k] = thr[best]
        d, s = dist[test], flags[test]
        predict = np.less(d, thr[best])
        fold_acc[k] = float(np.count_nonzero(predict == s)) / d.size
    return KFoldResult(
        accuracy=float(np.mean(fold_acc)),
        std=float(np.std(fold_acc)),
        fold_accuracies=fold_acc,
        fold_thresholds=fold_thr,
    )
