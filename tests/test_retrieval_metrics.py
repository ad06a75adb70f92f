"""facems.metrics identification and retrieval metrics: cmc and tpir_at_fpir by hand and against plain-loop
re-statements (insightface's evaluation_1N written out per probe); recall_at_k, map_at_r and r_precision by
hand, against pytorch-metric-learning's AccuracyCalculator and against a brute-force full sort."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from facems.metrics import (
    cmc,
    map_at_r,
    nearest_neighbors,
    r_precision,
    recall_at_k,
    retrieval_metrics,
    tpir_at_fpir,
)

# ----------------------------------------------------------------------------------------------------
# cmc / tpir_at_fpir
# ----------------------------------------------------------------------------------------------------


def _cmc_loop(
    scores: np.ndarray, probe: np.ndarray, gallery: np.ndarray, ranks: list[int]
) -> dict[int, float]:
    """Per probe: order the gallery by score, other labels before own label on ties; first own-label position."""
    positions = []
    for i in range(scores.shape[0]):
        if probe[i] not in set(gallery.tolist()):
            continue
        entries = [(-float(scores[i, j]), int(gallery[j] == probe[i]), j) for j in range(scores.shape[1])]
        entries.sort()  # descending score; on equal score the other-label entry (0) comes first
        positions.append(next(pos for pos, e in enumerate(entries, start=1) if e[1] == 1))
    return {r: sum(p <= r for p in positions) / len(positions) for r in ranks}


def _tpir_loop(
    scores: np.ndarray, probe: np.ndarray, gallery: np.ndarray, fpirs: list[float], rank: int
) -> dict[float, float]:
    """insightface's evaluation_1N, one probe at a time, generalised to several entries per label and rank r."""
    pos_ok, non_tops = [], []
    for i in range(scores.shape[0]):
        own = [float(scores[i, j]) for j in range(scores.shape[1]) if gallery[j] == probe[i]]
        others = [float(scores[i, j]) for j in range(scores.shape[1]) if gallery[j] != probe[i]]
        if not own:
            non_tops.append(max(others))
            continue
        pos = max(own)
        n_not_below = len([o for o in others if o >= pos])
        pos_ok.append((pos, n_not_below < rank))
    non_sorted = sorted(non_tops, reverse=True)
    out = {}
    for far in fpirs:
        thresh = non_sorted[max(int(len(non_sorted) * far) - 1, 0)]
        out[far] = sum(1 for pos, ok in pos_ok if ok and pos > thresh) / len(pos_ok)
    return out


