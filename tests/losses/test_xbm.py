"""Cross-batch memory: ring semantics against plain list models, checkpoint round trip, and the
memory loss against a plain-loop Multi-Similarity reference."""

from __future__ import annotations

import io
import math
import random

import pytest
import torch
import torch.nn.functional as F

from facems.losses import CrossBatchMemory, MultiSimilarityLoss, xbm_loss

ALPHA, BETA, BASE, EPS = 2.0, 40.0, 0.5, 0.1


def stored(rows: torch.Tensor) -> torch.Tensor:
    """What the memory should hold for ``rows``: fp32 copies, L2-normalised in fp32."""
    return F.normalize(rows.detach().float(), dim=1)


def loop_ms_memory(
    anchors: torch.Tensor, labels: list[int], refs: torch.Tensor, ref_labels: list[int]
) -> torch.Tensor:
    """Official MS loss, scalar by scalar, of anchors against a memory (no self pair to drop)."""
    total = anchors.new_zeros(())
    for i in range(anchors.shape[0]):
        a = anchors[i] / torch.sqrt(sum(v * v for v in anchors[i]))
        sims = [(a @ (refs[k] / refs[k].norm()), ref_labels[k] == labels[i]) for k in range(refs.shape[0])]
        pos = [s for s, same in sims if same]
        neg = [s for s, same in sims if not same]
        if not pos or not neg:
            continue
        min_pos = min(float(s.detach()) for s in pos)
        max_neg = max(float(s.detach()) for s in neg)
        pos = [s for s in pos if float(s.detach()) - EPS < max_neg]
        neg = [s for s in neg if float(s.detach()) + EPS > min_pos]
        if not pos or not neg:
            continue
        p = sum(torch.exp(-ALPHA * (s - BASE)) for s in pos)
        n = sum(torch.exp(BETA * (s - BASE)) for s in neg)
        total = total + torch.log(1 + p) / ALPHA + torch.log(1 + n) / BETA
    return total / anchors.shape[0]


def clustered_batch(
    gen: torch.Generator, ids: list[int], k: int, centers: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.tensor(ids).repeat_interleave(k)
    emb = centers[labels] + 0.6 * torch.randn(
        len(labels), centers.shape[1], generator=gen, dtype=torch.float64
    )
    return emb, labels


# ---------------------------------------------------------------- ring semantics


@pytest.mark.parametrize("size", [1, 7, 32])
def test_ring_matches_list_models(size: int) -> None:
    rng = random.Random(size)
    gen = torch.Generator().manual_seed(size)
    memory = CrossBatchMemory(size, 5)
    history: list[tuple[int, torch.Tensor]] = []  # every row ever enqueued, oldest first
    slots: list[tuple[int, torch.Tensor] | None] = [None] * size  # a ring written row by row
    write = 0
    next_label = 0
    for _ in range(25):
        n = rng.choice([0, 1, 2, 3, size - 1, size, size + 1, 2 * size + 3, rng.randint(1, 3 * size)])
        n = max(n, 0)
        feats = torch.randn(n, 5, generator=gen, dtype=torch.float64) * 3
        labels = torch.arange(next_label, next_label + n)  # unique labels identify the rows
        next_label += n
        memory.enqueue(feats, labels)
        for j in range(n):
            row = (int(labels[j]), stored(feats[j : j + 1])[0])
            history.append(row)
            slots[write] = row
            write = (write + 1) % size

        got_f, got_l = memory.get()
        want = history[-size:]
        assert len(memory) == len(want) == got_f.shape[0] == got_l.shape[0]
        assert int(memory.ptr) == len(history) % size
        assert int(memory.filled) == min(len(history), size)
        assert got_f.dtype == torch.float32 and got_l.dtype == torch.int64
        # The valid rows are the last `size` enqueued, whatever their order ...
        assert sorted(got_l.tolist()) == sorted(label for label, _ in want)
        by_label = dict(want)
        for label, row in zip(got_l.tolist(), got_f):
            assert torch.equal(row, by_label[label])
        # ... and they sit in the slots a row-by-row ring would give them.
        filled_slots = [s for s in slots if s is not None]
        assert got_l.tolist() == [label for label, _ in filled_slots]


def test_enqueue_stores_detached_normalised_fp32_copies() -> None:
    memory = CrossBatchMemory(8, 4)
    x = (torch.randn(3, 4, dtype=torch.float64) * 7).requires_grad_(True)
    y = x * 2  # a non-leaf with a graph
    memory.enqueue(y, torch.tensor([4, 5, 6], dtype=torch.int32))
    feats, labels = memory.get()
    assert not feats.requires_grad and feats.grad_fn is None
    assert feats.dtype == torch.float32 and labels.dtype == torch.int64
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(3), rtol=0, atol=1e-6)
    want = [[float(v) / math.sqrt(sum(float(u) ** 2 for u in row)) for v in row] for row in y.detach()]
    torch.testing.assert_close(feats, torch.tensor(want, dtype=torch.float32), rtol=0, atol=1e-6)
    assert labels.tolist() == [4, 5, 6]
    with torch.no_grad():  # a copy: later changes to the source do not reach the memory
        x.mul_(-1)
    torch.testing.assert_close(memory.get()[0], torch.tensor(want, dtype=torch.float32), rtol=0, atol=1e-6)


