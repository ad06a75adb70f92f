"""Verification, identification and retrieval metrics: pure numpy functions on labels, scores and embeddings.

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

1:N identification on a ``(n_probe, n_gallery)`` similarity matrix: :func:`cmc` (closed set, mated
probes only, pessimistic ties) and :func:`tpir_at_fpir` (open set, insightface's ``evaluation_1N``
threshold convention).

Retrieval on embeddings: :func:`retrieval_metrics` (and :func:`recall_at_k`, :func:`map_at_r`,
:func:`r_precision`) with pytorch-metric-learning's ``AccuracyCalculator`` definitions, on exact cosine
nearest neighbours (:func:`nearest_neighbors`) computed one chunk of queries at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_FARS",
    "DEFAULT_FPIRS",
    "DEFAULT_RANKS",
    "DEFAULT_RECALL_KS",
    "KFoldResult",
    "cmc",
    "kfold_accuracy",
    "map_at_r",
    "nearest_neighbors",
    "r_precision",
    "recall_at_k",
    "retrieval_metrics",
    "roc",
    "tar_at_far",
    "tpir_at_fpir",
]

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
    from sklearn.model_selection import KFold  # imported here: sklearn adds ~2 s to every process start

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


# ----------------------------------------------------------------------------------------------------
# Closed- and open-set identification (1:N): CMC and TPIR@FPIR
# ----------------------------------------------------------------------------------------------------

DEFAULT_RANKS: tuple[int, ...] = (1, 5, 10)
DEFAULT_FPIRS: tuple[float, ...] = (1e-2, 1e-1)

# Cells of a (probe chunk x gallery) block handled at once: bounds the temporary masks to ~64 MB.
_BLOCK_CELLS = 1 << 23


def _check_identification(
    scores: np.ndarray, probe_labels: np.ndarray, gallery_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate a (probe x gallery) score matrix and its labels; return them as arrays."""
    s = np.asarray(scores)
    p = np.asarray(probe_labels)
    g = np.asarray(gallery_labels)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"scores: expected a non-empty (n_probe, n_gallery) matrix, got shape {s.shape}")
    if p.ndim != 1 or p.shape[0] != s.shape[0]:
        raise ValueError(
            f"probe_labels: expected shape ({s.shape[0]},) to match scores {s.shape}, got {p.shape}"
        )
    if g.ndim != 1 or g.shape[0] != s.shape[1]:
        raise ValueError(
            f"gallery_labels: expected shape ({s.shape[1]},) to match scores {s.shape}, got {g.shape}"
        )
    if s.dtype.kind not in "biuf":
        raise ValueError(f"scores: expected real numbers, got dtype {s.dtype}")
    if s.dtype.kind != "f":
        s = s.astype(np.float64)
    if not np.all(np.isfinite(s)):
        bad = np.argwhere(~np.isfinite(s))[0]
        raise ValueError(
            f"scores: expected finite values, got {s[tuple(bad)]} at (probe, gallery) {tuple(bad)}"
        )
    return s, p, g


