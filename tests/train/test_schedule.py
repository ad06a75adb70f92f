"""Tests of facems.train.schedule against closed-form values written out independently."""

import dataclasses
import io
import math

import pytest
import torch
from torch import nn

from facems.config import ScheduleConfig
from facems.train.schedule import build_scheduler, lr_at, optimizer_steps


def reference_lr(
    step: int, lr: float, name: str, power: float, min_lr: float, total: int, warmup: int
) -> float:
    """The schedule as specified, one branch per case, without sharing code with the module."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if name == "constant":
        return lr
    if step >= total:
        return min_lr
    t = (step - warmup) / (total - warmup)
    if name == "poly":
        return min_lr + (lr - min_lr) * (1 - t) ** power
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


NAMES = ["poly", "cosine", "constant"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("warmup", [0, 4])
def test_lr_at_matches_reference(name: str, warmup: int) -> None:
    lr, min_lr, power, total = 0.1, 1e-4, 2.0, 24
    cfg = ScheduleConfig(name=name, power=power, min_lr=min_lr)
    steps = [0, 1, max(warmup - 1, 0), warmup, warmup + 1, (total + warmup) // 2, total - 1, total, total + 7]
    for s in steps:
        got = lr_at(s, lr, cfg, total, warmup)
        assert got == pytest.approx(reference_lr(s, lr, name, power, min_lr, total, warmup), rel=1e-12), s


def test_step_schedule_multiplies_by_gamma_at_each_milestone() -> None:
    """The official MS-loss CUB recipe: 3,000 iterations, x0.1 at 1,200 and 2,400 (after warmup)."""
    cfg = ScheduleConfig(name="step", milestones=[0.4, 0.8], gamma=0.1, epochs=2)
    expected = {
        0: 0.01,
        99: 1.0,
        100: 1.0,
        1199: 1.0,
        1200: 0.1,
        2399: 0.1,
        2400: 0.01,
        2999: 0.01,
        5000: 0.01,
    }
    for s, factor in expected.items():
        assert lr_at(s, 3e-5, cfg, 3000, 100) == pytest.approx(3e-5 * factor, rel=1e-12), s
    # Through the LambdaLR, every step: the same values, and they survive a state_dict round trip.
    opt = torch.optim.Adam(nn.Linear(2, 2).parameters(), lr=3e-5)
    sched = build_scheduler(opt, cfg, steps_per_epoch=1500)
    seen = []
    for _ in range(3000):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[1199] == pytest.approx(3e-5) and seen[1200] == pytest.approx(3e-6)
    assert seen[2400] == pytest.approx(3e-7) and seen[2999] == pytest.approx(3e-7)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["lr_lambdas"][0]["milestones"] == [0.4, 0.8] and state["lr_lambdas"][0]["gamma"] == 0.1


@pytest.mark.parametrize(
    "milestones, gamma, match",
    [
        ([0.8, 0.4], 0.1, "schedule.milestones"),
        ([0.0], 0.1, "schedule.milestones"),
        ([0.5], 0.0, "schedule.gamma"),
    ],
)
def test_step_schedule_rejects_bad_milestones(milestones: list[float], gamma: float, match: str) -> None:
    from facems.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        ScheduleConfig(name="step", milestones=milestones, gamma=gamma)


def test_lr_at_hand_values() -> None:
    """A few values worked out by hand."""
    cosine = ScheduleConfig(name="cosine", min_lr=0.0)
    poly = ScheduleConfig(name="poly", power=2.0, min_lr=0.0)
    const = ScheduleConfig(name="constant", min_lr=0.01)
    # 4 warmup steps then 10 decay steps (total 14).
    assert lr_at(0, 0.4, cosine, 14, 4) == pytest.approx(0.1)  # first warmup step: lr / 4
    assert lr_at(3, 0.4, cosine, 14, 4) == pytest.approx(0.4)  # last warmup step: peak
    assert lr_at(4, 0.4, cosine, 14, 4) == pytest.approx(0.4)  # t = 0
    assert lr_at(9, 0.4, cosine, 14, 4) == pytest.approx(0.2)  # t = 1/2: halfway
    assert lr_at(9, 0.4, poly, 14, 4) == pytest.approx(0.1)  # (1 - 1/2)^2 = 1/4
    assert lr_at(14, 0.4, poly, 14, 4) == 0.0
    assert lr_at(100, 0.4, cosine, 14, 4) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(9, 0.4, const, 14, 4) == 0.4
    assert lr_at(100, 0.4, const, 14, 4) == 0.4
    # min_lr shifts the floor: cosine halfway is the mean of lr and min_lr.
    assert lr_at(5, 1.0, ScheduleConfig(name="cosine", min_lr=0.2), 10, 0) == pytest.approx(0.6)
    assert lr_at(10, 1.0, ScheduleConfig(name="poly", min_lr=0.2), 10, 0) == pytest.approx(0.2)


def test_lr_at_errors() -> None:
    cfg = ScheduleConfig()
    with pytest.raises(ValueError, match=r"schedule.name = 'exp'.*constant, cosine, poly, step"):
        lr_at(0, 0.1, dataclasses.replace(cfg, name="exp"), 10, 0)
    with pytest.raises(ValueError, match="step = -1"):
        lr_at(-1, 0.1, cfg, 10, 0)
    with pytest.raises(ValueError, match="warmup_steps = 10"):
        lr_at(0, 0.1, cfg, 10, 10)
    with pytest.raises(ValueError, match="total_steps = 0"):
        lr_at(0, 0.1, cfg, 0, 0)


def _optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    return torch.optim.SGD(
        [{"params": [a], "name": "decay"}, {"params": [b], "weight_decay": 0.0, "name": "no_decay"}], lr=lr
    )


def _run(sched: torch.optim.lr_scheduler.LambdaLR, opt: torch.optim.Optimizer, n: int) -> list[list[float]]:
    """The lr of every group at each of ``n`` optimizer steps, stepping as the training loop does."""
    seen = []
    for _ in range(n):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return seen


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("warmup_epochs", "steps_per_epoch", "grad_accum", "total", "warmup"),
    [
        (0.0, 6, 1, 18, 0),
        (1.0, 6, 1, 18, 6),
        (1.0, 10, 2, 15, 5),  # 10 micro-batches / 2 = 5 optimizer steps per epoch
        (1.0, 11, 2, 15, 5),  # the odd micro-batch makes no optimizer step
        (0.5, 10, 2, 15, 3),  # 2.5 warmup steps round half up to 3
    ],
)
def test_scheduler_sequence(
    name: str, warmup_epochs: float, steps_per_epoch: int, grad_accum: int, total: int, warmup: int
) -> None:
    cfg = ScheduleConfig(name=name, warmup_epochs=warmup_epochs, epochs=3, power=1.5, min_lr=0.002)
    assert optimizer_steps(cfg, steps_per_epoch, grad_accum) == (total, warmup)
    opt = _optimizer(0.1)
    sched = build_scheduler(opt, cfg, steps_per_epoch, grad_accum)
    seen = _run(sched, opt, total + 3)
    for s, lrs in enumerate(seen):
        expected = reference_lr(s, 0.1, name, 1.5, 0.002, total, warmup)
        assert lrs == pytest.approx([expected, expected], rel=1e-12), s


def test_warmup_capped_below_total() -> None:
    # 2.9 of 3 epochs at 1 step per epoch rounds to 3: capped at 2 so one step decays.
    cfg = ScheduleConfig(warmup_epochs=2.9, epochs=3)
    assert optimizer_steps(cfg, 1) == (3, 2)


def test_state_dict_round_trip_resumes_sequence(tmp_path) -> None:
    cfg = ScheduleConfig(name="cosine", warmup_epochs=1.0, epochs=4, min_lr=0.001)
    opt = _optimizer(0.05)
    sched = build_scheduler(opt, cfg, steps_per_epoch=8, grad_accum=2)  # 4 per epoch, 16 in total
    head = _run(sched, opt, 7)
    path = tmp_path / "sched.pt"
    torch.save({"scheduler": sched.state_dict(), "optimizer": opt.state_dict()}, path)
    tail = _run(sched, opt, 12)

    saved = torch.load(path, weights_only=True)
    # A fresh run built with a different steps_per_epoch: the saved lengths must win.
    opt2 = _optimizer(0.05)
    sched2 = build_scheduler(opt2, cfg, steps_per_epoch=100)
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["scheduler"])
    assert [g["lr"] for g in opt2.param_groups] == tail[0]
    assert _run(sched2, opt2, 12) == tail
    expected = [reference_lr(s, 0.05, "cosine", 2.0, 0.001, 16, 4) for s in range(19)]
    assert [lrs[0] for lrs in head + tail] == pytest.approx(expected, rel=1e-12)


def test_state_dict_holds_plain_data() -> None:
    sched = build_scheduler(_optimizer(), ScheduleConfig(warmup_epochs=1.0), 5)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["lr_lambdas"][0]["total_steps"] == 100
    assert state["lr_lambdas"][1]["warmup_steps"] == 5


def test_build_scheduler_errors() -> None:
    cfg = ScheduleConfig()
    with pytest.raises(ValueError, match=r"schedule.name = 'linear'"):
        build_scheduler(_optimizer(), dataclasses.replace(cfg, name="linear"), 10)
    with pytest.raises(ValueError, match="steps_per_epoch = 0"):
        build_scheduler(_optimizer(), cfg, 0)
    with pytest.raises(ValueError, match="grad_accum = 0"):
        build_scheduler(_optimizer(), cfg, 10, 0)
    with pytest.raises(ValueError, match=r"steps_per_epoch = 3 .* grad_accum = 4"):
        build_scheduler(_optimizer(), cfg, 3, 4)
    with pytest.raises(ValueError, match=r"schedule.min_lr = 0.5.*'decay'"):
        build_scheduler(_optimizer(0.1), dataclasses.replace(cfg, min_lr=0.5), 10)
