"""Multi-Similarity loss against a plain-loop reference of the official algorithm and against
pytorch-metric-learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facems.losses.multi_similarity import MultiSimilarityLoss, ms_loss, ms_mine
from facems.losses.pairs import cosine_similarity_matrix, label_masks

ALPHA, BETA, BASE, EPS = 2.0, 40.0, 0.5, 0.1


def num(t: torch.Tensor) -> float:
    """A tensor's value as a Python float (detached: comparisons need no graph)."""
    return float(t.detach())


def reference_ms(
    emb: torch.Tensor,
    labels: list[int],
    alpha: float = ALPHA,
    beta: float = BETA,
    base: float = BASE,
    eps: float = EPS,
    mining: bool = True,
    anchors: list[int] | None = None,
    exclude_self: bool = True,
) -> torch.Tensor:
    """The official research-ms-loss loop, self pairs excluded by index (unless ``exclude_self`` is
    False: a memory bank, where the anchor's copy is a positive), scalar by scalar."""
    x = emb / emb.norm(dim=1, keepdim=True)
    n = x.shape[0]
    anchors = list(range(n)) if anchors is None else anchors
    total = emb.new_zeros(())
    for i in anchors:
        pos = [x[i] @ x[k] for k in range(n) if (k != i or not exclude_self) and labels[k] == labels[i]]
        neg = [x[i] @ x[k] for k in range(n) if labels[k] != labels[i]]
        if not pos or not neg:
            continue
        if mining:
            min_pos = min(float(s.detach()) for s in pos)
            max_neg = max(float(s.detach()) for s in neg)
            neg = [s for s in neg if float(s.detach()) + eps > min_pos]
            pos = [s for s in pos if float(s.detach()) - eps < max_neg]
        if not pos or not neg:
            continue
        pos_sum = sum(torch.exp(-alpha * (s - base)) for s in pos)
        neg_sum = sum(torch.exp(beta * (s - base)) for s in neg)
        total = total + torch.log(1 + pos_sum) / alpha + torch.log(1 + neg_sum) / beta
    return total / len(anchors)


