"""Tests of the GPW loss family against plain-Python loop references."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from facems.losses.gpw import (
    BinomialDevianceLoss,
    ContrastiveLoss,
    LiftedStructureLoss,
    TripletLoss,
    binomial_deviance_loss,
    contrastive_loss,
    lifted_structure_loss,
    triplet_all_loss,
    triplet_batch_hard_loss,
)
from facems.losses.pairs import label_masks

# ----------------------------------------------------------------------------------------------
# plain-Python references: a loss over explicit lists of positive / negative similarities
# ----------------------------------------------------------------------------------------------
Pairs = tuple[list[float], list[float]]


def _relu(x: float) -> float:
    return x if x > 0.0 else 0.0


def _softplus(x: float) -> float:
    return x + math.log1p(math.exp(-x)) if x > 0.0 else math.log1p(math.exp(x))


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def ref_contrastive(pairs: Pairs, pos_margin: float = 1.0, neg_margin: float = 0.5) -> float:
    sp, sn = pairs
    return sum(_relu(pos_margin - s) for s in sp) + sum(_relu(s - neg_margin) for s in sn)


def ref_triplet_batch_hard(pairs: Pairs, margin: float = 0.1) -> float:
    sp, sn = pairs
    if not sp or not sn:
        return 0.0
    return _relu(max(sn) - min(sp) + margin)


def ref_triplet_all(pairs: Pairs, margin: float = 0.1) -> float:
    sp, sn = pairs
    triplets = [_relu(n - p + margin) for p in sp for n in sn]
    return sum(triplets) / len(triplets) if triplets else 0.0


def ref_lifted(pairs: Pairs, margin: float = 1.0) -> float:
    sp, sn = pairs
    if not sp or not sn:
        return 0.0
    return _relu(_logsumexp([margin - s for s in sp]) + _logsumexp(sn))


def ref_binomial(pairs: Pairs, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5) -> float:
    sp, sn = pairs
    loss = 0.0
    if sp:
        loss += sum(_softplus(-alpha * (s - base)) for s in sp) / len(sp)
    if sn:
        loss += sum(_softplus(beta * (s - base)) for s in sn) / len(sn)
    return loss


def anchor_pairs(
    embeddings: Tensor,
    labels: Tensor,
    refs: Tensor | None = None,
    ref_labels: Tensor | None = None,
    anchor_index: Sequence[int] | None = None,
) -> list[Pairs]:
    """Positive / negative cosine similarities of each anchor, with explicit loops in float64."""
    if refs is None or ref_labels is None:
        refs, ref_labels = embeddings, labels
        anchor_index = list(range(len(labels)))

    def unit(rows: Tensor) -> list[list[float]]:
        out = []
        for row in rows.tolist():
            norm = math.sqrt(sum(v * v for v in row))
            out.append([v / norm for v in row])
        return out

    xs, rs = unit(embeddings.double()), unit(refs.double())
    ys, ry = labels.tolist(), ref_labels.tolist()
    result = []
    for i, x in enumerate(xs):
        sp: list[float] = []
        sn: list[float] = []
        for k, r in enumerate(rs):
            if anchor_index is not None and k == anchor_index[i]:
                continue  # self pair, excluded by index
            s = sum(a * b for a, b in zip(x, r))
            (sp if ry[k] == ys[i] else sn).append(s)
        result.append((sp, sn))
    return result


def reference_loss(ref_fn: Callable[..., float], pairs: list[Pairs], **kwargs: float) -> float:
    return sum(ref_fn(p, **kwargs) for p in pairs) / len(pairs)


# (pure function, module factory, reference, hyper-parameters)
LOSSES: dict[
    str, tuple[Callable[..., Tensor], Callable[..., torch.nn.Module], Callable[..., float], dict]
] = {
    "contrastive": (
        contrastive_loss,
        ContrastiveLoss,
        ref_contrastive,
        {"pos_margin": 0.9, "neg_margin": 0.3},
    ),
    "triplet_batch_hard": (
        triplet_batch_hard_loss,
        lambda **kw: TripletLoss(mining="batch_hard", **kw),
        ref_triplet_batch_hard,
        {"margin": 0.2},
    ),
    "triplet_all": (
        triplet_all_loss,
        lambda **kw: TripletLoss(mining="all", **kw),
        ref_triplet_all,
        {"margin": 0.2},
    ),
    "lifted": (lifted_structure_loss, LiftedStructureLoss, ref_lifted, {"margin": 1.0}),
    "binomial": (binomial_deviance_loss, BinomialDevianceLoss, ref_binomial, {"alpha": 2.0, "beta": 50.0}),
}
NAMES = list(LOSSES)


# ----------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_batch() -> tuple[Tensor, Tensor]:
    emb = torch.randn(24, 16, generator=_gen(0), dtype=torch.float64)
    return emb, torch.arange(6).repeat_interleave(4)


def clustered_batch() -> tuple[Tensor, Tensor]:
    g = _gen(1)
    centers = torch.randn(6, 16, generator=g, dtype=torch.float64)
    labels = torch.arange(6).repeat_interleave(4)
    return centers[labels] + 0.05 * torch.randn(24, 16, generator=g, dtype=torch.float64), labels


def singleton_batch() -> tuple[Tensor, Tensor]:
    emb = torch.randn(9, 8, generator=_gen(2), dtype=torch.float64)
    return emb, torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3])  # label 2 has no positive


def one_label_batch() -> tuple[Tensor, Tensor]:
    return torch.randn(5, 8, generator=_gen(3), dtype=torch.float64), torch.zeros(5, dtype=torch.long)


def one_sample_batch() -> tuple[Tensor, Tensor]:
    return torch.randn(1, 8, generator=_gen(4), dtype=torch.float64), torch.tensor([7])


BATCHES = {
    "random": random_batch,
    "clustered": clustered_batch,
    "singleton": singleton_batch,
    "one_label": one_label_batch,
    "one_sample": one_sample_batch,
}


def sim_and_masks(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """float64 similarities (``cosine_similarity_matrix`` works in fp32) and the library's masks."""
    x = F.normalize(embeddings, dim=1)
    pos, neg = label_masks(labels, labels, torch.arange(len(labels)))
    return x @ x.t(), pos, neg


