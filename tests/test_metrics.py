"""facems.metrics: roc against scikit-learn, tar_at_far by hand and by brute force, kfold_accuracy against a
plain-loop re-statement of insightface's calculate_roc."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve
from sklearn.model_selection import KFold

from facems.metrics import kfold_accuracy, roc, tar_at_far

# ----------------------------------------------------------------------------------------------------
# roc
# ----------------------------------------------------------------------------------------------------


def _score_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    cases = []
    for n in (2, 3, 7, 50, 1000):
        y = rng.integers(0, 2, n)
        y[0], y[-1] = 0, 1
        cases.append((y, rng.normal(size=n)))
        cases.append((y.astype(bool), rng.integers(0, 4, n).astype(np.float64)))  # heavy ties
        cases.append((y, np.round(rng.normal(size=n), 1).astype(np.float32)))  # float32 ties
    # alternating labels on distinct scores: long collinear runs that drop_intermediate removes
    y = np.tile([1, 0], 20)
    cases.append((y, -np.arange(40.0)))
    cases.append((np.array([0, 1]), np.array([0.5, 0.5])))  # one tie group
    cases.append((np.array([0, 0, 1, 1]), np.array([-0.0, 0.0, 1.0, 1.0])))  # signed zeros
    return cases


@pytest.mark.parametrize("case", range(len(_score_cases())))
def test_roc_equals_sklearn(case: int) -> None:
    y, s = _score_cases()[case]
    fpr, tpr, thr = roc(y, s)
    fpr_ref, tpr_ref, thr_ref = roc_curve(y, s)
    np.testing.assert_array_equal(fpr, fpr_ref)
    np.testing.assert_array_equal(tpr, tpr_ref)
    np.testing.assert_array_equal(thr, thr_ref)
    assert fpr.dtype == np.float64 and thr.dtype == np.float64


def test_roc_hand_computed() -> None:
    # scores 0.9(+) 0.8(-) 0.7(+) 0.6(-): accepting >= t for each distinct t
    fpr, tpr, thr = roc(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.6]))
    np.testing.assert_array_equal(thr, [np.inf, 0.9, 0.8, 0.7, 0.6])
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 0.5, 1, 1])


@pytest.mark.parametrize(
    ("labels", "scores", "match"),
    [
        (np.array([1, 1]), np.array([0.1, 0.2]), "impostor"),
        (np.array([0, 0]), np.array([0.1, 0.2]), "genuine"),
        (np.array([0, 2]), np.array([0.1, 0.2]), "0/1"),
        (np.array([0, 1]), np.array([0.1, np.nan]), "finite"),
        (np.array([0, 1, 1]), np.array([0.1, 0.2]), "equal length"),
        (np.array([], dtype=bool), np.array([]), "at least one"),
    ],
)
def test_roc_rejects_bad_input(labels: np.ndarray, scores: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        roc(labels, scores)


# ----------------------------------------------------------------------------------------------------
# tar_at_far
# ----------------------------------------------------------------------------------------------------


def _nearest_insightface(labels: np.ndarray, scores: np.ndarray, far: float) -> float:
    """insightface eval_ijbc's read-out, restated: flipud the sklearn curve, min over (|fpr - far|, index)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    _, k = min(zip(abs(fpr - far), range(len(fpr))))
    return float(tpr[k])


def _conservative_brute(labels: np.ndarray, scores: np.ndarray, far: float) -> float:
    """Try every threshold (each distinct score, and +inf): highest TPR with FPR <= far."""
    pos, neg = labels.astype(bool), ~labels.astype(bool)
    best = 0.0
    for t in np.unique(scores):
        accept = scores >= t
        fpr = np.count_nonzero(accept & neg) / np.count_nonzero(neg)
        if fpr <= far:
            best = max(best, np.count_nonzero(accept & pos) / np.count_nonzero(pos))
    return best


@pytest.mark.parametrize("case", range(len(_score_cases())))
def test_tar_at_far_matches_references(case: int) -> None:
    y, s = _score_cases()[case]
    fars = (1e-6, 1e-3, 0.02, 0.1, 0.25, 0.5, 1.0)
    near = tar_at_far(y, s, fars=fars, mode="nearest")
    cons = tar_at_far(y, s, fars=fars, mode="conservative")
    assert list(near) == list(fars) and list(cons) == list(fars)
    for f in fars:
        assert near[f] == _nearest_insightface(y, s, f)
        assert cons[f] == _conservative_brute(y, s, f)