def clustered(p: int, k: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(p, dim, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(p).repeat_interleave(k)
    emb = centers[labels] + spread * torch.randn(p * k, dim, generator=g, dtype=torch.float64)
    return emb, labels


def compare(emb: torch.Tensor, labels: torch.Tensor, tol: float = 1e-10, **kw: float) -> float:
    a = emb.clone().requires_grad_(True)
    b = emb.clone().requires_grad_(True)
    hp = {"alpha": ALPHA, "beta": BETA, "base": BASE, "epsilon": EPS, **kw}
    got = MultiSimilarityLoss(**hp)(a, labels)  # type: ignore[arg-type]
    want = reference_ms(b, labels.tolist(), hp["alpha"], hp["beta"], hp["base"], hp["epsilon"])
    assert got.dtype == torch.float64
    assert abs(float(got.detach()) - float(want.detach())) <= tol, (float(got.detach()), float(want.detach()))
    got.backward()
    if want.requires_grad:
        want.backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=tol)
    else:
        assert torch.count_nonzero(a.grad) == 0
    return float(got.detach())


@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_reference_random(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(32, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (32,), generator=g)
    assert compare(emb, labels) > 0


@pytest.mark.parametrize("seed", range(4))
def test_matches_loop_reference_clustered(seed: int) -> None:
    # Tight clusters: many anchors mine nothing (their hardest negative is far below their
    # easiest positive), so the "skip anchor" branch and the denominator are exercised.
    emb, labels = clustered(8, 4, 16, spread=0.15 + 0.05 * seed, seed=seed)
    sim = cosine_similarity_matrix(emb, emb)
    pos, neg = label_masks(labels, labels, torch.arange(len(labels)))
    pk, nk = ms_mine(sim, pos, neg, EPS)
    skipped = ~(pk.any(1) & nk.any(1))
    assert 0 < int(skipped.sum()) < len(labels)
    compare(emb, labels)


@pytest.mark.parametrize(
    "kw", [{"beta": 50.0}, {"alpha": 5.0, "base": 0.3}, {"epsilon": 0.0}, {"epsilon": 0.5}]
)
def test_matches_loop_reference_other_hyperparameters(kw: dict[str, float]) -> None:
    emb, labels = clustered(6, 5, 12, spread=0.5, seed=3)
    compare(emb, labels, **kw)


def test_without_mining_matches_reference() -> None:
    emb, labels = clustered(5, 4, 8, spread=0.6, seed=1)
    a = emb.clone().requires_grad_(True)
    got = MultiSimilarityLoss(mining=False)(a, labels)
    want = reference_ms(emb, labels.tolist(), mining=False)
    assert abs(float(got.detach()) - float(want)) < 1e-10


def test_chunking_does_not_change_result() -> None:
    emb, labels = clustered(10, 4, 16, spread=0.4, seed=2)
    a = emb.clone().requires_grad_(True)
    b = emb.clone().requires_grad_(True)
    la = MultiSimilarityLoss(chunk_size=0)(a, labels)
    lb = MultiSimilarityLoss(chunk_size=3)(b, labels)
    la.backward()
    lb.backward()
    assert abs(num(la) - num(lb)) < 1e-12
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


def test_local_anchors_against_references() -> None:
    emb, labels = clustered(6, 4, 12, spread=0.5, seed=4)
    loss = MultiSimilarityLoss()
    for anchor_index in (8, torch.arange(8, 16)):
        got = loss(emb[8:16], labels[8:16], emb, labels, anchor_index)
        want = reference_ms(emb, labels.tolist(), anchors=list(range(8, 16)))
        assert abs(num(got) - float(want)) < 1e-10


def test_memory_references_without_self() -> None:
    # anchor_index=None: every reference with the anchor's label is a positive, even an identical one.
    emb, labels = clustered(4, 3, 8, spread=0.5, seed=5)
    got = MultiSimilarityLoss()(emb, labels, emb.clone(), labels.clone(), None)
    pos, _ = label_masks(labels, labels, None)
    assert bool(pos.diagonal().all())
    want = reference_ms(emb, labels.tolist(), exclude_self=False)
    assert abs(num(got) - num(want)) < 1e-10
    # Without mining the S = 1 copies are kept (with mining they are too easy here): they change the loss.
    plain = MultiSimilarityLoss(mining=False)
    memory = plain(emb, labels, emb.clone(), labels.clone(), None)
    want = reference_ms(emb, labels.tolist(), mining=False, exclude_self=False)
    assert abs(num(memory) - num(want)) < 1e-10
    assert abs(num(memory) - num(plain(emb, labels))) > 1e-3


# ---------------------------------------------------------------- edge cases


def test_one_sample_is_zero_and_connected() -> None:
    x = torch.randn(1, 8, requires_grad=True)
    loss = MultiSimilarityLoss()(x, torch.tensor([3]))
    assert num(loss) == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("labels", [[1, 1, 1, 1, 1], [0, 1, 2, 3, 4]])
def test_one_label_or_all_distinct_is_zero_and_connected(labels: list[int]) -> None:
    x = torch.randn(5, 8, requires_grad=True)
    loss = MultiSimilarityLoss()(x, torch.tensor(labels))
    assert num(loss) == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0


def test_anchor_without_positive_contributes_zero_but_counts() -> None:
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(7, 8, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2])  # the last anchor has no positive
    value = compare(emb, labels)
    sub = MultiSimilarityLoss()(emb[:6], labels[:6])
    # 6 contributing anchors are the same pairs minus the lone anchor's negatives: not equal, but the
    # lone anchor must not add anything: recompute its row directly.
    sim = cosine_similarity_matrix(emb, emb)
    pos, neg = label_masks(labels, labels, torch.arange(7))
    per_row = [num(ms_loss(sim[i : i + 1], pos[i : i + 1], neg[i : i + 1])) for i in range(7)]
    assert per_row[6] == 0.0
    assert abs(value - sum(per_row) / 7) < 1e-12
    assert num(sub) > 0


def test_duplicate_positive_with_similarity_one_is_kept() -> None:
    # The official code drops positives with S >= 1 - 1e-5 to remove the self pair; facems removes
    # the self pair by index, so an exact duplicate is a real positive (S = 1) and contributes.
    def unit(c: float) -> list[float]:
        return [c, math.sqrt(1 - c * c)]

    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], unit(0.95), unit(0.6)], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    sim = cosine_similarity_matrix(emb, emb)
    pos, neg = label_masks(labels, labels, torch.arange(4))
    assert bool(pos[0, 1]) and num(sim[0, 1]) == 1.0
    pk, nk = ms_mine(sim, pos, neg, EPS)
    assert bool(pk[0, 1])  # 1 - 0.1 < max neg 0.95
    assert nk[0].nonzero().flatten().tolist() == [2]  # 0.95 + 0.1 > 1 > 0.6 + 0.1
    want_row0 = (
        math.log1p(math.exp(-ALPHA * (1.0 - BASE))) / ALPHA
        + math.log1p(math.exp(BETA * (0.95 - BASE))) / BETA
    )
    got_row0 = num(ms_loss(sim[:1], pos[:1], neg[:1]))
    assert abs(got_row0 - want_row0) < 1e-12
    compare(emb, labels)


