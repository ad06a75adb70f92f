"""ArcFace / CosFace margin heads against a per-sample plain computation and pytorch-metric-learning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facems.losses import MarginHead, margin_logits, margin_softmax_loss


def reference_target(c: float, kind: str, m: float) -> float:
    """Target cosine after the margin, written with angles (insightface's rule past pi - m)."""
    if kind == "cosface":
        return c - m
    theta = math.acos(max(-1.0, min(1.0, c)))
    if theta + m < math.pi:
        return math.cos(theta + m)
    return c - math.sin(m) * m


def reference_loss(
    x: torch.Tensor, w: torch.Tensor, labels: list[int], kind: str, s: float, m: float
) -> float:
    """Mean cross-entropy, sample by sample, with a hand-written log-softmax in Python floats."""
    xs = x.tolist()
    ws = w.tolist()
    total = 0.0
    for row, y in zip(xs, labels):
        nx = math.sqrt(sum(v * v for v in row))
        logits = []
        for j, wj in enumerate(ws):
            nw = math.sqrt(sum(v * v for v in wj))
            c = sum(a * b for a, b in zip(row, wj)) / (nx * nw)
            c = max(-1.0, min(1.0, c))
            logits.append(s * (reference_target(c, kind, m) if j == y else c))
        top = max(logits)
        log_norm = top + math.log(sum(math.exp(v - top) for v in logits))
        total += log_norm - logits[y]
    return total / len(labels)


def at_angles(w: torch.Tensor, labels: list[int], angles: list[float], seed: int) -> torch.Tensor:
    """Embeddings whose angle to their class centre is exactly ``angles[i]`` (random norms)."""
    gen = torch.Generator().manual_seed(seed)
    wn = F.normalize(w, dim=1)
    rows = []
    for y, a in zip(labels, angles):
        u = torch.randn(w.shape[1], generator=gen, dtype=w.dtype)
        u = F.normalize(u - (u @ wn[y]) * wn[y], dim=0)  # unit vector orthogonal to the centre
        norm = 0.5 + 3 * float(torch.rand((), generator=gen, dtype=torch.float64))
        rows.append(norm * (math.cos(a) * wn[y] + math.sin(a) * u))
    return torch.stack(rows)


def angle_cases(m: float) -> list[float]:
    """Angles across [0, pi]: small, typical, both sides of the pi - m switch, and near pi."""
    return [
        0.02,
        0.4,
        1.2,
        math.pi / 2,
        math.pi - m - 0.05,
        math.pi - m + 0.05,
        math.pi - 0.1,
        math.pi - 1e-3,
    ]


@pytest.mark.parametrize(
    ("kind", "scale", "margin"),
    [("arcface", 64.0, 0.5), ("arcface", 30.0, 0.3), ("cosface", 64.0, 0.4), ("cosface", 16.0, 0.2)],
)
def test_matches_plain_computation_float64(kind: str, scale: float, margin: float) -> None:
    gen = torch.Generator().manual_seed(1)
    num_classes, dim = 5, 12
    w = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    angles = angle_cases(margin)
    labels = [i % num_classes for i in range(len(angles))]
    x = at_angles(w, labels, angles, seed=2)
    got = margin_softmax_loss(x, w, torch.tensor(labels), kind, scale, margin)
    assert got.dtype == torch.float64
    want = reference_loss(x, w, labels, kind, scale, margin)
    assert abs(float(got) - want) <= 1e-10 * max(1.0, abs(want)), (float(got), want)
    # Sample by sample too, so one wrong sample cannot hide in the mean.
    for i in range(len(labels)):
        one = margin_softmax_loss(x[i : i + 1], w, torch.tensor(labels[i : i + 1]), kind, scale, margin)
        ref = reference_loss(x[i : i + 1], w, labels[i : i + 1], kind, scale, margin)
        assert abs(float(one) - ref) <= 1e-9 * max(1.0, abs(ref)), (i, angles[i], float(one), ref)


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_module_fp32_matches_plain_computation(kind: str) -> None:
    torch.manual_seed(3)
    head = MarginHead(16, 7, kind=kind, scale=64.0, margin=0.5 if kind == "arcface" else 0.35)
    labels = torch.randint(0, 7, (20,))
    angles = [float(a) for a in torch.rand(20, dtype=torch.float64) * math.pi]
    x = at_angles(head.weight.detach().double(), labels.tolist(), angles, seed=4).float()
    got = head(x, labels)
    assert got.dtype == torch.float32 and got.dim() == 0
    want = reference_loss(
        x.double(), head.weight.detach().double(), labels.tolist(), kind, head.scale, head.margin
    )
    assert abs(float(got.detach()) - want) <= 1e-4 * max(1.0, abs(want)), (float(got.detach()), want)


def test_matches_pytorch_metric_learning() -> None:
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(5)
    x = torch.randn(32, 10, dtype=torch.float64)
    labels = torch.randint(0, 6, (32,))
    cos = losses.CosFaceLoss(num_classes=6, embedding_size=10, margin=0.35, scale=64)
    cos.W.data = cos.W.data.double()
    want = cos(x, labels)
    got = margin_softmax_loss(x, cos.W.data.t(), labels, "cosface", 64.0, 0.35)
    assert abs(float(got) - float(want.detach())) < 1e-9
    # pytorch-metric-learning's ArcFace takes degrees and has no rule past pi - m: compare where no
    # target angle gets there (the embeddings are placed within 90 degrees of their centre).
    arc = losses.ArcFaceLoss(num_classes=6, embedding_size=10, margin=28.6, scale=64)
    arc.W.data = arc.W.data.double()
    w = arc.W.data.t()
    angles = [float(a) for a in torch.rand(32, dtype=torch.float64) * (math.pi / 2)]
    xa = at_angles(w, labels.tolist(), angles, seed=6)
    got = margin_softmax_loss(xa, w, labels, "arcface", 64.0, math.radians(28.6))
    assert abs(float(got) - float(arc(xa, labels).detach())) < 1e-9


@pytest.mark.parametrize("margin", [0.0, 0.2, 0.5, 1.0, math.pi / 2])
def test_arcface_target_decreases_with_the_angle(margin: float) -> None:
    theta = torch.linspace(0.0, math.pi, 20001, dtype=torch.float64)
    cosine = torch.cos(theta).unsqueeze(1)
    target = margin_logits(cosine, torch.zeros(len(theta), dtype=torch.long), "arcface", 1.0, margin)[:, 0]
    assert bool((target[1:] < target[:-1]).all())
    # Endpoints: cos(m) at theta = 0 (up to the documented sin(theta) >= 1e-10 floor) and
    # -1 - m sin(m) at theta = pi.
    assert abs(float(target[0]) - math.cos(margin)) <= 1e-10 * math.sin(margin) + 1e-12
    assert abs(float(target[-1]) - (-1 - margin * math.sin(margin))) < 1e-12


def test_non_target_logits_are_scaled_cosines() -> None:
    cosine = torch.tensor([[0.3, -0.2, 0.9], [-1.0, 1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([2, 0])
    for kind in ("arcface", "cosface"):
        out = margin_logits(cosine, labels, kind, 10.0, 0.5)
        assert out[0, :2].tolist() == [3.0, -2.0] and out[1, 1:].tolist() == [10.0, 0.0]
    out = margin_logits(cosine, labels, "cosface", 10.0, 0.5)
    assert abs(float(out[0, 2]) - 4.0) < 1e-12 and abs(float(out[1, 0]) + 15.0) < 1e-12


def test_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1, 0])
    # Angles away from the non-differentiable switch at pi - m, one of them past it.
    x = at_angles(w, labels.tolist(), [0.3, 1.0, 2.0, 2.9, 3.1], seed=8)
    for kind, margin in (("arcface", 0.5), ("cosface", 0.35)):
        xs = x.clone().requires_grad_(True)
        ws = w.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda a, b, k=kind, m=margin: margin_softmax_loss(a, b, labels, k, 2.0, m), (xs, ws)
        )
    head = MarginHead(4, 3, scale=2.0).double()
    xs = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: head(a, labels), (xs,))
    assert head(xs, labels).dtype == torch.float64


