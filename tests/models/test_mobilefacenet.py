"""Tests for MobileFaceNet (``mbf``, insightface arcface_torch compatible)."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from facems.models import MobileFaceNet, create_model
from facems.models.mobilefacenet import mbf

# Measured with sum(p.numel() for p in model.parameters()), num_features=512, blocks (1,4,6,2), scale 2.
MBF_PARAMS = 2_059_520
# insightface's model table reports MobileFaceNet as 0.45 "GFLOPs"; that table counts multiply-adds
# (iresnet50 is listed as 6.3, which FlopCounterMode measures as 12.6e9 FLOPs = 6.3e9 MACs).
INSIGHTFACE_MBF_GMACS = 0.45


@pytest.fixture(scope="module")
def model() -> MobileFaceNet:
    torch.manual_seed(0)
    return mbf()


def test_output_shape(model: MobileFaceNet) -> None:
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512)
    assert out.dtype == torch.float32


def test_num_features_kwarg() -> None:
    m = create_model("mbf", num_features=128)
    assert isinstance(m, MobileFaceNet)
    assert m.features.layers[2].out_features == 128


def test_param_count(model: MobileFaceNet) -> None:
    assert sum(p.numel() for p in model.parameters()) == MBF_PARAMS


def test_flops_match_insightface(model: MobileFaceNet) -> None:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 112, 112))
    gmacs = counter.get_total_flops() / 2 / 1e9
    assert gmacs == pytest.approx(INSIGHTFACE_MBF_GMACS, rel=0.10)


def test_fp32_head_under_bf16_autocast() -> None:
    # A slim variant: bf16 grouped convolutions are very slow on CPU, and the head logic is identical.
    torch.manual_seed(0)
    model = MobileFaceNet(blocks=(1, 1, 1, 1), scale=1).eval()
    seen: dict[str, torch.dtype] = {}

    def pre_hook(key: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen[key] = args[0].dtype

        return hook

    handles = [
        model.layers[-1].register_forward_hook(lambda _m, _a, out: seen.__setitem__("body_out", out.dtype)),
        model.conv_sep.register_forward_pre_hook(pre_hook("conv_sep_in")),
        model.features.layers[2].register_forward_pre_hook(pre_hook("linear_in")),
    ]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randn(2, 3, 112, 112))
    finally:
        for h in handles:
            h.remove()
    assert seen["body_out"] == torch.bfloat16  # the body did run under autocast
    assert seen["conv_sep_in"] == torch.float32
    assert seen["linear_in"] == torch.float32
    assert out.dtype == torch.float32


def test_state_dict_insightface_names(model: MobileFaceNet) -> None:
    sd = model.state_dict()
    expected_shapes = {
        "layers.0.layers.0.weight": (128, 3, 3, 3),
        "layers.0.layers.1.running_var": (128,),
        "layers.0.layers.2.weight": (128,),
        "layers.1.layers.0.weight": (128, 2, 3, 3),  # groups=64 on 128 channels
        "layers.2.layers.0.layers.0.weight": (128, 128, 1, 1),
        "layers.2.layers.1.layers.0.weight": (128, 1, 3, 3),
        "layers.2.layers.2.layers.1.running_mean": (128,),
        "layers.3.layers.3.layers.1.layers.0.weight": (128, 1, 3, 3),
        "layers.4.layers.0.layers.0.weight": (256, 128, 1, 1),
        "layers.5.layers.5.layers.2.layers.0.weight": (256, 256, 1, 1),
        "layers.6.layers.0.layers.0.weight": (512, 256, 1, 1),
        "layers.6.layers.2.layers.0.weight": (256, 512, 1, 1),
        "layers.7.layers.1.layers.2.layers.1.weight": (256,),
        "conv_sep.layers.0.weight": (512, 256, 1, 1),
        "conv_sep.layers.2.weight": (512,),
        "features.layers.0.layers.0.weight": (512, 1, 7, 7),
        "features.layers.0.layers.1.running_mean": (512,),
        "features.layers.2.weight": (512, 512),
        "features.layers.3.running_var": (512,),
    }
    for key, shape in expected_shapes.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert "features.layers.2.bias" not in sd
    assert "layers.8.layers.0.weight" not in sd
    assert len(model.layers) == 8


def test_wrong_input_size_raises(model: MobileFaceNet) -> None:
    with pytest.raises(ValueError, match="112"):
        model(torch.randn(1, 3, 128, 128))


def test_residual_stem_variant() -> None:
    with torch.device("meta"):
        m = MobileFaceNet(blocks=(2, 8, 12, 4), scale=4)  # insightface get_mbf_large
    keys = m.state_dict().keys()
    assert "layers.1.layers.1.layers.0.layers.0.weight" in keys
    assert m.conv_sep.layers[0].in_channels == 512