def test_exactly_one_mined_positive_and_negative() -> None:
    # Anchor 0: positive at S=0.5, another positive at S=0.95 (too easy: 0.95 - 0.1 > max neg 0.6);
    # negatives at S=0.6 (kept: 0.6 + 0.1 > 0.5) and S=0.3 (dropped: 0.3 + 0.1 < 0.5).
    def unit(c: float) -> list[float]:
        return [c, math.sqrt(1 - c * c)]

    emb = torch.tensor([[1.0, 0.0], unit(0.5), unit(0.95), unit(0.6), unit(0.3)], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 1])
    sim = cosine_similarity_matrix(emb, emb)
    pos, neg = label_masks(labels, labels, torch.arange(5))
    pk, nk = ms_mine(sim[:1], pos[:1], neg[:1], EPS)
    assert pk[0].nonzero().flatten().tolist() == [1]
    assert nk[0].nonzero().flatten().tolist() == [3]
    want = (
        math.log1p(math.exp(-ALPHA * (0.5 - BASE))) / ALPHA + math.log1p(math.exp(BETA * (0.6 - BASE))) / BETA
    )
    assert abs(num(ms_loss(sim[:1], pos[:1], neg[:1])) - want) < 1e-12
    compare(emb, labels)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_large_beta_stay_finite(dtype: torch.dtype) -> None:
    # Similarities near 0.999 with beta = 160: exp(160 * 0.499) ~ 1e34 per term would overflow a
    # naive sum in fp16/bf16 and nearly in fp32; the shifted logsumexp stays finite.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 64, generator=g)
    emb = (base + 1e-2 * torch.randn(256, 64, generator=g)).to(dtype).requires_grad_(True)
    labels = torch.arange(64).repeat_interleave(4)
    loss = MultiSimilarityLoss(beta=160.0)(emb, labels)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and num(loss) > 0
    loss.backward()
    assert emb.grad is not None and emb.grad.dtype == dtype
    assert bool(torch.isfinite(emb.grad.float()).all())
    ref = reference_ms(emb.detach().double(), labels.tolist(), beta=160.0)
    assert abs(num(loss) - num(ref)) / num(ref) < 2e-2  # input rounding only


def test_under_autocast_similarity_is_fp32() -> None:
    emb, labels = clustered(8, 4, 32, spread=0.5, seed=0)
    x = emb.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = MultiSimilarityLoss()(x @ torch.eye(32), labels)
    assert loss.dtype == torch.float32
    ref = reference_ms(emb, labels.tolist())
    assert abs(num(loss) - float(ref)) < 5e-2 * float(ref)


def test_invariant_to_batch_order_and_scale() -> None:
    emb, labels = clustered(8, 4, 16, spread=0.5, seed=9)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
    loss = MultiSimilarityLoss()
    a = loss(emb, labels)
    assert abs(num(a) - num(loss(emb[perm], labels[perm]))) < 1e-12
    scales = torch.rand(len(labels), 1, dtype=torch.float64) * 10 + 0.1
    assert abs(num(a) - num(loss(emb * scales, labels))) < 1e-12