def _identification_stats(
    scores: np.ndarray, probe_labels: np.ndarray, gallery_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-probe quantities shared by :func:`cmc` and :func:`tpir_at_fpir`.

    Returns:
        ``(mated, mated_score, rank, top_score)``, each ``[n_probe]``: whether the probe's label occurs in
        the gallery; its best score against a gallery entry of its own label (``-inf`` if none); its
        pessimistic rank ``1 + #{gallery entries of another label scoring >= mated_score}`` (meaningful
        for mated probes only); its highest score over the whole gallery.
    """
    s, p, g = _check_identification(scores, probe_labels, gallery_labels)
    n_probe, n_gallery = s.shape
    mated = np.isin(p, g)
    mated_score = np.full(n_probe, -np.inf)
    rank = np.zeros(n_probe, dtype=np.int64)
    top_score = np.empty(n_probe)
    step = max(1, _BLOCK_CELLS // n_gallery)
    for a in range(0, n_probe, step):
        block = s[a : a + step]
        same = p[a : a + step, None] == g[None, :]
        best = np.where(same, block, -np.inf).max(axis=1)
        # A tie between the best mated entry and another label's entry counts against the probe.
        beaten = np.count_nonzero((block >= best[:, None]) & ~same, axis=1)
        mated_score[a : a + step] = best
        rank[a : a + step] = 1 + beaten
        top_score[a : a + step] = block.max(axis=1)
    return mated, mated_score, rank, top_score


def _check_positive_ints(name: str, values: Sequence[int]) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name}: expected positive integers, got {v!r}")
        out.append(int(v))
    if not out:
        raise ValueError(f"{name}: expected at least one value, got none")
    return out


def cmc(
    scores: np.ndarray,
    probe_labels: np.ndarray,
    gallery_labels: np.ndarray,
    ranks: Sequence[int] = DEFAULT_RANKS,
) -> dict[int, float]:
    """Closed-set cumulative match characteristic (identification rate at rank r).

    Only the mated probes (whose label occurs in ``gallery_labels``) count. A probe's rank is that of
    its first correct gallery entry, i.e. of its best-scoring entry of its own label; ties are
    **pessimistic**: every entry of another label that scores at least as high as that entry ranks
    before it, so ``rank = 1 + #{other-label entries with score >= best mated score}``. (insightface's
    ``evaluation_1N`` breaks ties by ``argsort`` order instead; the two agree whenever the scores are
    distinct, as they are for real embeddings.) Several gallery entries may share a label.

    Args:
        scores: float ``(n_probe, n_gallery)`` similarities, higher = more alike (e.g. cosine).
        probe_labels: ``[n_probe]`` integer identity labels.
        gallery_labels: ``[n_gallery]`` integer identity labels.
        ranks: the ranks r >= 1 to report.

    Returns:
        ``{r: fraction of mated probes whose rank is <= r}`` (fractions in [0, 1]).

    Raises:
        ValueError: on mismatched shapes, non-finite scores, ranks that are not positive integers, or
            when no probe is mated.
    """
    rs = _check_positive_ints("ranks", ranks)
    mated, _, rank, _ = _identification_stats(scores, probe_labels, gallery_labels)
    if not mated.any():
        raise ValueError(
            f"probe_labels: none of the {mated.shape[0]} probes has its label in gallery_labels; "
            "the CMC needs at least one mated probe"
        )
    r = rank[mated]
    return {k: float(np.count_nonzero(r <= k)) / r.shape[0] for k in rs}


def tpir_at_fpir(
    scores: np.ndarray,
    probe_labels: np.ndarray,
    gallery_labels: np.ndarray,
    fpirs: Sequence[float] = DEFAULT_FPIRS,
    rank: int = 1,
) -> dict[float, float]:
    """Open-set identification: true positive identification rate at each false positive identification rate.

    A probe is mated when its label occurs in ``gallery_labels``, non-mated otherwise. The convention is
    insightface's IJB 1:N evaluation (``recognition/_evaluation_/ijb/ijb_evals.py``, ``evaluation_1N``),
    reproduced exactly so that the numbers are comparable with its tables:

    * each non-mated probe contributes its highest gallery score; with these ``n`` scores sorted in
      decreasing order, the threshold for a target ``f`` is the element at position
      ``max(int(n * f) - 1, 0)`` (0-based), i.e. the ``floor(n f)``-th highest;
    * a mated probe is a true positive when its correct gallery entry is within ``rank`` (pessimistic
      ties, as in :func:`cmc`; for ``rank=1`` this is insightface's ``pos_sim > max(neg_sims)``) **and**
      its score is strictly greater than the threshold (insightface's ``pos_sims > thresh``);
    * TPIR = true positives / number of mated probes.

    insightface assumes one gallery entry per identity (IJB's galleries have one template each); when
    several entries share the probe's label, the best-scoring one is the probe's mated score.

    Because of the strict comparison, at most ``max(floor(n f) - 1, 0)`` non-mated probes score above
    the threshold, so the realised FPIR never exceeds ``f`` (a ``>=`` rule would admit ``floor(n f)``);
    a target below ``1 / n`` uses the highest non-mated score, at which no non-mated probe is
    accepted.

    Args:
        scores: float ``(n_probe, n_gallery)`` similarities, higher = more alike (e.g. cosine).
        probe_labels: ``[n_probe]`` integer identity labels.
        gallery_labels: ``[n_gallery]`` integer identity labels.
        fpirs: target false positive identification rates, fractions in (0, 1].
        rank: the rank within which the correct entry must be found (>= 1; 1 is the usual TPIR).

    Returns:
        ``{fpir: tpir}`` for each target (TPIR as a fraction in [0, 1]).

    Raises:
        ValueError: on mismatched shapes, non-finite scores, a target outside (0, 1], ``rank < 1``, or
            when there is no mated or no non-mated probe.
    """
    (rank_,) = _check_positive_ints("rank", [rank])
    targets = [float(f) for f in fpirs]
    for f in targets:
        if not 0.0 < f <= 1.0:
            raise ValueError(f"fpirs: expected false positive identification rates in (0, 1], got {f}")
    mated, mated_score, probe_rank, top_score = _identification_stats(scores, probe_labels, gallery_labels)
    n_mated = int(np.count_nonzero(mated))
    n_non = mated.shape[0] - n_mated
    if n_mated == 0 or n_non == 0:
        raise ValueError(
            f"probe_labels: open-set identification needs mated and non-mated probes, got {n_mated} mated "
            f"and {n_non} non-mated (label absent from gallery_labels)"
        )
    non_top = np.sort(top_score[~mated])[::-1]
    found = mated_score[mated][probe_rank[mated] <= rank_]
    out: dict[float, float] = {}
    for f in targets:
        threshold = non_top[max(int(n_non * f) - 1, 0)]
        out[f] = float(np.count_nonzero(found > threshold)) / n_mated
    return out


# ----------------------------------------------------------------------------------------------------
# Retrieval: Recall@K, MAP@R, R-precision on exact cosine nearest neighbours
# ----------------------------------------------------------------------------------------------------

DEFAULT_RECALL_KS: tuple[int, ...] = (1, 2, 4, 8)

# Cells of a (query chunk x reference) similarity block: 2^22 float32 = 16 MB (+ 32 MB of partition indices).
_KNN_BLOCK_CELLS = 1 << 22


def _normalized_embeddings(name: str, emb: np.ndarray) -> np.ndarray:
    """float32 copy of a (n, d) embedding array with every row scaled to unit L2 norm."""
    x = np.asarray(emb)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty (n, dim) array, got shape {x.shape}")
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected real numbers, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"{name}: expected finite values, got {x[tuple(bad)]} at (row, column) {tuple(bad)}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # As torch.nn.functional.normalize: a zero row stays zero (cosine 0 with everything).
    return x / np.maximum(norms, np.float32(1e-12))


def _check_same_set(query: np.ndarray, ref: np.ndarray, same_set: bool) -> None:
    if same_set and (ref.shape[0] < query.shape[0] or not np.array_equal(query, ref[: query.shape[0]])):
        raise ValueError(
            f"same_set: the first {query.shape[0]} reference rows must be the query rows (query i is "
            f"reference i, excluded from its own neighbours); got query {query.shape} and reference "
            f"{ref.shape} that differ"
        )


def _iter_knn(
    query: np.ndarray, ref: np.ndarray, k: int, same_set: bool, chunk_size: int | None
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(start, indices, similarities)`` for consecutive chunks of queries (normalised float32 inputs).

    Exact top-``k`` by cosine similarity, ties broken by the lower reference index; with ``same_set``
    query ``i`` never returns reference ``i``.
    """
    n_q, n_ref = query.shape[0], ref.shape[0]
    step = chunk_size if chunk_size is not None else max(1, _KNN_BLOCK_CELLS // n_ref)
    for a in range(0, n_q, step):
        b = min(a + step, n_q)
        sim = query[a:b] @ ref.T
        if same_set:
            sim[np.arange(b - a), np.arange(a, b)] = -np.inf  # by index: a duplicate image still counts
        if k < n_ref:
            top = np.argpartition(sim, n_ref - k, axis=1)[:, n_ref - k :]  # the k largest, unordered
        else:
            top = np.broadcast_to(np.arange(n_ref), sim.shape).copy()
        vals = np.take_along_axis(sim, top, axis=1)
        if k < n_ref:
            # argpartition picks arbitrary members of a tie group that straddles the k-th place; redo those
            # rows so that the lowest indices of the group are the ones kept.
            kth = vals.min(axis=1)
            straddle = np.flatnonzero(np.count_nonzero(sim >= kth[:, None], axis=1) > k)
            for r in straddle:
                above = np.flatnonzero(sim[r] > kth[r])
                tied = np.flatnonzero(sim[r] == kth[r])[: k - above.shape[0]]
                top[r] = np.concatenate([above, tied])
                vals[r] = sim[r, top[r]]
        order = np.lexsort((top, -vals), axis=1)  # similarity descending, then index ascending
        yield a, np.take_along_axis(top, order, axis=1), np.take_along_axis(vals, order, axis=1)


def _resolve_reference(
    query_emb: np.ndarray,
    ref_emb: np.ndarray | None,
    same_set: bool,
) -> tuple[np.ndarray, np.ndarray, bool]:
    query = _normalized_embeddings("query_emb", query_emb)
    if ref_emb is None:
        return query, query, True
    ref = _normalized_embeddings("ref_emb", ref_emb)
    if ref.shape[1] != query.shape[1]:
        raise ValueError(
            f"ref_emb: expected embeddings of dimension {query.shape[1]} like query_emb, got {ref.shape[1]}"
        )
    _check_same_set(query, ref, same_set)
    return query, ref, same_set


def nearest_neighbors(
    query_emb: np.ndarray,
    ref_emb: np.ndarray | None,
    k: int,
    same_set: bool = False,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest references of every query by cosine similarity, computed in chunks of queries.

    Both sets are L2-normalised (float32) and compared by dot product, one chunk of queries against all
    references at a time, so memory is O(chunk x n_ref), never O(n_query x n_ref). Neighbours are sorted
    by decreasing similarity; equal similarities are ordered by increasing reference index (also at the
    k-th place: of a tie group that does not fit, the lowest indices are kept), so the result is
    deterministic.

    Args:
        query_emb: ``(n_query, d)`` embeddings (any scale; normalised here).
        ref_emb: ``(n_ref, d)`` embeddings, or ``None`` for the query set itself (implies ``same_set``).
        k: neighbours per query; clamped to the number of references available.
        same_set: query ``i`` is reference ``i`` (the first ``n_query`` reference rows are the queries,
            as pytorch-metric-learning's ``ref_includes_query``); it is excluded by index.
        chunk_size: queries per block; default so that a block holds about 4M similarities.

    Returns:
        ``(indices, similarities)``: int64 and float32 arrays of shape ``(n_query, k')`` with
        ``k' = min(k, n_ref - same_set)``.

    Raises:
        ValueError: on bad shapes or values, ``k < 1``, or no reference left to return.
    """
    (k_,) = _check_positive_ints("k", [k])
    query, ref, same = _resolve_reference(query_emb, ref_emb, same_set)
    if chunk_size is not None:
        (chunk_size,) = _check_positive_ints("chunk_size", [chunk_size])
    available = ref.shape[0] - int(same)
    if available < 1:
        raise ValueError("ref_emb: no reference left once each query's own row is excluded")
    k_eff = min(k_, available)
    idx = np.empty((query.shape[0], k_eff), dtype=np.int64)
    sims = np.empty((query.shape[0], k_eff), dtype=np.float32)
    for a, top, vals in _iter_knn(query, ref, k_eff, same, chunk_size):
        idx[a : a + top.shape[0]] = top
        sims[a : a + top.shape[0]] = vals
    return idx, sims


def retrieval_metrics(
    query_emb: np.ndarray,
    ref_emb: np.ndarray | None,
    query_labels: np.ndarray,
    ref_labels: np.ndarray | None,
    ks: Sequence[int] = DEFAULT_RECALL_KS,
    same_set: bool = False,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Recall@K, MAP@R and R-precision from one exact nearest-neighbour search.

    Definitions are pytorch-metric-learning's ``AccuracyCalculator`` (``precision_at_1``,
    ``mean_average_precision_at_r``, ``r_precision``; no average of per-class averages):

    * a reference is *relevant* to a query when their labels are equal; ``R`` is the number of relevant
      references, less the query itself with ``same_set``;
    * queries with ``R = 0`` (their label has no other reference) are left out of every metric, as
      pytorch-metric-learning leaves out its "lone" queries;
    * Recall@K: fraction of queries with at least one relevant reference among their K nearest (the
      usual deep-metric-learning Recall@K; Recall@1 equals ``precision_at_1``); K beyond the number of
      references counts every reference;
    * R-precision: relevant references among the R nearest, divided by R;
    * MAP@R: ``1/R * sum_{i <= R} P(i) rel(i)`` with ``P(i)`` the precision of the i nearest and
      ``rel(i)`` 1 when the i-th nearest is relevant.

    Neighbours come from :func:`nearest_neighbors` (cosine on L2-normalised float32 embeddings, chunked
    over the queries, ties ordered by reference index).

    Args:
        query_emb: ``(n_query, d)`` embeddings.
        ref_emb: ``(n_ref, d)`` embeddings, or ``None`` for the query set itself (implies ``same_set``).
        query_labels: ``[n_query]`` class labels.
        ref_labels: ``[n_ref]`` class labels (``None`` with ``ref_emb=None``).
        ks: the K of Recall@K (positive integers).
        same_set: query ``i`` is reference ``i`` (pytorch-metric-learning's ``ref_includes_query``); it
            is never its own neighbour and does not count in its own R.
        chunk_size: queries per block of the neighbour search (default: about 4M similarities).

    Returns:
        ``{"recall@K": ..., "map@r": ..., "r_precision": ...}``, fractions in [0, 1].

    Raises:
        ValueError: on mismatched shapes, bad values, or when no query has a relevant reference.
    """
    k_list = _check_positive_ints("ks", ks)
    query, ref, same = _resolve_reference(query_emb, ref_emb, same_set)
    q_lab = np.asarray(query_labels)
    r_lab = q_lab if ref_emb is None and ref_labels is None else np.asarray(ref_labels)
    if q_lab.ndim != 1 or q_lab.shape[0] != query.shape[0]:
        raise ValueError(
            f"query_labels: expected shape ({query.shape[0]},) like query_emb, got {q_lab.shape}"
        )
    if r_lab.ndim != 1 or r_lab.shape[0] != ref.shape[0]:
        raise ValueError(f"ref_labels: expected shape ({ref.shape[0]},) like ref_emb, got {r_lab.shape}")
    if same and not np.array_equal(q_lab, r_lab[: q_lab.shape[0]]):
        raise ValueError("same_set: the first n_query reference labels must equal query_labels")
    if chunk_size is not None:
        (chunk_size,) = _check_positive_ints("chunk_size", [chunk_size])

    _, codes = np.unique(np.concatenate([q_lab, r_lab]), return_inverse=True)
    q_code, r_code = codes[: q_lab.shape[0]], codes[q_lab.shape[0] :]
    r_count = np.bincount(r_code, minlength=int(codes.max()) + 1)
    relevant_total = r_count[q_code] - int(same)
    scored = relevant_total > 0
    if not scored.any():
        raise ValueError(
            f"query_labels: none of the {q_lab.shape[0]} queries has a relevant reference (same label, "
            "not itself); the retrieval metrics are undefined"
        )
    available = ref.shape[0] - int(same)
    k_eff = min(max(max(k_list), int(relevant_total.max())), available)

    hit_rank = np.full(q_lab.shape[0], np.iinfo(np.int64).max)  # 0-based rank of the first relevant
    ap = np.zeros(q_lab.shape[0])
    rp = np.zeros(q_lab.shape[0])
    positions = np.arange(1, k_eff + 1)
    for a, top, _ in _iter_knn(query, ref, k_eff, same, chunk_size):
        b = a + top.shape[0]
        rel = r_code[top] == q_code[a:b, None]
        in_r = positions[None, :] <= relevant_total[a:b, None]
        first = np.argmax(rel, axis=1)
        hit_rank[a:b] = np.where(rel.any(axis=1), first, hit_rank[a:b])
        rel_r = rel & in_r
        precision = np.cumsum(rel_r, axis=1) / positions
        denom = np.maximum(relevant_total[a:b], 1)
        ap[a:b] = np.sum(precision * rel_r, axis=1) / denom
        rp[a:b] = np.count_nonzero(rel_r, axis=1) / denom

    n = int(np.count_nonzero(scored))
    out = {f"recall@{k}": float(np.count_nonzero(hit_rank[scored] < k)) / n for k in k_list}
    out["map@r"] = float(np.mean(ap[scored]))
    out["r_precision"] = float(np.mean(rp[scored]))
    return out


def recall_at_k(
    query_emb: np.ndarray,
    ref_emb: np.ndarray | None,
    query_labels: np.ndarray,
    ref_labels: np.ndarray | None,
    ks: Sequence[int] = DEFAULT_RECALL_KS,
    same_set: bool = False,
    chunk_size: int | None = None,
) -> dict[int, float]:
    """Recall@K: fraction of queries with a relevant reference among their K nearest.

    Arguments and conventions as :func:`retrieval_metrics`.

    Returns:
        ``{K: recall}`` (fractions in [0, 1]).
    """
    m = retrieval_metrics(query_emb, ref_emb, query_labels, ref_labels, ks, same_set, chunk_size)
    return {int(k): m[f"recall@{int(k)}"] for k in ks}


def map_at_r(
    query_emb: np.ndarray,
    ref_emb: np.ndarray | None,
    query_labels: np.ndarray,
    ref_labels: np.ndarray | None,
    same_set: bool = False,
    chunk_size: int | None = None,
) -> float:
    """MAP@R (pytorch-metric-learning's ``mean_average_precision_at_r``); see :func:`retrieval_metrics`."""
    return retrieval_metrics(query_emb, ref_emb, query_labels, ref_labels, (1,), same_set, chunk_size)[
        "map@r"
    ]


def r_precision(
    query_emb: np.ndarray,
    ref_emb: np.ndarray | None,
    query_labels: np.ndarray,
    ref_labels: np.ndarray | None,
    same_set: bool = False,
    chunk_size: int | None = None,
) -> float:
    """R-precision (pytorch-metric-learning's ``r_precision``); see :func:`retrieval_metrics`."""
    m = retrieval_metrics(query_emb, ref_emb, query_labels, ref_labels, (1,), same_set, chunk_size)
    return m["r_precision"]