def test_bfloat16_input_is_stored_as_fp32() -> None:
    memory = CrossBatchMemory(4, 3)
    x = torch.randn(2, 3).bfloat16()
    memory.enqueue(x, torch.tensor([0, 1]))
    feats, _ = memory.get()
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, F.normalize(x.float(), dim=1), rtol=0, atol=0)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="size"):
        CrossBatchMemory(0, 4)
    with pytest.raises(ValueError, match="dim"):
        CrossBatchMemory(4, -1)
    memory = CrossBatchMemory(4, 3)
    with pytest.raises(ValueError, match=r"feats must be \(batch, 3\)"):
        memory.enqueue(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"feats must be \(batch, 3\)"):
        memory.enqueue(torch.randn(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="floating-point"):
        memory.enqueue(torch.ones(2, 3, dtype=torch.int64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels must be \(2,\)"):
        memory.enqueue(torch.randn(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        memory.enqueue(torch.randn(2, 3), torch.tensor([0.0, 1.0]))
    assert len(memory) == 0  # nothing was written by the failed calls
    with pytest.raises(ValueError, match=r"embeddings must be \(batch, 3\)"):
        xbm_loss(MultiSimilarityLoss(), memory, torch.randn(2, 5), torch.tensor([0, 1]))


# ---------------------------------------------------------------- checkpoints


def test_state_dict_round_trip_resumes_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 6, generator=gen), torch.randint(0, 4, (5,), generator=gen)) for _ in range(9)]
    a = CrossBatchMemory(12, 6)
    for feats, labels in batches[:4]:
        a.enqueue(feats, labels)
    assert set(a.state_dict()) == {"feats", "labels", "ptr", "filled"}
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = CrossBatchMemory(12, 6)
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert len(b) == len(a) == 12 and int(b.ptr) == int(a.ptr) == 20 % 12
    for feats, labels in batches[4:]:  # continuing after the resume gives identical memories
        a.enqueue(feats, labels)
        b.enqueue(feats, labels)
        for x, y in zip(a.get(), b.get()):
            assert torch.equal(x, y)
    with pytest.raises(RuntimeError, match="size mismatch"):
        CrossBatchMemory(10, 6).load_state_dict(a.state_dict())


# ---------------------------------------------------------------- memory loss


def test_empty_memory_gives_connected_zero() -> None:
    memory = CrossBatchMemory(16, 4)
    emb = torch.randn(6, 4, requires_grad=True)
    loss = xbm_loss(MultiSimilarityLoss(), memory, emb, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert loss.dtype == torch.float32 and loss.requires_grad and float(loss.detach()) == 0.0
    loss.backward()
    assert emb.grad is not None and torch.count_nonzero(emb.grad) == 0


def test_xbm_loss_matches_loop_over_training_steps() -> None:
    """Training order: memory loss against the previous batches, then enqueue the batch."""
    gen = torch.Generator().manual_seed(3)
    dim, size = 8, 40
    centers = F.normalize(torch.randn(10, dim, generator=gen, dtype=torch.float64), dim=1)
    memory = CrossBatchMemory(size, dim)
    history_f: list[torch.Tensor] = []
    history_l: list[int] = []
    loss_fn = MultiSimilarityLoss()
    nonzero = 0
    for step in range(7):
        ids = torch.randperm(10, generator=gen)[:4].tolist()
        emb, labels = clustered_batch(gen, ids, 3, centers)
        a = emb.clone().requires_grad_(True)
        b = emb.clone().requires_grad_(True)
        got = xbm_loss(loss_fn, memory, a, labels)
        refs = history_f[-size:]
        ref_labels = history_l[-size:]
        if not refs:
            assert step == 0 and float(got.detach()) == 0.0
        else:
            want = loop_ms_memory(b, labels.tolist(), torch.stack(refs).double(), ref_labels)
            assert got.dtype == torch.float64
            assert abs(float(got.detach()) - float(want.detach())) < 1e-10
            got.backward()
            if want.requires_grad:
                want.backward()
                assert b.grad is not None
                torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10)
            nonzero += float(got.detach()) > 0
        memory.enqueue(emb, labels)
        history_f.extend(stored(emb))
        history_l.extend(labels.tolist())
    assert len(history_l) > size  # the ring wrapped during the test
    assert nonzero >= 4  # the comparison was not vacuous


def test_memory_loss_equals_ms_loss_on_the_memory_rows() -> None:
    # Same numbers as calling the loss with the memory's rows as references and anchor_index=None.
    gen = torch.Generator().manual_seed(5)
    centers = F.normalize(torch.randn(6, 16, generator=gen, dtype=torch.float64), dim=1)
    memory = CrossBatchMemory(30, 16)
    for _ in range(3):
        emb, labels = clustered_batch(gen, [0, 1, 2, 3, 4, 5], 2, centers)
        memory.enqueue(emb, labels)
    emb, labels = clustered_batch(gen, [0, 2, 4], 4, centers)
    anchors = emb.float()
    refs, ref_labels = memory.get()
    got = xbm_loss(MultiSimilarityLoss(), memory, anchors, labels)
    want = MultiSimilarityLoss()(anchors, labels, refs.clone(), ref_labels.clone(), None)
    assert got.dtype == torch.float32
    assert float(got) > 0 and float(got) == float(want)


def test_gradient_reaches_only_the_anchors_and_survives_enqueue() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    memory = CrossBatchMemory(20, 4)
    loss_fn = MultiSimilarityLoss(mining=False)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    # Rows that came out of a graph: the memory must keep no link to it.
    source = torch.randn(12, 4, requires_grad=True)
    memory.enqueue(source * 2.0, torch.tensor([0, 1, 2, 3] * 3))
    inputs = torch.randn(6, 6, requires_grad=True)
    emb = model(inputs)
    total = loss_fn(emb, labels) + 0.5 * xbm_loss(loss_fn, memory, emb, labels)
    # Enqueueing the batch before backward (in place, over the rows the loss read) must not break it.
    memory.enqueue(emb.detach(), labels)
    total.backward()
    assert source.grad is None
    assert inputs.grad is not None and torch.count_nonzero(inputs.grad) > 0
    assert model.weight.grad is not None and torch.count_nonzero(model.weight.grad) > 0
    assert all(not t.requires_grad for t in (memory.feats, memory.labels, memory.ptr, memory.filled))
    # The memory term alone moves the anchors.
    anchors = torch.randn(6, 4, requires_grad=True)
    xbm_loss(loss_fn, memory, anchors, labels).backward()
    assert anchors.grad is not None and torch.count_nonzero(anchors.grad) > 0


def test_low_precision_anchors_give_fp32_loss() -> None:
    memory = CrossBatchMemory(10, 4)
    memory.enqueue(torch.randn(10, 4), torch.tensor([0, 1] * 5))
    emb = torch.randn(4, 4).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = xbm_loss(MultiSimilarityLoss(), memory, emb, torch.tensor([0, 0, 1, 1]))
    assert loss.dtype == torch.float32
    loss.backward()
    assert emb.grad is not None and emb.grad.dtype == torch.bfloat16
