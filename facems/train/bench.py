"""Training-step throughput on synthetic in-memory batches (the library side of ``scripts/bench_train.py``).

One training step, as the loop runs it, is split into four phases, each timed with the device
synchronised before and after:

- ``data``: a host uint8 batch ``(N, 3, 112, 112)`` goes to the device (pinned, non-blocking on
  CUDA), half of the images (drawn at random) are flipped horizontally, pixels are scaled with
  ``(x / 255 - 0.5) / 0.5`` to [-1, 1], and the batch is made channels_last (when asked);
- ``forward``: the backbone (under autocast for bf16/fp16) and the MS loss of the global batch
  (:class:`facems.losses.MultiSimilarityLoss` in :class:`facems.losses.CrossRankLoss`);
- ``backward``: gradients (through a GradScaler for fp16); under DDP this includes the gradient
  all-reduce;
- ``optimizer``: SGD with momentum 0.9 (:func:`facems.train.build_optimizer`) and zeroing the gradients.

``loss="arcface"`` times the workload of insightface's arcface_torch instead, for a like-for-like
comparison on the same card: the same backbone followed by an ArcFace margin-softmax classification
layer over ``num_classes`` identities (:class:`facems.losses.MarginHead`, s = 64, m = 0.5; 85,742 is
MS1MV2's count; a single GPU holds all the classes, as arcface_torch's partial FC with sample rate 1
does), trained with the same SGD. Labels are then drawn at random from the classes. Under DDP each
rank keeps a whole copy of that layer (arcface_torch shards it and gathers the embeddings instead),
so the comparison is meant for one GPU.

The batches are random pixels with P x K labels (K images per identity, distinct identities per
rank), prepared before timing, so no decoding or disk is involved: this measures the model, the
loss and the optimizer, i.e. the ceiling the data pipeline has to feed. Throughput counts the images
of *all* ranks over the slowest rank's wall time of the timed steps (warm-up steps, where
``torch.compile`` compiles, are excluded).
"""

from __future__ import annotations

import contextlib
import platform
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from facems.config import OptimConfig
from facems.data.transforms import normalize_faces
from facems.losses import CrossRankLoss, MarginHead, MultiSimilarityLoss
from facems.losses.distributed import world_info
from facems.models import create_model
from facems.train.loop import tune_cpu_allocator
from facems.train.optim import build_optimizer

__all__ = [
    "BENCH_LOSSES",
    "PRECISIONS",
    "BenchResult",
    "bench_train",
    "device_name",
    "format_table",
    "peak_memory_mb",
    "reset_peak_memory",
]

PRECISIONS = ("fp32", "bf16", "fp16")
BENCH_LOSSES = ("ms", "arcface")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BenchResult:
    """One benchmark configuration and what it measured.

    Attributes:
        model: backbone name.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        compile: the model ran under ``torch.compile``.
        channels_last: model and input in channels_last memory format.
        batch_per_rank: images per step on each rank.
        world_size: number of processes.
        steps: timed steps.
        images_per_s: images of all ranks per second of wall time (slowest rank).
        wall_s: wall time of the timed steps, slowest rank, seconds.
        ms_data, ms_forward, ms_backward, ms_optimizer: mean milliseconds per step of each phase,
            averaged over the ranks.
        peak_memory_mb: CUDA: peak allocated memory; CPU: peak resident set size of the process
            (MiB, largest over the ranks).
        device: the device's name (GPU model, or CPU model and threads per rank).
        loss: the last step's loss (of this rank), to show it stayed finite.
        objective: ``ms`` (the MS loss over the global batch) or ``arcface`` (the reference workload:
            an ArcFace classification layer over ``num_classes`` identities).
        num_classes: classes of the ArcFace layer (0 for ``ms``).
    """

    model: str
    precision: str
    compile: bool
    channels_last: bool
    batch_per_rank: int
    world_size: int
    steps: int
    images_per_s: float
    wall_s: float
    ms_data: float
    ms_forward: float
    ms_backward: float
    ms_optimizer: float
    peak_memory_mb: float
    device: str
    loss: float
    objective: str = "ms"
    num_classes: int = 0

    @property
    def ms_step(self) -> float:
        """Mean milliseconds per step, all four phases."""
        return self.ms_data + self.ms_forward + self.ms_backward + self.ms_optimizer

    def as_dict(self) -> dict[str, Any]:
        """The fields and ``ms_step`` as a plain dict (for JSON output)."""
        return {**asdict(self), "ms_step": self.ms_step}


