"""DistributedPKSampler: P x K batches per rank, disjoint ranks, determinism, coverage, resume."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from facems.data.samplers import DistributedPKSampler
from facems.testing import run_in_ddp


def make_labels(seed: int, counts: list[int]) -> np.ndarray:
    """Labels in shuffled dataset order; identity j has counts[j] images and the label 7 * j + 3."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(7 * np.arange(len(counts)) + 3, counts)
    return labels[rng.permutation(labels.size)]


def mixed_counts(seed: int, n_ids: int) -> list[int]:
    """Image counts 1..12 per identity, so with K = 4 some identities are underfull."""
    return [int(c) for c in np.random.default_rng(seed).integers(1, 13, n_ids)]


def rank_steps(sampler: DistributedPKSampler) -> list[list[int]]:
    """What the sampler yields, by plain iteration, cut into steps of P * K."""
    flat = list(sampler)
    assert len(flat) == len(sampler)
    b = sampler.p * sampler.k
    assert len(flat) % b == 0
    return [flat[i : i + b] for i in range(0, len(flat), b)]


def check_step_structure(labels: np.ndarray, steps_by_rank: list[list[list[int]]], p: int, k: int) -> None:
    """Plain-loop reference checks of the P x K contract for every step of every rank."""
    images_of: dict[int, set[int]] = {}
    for i, y in enumerate(labels.tolist()):
        images_of.setdefault(y, set()).add(i)
    n_steps = len(steps_by_rank[0])
    assert all(len(steps) == n_steps for steps in steps_by_rank)
    for s in range(n_steps):
        seen_ids: set[int] = set()
        for steps in steps_by_rank:
            batch = steps[s]
            per_id = Counter(int(labels[i]) for i in batch)
            assert len(per_id) == p, f"step {s}: {len(per_id)} identities, expected {p}"
            assert all(c == k for c in per_id.values()), f"step {s}: counts {per_id}"
            assert not seen_ids & set(per_id), f"step {s}: identity on two ranks"
            seen_ids |= set(per_id)
            # The K images of an identity sit together in the batch.
            for j in range(p):
                assert len({int(labels[i]) for i in batch[j * k : (j + 1) * k]}) == 1
            for y in per_id:
                mine = [i for i in batch if labels[i] == y]
                n = len(images_of[y])
                assert set(mine) <= images_of[y]
                # All-distinct when the identity has K images or more; otherwise every image used,
                # each floor(K/n) or ceil(K/n) times.
                assert len(set(mine)) == min(n, k), f"step {s}, identity {y}: {mine}"
                uses = Counter(mine).values()
                assert max(uses) - min(uses) <= 1


@pytest.mark.parametrize(("world", "p", "k"), [(1, 3, 4), (3, 2, 4), (2, 4, 2)])
def test_each_rank_gets_p_identities_by_k_images_and_ranks_are_disjoint(world: int, p: int, k: int) -> None:
    # 13 identities: cycle boundaries fall in the middle of steps for every group size here.
    labels = make_labels(0, mixed_counts(1, 13))
    steps_by_rank = [
        rank_steps(DistributedPKSampler(labels, p, k, num_replicas=world, rank=r, seed=5))
        for r in range(world)
    ]
    assert len(steps_by_rank[0]) == labels.size // (p * k * world)
    check_step_structure(labels, steps_by_rank, p, k)


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 9), min_size=2, max_size=30),
    p=st.integers(1, 4),
    k=st.integers(1, 5),
    world=st.integers(1, 3),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 5),
)
def test_pk_contract_holds_for_random_label_sets(
    counts: list[int], p: int, k: int, world: int, seed: int, epoch: int
) -> None:
    labels = make_labels(seed % 1000, counts)
    if len(counts) < p * world or labels.size < p * k * world:
        with pytest.raises(ValueError):
            DistributedPKSampler(labels, p, k, num_replicas=world, rank=0, seed=seed)
        return
    steps_by_rank = []
    for r in range(world):
        sampler = DistributedPKSampler(labels, p, k, num_replicas=world, rank=r, seed=seed)
        sampler.set_epoch(epoch)
        steps_by_rank.append(rank_steps(sampler))
    assert len(steps_by_rank[0]) == labels.size // (p * k * world)
    check_step_structure(labels, steps_by_rank, p, k)


