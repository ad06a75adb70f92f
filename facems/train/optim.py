"""Optimizer builder: SGD, Adam or AdamW over two parameter groups, with and without weight decay.

Weight decay pulls a weight towards zero. That is what one wants for convolution and linear
weights, but not for the scale and shift of a normalisation layer, for a bias, or for a PReLU
slope: shrinking those changes what the layer computes without regularising anything, so by default
they go to a ``no_decay`` group with ``weight_decay`` 0 (as in most face-recognition and timm recipes).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from facems.config import OptimConfig

__all__ = ["NORM_LAYERS", "build_optimizer", "param_groups"]

# Every normalisation layer whose affine parameters (weight, bias) should not decay.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
)


def _exempt_from_decay(module: nn.Module, param_name: str) -> bool:
    """True for a normalisation layer's parameters, any bias, and a PReLU weight."""
    return isinstance(module, (*NORM_LAYERS, nn.PReLU)) or param_name == "bias"


def param_groups(
    model: nn.Module, weight_decay: float, no_decay_on_norm_bias_prelu: bool = True
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into a decayed and a non-decayed group.

    Parameters of normalisation layers (:data:`NORM_LAYERS`), every parameter named ``bias`` and every
    :class:`torch.nn.PReLU` weight go to the group ``"no_decay"`` (``weight_decay`` 0); all other
    trainable parameters go to ``"decay"``. Frozen parameters (``requires_grad`` False, such as the
    iResNet ``features.weight``) are left out. A parameter shared by several modules appears once; it
    is exempt from decay if any module that holds it is exempt. Parameters keep the order of
    ``model.named_parameters()``. An empty group is omitted, so with
    ``no_decay_on_norm_bias_prelu=False`` the result is a single ``"decay"`` group.

    Args:
        model: the network.
        weight_decay: L2 weight decay of the ``"decay"`` group (>= 0).
        no_decay_on_norm_bias_prelu: when False, every trainable parameter decays.

    Returns:
        Param-group dicts for a :class:`torch.optim.Optimizer`, each with the keys ``params``
        (list of parameters), ``weight_decay`` and ``name`` (``"decay"`` or ``"no_decay"``).

    Raises:
        ValueError: ``weight_decay`` is negative, or ``model`` has no trainable parameter.
    """
    if weight_decay < 0:
        raise ValueError(f"param_groups: weight_decay = {weight_decay!r}: expected a number >= 0")
    exempt: set[int] = set()
    if no_decay_on_norm_bias_prelu:
        # A parameter tied between two modules is seen under each of them here.
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if _exempt_from_decay(module, name):
                    exempt.add(id(p))
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    # named_parameters() yields each shared parameter once (remove_duplicate defaults to True).
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if id(p) in exempt else decay).append(p)
    if not decay and not no_decay:
        raise ValueError(f"param_groups: {type(model).__name__} has no trainable parameter")
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay), "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def _sgd(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
    )


def _adam(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _adamw(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


_OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]], OptimConfig], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
}


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` over :func:`param_groups` of ``model``.

    ``sgd``: :class:`torch.optim.SGD` with ``cfg.momentum`` and ``cfg.nesterov`` (coupled L2 decay,
    added to the gradient). ``adam``: :class:`torch.optim.Adam` with ``cfg.betas`` (coupled L2 decay, as the
    official MS-loss code). ``adamw``: :class:`torch.optim.AdamW` with ``cfg.betas`` (decoupled decay,
    ``p *= 1 - lr * weight_decay``). Both start at ``lr = cfg.lr``; the schedule scales it per step.
    ``cfg.grad_clip`` and ``cfg.grad_accum`` are the training loop's business, not the optimizer's.

    Args:
        model: the network; its trainable parameters are optimised.
        cfg: the ``optim`` section of the run's config.

    Returns:
        The optimizer; its param groups carry a ``name`` key (``"decay"`` / ``"no_decay"``).

    Raises:
        ValueError: ``cfg.name`` is not a known optimizer (the message lists the known ones).
    """
    make = _OPTIMIZERS.get(cfg.name)
    if make is None:
        raise ValueError(f"optim.name = {cfg.name!r}: expected one of {', '.join(sorted(_OPTIMIZERS))}")
    groups = param_groups(model, cfg.weight_decay, cfg.no_decay_on_norm_bias_prelu)
    return make(groups, cfg)
