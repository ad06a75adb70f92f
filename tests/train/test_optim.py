"""Tests of facems.train.optim: parameter groups and the optimizer builder."""

import dataclasses

import pytest
import torch
from torch import nn

from facems.config import OptimConfig
from facems.models import create_model
from facems.train.optim import build_optimizer, param_groups


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return create_model("iresnet_tiny")


def _names(model: nn.Module, params: list) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


def _expected_split(model: nn.Module) -> tuple[set[str], set[str]]:
    """Reference split by walking modules: BN weight/bias, any bias, PReLU weight -> no decay."""
    decay, no_decay = set(), set()
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        for pname, p in m.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = prefix + pname
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.PReLU)):
                no_decay.add(full)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                (no_decay if pname == "bias" else decay).add(full)
            else:
                raise AssertionError(f"unexpected parameter {full} in {type(m).__name__}")
    return decay, no_decay


def test_iresnet_tiny_groups(tiny: nn.Module) -> None:
    groups = param_groups(tiny, 5e-4)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    decay, no_decay = _names(tiny, groups[0]["params"]), _names(tiny, groups[1]["params"])
    exp_decay, exp_no_decay = _expected_split(tiny)
    assert decay == exp_decay
    assert no_decay == exp_no_decay
    # Spot checks on names a reader recognises.
    assert {"conv1.weight", "fc.weight", "layer1.0.conv1.weight"} <= decay
    assert {"bn1.weight", "bn1.bias", "prelu.weight", "fc.bias", "features.bias"} <= no_decay
    assert {"layer1.0.prelu.weight", "layer2.0.downsample.1.weight"} <= no_decay
    assert "features.weight" not in decay | no_decay
    # Each trainable parameter exactly once, in total.
    flat = [p for g in groups for p in g["params"]]
    trainable = [p for p in tiny.parameters() if p.requires_grad]
    assert len(flat) == len({id(p) for p in flat}) == len(trainable)
    assert {id(p) for p in flat} == {id(p) for p in trainable}