def test_same_seed_and_epoch_give_the_same_sequence_and_others_differ() -> None:
    labels = make_labels(2, mixed_counts(3, 40))
    a = DistributedPKSampler(labels, 4, 4, num_replicas=2, rank=1, seed=11)
    b = DistributedPKSampler(labels.tolist(), 4, 4, num_replicas=2, rank=1, seed=11)
    c = DistributedPKSampler(torch.from_numpy(labels), 4, 4, num_replicas=2, rank=1, seed=11)
    first = list(a)
    assert list(a) == first  # iterating again repeats the epoch
    assert list(b) == first
    assert list(c) == first
    a.set_epoch(1)
    second = list(a)
    assert second != first
    a.set_epoch(0)
    assert list(a) == first
    other_seed = DistributedPKSampler(labels, 4, 4, num_replicas=2, rank=1, seed=12)
    assert list(other_seed) != first


def test_ranks_concatenate_to_the_global_plan_which_ignores_how_it_is_split() -> None:
    labels = make_labels(4, mixed_counts(5, 30))
    p, k = 3, 4
    samplers = [DistributedPKSampler(labels, p, k, num_replicas=2, rank=r, seed=9) for r in range(2)]
    for s in samplers:
        s.set_epoch(3)
    per_rank = [np.array(list(s), dtype=np.int64).reshape(-1, p * k) for s in samplers]
    union = np.concatenate(per_rank, axis=1)
    np.testing.assert_array_equal(samplers[0].global_plan().reshape(union.shape), union)
    # One process drawing 2P identities per step yields the same global batches.
    single = DistributedPKSampler(labels, 2 * p, k, num_replicas=1, rank=0, seed=9)
    single.set_epoch(3)
    np.testing.assert_array_equal(np.array(list(single)).reshape(union.shape), union)
    np.testing.assert_array_equal(samplers[1].plan(), per_rank[1])


def test_epoch_covers_identities_evenly_and_cycles_through_images() -> None:
    counts = mixed_counts(7, 25)
    labels = make_labels(6, counts)
    p, k, world = 2, 2, 2  # identities with 1 image are underfull
    samplers = [DistributedPKSampler(labels, p, k, num_replicas=world, rank=r, seed=1) for r in range(world)]
    batches = [i for s in samplers for i in s]
    # Plain-loop reference: visits per identity and distinct images seen.
    visits: Counter[int] = Counter()
    seen: dict[int, set[int]] = {}
    for start in range(0, len(batches), k):
        chunk = batches[start : start + k]
        y = int(labels[chunk[0]])
        visits[y] += 1
        seen.setdefault(y, set()).update(chunk)
    n_slots = samplers[0].steps_per_epoch * p * world
    assert n_slots >= 2 * len(counts)
    assert set(visits) == set(labels.tolist())  # every identity appears
    assert max(visits.values()) - min(visits.values()) <= 1
    assert sum(visits.values()) == n_slots
    n_images = Counter(labels.tolist())
    for y, v in visits.items():
        assert len(seen[y]) == min(n_images[y], v * k), f"identity {y}"


