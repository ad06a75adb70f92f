"""BN-Inception: the weights file's layout, an independent re-computation, loading, the registry entry.

``tests/fixtures/bninception_keys.json`` lists the keys and shapes of ``bn_inception-52deb4733.pth``
(the ImageNet weights the official MS-loss code loads). It was written from the layer definitions of
Cadene's ``pretrainedmodels/models/bninception.py`` (commit 87e97515, which loads that file with a
strict ``load_state_dict``) and the MS-loss repository's ``backbone/bninception.py``, not from facems;
its ``source`` field says so. The real file is not available to the tests, so every "pretrained" file
here is written by the test from that key list with random values.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facems.models import BNInception, RetrievalNet, WeightsError, caffe_preprocess, create_model, freeze_bn
from facems.models.bninception import INCEPTION_BLOCKS, InceptionSpec
from facems.models.heads import EmbeddingHead

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "bninception_keys.json"


def _fixture() -> dict:
    with open(FIXTURE) as f:
        return json.load(f)


def _file_keys() -> list[tuple[str, list[int]]]:
    return [(k, list(s)) for k, s in _fixture()["keys"]]


def _layout(model: nn.Module) -> list[tuple[str, list[int]]]:
    return [
        (k, list(v.shape)) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
    ]


def _fake_weights(gen: torch.Generator, bn_rows: bool = False) -> dict[str, Tensor]:
    """A state_dict with the file's keys and shapes and random values (variances positive)."""
    state: dict[str, Tensor] = {}
    for key, shape in _file_keys():
        t = torch.randn(shape, generator=gen) * 0.05
        if key.endswith("running_var"):
            t = torch.rand(shape, generator=gen) + 0.5
        if bn_rows and "_bn." in key:
            t = t.unsqueeze(0)  # the (1, C) BatchNorm vectors of older Caffe ports
        state[key] = t
    return state


# ----------------------------------------------------------------------------------------------- layout


def test_fixture_is_self_consistent() -> None:
    doc = _fixture()
    keys = _file_keys()
    assert doc["num_tensors"] == len(keys) == 416
    assert doc["num_elements"] == sum(math.prod(s) for _, s in keys)
    assert len({k for k, _ in keys}) == len(keys)


def test_state_dict_matches_weights_file_exactly() -> None:
    model = BNInception(num_classes=1000)
    assert _layout(model) == _file_keys()  # same keys, same order, same shapes


def test_feature_trunk_is_the_file_without_classifier() -> None:
    expected = [(k, s) for k, s in _file_keys() if not k.startswith("last_linear.")]
    assert _layout(BNInception()) == expected


def test_only_extra_keys_are_batch_counters() -> None:
    model = BNInception()
    extra = [k for k in model.state_dict() if k.endswith("num_batches_tracked")]
    bn_layers = sorted({k.rsplit(".", 1)[0] for k, _ in _file_keys() if k.endswith(".running_mean")})
    assert sorted(k.rsplit(".", 1)[0] for k in extra) == bn_layers
    assert len(bn_layers) == 69  # 3 stem convolutions + 66 in the inception blocks


def test_layers_are_caffe_style() -> None:
    model = BNInception()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 69
    assert all(c.bias is not None for c in convs)
    assert all(b.affine and b.eps == 1e-5 and b.momentum == 0.1 for b in bns)


def test_parameter_count() -> None:
    # Stated in BNInception's docstring; recomputed here from the fixture (all tensors but running stats).
    from_file = sum(math.prod(s) for k, s in _file_keys() if not k.endswith(("running_mean", "running_var")))
    classifier = 1024 * 1000 + 1000
    assert sum(p.numel() for p in BNInception(num_classes=1000).parameters()) == from_file == 11_295_240
    assert sum(p.numel() for p in BNInception().parameters()) == from_file - classifier == 10_270_240


def test_block_table_chains() -> None:
    channels = 192
    for spec in INCEPTION_BLOCKS:
        assert spec.in_channels == channels
        channels = spec.out_channels
    assert channels == 1024


# ------------------------------------------------------------------------------- independent forward