def test_gradcheck_float64() -> None:
    emb, labels = clustered(4, 3, 6, spread=0.7, seed=11)
    x = emb.clone().requires_grad_(True)
    assert num(MultiSimilarityLoss()(x, labels)) > 0
    assert torch.autograd.gradcheck(lambda t: MultiSimilarityLoss()(t, labels), (x,), eps=1e-6, atol=1e-7)
    refs = emb.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, r: MultiSimilarityLoss()(a, labels[:6], r, labels, 0),
        (x[:6].detach().requires_grad_(True), refs),
    )


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="beta"):
        MultiSimilarityLoss(beta=0)
    with pytest.raises(ValueError, match="labels must be"):
        MultiSimilarityLoss()(torch.randn(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="anchor_index"):
        MultiSimilarityLoss()(
            torch.randn(4, 3),
            torch.zeros(4, dtype=torch.long),
            torch.randn(6, 3),
            torch.zeros(6, dtype=torch.long),
            3,
        )
    with pytest.raises(ValueError, match="labels differ"):
        MultiSimilarityLoss()(
            torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), 0
        )


# ---------------------------------------------------------------- pytorch-metric-learning


def pml_loss(
    emb: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float, base: float, eps: float
) -> torch.Tensor:
    from pytorch_metric_learning import losses, miners

    miner = miners.MultiSimilarityMiner(epsilon=eps)
    loss = losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)
    return loss(emb, labels, miner(emb, labels))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("beta", [40.0, 50.0])
def test_matches_pytorch_metric_learning(seed: int, beta: float) -> None:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(40, 24, generator=g, dtype=torch.float64)
    labels = torch.arange(10).repeat_interleave(4)
    # Precondition of the comparison: every anchor keeps a positive and a negative after mining
    # (PML's loss keeps the positive term of an anchor whose mined negatives are empty; the
    # official code skips such an anchor).
    sim = cosine_similarity_matrix(emb, emb)
    pos, neg = label_masks(labels, labels, torch.arange(40))
    pk, nk = ms_mine(sim, pos, neg, EPS)
    assert bool((pk.any(1) & nk.any(1)).all())
    a = emb.clone().requires_grad_(True)
    b = emb.clone().requires_grad_(True)
    ours = MultiSimilarityLoss(beta=beta)(a, labels)
    theirs = pml_loss(b, labels, ALPHA, beta, BASE, EPS)
    assert abs(num(ours) - num(theirs)) < 1e-10
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10)


def test_documented_difference_pml_early_exit() -> None:
    # Anchor 0 keeps exactly one positive (S=0.5) and one negative (S=0.6); anchor 1's only negative
    # is far away (S=-0.39), so it mines nothing; anchor 2 has no positive. PML's pair losses exit
    # early and return 0 when every mined index list has at most one entry; the official algorithm,
    # and facems, give anchor 0's loss divided by 3.
    def at(degrees: float) -> list[float]:
        return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]

    emb = torch.tensor([at(0.0), at(60.0), at(-53.13)], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    from pytorch_metric_learning import miners

    a1, p, a2, n = miners.MultiSimilarityMiner(epsilon=EPS)(emb, labels)
    assert (a1.tolist(), p.tolist(), a2.tolist(), n.tolist()) == ([0], [1], [0], [2])
    ours = num(MultiSimilarityLoss()(emb, labels))
    s01, s02 = 0.5, math.cos(math.radians(53.13))
    want = (
        math.log1p(math.exp(-ALPHA * (s01 - BASE))) / ALPHA + math.log1p(math.exp(BETA * (s02 - BASE))) / BETA
    ) / 3
    assert abs(ours - want) < 1e-12
    assert abs(ours - num(reference_ms(emb, labels.tolist()))) < 1e-12
    assert num(pml_loss(emb, labels, ALPHA, BETA, BASE, EPS)) == 0.0


def test_automatic_chunks_do_not_change_result(monkeypatch: pytest.MonkeyPatch) -> None:
    import facems.losses.multi_similarity as ms

    emb, labels = clustered(10, 4, 16, spread=0.4, seed=6)
    a = emb.clone().requires_grad_(True)
    b = emb.clone().requires_grad_(True)
    whole = MultiSimilarityLoss(chunk_size=0)(a, labels)
    monkeypatch.setattr(ms, "AUTO_CHUNK_ELEMENTS", 7 * 40)  # 7 anchors per chunk: 6 chunks, last short
    auto = MultiSimilarityLoss()(b, labels)
    whole.backward()
    auto.backward()
    assert abs(num(whole) - num(auto)) < 1e-12
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)