def test_len_counts_what_iteration_yields() -> None:
    labels = make_labels(8, mixed_counts(9, 20))  # not a multiple of P * K * W
    n = labels.size
    p, k, world = 2, 3, 2
    for r in range(world):
        s = DistributedPKSampler(labels, p, k, num_replicas=world, rank=r)
        assert s.steps_per_epoch == n // (p * k * world)
        assert len(s) == (n // (p * k * world)) * p * k == len(list(s))
        keep = DistributedPKSampler(labels, p, k, num_replicas=world, rank=r, drop_last=False)
        assert keep.steps_per_epoch == -(-n // (p * k * world))
        assert len(keep) == len(list(keep)) == keep.steps_per_epoch * p * k
    assert n % (p * k * world) != 0


def test_num_underfull_identities_counts_identities_with_fewer_than_k_images() -> None:
    counts = mixed_counts(10, 30)
    labels = make_labels(0, counts)
    for k in (1, 4, 7):
        expected = sum(1 for c in counts if c < k)
        assert DistributedPKSampler(labels, 2, k).num_underfull_identities == expected
    assert DistributedPKSampler(labels, 2, 4).num_identities == 30
    assert DistributedPKSampler(labels, 2, 4).num_images == sum(counts)


def save_load(state: dict[str, object]) -> dict[str, object]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("steps_done", [0, 1, 5])
def test_resume_yields_exactly_the_remaining_steps(steps_done: int) -> None:
    labels = make_labels(11, mixed_counts(12, 30))
    p, k, world, rank = 2, 4, 2, 1

    def make() -> DistributedPKSampler:
        return DistributedPKSampler(labels, p, k, num_replicas=world, rank=rank, seed=3)

    before = make()
    before.set_epoch(2)
    full = list(before)
    b = p * k
    assert before.steps_per_epoch > 5
    state = save_load(before.state_dict(steps_done=steps_done))

    after = make()
    after.load_state_dict(state)
    assert after.epoch == 2 and after.start_step == steps_done
    after.set_epoch(2)  # the loop sets the same epoch again on resume: the offset stays
    remaining = full[steps_done * b :]
    assert len(after) == len(remaining)
    assert list(after) == remaining
    # A second checkpoint counts steps from the epoch's start, across the earlier resume.
    again = make()
    again.load_state_dict(save_load(after.state_dict(steps_done=steps_done + 1)))
    assert list(again) == full[(steps_done + 1) * b :]
    # The next epoch starts from step 0 and equals a fresh sampler's.
    after.set_epoch(3)
    fresh = make()
    fresh.set_epoch(3)
    assert after.start_step == 0
    assert list(after) == list(fresh)


def test_resume_at_end_of_epoch_yields_nothing_until_the_next_epoch() -> None:
    labels = make_labels(13, mixed_counts(14, 20))
    s = DistributedPKSampler(labels, 2, 4, seed=1)
    state = s.state_dict(steps_done=s.steps_per_epoch)
    t = DistributedPKSampler(labels, 2, 4, seed=1)
    t.load_state_dict(state)
    assert len(t) == 0 and list(t) == []
    t.set_epoch(1)
    s.set_epoch(1)
    assert list(t) == list(s)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("p", {"p": 3}),
        ("k", {"k": 2}),
        ("num_replicas", {"num_replicas": 3}),
        ("seed", {"seed": 1}),
        ("drop_last", {"drop_last": False}),
    ],
)
def test_resume_with_other_settings_raises_naming_the_field(field: str, kwargs: dict[str, object]) -> None:
    labels = make_labels(15, mixed_counts(16, 30))
    base: dict[str, object] = {"p": 2, "k": 4, "num_replicas": 2, "rank": 0, "seed": 0, "drop_last": True}
    state = DistributedPKSampler(labels, **base).state_dict(steps_done=1)  # type: ignore[arg-type]
    other = DistributedPKSampler(labels, **{**base, **kwargs})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"'{field}'"):
        other.load_state_dict(state)


def test_resume_with_other_labels_raises() -> None:
    labels = make_labels(17, mixed_counts(18, 30))
    state = DistributedPKSampler(labels, 2, 4).state_dict(steps_done=0)
    swapped = labels.copy()
    i = int(np.flatnonzero(swapped != swapped[0])[0])
    swapped[[0, i]] = swapped[[i, 0]]  # same counts per identity, different order
    with pytest.raises(ValueError, match="'labels_sha256'"):
        DistributedPKSampler(swapped, 2, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="'num_images'"):
        DistributedPKSampler(np.append(labels, labels[0]), 2, 4).load_state_dict(state)