def test_all_decay_when_disabled(tiny: nn.Module) -> None:
    groups = param_groups(tiny, 1e-3, no_decay_on_norm_bias_prelu=False)
    assert len(groups) == 1
    assert groups[0]["name"] == "decay" and groups[0]["weight_decay"] == 1e-3
    names = _names(tiny, groups[0]["params"])
    assert names == {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert "features.weight" not in names


class _Mixed(nn.Module):
    """Other norm layers, a tied weight, a bare parameter and a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 6, bias=False)
        self.head = nn.Linear(6, 4)
        self.head.weight = nn.Parameter(self.emb.weight.t().contiguous())
        self.tied = nn.Linear(4, 6, bias=False)
        self.tied.weight = self.emb.weight  # shared parameter
        self.ln = nn.LayerNorm(6)
        self.gn = nn.GroupNorm(2, 6)
        self.inorm = nn.InstanceNorm1d(6, affine=True)
        self.scale = nn.Parameter(torch.ones(3))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.shared_ln = self.ln  # shared module


def test_other_norms_shared_and_frozen() -> None:
    m = _Mixed()
    groups = {g["name"]: g for g in param_groups(m, 0.1)}
    decay = groups["decay"]["params"]
    no_decay = groups["no_decay"]["params"]
    ids_decay = {id(p) for p in decay}
    ids_no = {id(p) for p in no_decay}
    assert ids_decay == {id(m.emb.weight), id(m.head.weight), id(m.scale)}
    assert ids_no == {id(p) for p in (m.head.bias, m.ln.weight, m.ln.bias, m.gn.weight, m.gn.bias)} | {
        id(m.inorm.weight),
        id(m.inorm.bias),
    }
    assert len(decay) == 3 and len(no_decay) == 7  # the tied weight and shared LayerNorm appear once
    assert id(m.frozen) not in ids_decay | ids_no


def test_param_groups_errors() -> None:
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(nn.Linear(2, 2), -1.0)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        param_groups(frozen, 0.0)


def test_build_sgd_hyperparameters(tiny: nn.Module) -> None:
    cfg = OptimConfig(name="sgd", lr=0.2, momentum=0.8, nesterov=True, weight_decay=1e-3)
    opt = build_optimizer(tiny, cfg)
    assert type(opt) is torch.optim.SGD
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
    for g, wd in zip(opt.param_groups, [1e-3, 0.0]):
        assert g["lr"] == 0.2 and g["momentum"] == 0.8 and g["nesterov"] is True
        assert g["weight_decay"] == wd


def test_build_adamw_hyperparameters(tiny: nn.Module) -> None:
    cfg = OptimConfig(name="adamw", lr=1e-3, betas=(0.8, 0.95), weight_decay=0.05)
    opt = build_optimizer(tiny, cfg)
    assert type(opt) is torch.optim.AdamW
    for g, wd in zip(opt.param_groups, [0.05, 0.0]):
        assert g["lr"] == 1e-3 and g["betas"] == (0.8, 0.95) and g["weight_decay"] == wd


def test_build_optimizer_bad_name(tiny: nn.Module) -> None:
    cfg = dataclasses.replace(OptimConfig(), name="lamb")
    with pytest.raises(ValueError, match=r"optim.name = 'lamb'.*adam, adamw, sgd"):
        build_optimizer(tiny, cfg)


def _set_grads(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=gen)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_step_decays_only_the_decay_group(nesterov: bool) -> None:
    torch.manual_seed(1)
    model = create_model("iresnet_tiny")
    with torch.no_grad():  # BN weights start at 1: make them distinctive so decay would show
        model.bn1.weight.uniform_(0.5, 1.5)
    lr, mom, wd = 0.1, 0.9, 0.05
    opt = build_optimizer(model, OptimConfig(lr=lr, momentum=mom, nesterov=nesterov, weight_decay=wd))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _set_grads(model, 2)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    # First step of torch's SGD: d = g + wd * p; buf = d; with Nesterov d + mom * buf; p -= lr * that.
    scale = 1.0 + mom if nesterov else 1.0
    params = dict(model.named_parameters())
    for name, p_decay in (("bn1.weight", 0.0), ("prelu.weight", 0.0), ("fc.bias", 0.0), ("conv1.weight", wd)):
        d = grads[name] + p_decay * before[name]
        expected = before[name] - lr * scale * d
        torch.testing.assert_close(params[name].detach(), expected, rtol=1e-6, atol=1e-7)
    # The BN weight moved by the gradient alone, visibly different from a decayed update.
    decayed = before["bn1.weight"] - lr * scale * (grads["bn1.weight"] + wd * before["bn1.weight"])
    assert not torch.allclose(params["bn1.weight"].detach(), decayed, atol=1e-5)
    # The frozen features.weight has no gradient and stays.
    assert torch.equal(params["features.weight"].detach(), before["features.weight"])


def test_adamw_step_decoupled_decay_only_on_decay_group() -> None:
    torch.manual_seed(3)
    model = create_model("iresnet_tiny")
    lr, wd, eps = 1e-2, 0.1, 1e-8
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=lr, weight_decay=wd))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _set_grads(model, 4)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    params = dict(model.named_parameters())
    # First AdamW step: bias-corrected m = g, v = g^2, so p <- p * (1 - lr * wd) - lr * g / (|g| + eps).
    for name, p_decay in (("bn1.bias", 0.0), ("layer1.0.prelu.weight", 0.0), ("fc.weight", wd)):
        g = grads[name].double()
        expected = before[name].double() * (1 - lr * p_decay) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(params[name].detach().double(), expected, rtol=1e-5, atol=1e-6)


def test_adam_step_couples_l2_decay_only_on_decay_group() -> None:
    torch.manual_seed(5)
    model = create_model("iresnet_tiny")
    lr, wd, eps = 1e-2, 0.1, 1e-8
    opt = build_optimizer(model, OptimConfig(name="adam", lr=lr, weight_decay=wd, betas=(0.9, 0.99)))
    assert type(opt) is torch.optim.Adam
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _set_grads(model, 6)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    params = dict(model.named_parameters())
    # First Adam step with L2 decay in the gradient: d = g + wd * p, bias-corrected m = d, v = d^2,
    # so p <- p - lr * d / (|d| + eps): the decay changes the direction's magnitude, not a shrink.
    for name, p_decay in (("bn1.bias", 0.0), ("layer1.0.prelu.weight", 0.0), ("fc.weight", wd)):
        d = grads[name].double() + p_decay * before[name].double()
        expected = before[name].double() - lr * d / (d.abs() + eps)
        torch.testing.assert_close(params[name].detach().double(), expected, rtol=1e-5, atol=1e-6)