# ----------------------------------------------------------------------------------------------
# values against the references
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("name", NAMES)
def test_matches_loop_reference(name: str, batch: str) -> None:
    fn, _, ref_fn, hp = LOSSES[name]
    emb, labels = BATCHES[batch]()
    expected = reference_loss(ref_fn, anchor_pairs(emb, labels), **hp)
    sim, pos, neg = sim_and_masks(emb, labels)
    got = fn(sim, pos, neg, **hp)
    assert got.dim() == 0 and got.dtype == torch.float64
    assert abs(got.item() - expected) <= 1e-10 * max(1.0, abs(expected))


@pytest.mark.parametrize("name", NAMES)
def test_default_hyper_parameters_match_reference(name: str) -> None:
    fn, _, ref_fn, _ = LOSSES[name]
    emb, labels = random_batch()
    expected = reference_loss(ref_fn, anchor_pairs(emb, labels))
    got = fn(*sim_and_masks(emb, labels))
    assert abs(got.item() - expected) <= 1e-10 * max(1.0, abs(expected))


def test_clustered_batch_has_inactive_hinges() -> None:
    # sanity check of the test data: the clustered batch really exercises the zero side of the hinges
    emb, labels = clustered_batch()
    pairs = anchor_pairs(emb, labels)
    assert all(ref_triplet_batch_hard(p, margin=0.2) == 0.0 for p in pairs)
    assert any(s < 0.3 for _, sn in pairs for s in sn)