def _bn_relu_conv(state: dict[str, Tensor], name: str, x: Tensor, stride: int = 1) -> Tensor:
    """conv (padding k//2) -> written-out inference BatchNorm -> max(0, .)."""
    w = state[f"{name}.weight"]
    y = F.conv2d(x, w, state[f"{name}.bias"], stride=stride, padding=w.shape[-1] // 2)
    mean = state[f"{name}_bn.running_mean"].view(1, -1, 1, 1)
    var = state[f"{name}_bn.running_var"].view(1, -1, 1, 1)
    gamma = state[f"{name}_bn.weight"].view(1, -1, 1, 1)
    beta = state[f"{name}_bn.bias"].view(1, -1, 1, 1)
    y = (y - mean) / torch.sqrt(var + 1e-5) * gamma + beta
    return torch.clamp(y, min=0.0)


def _avg3x3_same(x: Tensor) -> Tensor:
    """3x3 mean over a zero-padded window, divisor always 9 (Caffe's AVE pooling with pad 1)."""
    c = x.shape[1]
    kernel = torch.full((c, 1, 3, 3), 1.0 / 9.0, dtype=x.dtype)
    return F.conv2d(F.pad(x, (1, 1, 1, 1)), kernel, groups=c)


def _max3x3(x: Tensor, stride: int, pad: int) -> Tensor:
    """3x3 max over windows starting every ``stride`` (Caffe rounds the output size up)."""
    h, w = x.shape[-2:]
    out_h = -(-(h + 2 * pad - 3) // stride) + 1
    out_w = -(-(w + 2 * pad - 3) // stride) + 1
    need_h = (out_h - 1) * stride + 3 - h - pad
    need_w = (out_w - 1) * stride + 3 - w - pad
    xp = F.pad(x, (pad, need_w, pad, need_h), value=float("-inf"))
    windows = [
        xp[:, :, i : i + (out_h - 1) * stride + 1 : stride, j : j + (out_w - 1) * stride + 1 : stride]
        for i in range(3)
        for j in range(3)
    ]
    return torch.stack(windows).amax(0)


def _ref_block(state: dict[str, Tensor], spec: InceptionSpec, x: Tensor) -> Tensor:
    p = f"inception_{spec.name}"
    out = []
    if spec.c1x1:
        out.append(_bn_relu_conv(state, f"{p}_1x1", x))
    out.append(_bn_relu_conv(state, f"{p}_3x3", _bn_relu_conv(state, f"{p}_3x3_reduce", x), spec.stride))
    d = _bn_relu_conv(state, f"{p}_double_3x3_reduce", x)
    d = _bn_relu_conv(state, f"{p}_double_3x3_1", d)
    out.append(_bn_relu_conv(state, f"{p}_double_3x3_2", d, spec.stride))
    if spec.stride == 2:
        out.append(_max3x3(x, 2, 0))
    elif spec.pool == "avg":
        out.append(_bn_relu_conv(state, f"{p}_pool_proj", _avg3x3_same(x)))
    else:
        out.append(_bn_relu_conv(state, f"{p}_pool_proj", _max3x3(x, 1, 1)))
    return torch.cat(out, 1)


def _ref_forward(state: dict[str, Tensor], x: Tensor) -> Tensor:
    x = _bn_relu_conv(state, "conv1_7x7_s2", x, stride=2)
    x = _max3x3(x, 2, 0)
    x = _bn_relu_conv(state, "conv2_3x3_reduce", x)
    x = _bn_relu_conv(state, "conv2_3x3", x)
    x = _max3x3(x, 2, 0)
    for spec in INCEPTION_BLOCKS:
        x = _ref_block(state, spec, x)
    return x.amax(dim=(2, 3))


@pytest.fixture(scope="module")
def loaded_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[BNInception, dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(0)
    state = _fake_weights(gen)
    path = tmp_path_factory.mktemp("bn") / "bn_inception-52deb4733.pth"
    torch.save(state, path)
    model = BNInception(pretrained=str(path)).double().eval()
    return model, {k: v.double() for k, v in state.items()}


@pytest.mark.parametrize("name, side", [("3a", 28), ("3c", 28), ("4e", 14), ("5b", 7)])
def test_inception_block_matches_plain_recomputation(
    loaded_model: tuple[BNInception, dict[str, Tensor]], name: str, side: int
) -> None:
    model, state = loaded_model
    spec = next(s for s in INCEPTION_BLOCKS if s.name == name)
    x = torch.randn(
        2, spec.in_channels, side, side, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    with torch.no_grad():
        got = model.inception(spec, x)
    want = _ref_block(state, spec, x)
    assert got.shape == want.shape == (2, spec.out_channels, *want.shape[-2:])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_full_forward_matches_plain_recomputation(
    loaded_model: tuple[BNInception, dict[str, Tensor]],
) -> None:
    model, state = loaded_model
    x = torch.randn(2, 3, 67, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 50
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, _ref_forward(state, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("side", [224, 227])
def test_output_shape_and_final_map(side: int) -> None:
    torch.manual_seed(0)
    model = BNInception().eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        fmap = model.forward_features(x)
        feats = model(x)
    assert fmap.shape == (2, 1024, 7, 7)
    assert feats.shape == (2, 1024)
    torch.testing.assert_close(feats, fmap.amax(dim=(2, 3)))


def test_avg_pool_and_classifier_options() -> None:
    torch.manual_seed(0)
    model = BNInception(pool="avg", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fmap = model.forward_features(x)
        logits = model(x)
    assert model.last_linear is not None
    torch.testing.assert_close(logits, model.last_linear(fmap.mean(dim=(2, 3))))
    with pytest.raises(ValueError, match="pool='sum'"):
        BNInception(pool="sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="inception_3c: a"):
        model(torch.randn(1, 3, 64, 61))  # width 61 leaves an odd 7-wide map before inception_3c


def test_grad_checkpoint_gives_the_same_gradients() -> None:
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = freeze_bn(BNInception(grad_checkpoint=ckpt).train())
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])  # type: ignore[union-attr]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------- preprocess


def test_caffe_preprocess_against_numpy() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(3, 3, 5, 4), dtype=np.uint8)
    flip = np.array([False, True, False])
    want = rgb[:, ::-1].astype(np.float64) - np.array([104.0, 117.0, 128.0]).reshape(1, 3, 1, 1)
    want[1] = want[1][..., ::-1]
    got = caffe_preprocess(torch.from_numpy(rgb), torch.from_numpy(flip), channels_last=True)
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(got.numpy(), want.astype(np.float32))
    # A pure red pixel is (B, G, R) = (0, 0, 255) before the mean.
    red = torch.zeros(1, 3, 1, 1, dtype=torch.uint8)
    red[0, 0] = 255
    assert caffe_preprocess(red).flatten().tolist() == [-104.0, -117.0, 127.0]


def test_caffe_preprocess_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        caffe_preprocess(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="flip of shape"):
        caffe_preprocess(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.bool))


# -------------------------------------------------------------------------------------------- loading


def test_pretrained_loads_every_tensor(tmp_path: Path) -> None:
    state = _fake_weights(torch.Generator().manual_seed(4))
    path = tmp_path / "w.pth"
    torch.save(state, path)
    model = BNInception(pretrained=path)
    own = model.state_dict()
    for key, value in state.items():
        if key.startswith("last_linear."):
            assert key not in own
        else:
            assert torch.equal(own[key], value), key
    full = BNInception(num_classes=1000, pretrained=str(path)).state_dict()
    assert all(torch.equal(full[k], v) for k, v in state.items())


def test_pretrained_accepts_row_vectors_and_batch_counters(tmp_path: Path) -> None:
    state = _fake_weights(torch.Generator().manual_seed(5), bn_rows=True)
    assert state["conv1_7x7_s2_bn.weight"].shape == (1, 64)
    state["conv2_3x3_bn.num_batches_tracked"] = torch.tensor(7)
    path = tmp_path / "old_port.pth"
    torch.save(state, path)
    own = BNInception(pretrained=path).state_dict()
    torch.testing.assert_close(own["conv1_7x7_s2_bn.weight"], state["conv1_7x7_s2_bn.weight"][0])
    torch.testing.assert_close(
        own["inception_5b_pool_proj_bn.running_var"], state["inception_5b_pool_proj_bn.running_var"][0]
    )
    assert int(own["conv2_3x3_bn.num_batches_tracked"]) == 7
    assert int(own["conv1_7x7_s2_bn.num_batches_tracked"]) == 0


def test_pretrained_errors_name_file_and_keys(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(6)
    missing_file = tmp_path / "nowhere" / "bn_inception-52deb4733.pth"
    with pytest.raises(WeightsError, match="no such file") as e:
        BNInception(pretrained=missing_file)
    assert str(missing_file) in str(e.value)

    state = _fake_weights(gen)
    del state["inception_4d_1x1.weight"]
    state["inception_9z_1x1.weight"] = torch.zeros(1)
    state["inception_3a_3x3.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as e:
        BNInception(pretrained=path)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing key(s): inception_4d_1x1.weight" in msg
    assert "unexpected key(s): inception_9z_1x1.weight" in msg
    assert "inception_3a_3x3.weight: file [64, 64, 1, 1], model [64, 64, 3, 3]" in msg

    not_a_state = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_state)
    with pytest.raises(WeightsError, match="expected a state_dict"):
        BNInception(pretrained=not_a_state)


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickled code ran",))


def test_pretrained_never_unpickles_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1_7x7_s2.weight": _Exploit()}, f, protocol=2)
    with pytest.raises(WeightsError, match="weights_only=True"):
        BNInception(pretrained=path)
    assert "unpickled code ran" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------ registry + head


def test_registry_builds_the_retrieval_network(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("bninception")
    assert isinstance(model, RetrievalNet) and isinstance(model.backbone, BNInception)
    assert model.num_features == 512 and model.input_size == 227
    assert model.head.fc.in_features == 1024 and model.head.fc.out_features == 512
    images = torch.randint(0, 256, (2, 3, 227, 227), dtype=torch.uint8)
    x = model.preprocess(images)
    torch.testing.assert_close(x, caffe_preprocess(images))
    model.eval()
    with torch.no_grad():
        emb = model(x)
        want = F.normalize(model.head.fc(model.backbone(x)), dim=1)
    assert emb.shape == (2, 512) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(emb, want)

    small = create_model("bninception", num_features=64, pool="avg", normalize=False, dropout=0.1)
    assert isinstance(small, RetrievalNet)
    assert small.head.fc.out_features == 64 and small.head.dropout.p == pytest.approx(0.1)
    assert isinstance(small.backbone, BNInception) and small.backbone.pool == "avg"

    state = _fake_weights(torch.Generator().manual_seed(7))
    path = tmp_path / "bn_inception-52deb4733.pth"
    torch.save(state, path)
    pre = create_model("bninception", pretrained=str(path))
    assert isinstance(pre, RetrievalNet)
    assert torch.equal(pre.state_dict()["backbone.inception_5b_3x3.weight"], state["inception_5b_3x3.weight"])


def test_frozen_batch_norm_survives_train_and_keeps_statistics() -> None:
    torch.manual_seed(0)
    model = create_model("bninception", num_features=32)
    model.eval()
    model.train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert model.training and model.head.training
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    out = model(torch.randn(2, 3, 64, 64))
    out.sum().backward()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(m.weight.grad is not None for m in bns)  # affine parameters still train

    free = create_model("bninception", num_features=32, freeze_bn=False)
    free.train()
    assert all(m.training for m in free.modules() if isinstance(m, nn.BatchNorm2d))
    mean_before = free.state_dict()["backbone.conv1_7x7_s2_bn.running_mean"].clone()
    free(torch.randn(2, 3, 64, 64))
    assert not torch.equal(free.state_dict()["backbone.conv1_7x7_s2_bn.running_mean"], mean_before)


def test_freeze_bn_function() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.BatchNorm1d(4), nn.Dropout()
    ).train()
    assert freeze_bn(net) is net
    assert [m.training for m in net] == [True, False, True, False, True]
    net.train()
    assert all(m.training for m in net)


def test_embedding_head_init_and_forward() -> None:
    torch.manual_seed(0)
    head = EmbeddingHead(2048, 512)
    w = head.fc.weight.detach()
    # kaiming_normal_(mode="fan_out", a=0): std = sqrt(2 / fan_out) with fan_out = 512 outputs.
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / 512), rel=0.01)
    assert abs(w.mean().item()) < 1e-3
    assert torch.count_nonzero(head.fc.bias) == 0
    x = torch.randn(3, 2048, dtype=torch.float64)
    with torch.no_grad():
        head.fc.bias.normal_()
        got = head(x.float())
    raw = x @ head.fc.weight.detach().double().T + head.fc.bias.detach().double()
    want = raw / raw.norm(dim=1, keepdim=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"dropout=1\.5"):
        EmbeddingHead(8, 4, dropout=1.5)