def test_gradients_stay_finite_at_cosine_plus_minus_one() -> None:
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    x = torch.tensor([[2.0, 0.0, 0.0], [-3.0, 0.0, 0.0], [0.0, -1.0, 0.0]], requires_grad=True)
    head = MarginHead(3, 2, kind="arcface")
    with torch.no_grad():
        head.weight.copy_(w)
    loss = head(x, torch.tensor([0, 0, 1]))
    loss.backward()
    assert x.grad is not None and head.weight.grad is not None
    assert bool(torch.isfinite(x.grad).all()) and bool(torch.isfinite(head.weight.grad).all())
    want = reference_loss(x.detach().double(), w.double(), [0, 0, 1], "arcface", 64.0, 0.5)
    assert abs(float(loss.detach()) - want) <= 1e-4 * want
    # The margin itself, on cosines of exactly +-1 (not behind a clamp): finite gradients too.
    for dtype in (torch.float32, torch.float64):
        cosine = torch.tensor([[1.0, 0.2], [-1.0, 0.1], [0.3, -1.0]], dtype=dtype, requires_grad=True)
        margin_logits(cosine, torch.tensor([0, 0, 1]), "arcface", 64.0, 0.5).sum().backward()
        assert cosine.grad is not None and bool(torch.isfinite(cosine.grad).all()), cosine.grad


