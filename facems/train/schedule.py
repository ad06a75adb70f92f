"""Learning-rate schedule: linear warmup, then poly, cosine or constant, stepped per optimizer step.

Step ``s`` (0-based) is the index of an optimizer step; the learning rate used by step ``s`` is
:func:`lr_at` ``(s, ...)``. With ``W`` warmup steps and ``T`` steps in total:

* warmup, ``s < W``: ``lr * (s + 1) / W``. It rises linearly from 0 and the first step already moves
  (a step at lr 0 would be wasted); the last warmup step runs at the full ``lr``.
* decay, ``W <= s < T``: ``t = (s - W) / (T - W)`` runs from 0 to just below 1, and

  - ``poly``: ``min_lr + (lr - min_lr) * (1 - t) ** power``
  - ``cosine``: ``min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * t))``
  - ``constant``: ``lr`` (``min_lr`` is not used)
  - ``step``: ``lr * gamma ** m``, ``m`` the number of ``milestones`` (fractions of ``T``) with
    ``milestone * T <= s`` (``min_lr`` is not used): the official MS-loss code's multi-step schedule

* after the end, ``s >= T``: the value at ``t = 1``, i.e. ``min_lr`` for ``poly`` and ``cosine``
  (``lr`` for ``constant``, ``lr * gamma ** len(milestones)`` for ``step``).

:func:`build_scheduler` wraps this in a :class:`torch.optim.lr_scheduler.LambdaLR`, one per run, to
be stepped after every ``optimizer.step()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from facems.config import ScheduleConfig

__all__ = ["LRFactor", "build_scheduler", "lr_at", "optimizer_steps"]


def _poly(t: float, power: float) -> float:
    return (1.0 - t) ** power


def _cosine(t: float, power: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * t))


def _constant(t: float, power: float) -> float:
    return 1.0


# Fraction of the way from min_lr to lr at decay progress t in [0, 1].
_DECAYS: dict[str, Callable[[float, float], float]] = {
    "poly": _poly,
    "cosine": _cosine,
    "constant": _constant,
}
_NAMES = (*_DECAYS, "step")


def lr_at(step: int, base_lr: float, cfg: ScheduleConfig, total_steps: int, warmup_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (see the module docstring for the formulas).

    Args:
        step: 0-based optimizer step (>= 0; steps past ``total_steps`` are allowed).
        base_lr: peak learning rate reached at the end of warmup (``optim.lr``).
        cfg: the schedule section; ``name``, ``power`` and ``min_lr`` are used (its epoch fields are
            not: lengths come in steps here).
        total_steps: optimizer steps in the whole run (>= 1).
        warmup_steps: optimizer steps of warmup, in ``[0, total_steps)``.

    Returns:
        The learning rate (absolute, not a factor).

    Raises:
        ValueError: an unknown ``cfg.name`` or an argument out of range.
    """
    return _lr(
        step, base_lr, cfg.name, cfg.power, cfg.min_lr, total_steps, warmup_steps, cfg.milestones, cfg.gamma
    )


def _lr(
    step: int,
    base_lr: float,
    name: str,
    power: float,
    min_lr: float,
    total_steps: int,
    warmup_steps: int,
    milestones: Sequence[float] = (),
    gamma: float = 1.0,
) -> float:
    if name not in _NAMES:
        raise ValueError(f"schedule.name = {name!r}: expected one of {', '.join(sorted(_NAMES))}")
    if step < 0:
        raise ValueError(f"lr_at: step = {step}: expected an optimizer step >= 0")
    if total_steps < 1:
        raise ValueError(f"lr_at: total_steps = {total_steps}: expected >= 1")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"lr_at: warmup_steps = {warmup_steps}: expected a number in [0, {total_steps})")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if name == "step":
        return base_lr * gamma ** sum(1 for m in milestones if m * total_steps <= step)
    t = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * _DECAYS[name](t, power)