@pytest.mark.parametrize("chunk_size", [1, 5, 24, 100])
def test_triplet_all_chunking_does_not_change_result(chunk_size: int) -> None:
    emb, labels = random_batch()
    sim, pos, neg = sim_and_masks(emb, labels)
    sim.requires_grad_(True)
    loss = triplet_all_loss(sim, pos, neg, margin=0.2, chunk_size=chunk_size)
    (grad,) = torch.autograd.grad(loss, sim)
    with torch.no_grad():
        base = triplet_all_loss(sim, pos, neg, margin=0.2, chunk_size=64)
    expected = reference_loss(ref_triplet_all, anchor_pairs(emb, labels), margin=0.2)
    assert abs(loss.item() - expected) <= 1e-10 and abs(base.item() - expected) <= 1e-10
    sim2 = sim.detach().requires_grad_(True)
    (grad2,) = torch.autograd.grad(triplet_all_loss(sim2, pos, neg, margin=0.2, chunk_size=64), sim2)
    torch.testing.assert_close(grad, grad2, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_on_similarities(name: str) -> None:
    fn, _, _, hp = LOSSES[name]
    g = _gen(10)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    sim = (torch.rand(8, 8, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    pos, neg = label_masks(labels, labels, torch.arange(8))
    extra = {"chunk_size": 3} if name == "triplet_all" else {}
    assert torch.autograd.gradcheck(lambda s: fn(s, pos, neg, **hp, **extra), (sim,))


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_through_normalisation(name: str) -> None:
    fn, _, _, hp = LOSSES[name]
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    emb = torch.randn(6, 5, generator=_gen(11), dtype=torch.float64).requires_grad_(True)
    pos, neg = label_masks(labels, labels, torch.arange(6))

    def loss(e: Tensor) -> Tensor:
        x = F.normalize(e, dim=1)
        return fn(x @ x.t(), pos, neg, **hp)

    assert torch.autograd.gradcheck(loss, (emb,))


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_module_matches_reference(name: str) -> None:
    _, make, ref_fn, hp = LOSSES[name]
    emb, labels = random_batch()
    got = make(**hp)(emb.float(), labels)
    expected = reference_loss(ref_fn, anchor_pairs(emb.float(), labels), **hp)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_module_with_explicit_references(name: str, as_tensor: bool) -> None:
    _, make, ref_fn, hp = LOSSES[name]
    emb, labels = random_batch()
    emb = emb.float().requires_grad_(True)
    anchors, anchor_labels = emb[4:8], labels[4:8]
    index: Tensor | int = torch.arange(4, 8) if as_tensor else 4
    got = make(**hp)(anchors, anchor_labels, emb, labels, anchor_index=index)
    pairs = anchor_pairs(anchors.detach(), anchor_labels, emb.detach(), labels, anchor_index=range(4, 8))
    expected = reference_loss(ref_fn, pairs, **hp)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    got.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_module_with_memory_bank(name: str) -> None:
    # anchors not among the references: no self pair is excluded
    _, make, ref_fn, hp = LOSSES[name]
    emb, labels = random_batch()
    bank = torch.randn(10, 16, generator=_gen(5), dtype=torch.float64)
    bank_labels = torch.arange(10) % 6
    got = make(**hp)(emb[:6].float(), labels[:6], bank.float(), bank_labels)
    pairs = anchor_pairs(emb[:6].float(), labels[:6], bank.float(), bank_labels, anchor_index=None)
    assert got.item() == pytest.approx(reference_loss(ref_fn, pairs, **hp), rel=1e-5, abs=1e-6)


def _nothing_contributes(name: str) -> list[tuple[Tensor, Tensor]]:
    # one sample: no positive and no negative, for every loss
    cases = [(torch.randn(1, 8, generator=_gen(6)), torch.tensor([3]))]
    if name != "binomial":  # every negative contributes to the binomial deviance
        # all labels distinct and mutually orthogonal embeddings: no positive, and every negative
        # similarity (0) is below the contrastive negative margin
        cases.append((torch.eye(5, 8) * 3.0, torch.arange(5)))
    return cases


@pytest.mark.parametrize("name", NAMES)
def test_connected_and_zero_when_nothing_contributes(name: str) -> None:
    _, make, _, hp = LOSSES[name]
    for emb, labels in _nothing_contributes(name):
        emb = emb.clone().requires_grad_(True)
        loss = make(**hp)(emb, labels)
        assert loss.requires_grad and loss.grad_fn is not None
        assert torch.isfinite(loss) and loss.item() == 0.0
        loss.backward()
        assert emb.grad is not None and torch.equal(emb.grad, torch.zeros_like(emb))


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch(name: str) -> None:
    fn, _, _, hp = LOSSES[name]
    sim = torch.zeros(0, 4, requires_grad=True)
    empty = torch.zeros(0, 4, dtype=torch.bool)
    loss = fn(sim, empty, empty, **hp)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()


@pytest.mark.parametrize("name", NAMES)
def test_anchors_without_pairs_count_in_denominator(name: str) -> None:
    fn, _, ref_fn, hp = LOSSES[name]
    emb, labels = singleton_batch()
    sim, pos, neg = sim_and_masks(emb, labels)
    pairs = anchor_pairs(emb, labels)
    keep = [i for i, (sp, sn) in enumerate(pairs) if sp]  # drop the singleton anchor
    partial = fn(sim[keep], pos[keep], neg[keep], **hp)
    full = fn(sim, pos, neg, **hp)
    singleton = ref_fn(pairs[5], **hp)
    torch.testing.assert_close(full * len(pairs), partial * len(keep) + singleton, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# stability, validation, repr
# ----------------------------------------------------------------------------------------------
def test_binomial_large_scale_is_stable_in_fp32() -> None:
    g = _gen(7)
    direction = torch.randn(1, 64, generator=g)
    emb = (direction + 0.03 * torch.randn(16, 64, generator=g)).requires_grad_(True)
    labels = torch.arange(16) % 4
    x = F.normalize(emb.detach(), dim=1)
    sims = (x @ x.t())[~torch.eye(16, dtype=torch.bool)]
    assert sims.min() > 0.998  # everything is near 0.999: beta * (S - base) ~ 80
    loss = BinomialDevianceLoss(alpha=2.0, beta=160.0, base=0.5)(emb, labels)
    assert torch.isfinite(loss)
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    # value check: the negative term is ~ beta * (S - base), the naive exp would be ~ e^80
    pairs = anchor_pairs(emb.detach(), labels)
    expected = reference_loss(ref_binomial, pairs, alpha=2.0, beta=160.0, base=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_binomial_pure_function_extreme_scale_fp32() -> None:
    sim = torch.tensor([[1.0, 0.999, -1.0], [0.999, 1.0, 1.0]], requires_grad=True)
    pos = torch.tensor([[False, False, True], [False, False, False]])
    neg = torch.tensor([[False, True, False], [True, False, True]])
    loss = binomial_deviance_loss(sim, pos, neg, alpha=1000.0, beta=1000.0, base=0.0)
    loss.backward()
    assert torch.isfinite(loss) and sim.grad is not None and torch.isfinite(sim.grad).all()


def test_lifted_large_margin_is_stable_in_fp32() -> None:
    sim = (torch.rand(6, 6, generator=_gen(8)) * 2 - 1).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pos, neg = label_masks(labels, labels, torch.arange(6))
    loss = lifted_structure_loss(sim * 100.0, pos, neg, margin=200.0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 100.0
    assert sim.grad is not None and torch.isfinite(sim.grad).all()


def test_triplet_bad_mining_raises() -> None:
    with pytest.raises(ValueError, match=r"batch_hard.*all"):
        TripletLoss(mining="bogus")


def test_bad_inputs_raise() -> None:
    sim = torch.zeros(3, 4)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError):
        contrastive_loss(sim, mask[:, :3], mask)
    with pytest.raises(ValueError):
        lifted_structure_loss(sim, mask.float(), mask)
    with pytest.raises(ValueError):
        triplet_all_loss(sim, mask, mask, chunk_size=0)


def test_extra_repr_shows_hyper_parameters() -> None:
    assert "pos_margin=0.8" in repr(ContrastiveLoss(pos_margin=0.8))
    assert "mining='all'" in repr(TripletLoss(margin=0.3, mining="all"))
    assert "margin=0.3" in repr(TripletLoss(margin=0.3))
    assert "margin=2.0" in repr(LiftedStructureLoss(margin=2.0))
    assert "beta=160.0" in repr(BinomialDevianceLoss(beta=160.0))
    loss = TripletLoss(margin=0.3, mining="all")
    assert loss.margin == 0.3 and loss.mining == "all"
