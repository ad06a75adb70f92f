"""Backbone files both ways: insightface-layout state dicts into facems, facems' model.pt out."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from facems.models import WeightsError, create_model, infer_network, load_backbone, open_backbone
from facems.models.loading import IRESNET_STAGES


def _bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.{n}", (c,)) for n in ("weight", "bias", "running_mean", "running_var")] + [
        (f"{prefix}.num_batches_tracked", ())
    ]


def insightface_iresnet_layout(
    stages: tuple[int, ...], width: int = 64, emb: int = 512
) -> list[tuple[str, tuple]]:
    """Keys and shapes of arcface_torch's iresnet ``state_dict``, written out from its architecture."""
    out: list[tuple[str, tuple]] = [
        ("conv1.weight", (width, 3, 3, 3)),
        *_bn("bn1", width),
        ("prelu.weight", (width,)),
    ]
    inplanes = width
    for s, n in enumerate(stages):
        planes = width * 2**s
        for b in range(n):
            p = f"layer{s + 1}.{b}"
            cin = inplanes if b == 0 else planes
            out += _bn(f"{p}.bn1", cin)
            out += [(f"{p}.conv1.weight", (planes, cin, 3, 3))]
            out += _bn(f"{p}.bn2", planes)
            out += [(f"{p}.prelu.weight", (planes,)), (f"{p}.conv2.weight", (planes, planes, 3, 3))]
            out += _bn(f"{p}.bn3", planes)
            if b == 0:
                out += [(f"{p}.downsample.0.weight", (planes, cin, 1, 1)), *_bn(f"{p}.downsample.1", planes)]
        inplanes = planes
    out += _bn("bn2", inplanes)
    out += [("fc.weight", (emb, inplanes * 49)), ("fc.bias", (emb,)), *_bn("features", emb)]
    return out


def random_state(
    layout: list[tuple[str, tuple]], dtype: torch.dtype = torch.float32, seed: int = 0
) -> OrderedDict:
    g = torch.Generator().manual_seed(seed)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape in layout:
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = (torch.rand(shape, generator=g) + 0.5).to(dtype)
        else:
            state[key] = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    return state


@pytest.mark.parametrize("name", ["iresnet18", "iresnet34", "iresnet50", "iresnet100"])
def test_facems_keys_and_shapes_are_insightface_layout(name: str) -> None:
    stages = {v: k for k, v in IRESNET_STAGES.items()}[name]
    ours = [(k, tuple(v.shape)) for k, v in create_model(name).state_dict().items()]
    assert ours == insightface_iresnet_layout(stages)


@pytest.mark.parametrize(
    ("file_kind", "dtype"),
    [
        ("plain", torch.float32),
        ("module", torch.float32),
        ("plain", torch.float16),
        ("module", torch.float16),
    ],
)
def test_insightface_state_dict_loads_with_inferred_network(
    tmp_path: Path, file_kind: str, dtype: torch.dtype
) -> None:
    state = random_state(insightface_iresnet_layout((2, 2, 2, 2), emb=256), dtype)
    saved = OrderedDict((f"module.{k}", v) for k, v in state.items()) if file_kind == "module" else state
    path = tmp_path / "backbone.pth"
    torch.save(saved, path)
    model, name, emb = open_backbone(path)
    assert (name, emb) == ("iresnet18", 256)
    loaded = model.state_dict()
    for key, value in state.items():
        assert loaded[key].dtype == (torch.float32 if value.is_floating_point() else value.dtype)
        torch.testing.assert_close(loaded[key], value.to(loaded[key].dtype), rtol=0, atol=0)
    assert not model.training
    x = torch.randn(2, 3, 112, 112)
    assert model(x).shape == (2, 256)


def test_facems_model_pt_round_trip_and_checkpoint(tmp_path: Path) -> None:
    model = create_model("iresnet_tiny", num_features=64).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    loaded = load_backbone(tmp_path / "model.pt")
    x = torch.randn(3, 3, 112, 112)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # A training checkpoint names its network in the stored config (here deliberately a name the keys
    # alone would not give: the config wins).
    ckpt = {
        "format": 1,
        "model": model.state_dict(),
        "config": {"model": {"name": "iresnet_tiny", "num_features": 64}},
    }
    torch.save(ckpt, tmp_path / "checkpoint_last.pt")
    _, name, emb = open_backbone(tmp_path / "checkpoint_last.pt")
    assert (name, emb) == ("iresnet_tiny", 64)
    torch.save({"state_dict_backbone": model.state_dict()}, tmp_path / "checkpoint_gpu_0.pt")
    assert open_backbone(tmp_path / "checkpoint_gpu_0.pt")[1:] == ("iresnet_tiny", 64)


@pytest.mark.parametrize("name", ["mbf", "iresnet_tiny", "iresnet_tiny_s2", "iresnet_nano_s2"])
def test_small_networks_inferred(name: str) -> None:
    assert infer_network(create_model(name, num_features=128).state_dict()) == (name, 128)


def test_errors_name_the_keys(tmp_path: Path) -> None:
    state = random_state(insightface_iresnet_layout((3, 4, 6, 3)))
    del state["layer2.1.conv1.weight"]
    state["head.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "r34.pth")
    with pytest.raises(
        WeightsError, match=r"missing keys \['layer2.1.conv1.weight'\].*unexpected keys \['head.extra'\]"
    ):
        load_backbone(tmp_path / "r34.pth", "iresnet34")
    with pytest.raises(WeightsError, match="does not fit iresnet50"):
        load_backbone(tmp_path / "r34.pth", "iresnet50")
    odd = random_state(insightface_iresnet_layout((2, 3, 2, 2)))
    torch.save(odd, tmp_path / "odd.pth")
    with pytest.raises(WeightsError, match="2/3/2/2 blocks per stage"):
        load_backbone(tmp_path / "odd.pth")
    wrong_shape = random_state(insightface_iresnet_layout((2, 2, 2, 2)))
    wrong_shape["fc.bias"] = torch.zeros(3)
    torch.save(wrong_shape, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match=r"fc\.bias"):
        load_backbone(tmp_path / "shape.pth", "iresnet18", 512)
    with pytest.raises(WeightsError, match="no such file"):
        load_backbone(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="expected a state_dict"):
        load_backbone(tmp_path / "list.pt")


class _Payload:
    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.target,))

    def __init__(self, target: str) -> None:
        self.target = target


def test_pickled_code_is_refused_and_not_run(tmp_path: Path) -> None:
    target = tmp_path / "created_by_payload"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Payload(str(target))}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="weights_only"):
        load_backbone(tmp_path / "evil.pt")
    assert not target.exists()