def optimizer_steps(cfg: ScheduleConfig, steps_per_epoch: int, grad_accum: int = 1) -> tuple[int, int]:
    """Convert the schedule's epoch lengths to optimizer steps.

    With gradient accumulation an epoch of ``steps_per_epoch`` micro-batches makes
    ``steps_per_epoch // grad_accum`` optimizer steps (micro-batches left over at the end of an
    epoch do not make a step of their own). Then ``total = epochs * optimizer steps per epoch`` and
    ``warmup = round(warmup_epochs * optimizer steps per epoch)``, rounding halves up, capped at
    ``total - 1`` so that at least one step is past warmup.

    Args:
        cfg: the schedule section (``epochs``, ``warmup_epochs``).
        steps_per_epoch: micro-batches (data-loader batches) per epoch on each rank (>= 1).
        grad_accum: micro-batches per optimizer step (>= 1).

    Returns:
        ``(total_steps, warmup_steps)`` in optimizer steps.

    Raises:
        ValueError: a length below 1, or fewer micro-batches per epoch than ``grad_accum``.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"build_scheduler: steps_per_epoch = {steps_per_epoch}: expected >= 1")
    if grad_accum < 1:
        raise ValueError(f"build_scheduler: grad_accum = {grad_accum}: expected >= 1")
    per_epoch = steps_per_epoch // grad_accum
    if per_epoch == 0:
        raise ValueError(
            f"build_scheduler: steps_per_epoch = {steps_per_epoch} micro-batches make no optimizer step "
            f"with grad_accum = {grad_accum}: expected steps_per_epoch >= grad_accum"
        )
    total = cfg.epochs * per_epoch
    warmup = min(math.floor(cfg.warmup_epochs * per_epoch + 0.5), total - 1)
    return total, warmup


class LRFactor:
    """``lr_at(step) / base_lr`` as a picklable callable for :class:`LambdaLR`.

    ``LambdaLR.state_dict()`` stores the ``__dict__`` of callables that are not plain functions, so
    every attribute here is a number or a string: the scheduler's state survives
    ``torch.save`` / ``torch.load(weights_only=True)``, and loading it restores the schedule's
    lengths and shape as they were when it was saved.
    """

    def __init__(
        self,
        base_lr: float,
        name: str,
        power: float,
        min_lr: float,
        total_steps: int,
        warmup_steps: int,
        milestones: Sequence[float] = (),
        gamma: float = 1.0,
    ) -> None:
        self.base_lr = float(base_lr)
        self.name = name
        self.power = float(power)
        self.min_lr = float(min_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.milestones = [float(m) for m in milestones]
        self.gamma = float(gamma)

    def __call__(self, step: int) -> float:
        # The stored fields, not the run's current config: after a resume they are the saved ones.
        lr = _lr(
            step,
            self.base_lr,
            self.name,
            self.power,
            self.min_lr,
            self.total_steps,
            self.warmup_steps,
            self.milestones,
            self.gamma,
        )
        return lr / self.base_lr


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int, grad_accum: int = 1
) -> LambdaLR:
    """A :class:`LambdaLR` giving each param group the learning rate of :func:`lr_at`.

    Call ``scheduler.step()`` once per optimizer step (not per micro-batch). ``steps_per_epoch``
    counts micro-batches; lengths are converted to optimizer steps by :func:`optimizer_steps`. The
    peak learning rate of each group is its ``lr`` when the scheduler is built (``initial_lr`` if a
    scheduler was attached before). On construction the groups' ``lr`` is set to that of step 0.

    Args:
        optimizer: the optimizer, e.g. from :func:`facems.train.optim.build_optimizer`.
        cfg: the ``schedule`` section of the run's config.
        steps_per_epoch: micro-batches per epoch on each rank (>= 1).
        grad_accum: micro-batches per optimizer step (``optim.grad_accum``, >= 1).

    Returns:
        The scheduler; its ``state_dict()`` holds only numbers, strings, lists and dicts.

    Raises:
        ValueError: an unknown ``cfg.name``, a length out of range, or a group whose peak learning
            rate is not above 0 or is below ``cfg.min_lr``.
    """
    if cfg.name not in _NAMES:
        raise ValueError(f"schedule.name = {cfg.name!r}: expected one of {', '.join(sorted(_NAMES))}")
    total, warmup = optimizer_steps(cfg, steps_per_epoch, grad_accum)
    factors: list[Callable[[int], float]] = []
    for i, group in enumerate(optimizer.param_groups):
        base = float(group.get("initial_lr", group["lr"]))
        label = f"param group {i} ({group['name']!r})" if "name" in group else f"param group {i}"
        if base <= 0:
            raise ValueError(f"build_scheduler: {label} has lr = {base}: expected > 0")
        if cfg.min_lr > base:
            raise ValueError(
                f"schedule.min_lr = {cfg.min_lr}: expected <= the peak lr {base} of {label} (optim.lr)"
            )
        factors.append(
            LRFactor(base, cfg.name, cfg.power, cfg.min_lr, total, warmup, cfg.milestones, cfg.gamma)
        )
    return LambdaLR(optimizer, lr_lambda=factors)