def test_tar_at_far_hand_computed() -> None:
    # 4 impostors at 0.9, 0.5, 0.4, 0.3; 4 genuine at 0.8, 0.7, 0.6, 0.2.
    y = np.array([0, 1, 1, 1, 0, 0, 0, 1])
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    # Full curve (fpr, tpr): (0,0) (.25,0) (.25,.25) (.25,.5) (.25,.75) (.5,.75) (.75,.75) (1,.75) (1,1)
    cons = tar_at_far(y, s, fars=(0.1, 0.25, 0.6), mode="conservative")
    assert cons == {0.1: 0.0, 0.25: 0.75, 0.6: 0.75}
    # After drop_intermediate: (0,0) (.25,0) (.25,.75) (1,.75) (1,1). FAR 0.1 is nearest to fpr 0 -> 0;
    # 0.6 is nearest to .25 (0.35 away) rather than 1 (0.4 away) -> .75.
    near = tar_at_far(y, s, fars=(0.1, 0.25, 0.6), mode="nearest")
    assert near == {0.1: 0.0, 0.25: 0.75, 0.6: 0.75}
    # Nearest may exceed the bound: FAR 0.2 -> fpr .25 point, TAR .75; conservative gives 0.
    assert tar_at_far(y, s, fars=(0.2,), mode="nearest") == {0.2: 0.75}
    assert tar_at_far(y, s, fars=(0.2,), mode="conservative") == {0.2: 0.0}


def test_conservative_sees_points_that_drop_intermediate_removes() -> None:
    # Alternating labels: the sklearn curve keeps only corners, but every step is an operating point.
    y = np.tile([1, 0], 10)
    s = -np.arange(20.0)
    assert tar_at_far(y, s, fars=(0.35,), mode="conservative")[0.35] == _conservative_brute(y, s, 0.35) == 0.4


def test_tar_at_far_rejects_bad_arguments() -> None:
    y, s = np.array([0, 1]), np.array([0.1, 0.2])
    with pytest.raises(ValueError, match="mode"):
        tar_at_far(y, s, mode="closest")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        tar_at_far(y, s, fars=(0.0,))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        tar_at_far(y, s, fars=(1.5,))


# ----------------------------------------------------------------------------------------------------
# kfold_accuracy
# ----------------------------------------------------------------------------------------------------


def _loop_calculate_accuracy(threshold: float, dist: np.ndarray, actual_issame: np.ndarray) -> float:
    predict_issame = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict_issame, actual_issame))
    tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
    return float(tp + tn) / dist.size


