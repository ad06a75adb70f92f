"""Training logs: throughput accounting, per-rank log files, and rank 0's bar, JSON lines and TensorBoard.

Nothing here talks to ``torch.distributed``. The training loop all-reduces what it measures (images
of every rank, the loss averaged over ranks, ...) and passes those *global* numbers in, so each
piece can be tested with plain values and a fake clock.

- :class:`ThroughputMeter`: images per second of wall time, with evaluation and checkpoint windows
  left out, and the fraction of the remaining time spent waiting for data.
- :func:`setup_logging`: the ``facems`` logger; every rank writes its own file in the run folder,
  rank 0 alone also writes to the console.
- :class:`TrainLogger`: on rank 0 a tqdm progress bar, ``metrics.jsonl`` (one JSON object per log
  call) and TensorBoard scalars in ``tb/``; on every rank one line per log call in its log file.

Files in the run folder::

    train.log            rank 0's log (rank r > 0: train.rank{r}.log)
    metrics.jsonl        rank 0: {"step", "epoch", "loss", "lr", "images_per_s", ...} per log step,
                         {"step", "eval": {target: {metric: value}}} per evaluation
    tb/                  rank 0: TensorBoard event files (train/*, val/<target>/<metric>)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Callable, Union

from tqdm import tqdm

__all__ = [
    "LOGGER_NAME",
    "METRIC_KEYS",
    "ThroughputMeter",
    "TrainLogger",
    "close_logging",
    "log_file_name",
    "setup_logging",
]

LOGGER_NAME = "facems"

# The keys every metrics.jsonl training record carries (None where the loop did not supply a value),
# in this order; TensorBoard tags are "train/<key>" for all but step and epoch.
METRIC_KEYS: tuple[str, ...] = (
    "step",
    "epoch",
    "loss",
    "lr",
    "images_per_s",
    "data_wait_fraction",
    "grad_norm",
    "loss_scale",
    "skipped_steps",
)

MetricValue = Union[float, int, None]

# Marks the handlers setup_logging installs, so that they (and only they) are found again.
_HANDLER_TAG = "_facems_handler"


class ThroughputMeter:
    """Images per second of training wall time, leaving out evaluation and checkpoint windows.

    The loop calls :meth:`add` once per optimizer step with the images of *all* ranks in that step
    (so the rate is global, not rank 0's rate times the world size), wraps evaluation or a
    checkpoint write in :meth:`excluded`, and reports :meth:`add_data_wait` with the seconds it
    waited for the next batch. A *window* runs from :meth:`start` or the last :meth:`reset_window`
    to now; :meth:`rate` and :meth:`data_wait_fraction` describe the current window, and
    :meth:`overall_rate` everything since :meth:`start`.

    Args:
        clock: monotonic clock in seconds (tests pass a fake one).

    Example::

        meter = ThroughputMeter()
        meter.start()
        for step in ...:
            meter.add(global_batch)
            if step % every == 0:
                log(images_per_s=meter.rate(), data_wait_fraction=meter.data_wait_fraction())
                meter.reset_window()
            if step % eval_every == 0:
                with meter.excluded():
                    evaluate()
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._started = False
        # Since start().
        self._t_start = 0.0
        self._images_total = 0
        self._excluded_total = 0.0
        # Since the last reset_window().
        self._t_window = 0.0
        self._images_window = 0
        self._excluded_window = 0.0
        self._data_wait_window = 0.0
        # Open excluded() blocks: nesting depth and when the outermost began (or, after a reset
        # inside it, when the window began).
        self._depth = 0
        self._t_excl_total = 0.0
        self._t_excl_window = 0.0

    def start(self) -> None:
        """Start (or restart) counting: zero every counter and open the first window now."""
        now = self._clock()
        self._started = True
        self._t_start = self._t_window = now
        self._images_total = self._images_window = 0
        self._excluded_total = self._excluded_window = 0.0
        self._data_wait_window = 0.0
        self._t_excl_total = self._t_excl_window = now

    def _require_started(self, what: str) -> None:
        if not self._started:
            raise RuntimeError(f"ThroughputMeter.{what}() called before start()")

    def add(self, images: int) -> None:
        """Count the images of one optimizer step, summed over all ranks.

        Args:
            images: global images processed by the step (>= 0).
        """
        self._require_started("add")
        if images < 0:
            raise ValueError(f"ThroughputMeter.add: images = {images!r}: expected an integer >= 0")
        self._images_total += int(images)
        self._images_window += int(images)

    def add_data_wait(self, seconds: float) -> None:
        """Count time the loop spent waiting for its next batch (part of the training time).

        Args:
            seconds: wall time waited (>= 0).
        """
        self._require_started("add_data_wait")
        if not seconds >= 0:
            raise ValueError(f"ThroughputMeter.add_data_wait: seconds = {seconds!r}: expected a number >= 0")
        self._data_wait_window += float(seconds)

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """A block whose wall time counts neither as training time nor towards the rate.

        Blocks may nest; the outermost one decides. Use it around evaluation, checkpoint writes
        and anything else that is not training.
        """
        self._require_started("excluded")
        if self._depth == 0:
            self._t_excl_total = self._t_excl_window = self._clock()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                now = self._clock()
                self._excluded_total += now - self._t_excl_total
                self._excluded_window += now - self._t_excl_window

    def _open_excluded(self, since: float, now: float) -> float:
        """Seconds of a still-open excluded block that fall after ``since``."""
        return now - since if self._depth > 0 else 0.0

    def window_seconds(self) -> float:
        """Training seconds in the current window: wall time minus excluded blocks (open ones too)."""
        self._require_started("window_seconds")
        now = self._clock()
        excluded = self._excluded_window + self._open_excluded(self._t_excl_window, now)
        return max(now - self._t_window - excluded, 0.0)

    def rate(self) -> float:
        """Images per second of training time in the current window (0.0 before any time passed)."""
        seconds = self.window_seconds()
        return self._images_window / seconds if seconds > 0 else 0.0

    def overall_rate(self) -> float:
        """Images per second of training time since :meth:`start` (0.0 before any time passed)."""
        self._require_started("overall_rate")
        now = self._clock()
        excluded = self._excluded_total + self._open_excluded(self._t_excl_total, now)
        seconds = now - self._t_start - excluded
        return self._images_total / seconds if seconds > 0 else 0.0

    def data_wait_fraction(self) -> float:
        """Share of the current window's training time spent waiting for data, in [0, 1]."""
        seconds = self.window_seconds()
        if seconds <= 0:
            return 0.0
        return min(self._data_wait_window / seconds, 1.0)

    @property
    def images(self) -> int:
        """Images counted since :meth:`start`."""
        return self._images_total

    def reset_window(self) -> None:
        """Open a new window now (per log interval); the totals since :meth:`start` are kept."""
        self._require_started("reset_window")
        now = self._clock()
        self._t_window = now
        self._images_window = 0
        self._excluded_window = 0.0
        self._data_wait_window = 0.0
        if self._depth > 0:
            # The open block's time before now belonged to the old window.
            self._t_excl_window = now


def log_file_name(rank: int) -> str:
    """``train.log`` for rank 0, ``train.rank{rank}.log`` for the others."""
    return "train.log" if rank == 0 else f"train.rank{rank}.log"


class _TqdmConsoleHandler(logging.StreamHandler):
    """Console handler that prints through ``tqdm.write``, so log lines do not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:
            self.handleError(record)


def _our_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if getattr(h, _HANDLER_TAG, None) is not None]


def _configured_for(logger: logging.Logger, path: Path, rank: int, world_size: int) -> bool:
    """True when ``logger`` already holds exactly the handlers setup_logging would install."""
    tags = [getattr(h, _HANDLER_TAG) for h in _our_handlers(logger)]
    want = [("file", str(path.resolve()), rank, world_size)]
    if rank == 0:
        want.append(("console", "", rank, world_size))
    return sorted(tags) == sorted(want)


def setup_logging(run_dir: Path, rank: int, world_size: int) -> logging.Logger:
    """Configure the ``facems`` logger for one rank of a run.

    Every rank appends to its own file in ``run_dir`` (:func:`log_file_name`), at DEBUG and above;
    rank 0 also prints INFO and above to stderr (through tqdm, so a progress bar stays intact).
    Lines carry the time, ``rank r/W`` and the level. The logger stops propagating to the root
    logger while configured, so a root handler cannot make other ranks print to the console.

    Calling it again with the same arguments changes nothing; with other arguments it replaces the
    handlers it installed before. :func:`close_logging` removes them.

    Args:
        run_dir: the run folder (created if missing).
        rank: this process's rank, in ``[0, world_size)``.
        world_size: number of processes.

    Returns:
        The ``facems`` logger.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"setup_logging: rank = {rank!r}, world_size = {world_size!r}: "
            "expected world_size >= 1 and 0 <= rank < world_size"
        )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / log_file_name(rank)
    logger = logging.getLogger(LOGGER_NAME)
    if _configured_for(logger, path, rank, world_size):
        return logger
    close_logging()

    fmt = logging.Formatter(
        f"%(asctime)s rank {rank}/{world_size} %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )
    file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(fmt)
    setattr(file_handler, _HANDLER_TAG, ("file", str(path.resolve()), rank, world_size))
    logger.addHandler(file_handler)
    if rank == 0:
        console = _TqdmConsoleHandler(sys.stderr)
        console.setLevel(logging.INFO)
        console.setFormatter(fmt)
        setattr(console, _HANDLER_TAG, ("console", "", rank, world_size))
        logger.addHandler(console)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger


def close_logging() -> None:
    """Flush, close and remove the handlers :func:`setup_logging` installed; restore propagation."""
    logger = logging.getLogger(LOGGER_NAME)
    handlers = _our_handlers(logger)
    for handler in handlers:
        logger.removeHandler(handler)
        handler.close()
    if handlers:
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


def _json_value(value: Any) -> Any:
    """A value ``json.dumps(allow_nan=False)`` accepts: non-finite floats become "nan", "inf", "-inf"."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, int):
        return value
    if hasattr(value, "item"):  # numpy and torch scalars
        return _json_value(value.item())
    f = float(value)
    if math.isnan(f):
        return "nan"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    return f


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _fmt(value: Any, spec: str) -> str:
    return format(float(value), spec) if _is_number(value) else "-"


class TrainLogger:
    """Everything a training run reports, in one object the loop calls every log step.

    On rank 0: a tqdm progress bar over optimizer steps (postfix loss, lr, img/s; tqdm's ETA),
    ``run_dir/metrics.jsonl`` (appended, one JSON object per :meth:`log` or :meth:`log_eval` call,
    flushed line by line; NaN and infinities written as the strings ``"nan"``, ``"inf"``,
    ``"-inf"``, missing values as null, so every line is valid JSON) and, when ``tensorboard``,
    scalars in ``run_dir/tb``. On every rank: one INFO line per call in the rank's log file
    (rank 0 also on the console), via :func:`setup_logging`, which this installs if it is not
    already in place for this run and rank (and then removes again in :meth:`close`).

    The numbers passed in must already be global (all-reduced by the loop).

    Args:
        run_dir: run folder.
        rank: this process's rank.
        world_size: number of processes.
        total_steps: optimizer steps of the whole run (the bar's total).
        start_step: steps already done (resume): the bar starts there.
        every_steps: the loop's log interval; only used in the start-up message.
        tensorboard: write TensorBoard scalars (rank 0).
        progress: show the progress bar (rank 0).
    """

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        world_size: int,
        total_steps: int,
        start_step: int = 0,
        every_steps: int = 10,
        tensorboard: bool = True,
        progress: bool = True,
    ) -> None:
        if total_steps < 0 or not 0 <= start_step:
            raise ValueError(
                f"TrainLogger: total_steps = {total_steps!r}, start_step = {start_step!r}: "
                "expected integers >= 0"
            )
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.world_size = world_size
        self.is_main = rank == 0
        logger = logging.getLogger(LOGGER_NAME)
        self._owns_logging = not _configured_for(logger, self.run_dir / log_file_name(rank), rank, world_size)
        setup_logging(self.run_dir, rank, world_size)
        self.logger = logging.getLogger(f"{LOGGER_NAME}.train")
        self._closed = False
        self._bar: tqdm | None = None
        self._jsonl: IO[str] | None = None
        self._tb: Any = None
        if self.is_main:
            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                disable=not progress,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        self.logger.info(
            "logging to %s: steps %d..%d, every %d steps, world size %d%s",
            self.run_dir,
            start_step,
            total_steps,
            every_steps,
            world_size,
            ", tensorboard" if tensorboard and self.is_main else "",
        )

    # -- writing -----------------------------------------------------------------------------------

    def _write_json(self, record: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(_json_value(record), allow_nan=False) + "\n")
            self._jsonl.flush()

    def _scalar(self, tag: str, value: Any, step: int) -> None:
        if self._tb is not None and _is_number(value):
            self._tb.add_scalar(tag, float(value), step)

    def step(self, n: int = 1) -> None:
        """Advance the progress bar by ``n`` optimizer steps (call every step)."""
        if self._bar is not None:
            self._bar.update(n)

    def log(self, step: int, epoch: int, metrics: Mapping[str, MetricValue]) -> None:
        """Record one log step.

        Args:
            step: optimizer steps done so far.
            epoch: current epoch (0-based).
            metrics: global values; the keys of :data:`METRIC_KEYS` (``loss``, ``lr``,
                ``images_per_s``, ``data_wait_fraction``, ``grad_norm``, ``loss_scale``,
                ``skipped_steps``) are recognised, missing ones are written as null; any other key
                is written too (and, when numeric, as the scalar ``train/<key>``).
        """
        if self._closed:
            raise RuntimeError("TrainLogger.log() called after close()")
        record: dict[str, Any] = {"step": int(step), "epoch": int(epoch)}
        for key in METRIC_KEYS[2:]:
            record[key] = metrics.get(key)
        for key, value in metrics.items():
            if key not in record:
                record[key] = value
        record["time"] = time.time()
        self._write_json(record)
        for key, value in record.items():
            if key not in ("step", "epoch", "time"):
                self._scalar(f"train/{key}", value, step)
        if self._tb is not None:
            self._tb.flush()
        if self._bar is not None:
            self._bar.set_postfix(
                {
                    "loss": _fmt(record["loss"], ".4f"),
                    "lr": _fmt(record["lr"], ".3g"),
                    "img/s": _fmt(record["images_per_s"], ".1f"),
                },
                refresh=False,
            )
        extras = [k for k in record if k not in METRIC_KEYS and k != "time"]
        self.logger.info(
            "step %d epoch %d loss %s lr %s img/s %s data wait %s grad norm %s loss scale %s skipped %s%s",
            step,
            epoch,
            _fmt(record["loss"], ".4f"),
            _fmt(record["lr"], ".4g"),
            _fmt(record["images_per_s"], ".1f"),
            _fmt(record["data_wait_fraction"], ".1%"),
            _fmt(record["grad_norm"], ".3g"),
            _fmt(record["loss_scale"], ".4g"),
            _fmt(record["skipped_steps"], ".0f"),
            "".join(f" {k} {record[k]}" for k in extras),
        )

    def log_eval(self, step: int, results: Mapping[str, Mapping[str, float]]) -> None:
        """Record one evaluation.

        Args:
            step: optimizer steps done when the model was evaluated.
            results: ``{target: {metric: value}}``, e.g. ``{"cplfw": {"accuracy": 0.91}}``.
        """
        if self._closed:
            raise RuntimeError("TrainLogger.log_eval() called after close()")
        self._write_json({"step": int(step), "eval": results, "time": time.time()})
        for target, metrics in results.items():
            for metric, value in metrics.items():
                self._scalar(f"val/{target}/{metric}", value, step)
        if self._tb is not None:
            self._tb.flush()
        parts = [
            f"{target} " + " ".join(f"{m} {_fmt(v, '.4f')}" for m, v in metrics.items())
            for target, metrics in results.items()
        ]
        self.logger.info("eval step %d: %s", step, "; ".join(parts) if parts else "(no targets)")

    # -- closing -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close the bar, ``metrics.jsonl`` and TensorBoard; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._owns_logging:
            close_logging()

    def __enter__(self) -> TrainLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
