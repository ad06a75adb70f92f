"""facems.embed: batched flip-test embedding equals a per-image loop; 2 gloo ranks equal 1 process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from facems.embed import embed_images, embed_views
from facems.testing import run_in_ddp


class SmallNet(nn.Module):
    """Conv + BN + asymmetric pooling (so the mirror gives another embedding) -> 6-d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, 6)
        self.seen_channels_last: list[bool] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen_channels_last.append(x.is_contiguous(memory_format=torch.channels_last) and x.shape[0] > 1)
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))


def make_model() -> SmallNet:
    torch.manual_seed(7)
    m = SmallNet()
    assert m.bn.running_mean is not None and m.bn.running_var is not None
    with torch.no_grad():  # non-trivial running statistics, so eval and train mode differ
        m.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 4))
        m.bn.running_var.copy_(torch.linspace(0.5, 2.0, 4))
    return m


def make_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 16, 12), dtype=np.uint8)


def normalise(img: np.ndarray) -> Tensor:
    """uint8 (3, H, W) -> float (1, 3, H, W) in [-1, 1], computed in float64."""
    return ((torch.from_numpy(np.ascontiguousarray(img)).double() / 255.0 - 0.5) / 0.5).float()[None]


def loop_reference(model: nn.Module, images: np.ndarray, flip: bool) -> np.ndarray:
    """One image at a time, insightface's normalisation, model in eval mode, emb + flip_emb."""
    model.eval()
    rows = []
    with torch.no_grad():
        for img in images:
            e = model(normalise(img))
            if flip:
                e = e + model(normalise(img[:, :, ::-1]))  # mirror = reversed width axis
            rows.append(e[0].numpy())
    return np.stack(rows)


@pytest.mark.parametrize("flip", [True, False])
def test_single_process_equals_per_image_loop(flip: bool) -> None:
    model = make_model()
    images = make_images(7)
    model.train()
    model.bn.eval()  # a submodule in its own mode: restored as it was, not to the parent's
    got = embed_images(model, images, batch_size=3, flip=flip)
    assert model.training and model.conv.training and not model.bn.training
    assert got.dtype == np.float32 and got.shape == (7, 6)
    want = loop_reference(make_model(), images, flip)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the mirror changes this model's output, so flip is not a no-op
    if flip:
        assert not np.allclose(got, 2 * loop_reference(make_model(), images, False), atol=1e-3)


def test_views_sum_to_embedding_and_torch_input_matches_numpy() -> None:
    model = make_model()
    images = make_images(5, seed=1)
    views = embed_views(model, images, batch_size=2)
    assert views.shape == (2, 5, 6) and views.dtype == np.float32
    np.testing.assert_allclose(views[0], loop_reference(make_model(), images, False), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        views[1], loop_reference(make_model(), images[..., ::-1], False), rtol=1e-5, atol=1e-5
    )
    got = embed_images(model, torch.from_numpy(images), batch_size=4)
    np.testing.assert_array_equal(got, views[0] + views[1])


def test_channels_last_model_gets_channels_last_input() -> None:
    images = make_images(6, seed=2)
    plain = make_model()
    want = embed_images(plain, images, batch_size=3)
    assert not any(plain.seen_channels_last)
    cl = make_model().to(memory_format=torch.channels_last)
    got = embed_images(cl, images, batch_size=3)
    assert cl.seen_channels_last and all(cl.seen_channels_last)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_is_close_and_returns_float32() -> None:
    images = make_images(4, seed=3)
    want = embed_images(make_model(), images)
    got = embed_images(make_model(), images, precision="bf16", device="cpu")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05)


def test_rejects_bad_input() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="uint8"):
        embed_images(model, make_images(2).astype(np.float32))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        embed_images(model, make_images(2)[:, :1])
    with pytest.raises(ValueError, match="N >= 1"):
        embed_images(model, make_images(0))
    with pytest.raises(ValueError, match="precision"):
        embed_images(model, make_images(2), precision="fp8")
    with pytest.raises(ValueError, match="batch_size"):
        embed_images(model, make_images(2), batch_size=0)


def _ddp_embed(rank: int, world: int, images9: Tensor, images1: Tensor) -> dict[str, object]:
    model = make_model()
    model.train()
    out9 = embed_images(model, images9.numpy(), batch_size=2)
    mode_after = model.training
    # N < world: rank 0 has an empty shard and never runs the model.
    out1 = embed_images(model, images1.numpy(), batch_size=2)
    # A DDP-wrapped model with BN buffers; the ranks run different numbers of batches (2 and 3).
    wrapped = DistributedDataParallel(make_model())
    out_ddp = embed_images(wrapped, images9.numpy(), batch_size=2)
    local = embed_images(model, images9.numpy(), batch_size=2, distributed=False)
    return {
        "out9": torch.from_numpy(out9),
        "out1": torch.from_numpy(out1),
        "out_ddp": torch.from_numpy(out_ddp),
        "local": torch.from_numpy(local),
        "mode_after": mode_after,
        "wrapped_training": wrapped.module.training,
    }


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_two_ranks_return_the_full_array_in_input_order() -> None:
    images9, images1 = make_images(9, seed=4), make_images(1, seed=5)
    want9 = embed_images(make_model(), images9, batch_size=4)
    want1 = embed_images(make_model(), images1)
    results = run_in_ddp(2, _ddp_embed, torch.from_numpy(images9), torch.from_numpy(images1), timeout=110)
    for r in results:
        np.testing.assert_allclose(r["out9"].numpy(), want9, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r["out1"].numpy(), want1, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r["out_ddp"].numpy(), want9, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r["local"].numpy(), want9, rtol=1e-5, atol=1e-5)
        assert r["mode_after"] is True and r["wrapped_training"] is True