def device_name(device: torch.device) -> str:
    """A GPU's model name, or the CPU's model name with the number of threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {torch.get_num_threads()} threads/rank"


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory measurement.

    CUDA: resets the allocator's peak statistics. CPU (Linux): resets the process's peak resident
    set size by writing 5 to ``/proc/self/clear_refs``; where that is not possible, the CPU peak is
    the process's peak since it started.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: ``torch.cuda.max_memory_allocated``; CPU: ``getrusage`` peak RSS of this process (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def bench_train(
    model: str = "iresnet_tiny",
    batch: int = 64,
    k: int = 4,
    precision: str = "fp32",
    channels_last: bool = True,
    compile: bool = False,
    steps: int = 20,
    warmup: int = 3,
    device: torch.device | str | None = None,
    seed: int = 0,
    loss: str = "ms",
    num_classes: int = 85742,
) -> BenchResult:
    """Time ``warmup + steps`` training steps of ``model`` on synthetic batches; time the last ``steps``.

    Runs in the current process; when a process group is initialised, every rank must call it with
    the same arguments: the model is wrapped in DDP, the loss is the global batch's, and the numbers
    are reduced over the ranks (images summed, wall time and memory maximised, phases averaged).

    Args:
        model: backbone name (:func:`facems.models.create_model`).
        batch: images per rank per step, a multiple of ``k``.
        k: images per identity (P = batch / k identities per rank).
        precision: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast and a GradScaler).
        channels_last: model and input in channels_last memory format.
        compile: wrap the model in ``torch.compile`` (compilation happens in the warm-up steps).
        steps: timed steps (>= 1).
        warmup: untimed steps before them (>= 0).
        device: where to run (None: CUDA if available, else CPU).
        seed: seed of the weights and the synthetic batches.
        loss: ``ms`` (facems's step) or ``arcface`` (arcface_torch's workload, see the module doc).
        num_classes: classes of the ArcFace layer (``loss="arcface"`` only).

    Returns:
        The measured :class:`BenchResult`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"bench_train: precision = {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if k < 1 or batch < k or batch % k:
        raise ValueError(f"bench_train: batch = {batch}, k = {k}: expected k >= 1 and batch a multiple of k")
    if steps < 1 or warmup < 0:
        raise ValueError(f"bench_train: steps = {steps}, warmup = {warmup}: expected steps >= 1, warmup >= 0")
    if loss not in BENCH_LOSSES:
        raise ValueError(f"bench_train: loss = {loss!r}: expected one of {', '.join(BENCH_LOSSES)}")
    if loss == "arcface" and num_classes < 1:
        raise ValueError(f"bench_train: num_classes = {num_classes}: expected >= 1 for loss 'arcface'")
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"bench_train: precision = 'bf16': {device_name(dev)} does not support bf16")
    if dev.type == "cpu":  # as the trainer does: no mmap/munmap of activations every step
        tune_cpu_allocator()
    rank, world = world_info()
    sync = _sync(dev)
    reset_peak_memory(dev)

    torch.manual_seed(seed)  # the same initial weights on every rank
    net: nn.Module = create_model(model).to(dev)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    head = MarginHead(_embedding_dim(net), num_classes).to(dev) if loss == "arcface" else None
    params = nn.ModuleList([net] if head is None else [net, head])
    optimizer = build_optimizer(params, OptimConfig(name="sgd", lr=0.01, momentum=0.9))
    if compile:
        net = torch.compile(net)  # type: ignore[assignment]
    ms_loss = CrossRankLoss(MultiSimilarityLoss())
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = ms_loss if head is None else head
    scaler = torch.amp.GradScaler(dev.type) if precision == "fp16" else None
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = (
        (lambda: torch.autocast(dev.type, dtype=_AUTOCAST_DTYPES[precision]))
        if precision in _AUTOCAST_DTYPES
        else contextlib.nullcontext
    )

    # Synthetic host batches: two, so consecutive steps do not see the same tensor.
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    host = [torch.randint(0, 256, (batch, 3, 112, 112), dtype=torch.uint8, generator=gen) for _ in range(2)]
    if dev.type == "cuda":
        host = [h.pin_memory() for h in host]
    per_rank = batch // k
    labels = (torch.arange(per_rank).repeat_interleave(k) + rank * per_rank).to(dev)
    if head is not None:
        labels = torch.randint(0, num_classes, (batch,), generator=gen).to(dev)
    flip_gen = torch.Generator(device=dev).manual_seed(seed * 1000 + rank)

    totals = [0.0, 0.0, 0.0, 0.0]  # seconds in data, forward, backward, optimizer (timed steps)
    loss_value = float("nan")
    wall_start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            if world > 1:  # start the timed steps together
                dist.all_reduce(torch.zeros(1, device=dev))
            sync()
            wall_start = time.perf_counter()
        sync()
        t0 = time.perf_counter()
        flip = torch.rand(batch, device=dev, generator=flip_gen) < 0.5
        x = normalize_faces(host[i % 2].to(dev, non_blocking=True), flip, channels_last)
        sync()
        t1 = time.perf_counter()
        with autocast():
            emb = net(x)
        loss_t = loss_fn(emb.float(), labels)
        sync()
        t2 = time.perf_counter()
        if scaler is not None:
            scaler.scale(loss_t).backward()
        else:
            loss_t.backward()
        sync()
        t3 = time.perf_counter()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t4 = time.perf_counter()
        if i >= warmup:
            for j, dt in enumerate((t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                totals[j] += dt
        loss_value = float(loss_t.detach())
    wall = time.perf_counter() - wall_start
    peak = peak_memory_mb(dev)

    summed = torch.tensor([float(batch * steps), *totals], dtype=torch.float64, device=dev)
    maxed = torch.tensor([wall, peak], dtype=torch.float64, device=dev)
    if world > 1:
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
    images, *phase_sums = summed.tolist()
    wall, peak = maxed.tolist()
    ms = [1000.0 * s / (steps * world) for s in phase_sums]
    return BenchResult(
        model=model,
        precision=precision,
        compile=compile,
        channels_last=channels_last,
        batch_per_rank=batch,
        world_size=world,
        steps=steps,
        images_per_s=images / wall,
        wall_s=wall,
        ms_data=ms[0],
        ms_forward=ms[1],
        ms_backward=ms[2],
        ms_optimizer=ms[3],
        peak_memory_mb=peak,
        device=device_name(dev),
        loss=loss_value,
        objective=loss,
        num_classes=num_classes if head is not None else 0,
    )


def _embedding_dim(net: nn.Module) -> int:
    """The backbone's output width (``num_features``), from the attribute or one dry forward pass."""
    inner = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net
    dim = getattr(inner, "num_features", None)
    if isinstance(dim, int):
        return dim
    p = next(inner.parameters())
    was_training = inner.training
    inner.eval()
    with torch.no_grad():
        dim = int(inner(torch.zeros(1, 3, 112, 112, device=p.device)).shape[1])
    inner.train(was_training)
    return dim


_COLUMNS = (
    "model",
    "loss",
    "precision",
    "compile",
    "channels_last",
    "batch/rank",
    "world",
    "img/s (all ranks)",
    "ms/step",
    "data ms",
    "forward ms",
    "backward ms",
    "optimizer ms",
    "peak MiB",
    "device",
)


def format_table(rows: list[BenchResult]) -> str:
    """A markdown table with one line per result (columns as in ``scripts/bench_train.py``)."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for r in rows:
        cells = [
            r.model,
            r.objective if r.objective == "ms" else f"{r.objective} ({r.num_classes} classes)",
            r.precision,
            "yes" if r.compile else "no",
            "yes" if r.channels_last else "no",
            str(r.batch_per_rank),
            str(r.world_size),
            f"{r.images_per_s:.1f}",
            f"{r.ms_step:.1f}",
            f"{r.ms_data:.1f}",
            f"{r.ms_forward:.1f}",
            f"{r.ms_backward:.1f}",
            f"{r.ms_optimizer:.1f}",
            f"{r.peak_memory_mb:.0f}",
            r.device,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