def test_cmc_by_hand() -> None:
    gallery = np.array([10, 20, 30])
    scores = np.array(
        [
            [0.9, 0.1, 0.2],  # label 10: rank 1
            [0.8, 0.5, 0.6],  # label 20: rank 3
            [0.1, 0.7, 0.7],  # label 30: tie with label 20 at the top -> pessimistic rank 2
            [0.9, 0.9, 0.9],  # label 99: not mated, ignored
        ]
    )
    probe = np.array([10, 20, 30, 99])
    assert cmc(scores, probe, gallery, ranks=(1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}


def test_cmc_several_entries_per_label() -> None:
    # The first correct entry counts: label 7 has entries at scores 0.2 and 0.6, one other label above.
    scores = np.array([[0.2, 0.9, 0.6, 0.1]])
    assert cmc(scores, np.array([7]), np.array([7, 8, 7, 9]), ranks=(1, 2)) == {1: 0.0, 2: 1.0}


@pytest.mark.parametrize("seed", range(6))
def test_cmc_matches_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_probe, n_gallery = int(rng.integers(5, 60)), int(rng.integers(3, 40))
    gallery = rng.integers(0, n_gallery, n_gallery)  # duplicates allowed
    probe = rng.integers(0, n_gallery + 5, n_probe)
    probe[0] = gallery[0]
    # coarse scores: many ties
    scores = (
        rng.integers(0, 5, (n_probe, n_gallery)).astype(np.float32) / 4
        if seed % 2
        else rng.normal(size=(n_probe, n_gallery))
    )
    ranks = [1, 2, 5, 10]
    got = cmc(scores, probe, gallery, ranks)
    want = _cmc_loop(scores, probe, gallery, ranks)
    assert got.keys() == want.keys()
    for r in ranks:
        assert got[r] == pytest.approx(want[r], abs=1e-15)


def test_tpir_by_hand() -> None:
    # Gallery labels 1, 2. Non-mated probes' top scores: 0.9, 0.7, 0.5, 0.3 (n = 4).
    gallery = np.array([1, 2])
    scores = np.array(
        [
            [0.95, 0.1],  # mated 1, score 0.95, rank 1
            [0.8, 0.2],  # mated 1, score 0.8, rank 1
            [0.6, 0.4],  # mated 1, score 0.6, rank 1
            [0.9, 0.85],  # mated 2, score 0.85, rank 2
            [0.9, 0.0],  # non-mated
            [0.7, 0.1],
            [0.2, 0.5],
            [0.3, 0.3],
        ]
    )
    probe = np.array([1, 1, 1, 2, 5, 6, 7, 8])
    # fpir 0.25: int(4 * .25) - 1 = 0 -> threshold 0.9 -> only 0.95 passes: 1/4
    # fpir 0.5:  index 1 -> threshold 0.7 -> 0.95, 0.8: 2/4
    # fpir 1.0:  index 3 -> threshold 0.3 -> 0.95, 0.8, 0.6: 3/4 (0.85 is at rank 2)
    # fpir 0.01: index max(-1, 0) = 0 -> threshold 0.9: 1/4
    got = tpir_at_fpir(scores, probe, gallery, fpirs=(0.25, 0.5, 1.0, 0.01))
    assert got == {0.25: 0.25, 0.5: 0.5, 1.0: 0.75, 0.01: 0.25}
    assert tpir_at_fpir(scores, probe, gallery, fpirs=(1.0,), rank=2) == {1.0: 1.0}


def test_tpir_threshold_is_strict() -> None:
    # A mated score equal to the threshold is not accepted (insightface: pos_sims > thresh).
    scores = np.array([[0.5], [0.5]])
    assert tpir_at_fpir(scores, np.array([1, 2]), np.array([1]), fpirs=(1.0,)) == {1.0: 0.0}


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rank", [1, 3])
def test_tpir_matches_loop(seed: int, rank: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n_probe, n_gallery = int(rng.integers(20, 200)), int(rng.integers(3, 30))
    gallery = rng.permutation(n_gallery) if seed < 3 else rng.integers(0, n_gallery, n_gallery)
    probe = rng.integers(0, 2 * n_gallery, n_probe)
    probe[0], probe[1] = gallery[0], 10 * n_gallery  # at least one mated, one non-mated
    if seed % 2:
        scores = np.round(rng.normal(size=(n_probe, n_gallery)), 1)  # ties
    else:
        scores = rng.normal(size=(n_probe, n_gallery)).astype(np.float32)
    fpirs = [1e-3, 1e-2, 0.05, 0.1, 0.3, 1.0]
    got = tpir_at_fpir(scores, probe, gallery, fpirs, rank=rank)
    want = _tpir_loop(scores, probe, gallery, fpirs, rank)
    for f in fpirs:
        assert got[f] == pytest.approx(want[f], abs=1e-15)


def test_tpir_realised_fpir_does_not_exceed_target() -> None:
    rng = np.random.default_rng(3)
    gallery = np.arange(20)
    probe = rng.integers(0, 60, 500)
    scores = rng.normal(size=(500, 20))
    non = ~np.isin(probe, gallery)
    tops = scores[non].max(axis=1)
    n = tops.shape[0]
    for f in (0.01, 0.05, 0.1, 0.5):
        threshold = np.sort(tops)[::-1][max(math.floor(n * f) - 1, 0)]
        assert np.count_nonzero(tops > threshold) / n <= f


def test_cmc_over_several_blocks() -> None:
    # More probe rows than one block holds: rank 1 = own score above every other label's score.
    rng = np.random.default_rng(4)
    big = rng.normal(size=(70_000, 130)).astype(np.float32)
    labels = rng.integers(0, 260, 70_000)
    got = cmc(big, labels, np.arange(130), ranks=(1,))
    mated = labels < 130
    own = big[mated, labels[mated]]
    others = big[mated].copy()
    others[np.arange(others.shape[0]), labels[mated]] = -np.inf
    assert got[1] == pytest.approx(np.mean(own > others.max(axis=1)), abs=1e-15)


@pytest.mark.parametrize(
    ("scores", "probe", "gallery", "match"),
    [
        (np.zeros((2, 3)), np.array([1, 2, 3]), np.array([1, 2, 3]), "probe_labels"),
        (np.zeros((2, 3)), np.array([1, 2]), np.array([1, 2]), "gallery_labels"),
        (np.zeros(3), np.array([1, 2, 3]), np.array([1, 2, 3]), "scores"),
        (np.array([[np.nan, 0.0]]), np.array([1]), np.array([1, 2]), "finite"),
    ],
)
def test_identification_rejects_bad_shapes(scores, probe, gallery, match) -> None:
    with pytest.raises(ValueError, match=match):
        cmc(scores, probe, gallery)
    with pytest.raises(ValueError, match=match):
        tpir_at_fpir(scores, probe, gallery)


def test_identification_needs_mated_and_non_mated() -> None:
    scores = np.zeros((2, 2))
    with pytest.raises(ValueError, match="mated"):
        cmc(scores, np.array([5, 6]), np.array([1, 2]))
    with pytest.raises(ValueError, match="0 non-mated"):
        tpir_at_fpir(scores, np.array([1, 2]), np.array([1, 2]))
    with pytest.raises(ValueError, match="0 mated"):
        tpir_at_fpir(scores, np.array([5, 6]), np.array([1, 2]))
    with pytest.raises(ValueError, match="fpirs"):
        tpir_at_fpir(scores, np.array([1, 6]), np.array([1, 2]), fpirs=(0.0,))
    with pytest.raises(ValueError, match="ranks"):
        cmc(scores, np.array([1, 6]), np.array([1, 2]), ranks=(0,))


# ----------------------------------------------------------------------------------------------------
# recall_at_k / map_at_r / r_precision / nearest_neighbors
# ----------------------------------------------------------------------------------------------------


def _clustered(
    rng: np.random.Generator, n: int, classes: int, dim: int, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    centers = rng.normal(size=(classes, dim))
    labels = rng.integers(0, classes, n)
    return (centers[labels] + noise * rng.normal(size=(n, dim))).astype(np.float32), labels


def _pml(query, query_labels, ref=None, ref_labels=None, ref_includes_query=False) -> dict[str, float]:
    torch = pytest.importorskip("torch")
    accuracy_calculator = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.inference import CustomKNN

    calc = accuracy_calculator.AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=CustomKNN(CosineSimilarity()),  # exact; faiss is not a dependency
    )
    return calc.get_accuracy(query, query_labels, ref, ref_labels, ref_includes_query)


def _brute_force(query, ref, q_lab, r_lab, ks, same_set) -> dict[str, float]:
    """Full stable sort of every similarity row in float64, metrics by plain loops."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    r = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    recalls = dict.fromkeys(ks, 0)
    ap_sum = rp_sum = 0.0
    n = 0
    for i in range(q.shape[0]):
        candidates = [j for j in range(r.shape[0]) if not (same_set and j == i)]
        relevant = sum(1 for j in candidates if r_lab[j] == q_lab[i])
        if relevant == 0:
            continue
        n += 1
        sims = (r[candidates].astype(np.float64) @ q[i].astype(np.float64)).tolist()
        ranked = [c for _, c in sorted(zip([-s for s in sims], candidates))]
        hits = [int(r_lab[j] == q_lab[i]) for j in ranked]
        for k in ks:
            recalls[k] += int(any(hits[:k]))
        precisions = [sum(hits[: i + 1]) / (i + 1) for i in range(relevant)]
        ap_sum += sum(p * h for p, h in zip(precisions, hits[:relevant])) / relevant
        rp_sum += sum(hits[:relevant]) / relevant
    out = {f"recall@{k}": recalls[k] / n for k in ks}
    out["map@r"] = ap_sum / n
    out["r_precision"] = rp_sum / n
    return out


def test_retrieval_by_hand() -> None:
    # Points on a line through the unit circle: angles 0, 10, 20, 90, 100 degrees; labels a a b a b.
    angles = np.deg2rad([0.0, 10.0, 20.0, 90.0, 100.0])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    labels = np.array([0, 0, 1, 0, 1])
    m = retrieval_metrics(emb, None, labels, None, ks=(1, 2, 4))
    # Neighbours (self excluded): 0: 1 2 3 4 | 1: 0 2 3 4 | 2: 1 0 3 4 | 3: 4 2 1 0 | 4: 3 2 1 0
    # R: label 0 has 3 members -> R = 2; label 1 has 2 -> R = 1.
    # hits: 0: 1 0 1 0 | 1: 1 0 1 0 | 2: 0 0 0 1 | 3: 0 0 1 1 | 4: 0 1 0 0
    assert m["recall@1"] == pytest.approx(2 / 5)
    assert m["recall@2"] == pytest.approx(3 / 5)
    assert m["recall@4"] == pytest.approx(1.0)
    # R-precision: 0: 1/2, 1: 1/2, 2: 0/1, 3: 0/2, 4: 0/1
    assert m["r_precision"] == pytest.approx((0.5 + 0.5) / 5)
    # AP@R: 0: (1/1)/2, 1: (1/1)/2, others 0
    assert m["map@r"] == pytest.approx((0.5 + 0.5) / 5)
    assert recall_at_k(emb, None, labels, None, ks=(2,)) == {2: pytest.approx(3 / 5)}
    assert map_at_r(emb, None, labels, None) == pytest.approx(0.2)
    assert r_precision(emb, None, labels, None) == pytest.approx(0.2)


def test_query_gallery_by_hand_and_lone_queries() -> None:
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    gallery_labels = np.array([1, 2, 2])
    query = np.array([[1.0, 0.1], [0.1, 1.0], [5.0, 5.0]])
    query_labels = np.array([2, 2, 9])  # label 9 has no reference: left out
    m = retrieval_metrics(query, gallery, query_labels, gallery_labels, ks=(1, 2))
    # q0 ranks 0 (label 1), 2, 1 -> hits 0 1 1, R 2: AP = (1/2)/2, RP = 1/2; q1 ranks 1, 2 -> hits 1 1, AP = RP = 1
    assert m == pytest.approx(
        {"recall@1": 0.5, "recall@2": 1.0, "map@r": (0.25 + 1.0) / 2, "r_precision": 0.75}
    )


@pytest.mark.parametrize("seed", range(4))
def test_same_set_matches_pytorch_metric_learning(seed: int) -> None:
    rng = np.random.default_rng(seed)
    emb, labels = _clustered(rng, 400, 40, 16, noise=1.0 + 0.25 * seed)
    labels[0] = 1000  # a lone query
    got = retrieval_metrics(emb, None, labels, None, ks=(1, 2, 4, 8))
    want = _pml(emb, labels)
    assert got["recall@1"] == pytest.approx(want["precision_at_1"], abs=1e-12)
    assert got["r_precision"] == pytest.approx(want["r_precision"], abs=1e-12)
    assert got["map@r"] == pytest.approx(want["mean_average_precision_at_r"], abs=1e-12)
    assert 0.05 < got["map@r"] < 0.95  # a case where the metrics are informative
    # the same through an explicit reference equal to the query set
    assert retrieval_metrics(emb, emb, labels, labels, ks=(1, 2, 4, 8), same_set=True) == got


@pytest.mark.parametrize("seed", range(4))
def test_query_gallery_matches_pytorch_metric_learning(seed: int) -> None:
    rng = np.random.default_rng(10 + seed)
    emb, labels = _clustered(rng, 500, 30, 12, noise=1.2)
    query, gallery = emb[:200], emb[200:]
    q_lab, g_lab = labels[:200], labels[200:]
    got = retrieval_metrics(query, gallery, q_lab, g_lab, ks=(1, 10))
    want = _pml(query, q_lab, gallery, g_lab)
    assert got["recall@1"] == pytest.approx(want["precision_at_1"], abs=1e-12)
    assert got["r_precision"] == pytest.approx(want["r_precision"], abs=1e-12)
    assert got["map@r"] == pytest.approx(want["mean_average_precision_at_r"], abs=1e-12)


def test_reference_extends_query_matches_pytorch_metric_learning() -> None:
    # ref_includes_query: the queries are the first rows of a larger reference set.
    rng = np.random.default_rng(7)
    emb, labels = _clustered(rng, 300, 20, 8, noise=1.0)
    got = retrieval_metrics(emb[:120], emb, labels[:120], labels, same_set=True)
    want = _pml(emb[:120], labels[:120], emb, labels, ref_includes_query=True)
    assert got["recall@1"] == pytest.approx(want["precision_at_1"], abs=1e-12)
    assert got["map@r"] == pytest.approx(want["mean_average_precision_at_r"], abs=1e-12)
    assert got["r_precision"] == pytest.approx(want["r_precision"], abs=1e-12)


@pytest.mark.parametrize("same_set", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_retrieval_matches_brute_force(same_set: bool, chunk_size: int | None) -> None:
    rng = np.random.default_rng(21)
    emb, labels = _clustered(rng, 150, 12, 6, noise=1.5)
    ks = (1, 2, 4, 8, 16, 1000)
    if same_set:
        got = retrieval_metrics(emb, None, labels, None, ks, chunk_size=chunk_size)
        want = _brute_force(emb, emb, labels, labels, ks, True)
    else:
        got = retrieval_metrics(emb[:50], emb[50:], labels[:50], labels[50:], ks, chunk_size=chunk_size)
        want = _brute_force(emb[:50], emb[50:], labels[:50], labels[50:], ks, False)
    assert got == pytest.approx(want, abs=1e-12)
    assert got["recall@1000"] == 1.0


def test_nearest_neighbors_ties_by_index() -> None:
    # Reference rows 1, 3, 4, 6 are the same direction; row 5 is exactly between the axes.
    ref = np.array([[0, 1], [2, 0], [0, -1], [1, 0], [3, 0], [1, 1], [1, 0]], dtype=np.float32)
    query = np.array([[1.0, 0.0]])
    idx, sims = nearest_neighbors(query, ref, k=3)
    np.testing.assert_array_equal(idx, [[1, 3, 4]])  # a tie group straddling k: lowest indices kept
    np.testing.assert_allclose(sims, [[1, 1, 1]])
    idx, _ = nearest_neighbors(query, ref, k=6)
    np.testing.assert_array_equal(idx, [[1, 3, 4, 6, 5, 0]])
    for chunk in (1, 2):
        idx, _ = nearest_neighbors(np.repeat(query, 3, axis=0), ref, k=2, chunk_size=chunk)
        np.testing.assert_array_equal(idx, [[1, 3]] * 3)


def test_self_excluded_by_index_not_by_value() -> None:
    # Two identical images of one class: each is the other's nearest neighbour, Recall@1 = 1.
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    labels = np.array([0, 0, 1, 1])
    idx, _ = nearest_neighbors(emb, None, k=1)
    np.testing.assert_array_equal(idx[:, 0], [1, 0, 3, 2])
    assert recall_at_k(emb, None, labels, None, ks=(1,)) == {1: 1.0}


def test_knn_memory_is_chunked() -> None:
    # 12,000 x 12,000 float32 similarities would take 576 MB; the chunked search stays far below.
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(12_000, 4)).astype(np.float32)
    labels = rng.integers(0, 3000, 12_000)
    tracemalloc.start()
    try:
        m = retrieval_metrics(emb, None, labels, None, ks=(1, 4))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12_000 * 12_000 * 4 / 4
    assert 0.0 <= m["recall@1"] <= m["recall@4"] <= 1.0


def test_retrieval_rejects_bad_input() -> None:
    emb = np.eye(3)
    labels = np.array([0, 0, 1])
    with pytest.raises(ValueError, match="query_labels"):
        retrieval_metrics(emb, None, labels[:2], None)
    with pytest.raises(ValueError, match="ref_labels"):
        retrieval_metrics(emb, emb, labels, labels[:2])
    with pytest.raises(ValueError, match="dimension"):
        retrieval_metrics(emb, np.eye(4), labels, np.arange(4))
    with pytest.raises(ValueError, match="same_set"):
        retrieval_metrics(emb, emb[::-1], labels, labels, same_set=True)
    with pytest.raises(ValueError, match="finite"):
        retrieval_metrics(np.array([[np.inf, 0.0], [0.0, 1.0]]), None, np.array([0, 0]), None)
    with pytest.raises(ValueError, match="relevant reference"):
        retrieval_metrics(emb, None, np.array([0, 1, 2]), None)
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(emb, None, labels, None, ks=(0,))
    with pytest.raises(ValueError, match="no reference left"):
        nearest_neighbors(np.ones((1, 2)), None, k=1)
