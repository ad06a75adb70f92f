"""The MS loss across ranks equals the MS loss of one process on the concatenated batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from facems.losses.distributed import CrossRankLoss, all_gather_with_grad
from facems.losses.multi_similarity import MultiSimilarityLoss
from facems.testing import run_in_ddp

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

STEPS, GLOBAL_BATCH, DIM = 3, 24, 8


def make_model() -> nn.Module:
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(DIM, 32), nn.Tanh(), nn.Linear(32, 16))


def make_batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(STEPS):
        # 6 identities x 4 images, shuffled, so positives and negatives of an anchor sit on both ranks.
        labels = torch.arange(6).repeat_interleave(4)[torch.randperm(GLOBAL_BATCH, generator=g)]
        centers = torch.randn(6, DIM, generator=g)
        x = centers[labels] + 0.8 * torch.randn(GLOBAL_BATCH, DIM, generator=g)
        batches.append((x, labels))
    return batches


def train_single(
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[dict[str, torch.Tensor], list[float]]:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    loss_fn = MultiSimilarityLoss()
    losses = []
    for x, y in batches:
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return model.state_dict(), losses


def train_ddp(rank: int, world: int, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, object]:
    model = DistributedDataParallel(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    loss_fn = CrossRankLoss(MultiSimilarityLoss())
    b = GLOBAL_BATCH // world
    logged = []
    for x, y in batches:
        loss = loss_fn(model(x[rank * b : (rank + 1) * b]), y[rank * b : (rank + 1) * b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = loss.detach().clone()
        torch.distributed.all_reduce(value)
        logged.append(float(value) / world)
    return {"state": model.module.state_dict(), "logged": logged}


def test_two_ranks_equal_one_process_on_concatenated_batch() -> None:
    batches = make_batches(seed=0)
    want_state, want_losses = train_single(batches)
    results = run_in_ddp(2, train_ddp, batches, timeout=240)
    for result in results:
        assert result["logged"] == pytest.approx(want_losses, abs=1e-6)
        for key, want in want_state.items():
            torch.testing.assert_close(result["state"][key], want, rtol=0, atol=1e-6)
    # The run moved the parameters: equality is not that of an untouched model.
    assert not torch.allclose(make_model().state_dict()["0.weight"], want_state["0.weight"], atol=1e-3)


def gather_uneven(rank: int, world: int, x_all: torch.Tensor, y_all: torch.Tensor) -> dict[str, torch.Tensor]:
    bounds = [0, 3, x_all.shape[0]]  # rank 0 holds 3 rows, rank 1 the rest
    rows = slice(bounds[rank], bounds[rank + 1])
    x = x_all[rows].clone().requires_grad_(True)
    weights = torch.arange(x_all.numel(), dtype=x.dtype).view_as(x_all)
    gathered = all_gather_with_grad(x)
    (gathered * weights).sum().backward()
    x2 = x_all[rows].clone().requires_grad_(True)
    loss = CrossRankLoss(MultiSimilarityLoss())(x2, y_all[rows])
    loss.backward()
    return {"gathered": gathered.detach(), "grad": x.grad, "loss": loss.detach(), "loss_grad": x2.grad}


def test_uneven_batches_gather_and_scale() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1])
    results = run_in_ddp(2, gather_uneven, x, y, timeout=120)
    weights = torch.arange(x.numel(), dtype=x.dtype).view_as(x)
    xs = x.clone().requires_grad_(True)
    single = MultiSimilarityLoss()(xs, y)
    single.backward()
    assert float(single.detach()) > 0
    for rank, rows in enumerate([slice(0, 3), slice(3, 11)]):
        r = results[rank]
        torch.testing.assert_close(r["gathered"], x, rtol=0, atol=0)
        torch.testing.assert_close(r["grad"], 2 * weights[rows], rtol=0, atol=0)
        # DDP divides the summed gradient by the world size.
        torch.testing.assert_close(r["loss_grad"] / 2, xs.grad[rows], rtol=0, atol=1e-12)
    mean_loss = (results[0]["loss"] + results[1]["loss"]) / 2
    assert abs(float(mean_loss) - float(single.detach())) < 1e-12


def test_single_process_is_plain_loss() -> None:
    x = torch.randn(12, 4)
    y = torch.arange(3).repeat_interleave(4)
    assert float(CrossRankLoss(MultiSimilarityLoss())(x, y)) == float(MultiSimilarityLoss()(x, y))
    assert all_gather_with_grad(x) is x
