"""Tests for the iResNet backbones (insightface arcface_torch compatible) and all registered models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from facems.models import IBasicBlock, IResNet, create_model, list_models
from facems.models.iresnet import iresnet18, iresnet50, iresnet_tiny

# Exact counts measured with sum(p.numel() for p in model.parameters()) at num_features=512
# (includes the frozen features.weight), and the published insightface sizes they must match.
PARAM_COUNTS = {
    "iresnet18": (24_025_600, 24.0e6),
    "iresnet34": (34_139_328, None),
    "iresnet50": (43_590_848, 43.6e6),
    "iresnet100": (65_156_160, 65.2e6),
    "iresnet200": (118_833_920, 118.8e6),
    "iresnet_tiny": (3_914_752, None),
    "iresnet_tiny_s2": (1_752_064, None),  # iresnet_tiny less its fc difference: 128 * (49 - 16) * 512
    "iresnet_nano_s2": (702_400, None),
}

# Models cheap enough to run forward + backward on 2 CPU cores; the rest are only constructed.
RUNNABLE = {"iresnet_nano_s2", "iresnet_tiny", "iresnet_tiny_s2", "iresnet18", "mbf"}


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _bn_keys(prefix: str) -> list[str]:
    return [f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def _insightface_iresnet_keys(depths: list[int]) -> list[str]:
    """State-dict keys of insightface's iresnet, in registration order."""
    keys = ["conv1.weight", *_bn_keys("bn1"), "prelu.weight"]
    for stage, depth in enumerate(depths, start=1):
        for b in range(depth):
            p = f"layer{stage}.{b}"
            keys += _bn_keys(f"{p}.bn1")
            keys += [f"{p}.conv1.weight"]
            keys += _bn_keys(f"{p}.bn2")
            keys += [f"{p}.prelu.weight", f"{p}.conv2.weight"]
            keys += _bn_keys(f"{p}.bn3")
            if b == 0:
                keys += [f"{p}.downsample.0.weight", *_bn_keys(f"{p}.downsample.1")]
    keys += _bn_keys("bn2")
    keys += ["fc.weight", "fc.bias"]
    keys += _bn_keys("features")
    return keys


@pytest.fixture(scope="module")
def r18() -> IResNet:
    torch.manual_seed(0)
    return iresnet18()


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts(name: str) -> None:
    exact, published = PARAM_COUNTS[name]
    with torch.device("meta"):
        model = create_model(name)
    n = _num_params(model)
    assert n == exact
    if published is not None:
        assert abs(n - published) / published < 0.005


def test_r18_state_dict_keys_match_insightface(r18: IResNet) -> None:
    assert list(r18.state_dict().keys()) == _insightface_iresnet_keys([2, 2, 2, 2])


@pytest.mark.parametrize(
    ("name", "depths"),
    [("iresnet34", [3, 4, 6, 3]), ("iresnet100", [3, 13, 30, 3]), ("iresnet200", [6, 26, 60, 6])],
)
def test_deeper_state_dict_keys_match_insightface(name: str, depths: list[int]) -> None:
    with torch.device("meta"):
        model = create_model(name)
    assert list(model.state_dict().keys()) == _insightface_iresnet_keys(depths)


def test_r18_key_shapes(r18: IResNet) -> None:
    sd = r18.state_dict()
    assert sd["conv1.weight"].shape == (64, 3, 3, 3)
    assert sd["layer1.0.conv1.weight"].shape == (64, 64, 3, 3)
    assert sd["layer2.0.bn1.weight"].shape == (64,)
    assert sd["layer2.0.conv1.weight"].shape == (128, 64, 3, 3)
    assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert sd["layer4.1.prelu.weight"].shape == (512,)
    assert sd["fc.weight"].shape == (512, 512 * 7 * 7)
    assert r18.layer2[0].conv2.stride == (2, 2)
    assert r18.layer2[0].conv1.stride == (1, 1)
    assert r18.layer2[0].downsample[0].stride == (2, 2)


def test_r50_keys_and_shapes() -> None:
    model = iresnet50()
    sd = model.state_dict()
    assert list(sd.keys()) == _insightface_iresnet_keys([3, 4, 14, 3])
    assert sd["layer2.0.downsample.1.running_mean"].shape == (128,)
    assert sd["layer3.13.bn3.weight"].shape == (256,)
    assert sd["fc.weight"].shape == (512, 25088)
    assert sd["features.weight"].shape == (512,)
    assert torch.all(model.features.weight == 1.0)
    assert model.features.weight.requires_grad is False
    assert model.features.bias.requires_grad is True


def test_init_matches_insightface(r18: IResNet) -> None:
    w = r18.layer3[0].conv1.weight
    assert abs(w.mean().item()) < 0.01
    assert w.std().item() == pytest.approx(0.1, rel=0.05)
    for m in r18.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert not any(torch.all(m.bn3.weight == 0) for m in r18.modules() if isinstance(m, IBasicBlock))


def test_zero_init_residual() -> None:
    model = iresnet_tiny(zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, IBasicBlock)]
    assert len(blocks) == 8
    for blk in blocks:
        assert torch.all(blk.bn3.weight == 0)
        assert torch.all(blk.bn2.weight == 1)


