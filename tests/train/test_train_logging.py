"""Tests of facems.train.logging: throughput accounting, per-rank log files, metrics.jsonl, TensorBoard."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from facems.train.logging import (
    LOGGER_NAME,
    METRIC_KEYS,
    ThroughputMeter,
    TrainLogger,
    close_logging,
    setup_logging,
)


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def _no_leftover_handlers() -> Iterator[None]:
    yield
    close_logging()


# -- ThroughputMeter ---------------------------------------------------------------------------------


def test_meter_rate_counts_global_images_over_wall_time() -> None:
    clock = FakeClock()
    meter = ThroughputMeter(clock)
    meter.start()
    for _ in range(5):
        clock.advance(0.5)
        meter.add(256)
    assert meter.rate() == pytest.approx(5 * 256 / 2.5)
    assert meter.overall_rate() == pytest.approx(5 * 256 / 2.5)
    assert meter.images == 1280


def test_meter_excluded_windows_do_not_count() -> None:
    clock = FakeClock()
    meter = ThroughputMeter(clock)
    meter.start()
    clock.advance(2.0)
    meter.add(100)
    with meter.excluded():
        clock.advance(30.0)  # evaluation
        with meter.excluded():  # nested: a checkpoint inside the evaluation window
            clock.advance(5.0)
        clock.advance(1.0)
    clock.advance(3.0)
    meter.add(150)
    # Training time: 2 + 3 = 5 s; 250 images.
    assert meter.window_seconds() == pytest.approx(5.0)
    assert meter.rate() == pytest.approx(250 / 5.0)
    assert meter.overall_rate() == pytest.approx(250 / 5.0)


def test_meter_open_excluded_window_is_left_out_while_still_open() -> None:
    clock = FakeClock()
    meter = ThroughputMeter(clock)
    meter.start()
    clock.advance(4.0)
    meter.add(40)
    with meter.excluded():
        clock.advance(100.0)
        assert meter.rate() == pytest.approx(40 / 4.0)
        meter.reset_window()  # a new window opens inside the excluded block
        clock.advance(7.0)
    clock.advance(2.0)
    meter.add(10)
    assert meter.rate() == pytest.approx(10 / 2.0)
    assert meter.overall_rate() == pytest.approx(50 / 6.0)


def test_meter_reset_window_gives_per_interval_rates() -> None:
    clock = FakeClock()
    meter = ThroughputMeter(clock)
    meter.start()
    clock.advance(1.0)
    meter.add(64)
    assert meter.rate() == pytest.approx(64.0)
    meter.reset_window()
    assert meter.rate() == 0.0  # no time in the new window yet
    clock.advance(4.0)
    meter.add(64)
    meter.add(64)
    assert meter.rate() == pytest.approx(128 / 4.0)
    assert meter.overall_rate() == pytest.approx(192 / 5.0)


def test_meter_data_wait_fraction_is_per_window_and_ignores_excluded_time() -> None:
    clock = FakeClock()
    meter = ThroughputMeter(clock)
    meter.start()
    clock.advance(10.0)
    meter.add_data_wait(2.5)
    with meter.excluded():
        clock.advance(10.0)
    assert meter.data_wait_fraction() == pytest.approx(0.25)
    meter.reset_window()
    assert meter.data_wait_fraction() == 0.0
    clock.advance(4.0)
    meter.add_data_wait(1.0)
    meter.add_data_wait(1.0)
    assert meter.data_wait_fraction() == pytest.approx(0.5)


def test_meter_matches_a_plain_event_replay() -> None:
    """Replay a random event sequence and compare with totals computed independently."""
    import random

    rng = random.Random(3)
    clock = FakeClock()
    meter = ThroughputMeter(clock)
    meter.start()
    train_time = images = wait = 0.0
    for _ in range(200):
        kind = rng.choice(["step", "eval"])
        dt = rng.uniform(0.01, 2.0)
        if kind == "step":
            clock.advance(dt)
            n = rng.randrange(1, 512)
            w = rng.uniform(0, dt)
            meter.add(n)
            meter.add_data_wait(w)
            train_time += dt
            images += n
            wait += w
        else:
            with meter.excluded():
                clock.advance(dt)
    assert meter.rate() == pytest.approx(images / train_time)
    assert meter.data_wait_fraction() == pytest.approx(wait / train_time)


def test_meter_errors() -> None:
    meter = ThroughputMeter(FakeClock())
    with pytest.raises(RuntimeError, match="before start"):
        meter.add(1)
    meter.start()
    with pytest.raises(ValueError, match="images = -1"):
        meter.add(-1)
    with pytest.raises(ValueError, match=r"seconds = -0\.5"):
        meter.add_data_wait(-0.5)


# -- setup_logging -----------------------------------------------------------------------------------


def test_setup_logging_per_rank_files_with_rank_in_lines(tmp_path: Path) -> None:
    logger = setup_logging(tmp_path, rank=1, world_size=2)
    logger.info("hello from one")
    logger.debug("debug detail")
    close_logging()
    logger = setup_logging(tmp_path, rank=0, world_size=2)
    logger.getChild("train").info("hello from zero")
    close_logging()
    rank1 = (tmp_path / "train.rank1.log").read_text().splitlines()
    rank0 = (tmp_path / "train.log").read_text().splitlines()
    assert len(rank1) == 2 and all("rank 1/2" in line for line in rank1)
    assert "INFO" in rank1[0] and rank1[0].endswith("hello from one")
    assert "DEBUG" in rank1[1]
    assert len(rank0) == 1 and "rank 0/2" in rank0[0] and "facems.train" in rank0[0]


def test_setup_logging_console_on_rank0_only(tmp_path: Path) -> None:
    logger = setup_logging(tmp_path, 0, 2)
    streams = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)]
    consoles = [h for h in streams if not isinstance(h, logging.FileHandler)]
    assert len(consoles) == 1 and consoles[0].level == logging.INFO
    logger = setup_logging(tmp_path, 1, 2)
    assert all(isinstance(h, logging.FileHandler) for h in logger.handlers)


def test_setup_logging_is_idempotent_and_close_removes_handlers(tmp_path: Path) -> None:
    root = logging.getLogger(LOGGER_NAME)
    before = list(root.handlers)
    logger = setup_logging(tmp_path, 0, 1)
    first = list(logger.handlers)
    assert len(first) == len(before) + 2
    logger = setup_logging(tmp_path, 0, 1)
    assert logger.handlers == first  # same handlers, none added
    logger.info("once")
    assert (tmp_path / "train.log").read_text().count("once") == 1
    close_logging()
    assert root.handlers == before
    assert root.propagate
    close_logging()  # twice is harmless


def test_setup_logging_rejects_bad_rank(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rank = 2, world_size = 2"):
        setup_logging(tmp_path, 2, 2)


# -- TrainLogger -------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_logger_jsonl_records_and_non_finite_values(tmp_path: Path) -> None:
    with TrainLogger(tmp_path, 0, 1, total_steps=30, tensorboard=False, progress=False) as tl:
        for step in range(1, 31):
            tl.step()
            if step % 10 == 0:
                tl.log(
                    step,
                    epoch=step // 20,
                    metrics={
                        "loss": float("nan") if step == 20 else 1.0 / step,
                        "lr": 0.1,
                        "images_per_s": 1234.5,
                        "grad_norm": float("inf") if step == 30 else 2.0,
                        "skipped_steps": 1 if step >= 20 else 0,
                        "memory_mb": 512,
                    },
                )
        tl.log_eval(30, {"cplfw": {"accuracy": 0.875, "threshold": float("-inf")}})
    records = _read_jsonl(tmp_path / "metrics.jsonl")
    assert len(records) == 4
    train = records[:3]
    assert [r["step"] for r in train] == [10, 20, 30]
    assert [r["epoch"] for r in train] == [0, 1, 1]
    for r in train:
        assert list(r)[: len(METRIC_KEYS)] == list(METRIC_KEYS)
        assert r["data_wait_fraction"] is None and r["loss_scale"] is None
        assert r["memory_mb"] == 512
    assert train[0]["loss"] == pytest.approx(0.1)
    assert train[1]["loss"] == "nan"
    assert train[2]["grad_norm"] == "inf"
    assert [r["skipped_steps"] for r in train] == [0, 1, 1]
    assert records[3]["eval"] == {"cplfw": {"accuracy": 0.875, "threshold": "-inf"}}
    log = (tmp_path / "train.log").read_text()
    assert "step 20 epoch 1 loss nan" in log
    assert "eval step 30: cplfw accuracy 0.8750" in log


def test_train_logger_appends_on_resume(tmp_path: Path) -> None:
    with TrainLogger(tmp_path, 0, 1, total_steps=20, tensorboard=False, progress=False) as tl:
        tl.log(10, 0, {"loss": 1.0})
    with TrainLogger(tmp_path, 0, 1, total_steps=20, start_step=10, tensorboard=False, progress=False) as tl:
        tl.log(20, 0, {"loss": 0.5})
    assert [r["step"] for r in _read_jsonl(tmp_path / "metrics.jsonl")] == [10, 20]


def test_train_logger_other_ranks_write_only_their_log(tmp_path: Path) -> None:
    tl = TrainLogger(tmp_path, 1, 2, total_steps=10, tensorboard=True, progress=True)
    tl.step()
    tl.log(1, 0, {"loss": 0.25, "lr": 0.01})
    tl.log_eval(1, {"calfw": {"accuracy": 0.5}})
    tl.close()
    tl.close()  # twice is harmless
    assert not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "tb").exists()
    assert not (tmp_path / "train.log").exists()
    lines = (tmp_path / "train.rank1.log").read_text().splitlines()
    assert any("rank 1/2" in line and "step 1 epoch 0 loss 0.2500" in line for line in lines)
    with pytest.raises(RuntimeError, match="after close"):
        tl.log(2, 0, {})


def test_train_logger_tensorboard_scalars_read_back(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with TrainLogger(tmp_path, 0, 1, total_steps=20, progress=False) as tl:
        tl.log(10, 0, {"loss": 0.75, "lr": 0.05, "images_per_s": 300.0, "loss_scale": None})
        tl.log(20, 0, {"loss": 0.5, "lr": 0.025, "images_per_s": 310.0, "data_wait_fraction": 0.125})
        tl.log_eval(20, {"cplfw": {"accuracy": 0.9375}})
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_s", "val/cplfw/accuracy"} <= tags
    assert "train/loss_scale" not in tags  # None is not a scalar
    loss = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(10, 0.75), (20, 0.5)]
    assert [(e.step, e.value) for e in acc.Scalars("train/data_wait_fraction")] == [(20, 0.125)]
    (val,) = acc.Scalars("val/cplfw/accuracy")
    assert val.step == 20 and math.isclose(val.value, 0.9375)


def test_train_logger_keeps_logging_it_did_not_install(tmp_path: Path) -> None:
    logger = setup_logging(tmp_path, 0, 1)
    handlers = list(logger.handlers)
    with TrainLogger(tmp_path, 0, 1, total_steps=1, tensorboard=False, progress=False) as tl:
        tl.log(1, 0, {"loss": 1.0})
    assert logger.handlers == handlers
    logger.info("after the train logger")
    assert "after the train logger" in (tmp_path / "train.log").read_text()


def test_train_logger_progress_bar_counts_steps(tmp_path: Path) -> None:
    with TrainLogger(tmp_path, 0, 1, total_steps=50, start_step=20, tensorboard=False) as tl:
        assert tl._bar is not None
        tl.step()
        tl.step(4)
        tl.log(25, 0, {"loss": 0.5, "lr": 0.1, "images_per_s": 99.0})
        assert tl._bar.n == 25 and tl._bar.total == 50
        assert tl._bar.postfix is not None and "img/s=99.0" in tl._bar.postfix
