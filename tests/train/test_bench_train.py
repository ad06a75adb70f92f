"""Tests of facems.train.bench (the library side of scripts/bench_train.py); no timing thresholds."""

from __future__ import annotations

import math

import pytest

from facems.testing import run_in_ddp
from facems.train.bench import BenchResult, bench_train, format_table


def _check_row(r: BenchResult, batch: int, world: int, steps: int) -> None:
    for name in (
        "images_per_s",
        "wall_s",
        "ms_data",
        "ms_forward",
        "ms_backward",
        "ms_optimizer",
        "peak_memory_mb",
    ):
        value = getattr(r, name)
        assert math.isfinite(value) and value > 0, f"{name} = {value}"
    assert math.isfinite(r.loss)
    assert r.batch_per_rank == batch and r.world_size == world and r.steps == steps
    # Throughput accounting: the images of every rank over the (slowest rank's) wall time.
    assert r.images_per_s == pytest.approx(batch * world * steps / r.wall_s)
    # The phases are contiguous, so their sum cannot exceed the wall time per step (small slack
    # for the loop itself and, across ranks, averaging against the slowest rank).
    assert r.ms_step * steps / 1000.0 <= r.wall_s * 1.05


def test_bench_train_one_process_row_is_finite_and_positive() -> None:
    r = bench_train("iresnet_tiny", batch=8, k=4, precision="fp32", steps=1, warmup=0, device="cpu")
    _check_row(r, batch=8, world=1, steps=1)
    assert r.model == "iresnet_tiny" and r.precision == "fp32" and r.channels_last and not r.compile
    table = format_table([r]).splitlines()
    assert len(table) == 3 and table[0].startswith("| model | loss | precision |")
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[:7] == ["iresnet_tiny", "ms", "fp32", "no", "yes", "8", "1"]
    assert float(cells[7]) == pytest.approx(r.images_per_s, abs=0.06)
    assert "threads/rank" in cells[-1]
    assert r.objective == "ms" and r.num_classes == 0


def test_bench_train_arcface_workload_trains_the_classification_layer() -> None:
    r = bench_train(
        "iresnet_tiny", batch=8, k=4, steps=1, warmup=1, device="cpu", loss="arcface", num_classes=37
    )
    _check_row(r, batch=8, world=1, steps=1)
    assert r.objective == "arcface" and r.num_classes == 37
    # Margin cross-entropy over 37 classes at s = 64 from random weights: far above the MS loss's range.
    assert r.loss > math.log(37)
    cells = [c.strip() for c in format_table([r]).splitlines()[2].strip("|").split("|")]
    assert cells[1] == "arcface (37 classes)"


def test_bench_train_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="precision = 'fp8'"):
        bench_train(precision="fp8", device="cpu")
    with pytest.raises(ValueError, match="batch = 10, k = 4"):
        bench_train(batch=10, k=4, device="cpu")
    with pytest.raises(ValueError, match="loss = 'triplet'"):
        bench_train(loss="triplet", device="cpu")
    with pytest.raises(ValueError, match="num_classes = 0"):
        bench_train(loss="arcface", num_classes=0, device="cpu")


def _bench_on_rank(rank: int, world_size: int) -> dict:
    return bench_train("iresnet_tiny", batch=4, k=2, steps=1, warmup=0, device="cpu").as_dict()


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_bench_train_two_ranks_count_the_images_of_both() -> None:
    rows = run_in_ddp(2, _bench_on_rank)
    reduced = (
        "images_per_s",
        "wall_s",
        "ms_data",
        "ms_forward",
        "ms_backward",
        "ms_optimizer",
        "peak_memory_mb",
    )
    assert [rows[0][k] for k in reduced] == [rows[1][k] for k in reduced]  # every rank holds the reduced row
    r = BenchResult(**{k: v for k, v in rows[0].items() if k != "ms_step"})
    _check_row(r, batch=4, world=2, steps=1)