def test_malformed_state_raises() -> None:
    labels = make_labels(19, mixed_counts(20, 30))
    s = DistributedPKSampler(labels, 2, 4)
    good = s.state_dict(steps_done=1)
    with pytest.raises(ValueError, match="steps_done"):
        s.state_dict(steps_done=s.steps_per_epoch + 1)
    with pytest.raises(ValueError, match="lacks key"):
        s.load_state_dict({key: v for key, v in good.items() if key != "p"})
    with pytest.raises(ValueError, match="'steps_done'"):
        s.load_state_dict({**good, "steps_done": s.steps_per_epoch + 1})
    with pytest.raises(ValueError, match="'epoch'"):
        s.load_state_dict({**good, "epoch": -1})
    with pytest.raises(ValueError, match="'version'"):
        s.load_state_dict({**good, "version": 99})
    assert s.epoch == 0 and s.start_step == 0  # nothing was half-applied


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"p": 0}, "p .* must be >= 1, got 0"),
        ({"k": 0}, "k .* must be >= 1, got 0"),
        ({"num_replicas": 0, "rank": 0}, "num_replicas must be >= 1, got 0"),
        ({"num_replicas": 2, "rank": 2}, r"rank must be in \[0, num_replicas\) = \[0, 2\), got 2"),
        ({"num_replicas": 2, "rank": -1}, "got -1"),
        ({"seed": -1}, "seed must be >= 0"),
        (
            {"p": 4, "num_replicas": 3, "rank": 0},
            "10 identities, fewer than p \\* num_replicas = 4 \\* 3 = 12",
        ),
        ({"p": 5, "k": 5, "num_replicas": 2, "rank": 0}, "fewer than one global batch"),
    ],
)
def test_invalid_arguments_raise_with_values(kwargs: dict[str, int], message: str) -> None:
    labels = make_labels(21, [4] * 10)  # 10 identities, 40 images
    args: dict[str, int] = {"p": 2, "k": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        DistributedPKSampler(labels, **args)  # type: ignore[arg-type]


def test_drop_last_false_allows_a_set_smaller_than_one_global_batch() -> None:
    labels = make_labels(21, [4] * 10)
    s = DistributedPKSampler(labels, 5, 5, num_replicas=2, rank=1, drop_last=False)
    assert s.steps_per_epoch == 1 and len(list(s)) == 25


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.zeros((2, 3), dtype=np.int64), "1-D"),
        (np.array([], dtype=np.int64), "non-empty"),
        (np.array([0.0, 1.0, 2.0]), "integers"),
    ],
)
def test_invalid_labels_raise(labels: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistributedPKSampler(labels, 1, 1)


class IndexDataset(Dataset[int]):
    """Item i is its own index."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def test_dataloader_batches_are_the_steps() -> None:
    labels = make_labels(22, mixed_counts(23, 24))
    sampler = DistributedPKSampler(labels, 3, 4, num_replicas=2, rank=0, seed=4)
    sampler.set_epoch(1)
    loader: DataLoader[int] = DataLoader(
        IndexDataset(labels.size),
        batch_size=sampler.batch_size,
        sampler=sampler,
        shuffle=False,
        drop_last=True,
    )
    batches = [b.tolist() for b in loader]
    assert len(loader) == sampler.steps_per_epoch == len(batches)
    assert batches == sampler.plan().tolist()
    for batch in batches:
        per_id = Counter(int(labels[i]) for i in batch)
        assert len(per_id) == 3 and set(per_id.values()) == {4}


def ddp_sampler_worker(rank: int, world: int, labels: torch.Tensor) -> dict[str, object]:
    sampler = DistributedPKSampler(labels, p=2, k=4, seed=6)
    sampler.set_epoch(1)
    return {
        "rank": sampler.rank,
        "num_replicas": sampler.num_replicas,
        "indices": torch.tensor(list(sampler), dtype=torch.long),
    }


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_defaults_come_from_the_process_group_and_ranks_are_disjoint() -> None:
    labels = make_labels(24, mixed_counts(25, 20))
    results = run_in_ddp(2, ddp_sampler_worker, torch.from_numpy(labels), timeout=100)
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["num_replicas"] for r in results] == [2, 2]
    steps_by_rank = []
    for r, res in enumerate(results):
        local = DistributedPKSampler(labels, p=2, k=4, num_replicas=2, rank=r, seed=6)
        local.set_epoch(1)
        assert res["indices"].tolist() == list(local)
        steps_by_rank.append(rank_steps(local))
    check_step_structure(labels, steps_by_rank, 2, 4)