def test_tiny_widths() -> None:
    model = iresnet_tiny()
    assert model.conv1.out_channels == 16
    assert [model.layer1[0].conv2.out_channels, model.layer2[0].conv2.out_channels] == [16, 32]
    assert [model.layer3[0].conv2.out_channels, model.layer4[0].conv2.out_channels] == [64, 128]
    assert model.fc.in_features == 128 * 7 * 7
    assert model.fc.out_features == 512
    assert iresnet_tiny(num_features=128).fc.out_features == 128


def test_nano_s2_is_tiny_s2_at_half_width() -> None:
    nano, tiny = create_model("iresnet_nano_s2"), create_model("iresnet_tiny_s2")
    assert nano.conv1.out_channels == 8 and nano.conv1.stride == (2, 2)
    assert [nano.layer1[0].conv2.out_channels, nano.layer2[0].conv2.out_channels] == [8, 16]
    assert [nano.layer3[0].conv2.out_channels, nano.layer4[0].conv2.out_channels] == [32, 64]
    assert nano.fc.in_features == 64 * 4 * 4 and nano.fc.out_features == 512
    assert list(nano.state_dict()) == list(tiny.state_dict())  # same layout, insightface key names
    assert nano.eval()(torch.zeros(2, 3, 112, 112)).shape == (2, 512)


def test_output_shape_and_dtype(r18: IResNet) -> None:
    x = torch.randn(2, 3, 112, 112)
    tiny = iresnet_tiny().eval()
    r18.eval()
    with torch.no_grad():
        for model in (tiny, r18):
            out = model(x)
            assert out.shape == (2, 512)
            assert out.dtype == torch.float32


def test_fp32_head_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = iresnet_tiny().eval()
    seen: dict[str, torch.dtype] = {}

    def record_fc_input(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen["fc_in"] = args[0].dtype

    def record_body_output(_m: nn.Module, _args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen["layer4_out"] = out.dtype

    model.fc.register_forward_pre_hook(record_fc_input)
    model.layer4.register_forward_hook(record_body_output)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 112, 112))
    assert seen["layer4_out"] == torch.bfloat16  # the body did run under autocast
    assert seen["fc_in"] == torch.float32
    assert out.dtype == torch.float32
    assert out.shape == (2, 512)


def test_grad_checkpoint_matches_plain() -> None:
    torch.manual_seed(0)
    plain = iresnet_tiny().train()
    ckpt = iresnet_tiny(grad_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    # A pre-hook: non-reentrant checkpointing may stop the recomputation early, skipping post-hooks.
    ckpt.layer1[0].register_forward_pre_hook(lambda *_: calls.append(1))

    x = torch.randn(2, 3, 112, 112)
    proj = torch.randn(2, 512)
    out_plain = plain(x)
    out_ckpt = ckpt(x)
    (out_plain * proj).sum().backward()
    (out_ckpt * proj).sum().backward()

    torch.testing.assert_close(out_ckpt, out_plain, atol=1e-5, rtol=1e-5)
    for (name, p_plain), (_, p_ckpt) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if p_plain.grad is None:
            assert p_ckpt.grad is None, name
            continue
        assert p_ckpt.grad is not None, name
        torch.testing.assert_close(p_ckpt.grad, p_plain.grad, atol=1e-5, rtol=1e-5, msg=name)
    assert len(calls) == 2  # forward + recomputation during backward => checkpointing was active


def test_grad_checkpoint_inactive_in_eval() -> None:
    model = iresnet_tiny(grad_checkpoint=True).eval()
    calls = []
    model.layer1[0].register_forward_pre_hook(lambda *_: calls.append(1))
    model(torch.randn(2, 3, 112, 112)).sum().backward()
    assert len(calls) == 1


def test_dropout_arg() -> None:
    assert iresnet_tiny().dropout.p == 0.0
    assert iresnet_tiny(dropout=0.4).dropout.p == pytest.approx(0.4)


@pytest.mark.parametrize("shape", [(2, 3, 96, 96), (2, 3, 112, 96), (3, 112, 112)])
def test_wrong_input_size_raises(shape: tuple[int, ...]) -> None:
    model = iresnet_tiny()
    with pytest.raises(ValueError, match="112"):
        model(torch.randn(*shape))


def test_features_weight_frozen_after_sgd_step() -> None:
    torch.manual_seed(0)
    model = iresnet_tiny().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    fc_before = model.fc.weight.detach().clone()
    out = model(torch.randn(4, 3, 112, 112))
    (out * torch.randn_like(out)).sum().backward()
    assert model.features.weight.grad is None
    opt.step()
    assert torch.all(model.features.weight == 1.0)
    assert not torch.equal(model.fc.weight, fc_before)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model(name: str) -> None:
    if name not in RUNNABLE:
        # Too slow to run on 2 CPU cores: construct (on the meta device) and check the head only.
        with torch.device("meta"):
            model = create_model(name, num_features=256)
        assert _num_params(model) > 0
        return
    torch.manual_seed(0)
    model = create_model(name).train()
    out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
