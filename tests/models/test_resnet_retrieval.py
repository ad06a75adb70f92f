"""ResNet-50 retrieval trunk: torchvision's layout and numbers, local/cached weights only, registry entry.

torchvision itself is the independent reference: the trunk must hold exactly its ``resnet50`` tensors
apart from ``fc`` and give the output of its own forward (up to the pooling). No file is downloaded:
``torch.hub.download_url_to_file`` is replaced by a function that fails the test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import Tensor, nn
from torchvision.models import ResNet50_Weights
from torchvision.models import resnet50 as tv_resnet50

from facems.models import (
    ResNet50Trunk,
    RetrievalNet,
    WeightsError,
    create_model,
    imagenet_preprocess,
    list_models,
    torchvision_resnet50_weights,
)


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a download was attempted: {args}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture(scope="module")
def tv_state() -> dict[str, Tensor]:
    """A torchvision ResNet-50 state_dict with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    net = tv_resnet50(weights=None)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def tv_file(tv_state: dict[str, Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tv") / "resnet50.pth"
    torch.save(tv_state, path)
    return path


def _light_state(tv_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision's keys and shapes, each tensor one distinct constant (stored as one element, so files stay small)."""
    return {
        k: torch.full((), float(i + 1), dtype=v.dtype).expand(v.shape)
        for i, (k, v) in enumerate(tv_state.items())
    }


def test_state_dict_is_torchvision_without_fc(tv_state: dict[str, Tensor]) -> None:
    trunk = ResNet50Trunk()
    want = [(k, tuple(v.shape)) for k, v in tv_state.items() if not k.startswith("fc.")]
    assert [(k, tuple(v.shape)) for k, v in trunk.state_dict().items()] == want
    assert sum(p.numel() for p in trunk.parameters()) == 23_508_032  # torchvision's 25,557,032 minus fc


def test_forward_equals_torchvision(tv_state: dict[str, Tensor], tv_file: Path) -> None:
    trunk = ResNet50Trunk(pretrained=str(tv_file)).eval()
    ref = tv_resnet50(weights=None)
    ref.load_state_dict(tv_state)
    ref.eval()
    ref.fc = nn.Identity()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = trunk(x)
        want = ref(x)
        fmap = trunk.forward_features(x)
        trunk.pool = "max"
        got_max = trunk(x)
    assert got.shape == (2, 2048)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fmap.mean(dim=(2, 3)), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_max, fmap.amax(dim=(2, 3)))


def test_shape_at_224() -> None:
    trunk = ResNet50Trunk().eval()
    with torch.no_grad():
        assert trunk.forward_features(torch.randn(2, 3, 224, 224)).shape == (2, 2048, 7, 7)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        trunk(torch.randn(2, 224, 224))
    with pytest.raises(ValueError, match="pool='gem'"):
        ResNet50Trunk(pool="gem")  # type: ignore[arg-type]


def test_local_file_loads_strictly_apart_from_fc(tv_state: dict[str, Tensor], tmp_path: Path) -> None:
    no_fc = {k: v for k, v in _light_state(tv_state).items() if not k.startswith("fc.")}
    path = tmp_path / "no_fc.pth"
    torch.save(no_fc, path)
    own = ResNet50Trunk(pretrained=path).state_dict()
    assert all(torch.equal(own[k], v) for k, v in no_fc.items())

    broken = dict(no_fc)
    del broken["layer3.2.bn2.running_var"]
    broken["layer5.0.conv1.weight"] = torch.zeros(1)
    bad = tmp_path / "broken.pth"
    torch.save(broken, bad)
    with pytest.raises(WeightsError) as e:
        ResNet50Trunk(pretrained=bad)
    msg = str(e.value)
    assert str(bad) in msg and "layer3.2.bn2.running_var" in msg and "layer5.0.conv1.weight" in msg


def _point_torch_home(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere would win over TORCH_HOME
    return home / "hub" / "checkpoints"


def test_torchvision_option_needs_the_cached_file(
    tv_state: dict[str, Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _point_torch_home(monkeypatch, tmp_path / "torch_home")
    with pytest.raises(WeightsError) as e:
        ResNet50Trunk(pretrained="torchvision")
    msg = str(e.value)
    assert str(folder) in msg and "downloads nothing" in msg
    assert ResNet50_Weights.IMAGENET1K_V1.url in msg
    assert not folder.exists()  # nothing was created or fetched

    folder.mkdir(parents=True)
    light = _light_state(tv_state)
    torch.save(light, folder / os.path.basename(ResNet50_Weights.IMAGENET1K_V1.url))
    assert torchvision_resnet50_weights() == str(folder / "resnet50-0676ba61.pth")
    model = create_model("resnet50", pretrained="torchvision")
    assert isinstance(model, RetrievalNet)
    assert torch.equal(model.state_dict()["backbone.layer4.2.conv3.weight"], light["layer4.2.conv3.weight"])


def test_torchvision_option_accepts_the_older_file_name(
    tv_state: dict[str, Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _point_torch_home(monkeypatch, tmp_path / "old_home")
    folder.mkdir(parents=True)
    torch.save(_light_state(tv_state), folder / "resnet50-19c8e357.pth")
    assert torchvision_resnet50_weights() == str(folder / "resnet50-19c8e357.pth")


def test_imagenet_preprocess_matches_torchvision_normalize() -> None:
    images = torch.randint(
        0, 256, (3, 3, 6, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    flip = torch.tensor([True, False, True])
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    want = torch.stack(
        [
            TF.normalize(TF.hflip(im) if f else im, mean, std)
            for im, f in zip(TF.convert_image_dtype(images), flip)
        ]
    )
    got = imagenet_preprocess(images, flip, channels_last=True)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="uint8"):
        imagenet_preprocess(images.float())


def test_registry_entry() -> None:
    assert {"bninception", "resnet50", "iresnet50", "mbf"} <= set(list_models())
    torch.manual_seed(0)
    model = create_model("resnet50", num_features=128)
    assert isinstance(model, RetrievalNet) and isinstance(model.backbone, ResNet50Trunk)
    assert model.num_features == 128 and model.input_size == 224
    assert model.head.fc.in_features == 2048
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    x = model.preprocess(images)
    torch.testing.assert_close(x, imagenet_preprocess(images))
    model.train()
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    emb = model(x)
    assert emb.shape == (2, 128)
    torch.testing.assert_close(emb.detach().norm(dim=1), torch.ones(2))
    with torch.no_grad():
        torch.testing.assert_close(emb, F.normalize(model.head.fc(model.backbone(x)), dim=1))
    plain = create_model("resnet50", freeze_bn=False, pool="max")
    plain.train()
    assert all(m.training for m in plain.modules() if isinstance(m, nn.BatchNorm2d))
    assert isinstance(plain.backbone, ResNet50Trunk) and plain.backbone.pool == "max"


def test_grad_checkpoint_gives_the_same_gradients(tv_state: dict[str, Tensor]) -> None:
    trunk = ResNet50Trunk().train()
    trunk.load_state_dict({k: v for k, v in tv_state.items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    grads = []
    for ckpt in (False, True):
        trunk.grad_checkpoint = ckpt
        trunk.zero_grad(set_to_none=True)
        trunk(x).square().sum().backward()
        grads.append([p.grad.clone() for p in trunk.parameters()])  # type: ignore[union-attr]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