def test_autocast_bfloat16_gives_fp32() -> None:
    torch.manual_seed(9)
    backbone = torch.nn.Linear(8, 6)
    head = MarginHead(6, 4)
    inputs = torch.randn(10, 8)
    labels = torch.randint(0, 4, (10,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = backbone(inputs)
        assert emb.dtype == torch.bfloat16
        loss = head(emb, labels)
    assert loss.dtype == torch.float32
    # The head ignored autocast: the same bf16 embeddings give the same fp32 loss outside it.
    assert float(loss.detach()) == float(head(emb.detach().float(), labels).detach())
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.dtype == torch.float32
    assert backbone.weight.grad is not None and bool(torch.isfinite(backbone.weight.grad).all())


def test_weight_initialisation() -> None:
    torch.manual_seed(0)
    head = MarginHead(512, 400)
    assert head.weight.shape == (400, 512) and head.weight.dtype == torch.float32
    assert abs(float(head.weight.detach().std()) - 0.01) < 3e-4
    assert abs(float(head.weight.detach().mean())) < 1e-4


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        MarginHead(4, 3, kind="sphereface")
    with pytest.raises(ValueError, match="scale"):
        MarginHead(4, 3, scale=0.0)
    with pytest.raises(ValueError, match="scale"):
        MarginHead(4, 3, scale=float("nan"))
    with pytest.raises(ValueError, match="arcface margin"):
        MarginHead(4, 3, margin=-0.1)
    with pytest.raises(ValueError, match="arcface margin"):
        MarginHead(4, 3, margin=2.0)
    with pytest.raises(ValueError, match="cosface margin"):
        MarginHead(4, 3, kind="cosface", margin=float("inf"))
    with pytest.raises(ValueError, match="num_classes"):
        MarginHead(4, 0)
    with pytest.raises(ValueError, match="num_features"):
        MarginHead(0, 3)
    head = MarginHead(4, 3)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got values in \[0, 3\]"):
        head(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got values in \[-1, 2\]"):
        head(x, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="integer"):
        head(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels must be \(2,\)"):
        head(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"embeddings must be \(batch, 4\)"):
        head(torch.randn(2, 5), torch.tensor([0, 1]))


def test_empty_batch_is_connected_zero() -> None:
    head = MarginHead(4, 3)
    x = torch.zeros(0, 4, requires_grad=True)
    loss = head(x, torch.zeros(0, dtype=torch.long))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert head.weight.grad is not None and torch.count_nonzero(head.weight.grad) == 0