def _loop_kfold(
    embeddings: np.ndarray, issame: np.ndarray, nfolds: int = 10, thresholds: np.ndarray | None = None
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """insightface's verification.evaluate -> calculate_roc (pca=0), restated with explicit loops."""
    thresholds = np.arange(0, 4, 0.01) if thresholds is None else thresholds
    e1, e2 = embeddings[0::2], embeddings[1::2]
    dist = np.sum(np.square(np.subtract(e1, e2)), 1)
    indices = np.arange(len(issame))
    splits = [(indices, indices)] if nfolds == 1 else KFold(n_splits=nfolds, shuffle=False).split(indices)
    accuracy = np.zeros(nfolds)
    best_thresholds = np.zeros(nfolds)
    for fold_idx, (train_set, test_set) in enumerate(splits):
        acc_train = np.zeros(len(thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            acc_train[threshold_idx] = _loop_calculate_accuracy(threshold, dist[train_set], issame[train_set])
        best = np.argmax(acc_train)
        best_thresholds[fold_idx] = thresholds[best]
        accuracy[fold_idx] = _loop_calculate_accuracy(thresholds[best], dist[test_set], issame[test_set])
    return float(np.mean(accuracy)), float(np.std(accuracy)), accuracy, best_thresholds


def _assert_same(embeddings: np.ndarray, issame: np.ndarray, **kw: object) -> None:
    got = kfold_accuracy(embeddings, issame, **kw)  # type: ignore[arg-type]
    mean, std, accs, thrs = _loop_kfold(embeddings, issame, **kw)  # type: ignore[arg-type]
    assert got.accuracy == mean
    assert got.std == std
    np.testing.assert_array_equal(got.fold_accuracies, accs)
    np.testing.assert_array_equal(got.fold_thresholds, thrs)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(
    ("n_pairs", "dim", "nfolds", "dtype"),
    [(600, 16, 10, np.float64), (257, 8, 10, np.float32), (45, 4, 7, np.float64), (30, 3, 1, np.float64)],
)
def test_kfold_equals_loop_on_random_embeddings(n_pairs: int, dim: int, nfolds: int, dtype: type) -> None:
    rng = np.random.default_rng(n_pairs)
    issame = rng.random(n_pairs) < 0.5
    a = rng.normal(size=(n_pairs, dim))
    # genuine partners close to their anchor, impostors independent: accuracies well above chance
    b = np.where(issame[:, None], a + 0.6 * rng.normal(size=(n_pairs, dim)), rng.normal(size=(n_pairs, dim)))
    emb = np.empty((2 * n_pairs, dim))
    emb[0::2], emb[1::2] = _unit(a), _unit(b)
    _assert_same(emb.astype(dtype), issame, nfolds=nfolds)
    assert kfold_accuracy(emb.astype(dtype), issame, nfolds=nfolds).accuracy > 0.6


def _on_threshold_embeddings(n_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """1-D embeddings (x, 0) whose squared distance x*x equals a grid threshold exactly."""
    grid = np.arange(0, 4, 0.01)
    exact = [t for t in grid if np.sqrt(t) * np.sqrt(t) == t]
    assert len(exact) > 100
    roots = np.sqrt(rng.choice(exact, size=n_pairs))
    emb = np.zeros((2 * n_pairs, 1))
    emb[0::2, 0] = roots
    dist = np.sum(np.square(emb[0::2] - emb[1::2]), 1)
    assert np.all(np.isin(dist, grid))
    return emb, dist


def test_kfold_equals_loop_with_distances_exactly_on_thresholds() -> None:
    rng = np.random.default_rng(1)
    emb, dist = _on_threshold_embeddings(300, rng)
    issame = (dist < 1.5) ^ (rng.random(300) < 0.2)  # mostly separable, some noise
    _assert_same(emb, issame)
    # Dense: every distance is one of the consecutive grid points 0.53..0.58 (all exact squares), so
    # the chosen threshold is itself a distance that test pairs have (dist == t must count as "not <").
    grid = np.arange(0, 4, 0.01)
    values = grid[53:59]
    assert np.all(np.sqrt(values) * np.sqrt(values) == values)
    emb = np.zeros((2 * 400, 1))
    emb[0::2, 0] = np.sqrt(rng.choice(values, size=400))
    dist = emb[0::2, 0] ** 2
    issame = (dist < 0.555) ^ (rng.random(400) < 0.1)
    _assert_same(emb, issame)
    res = kfold_accuracy(emb, issame)
    assert np.all(np.isin(res.fold_thresholds, values))


def test_kfold_equals_loop_with_ties() -> None:
    rng = np.random.default_rng(2)
    # Few distinct distances (many tied pairs), labels independent of distance: many tied accuracies.
    emb = np.zeros((2 * 200, 1))
    emb[0::2, 0] = rng.choice([0.0, 0.5, 1.0, 1.5], size=200)
    issame = rng.random(200) < 0.5
    _assert_same(emb, issame)
    # All pairs identical and all genuine: every threshold > 0 ties; argmax takes the first (0.01).
    same = np.ones((2 * 50, 2)) / np.sqrt(2)
    res = kfold_accuracy(same, np.ones(50, bool))
    np.testing.assert_array_equal(res.fold_thresholds, np.full(10, 0.01))
    assert res.accuracy == 1.0 and res.std == 0.0
    _assert_same(same, np.ones(50, bool))
    # Custom dyadic thresholds with distances exactly on them, uneven folds (53 pairs in 10 folds).
    emb2 = np.zeros((2 * 53, 1))
    emb2[0::2, 0] = np.sqrt(rng.choice([0.25, 0.5, 1.0, 2.0], size=53))
    _assert_same(emb2, rng.random(53) < 0.5, thresholds=np.array([0.0, 0.25, 0.5, 1.0, 2.0, 4.0]))


def test_kfold_hand_computed() -> None:
    # 2 folds of 2 pairs; distances 0.25 (same), 1.0 (diff) | 0.5 (same), 2.25 (diff).
    emb = np.zeros((8, 1))
    emb[0::2, 0] = [0.5, 1.0, np.sqrt(0.5), 1.5]
    res = kfold_accuracy(
        emb, np.array([True, False, True, False]), nfolds=2, thresholds=np.array([0.3, 0.6, 2.0])
    )
    # fold 0 trains on (0.5 same, 2.25 diff): 0.6 is the first perfect threshold -> test: 0.25 same ok, 1.0 diff ok
    # fold 1 trains on (0.25 same, 1.0 diff): 0.3 first perfect -> test: 0.5 same wrong, 2.25 diff ok
    np.testing.assert_array_equal(res.fold_thresholds, [0.6, 0.3])
    np.testing.assert_array_equal(res.fold_accuracies, [1.0, 0.5])
    assert res.accuracy == 0.75 and res.std == 0.25


def test_kfold_rejects_bad_input() -> None:
    emb = np.zeros((20, 3))
    with pytest.raises(ValueError, match=r"\[2n, D\]"):
        kfold_accuracy(np.zeros((5, 3)), np.ones(2, bool))
    with pytest.raises(ValueError, match=r"issame: expected \[10\]"):
        kfold_accuracy(emb, np.ones(9, bool))
    with pytest.raises(ValueError, match="nfolds"):
        kfold_accuracy(emb, np.ones(10, bool), nfolds=11)
    with pytest.raises(ValueError, match="nfolds"):
        kfold_accuracy(emb, np.ones(10, bool), nfolds=0)
    with pytest.raises(ValueError, match="thresholds"):
        kfold_accuracy(emb, np.ones(10, bool), thresholds=np.array([]))
