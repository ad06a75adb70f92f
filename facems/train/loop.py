"""The training loop: :func:`fit` runs a whole configured run; :class:`Trainer` holds its pieces.

One optimizer step, on every rank::

    uint8 P x K batch -> device (non-blocking) -> random flip + (x/255 - 0.5)/0.5, channels_last
    -> backbone under autocast -> embeddings (fp32 head)
    -> pair loss over the global batch (CrossRankLoss: local anchors x all ranks' references)
       [+ xbm_weight * loss against the cross-batch memory] [+ margin_weight * ArcFace/CosFace loss]
    -> backward (scaled for fp16, divided by grad_accum; DDP averages gradients at the last micro-batch)
    -> one all-reduce of (loss sum, sample count, non-finite count, data wait)
    -> if anything was non-finite: skip the update, restore BatchNorm buffers, count the bad step
       else: unscale (fp16), clip the global gradient norm, optimizer step
    -> scheduler step (also for a skipped step: the schedule follows the data position)

Choices made here (the issue is silent on them):

* The random flip of each image is drawn from a generator seeded by ``(data.seed, epoch, micro-batch,
  rank)``, not from the global RNG, so it is the same after a resume whatever else drew numbers.
* A step whose loss or gradient norm is not finite on any rank is skipped on all ranks (the decision
  comes from the all-reduced counts, so ranks never disagree); BatchNorm running statistics updated by
  its forward pass are put back, so no non-finite value reaches the state a checkpoint saves.
  ``train.max_bad_steps`` consecutive bad steps stop training with :class:`TrainingDiverged`.
  With fp16, steps that the GradScaler skips for overflowing gradients are normal loss-scale
  adjustments and are counted separately (``loss_scale_skips``), not as bad steps.
* Micro-batches left over at the end of an epoch (``steps_per_epoch % grad_accum``) are not trained on.
* Resuming with another number of processes is allowed: the model, optimizer and memory are restored,
  the global batch changes with the world size, so the epoch continues at the same fraction of its
  images and the learning-rate schedule is rebuilt for the new epoch length at the same step.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import inspect
import logging
import math
import re
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import facems
from facems.config import Config, config_from_dict, config_to_dict, save_config
from facems.data.binfile import load_bin
from facems.data.datasets import RecordFaceDataset
from facems.data.loader import build_face_loader
from facems.data.samplers import DistributedPKSampler
from facems.data.transforms import normalize_faces
from facems.losses import (
    BinomialDevianceLoss,
    ContrastiveLoss,
    CrossBatchMemory,
    CrossRankLoss,
    LiftedStructureLoss,
    MarginHead,
    MultiSimilarityLoss,
    TripletLoss,
    all_gather_no_grad,
    xbm_loss,
)
from facems.models import create_model, open_backbone
from facems.protocols.pairs import verify_bin
from facems.train.checkpoint import CheckpointError, CheckpointManager, load_checkpoint, save_model_pt
from facems.train.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    cleanup_distributed,
    init_distributed,
)
from facems.train.logging import ThroughputMeter, TrainLogger, setup_logging
from facems.train.optim import NORM_LAYERS, build_optimizer
from facems.train.rng import capture_rng_state, restore_rng_state
from facems.train.schedule import build_scheduler, optimizer_steps

__all__ = [
    "FitResult",
    "Trainer",
    "TrainingDiverged",
    "build_pair_loss",
    "cpu_supports_bf16",
    "fit",
    "resolve_precision",
    "tune_cpu_allocator",
]

logger = logging.getLogger("facems.train")

CHECKPOINT_FORMAT = 1


class TrainingDiverged(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient norm."""


@dataclasses.dataclass
class FitResult:
    """What a finished run reports: where it wrote, how far it got, its last evaluation."""

    run_dir: Path
    step: int
    epoch: int
    bad_steps_total: int
    images_per_s: float
    last_eval: dict[str, dict[str, float]]
    best_eval: dict[str, dict[str, float]]
    best_score: float
    best_step: int


# ----------------------------------------------------------------------------------- building blocks


def cpu_supports_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix units (AVX512-BF16 or AMX-BF16), read from /proc/cpuinfo.

    Without them PyTorch emulates bf16 matrix products, which measured here (no such units) about 80x
    slower than fp32 for a 1024^2 matmul; so ``train.precision=auto`` picks fp32 on such CPUs.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set(re.findall(r"^flags\s*:\s*(.*)$", text, flags=re.M)[0].split()) if "flags" in text else set()
    return bool(flags & {"avx512_bf16", "amx_bf16"})


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def tune_cpu_allocator(threshold: int = 1 << 30) -> bool:
    """Keep freed large blocks in glibc's heap instead of returning them to the kernel.

    By default glibc serves every block above 32 MiB (a CPU activation of a 64-image batch is 51 MiB)
    with its own ``mmap`` and unmaps it on free, so each step pays fresh page faults. Measured on the
    2-core machine, 12 steps of iresnet_tiny at batch 128 (with start-up): 58 s wall and 31 s system
    time by default, 41 s and 4 s with both thresholds raised. Returns whether the settings took
    (``False`` off glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on GPUs that support it (else ``fp16``) and on CPUs with bf16 units, else ``fp32``."""
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"train.precision = {precision!r}: expected auto, bf16, fp16 or fp32")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def build_pair_loss(cfg: Config) -> nn.Module:
    """The batch pair loss named by ``loss.name`` (MS with the configured hyper-parameters, or a GPW loss)."""
    lc = cfg.loss
    if lc.name == "ms":
        return MultiSimilarityLoss(lc.alpha, lc.beta, lc.base, lc.epsilon, lc.mining, lc.chunk_size)
    makers: dict[str, Any] = {
        "contrastive": ContrastiveLoss,
        "triplet": TripletLoss,
        "lifted": LiftedStructureLoss,
        "binomial": BinomialDevianceLoss,
    }
    return makers[lc.name]()


def _flip_mask(seed: int, epoch: int, micro: int, rank: int, n: int) -> Tensor:
    words = np.random.SeedSequence([seed, epoch, micro, rank]).generate_state(2)
    gen = torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))
    return torch.rand(n, generator=gen) < 0.5


class _Net(nn.Module):
    """Backbone plus the optional margin head: one module, so DDP averages the head's gradients too."""

    def __init__(self, backbone: nn.Module, head: MarginHead | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        emb = self.backbone(x).float()
        return emb, (self.head(emb, labels) if self.head is not None else None)


def _no_buffer_sync() -> dict[str, Any]:
    """DDP keyword for rank-local BatchNorm statistics (as arcface_torch): renamed in recent PyTorch."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _all_finite(tensors: list[Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


# -------------------------------------------------------------------------------------- the trainer


class Trainer:
    """Everything one rank needs for a run; :meth:`fit` trains, evaluates and checkpoints.

    Build it after :func:`facems.train.distributed.init_distributed`. :func:`fit` does both.
    """

    def __init__(self, cfg: Config, info: DistInfo) -> None:
        self.cfg = cfg
        self.info = info
        self.device = info.device
        self.run_dir = Path(cfg.train.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log = setup_logging(self.run_dir, info.rank, info.world_size)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        if self.device.type == "cpu":
            tune_cpu_allocator()
        self._configure_backends()

        # Data: sizes come from the pack (property, idx), never from the config.
        dc = cfg.data
        self.dataset = RecordFaceDataset(
            dc.root, (dc.image_size, dc.image_size), dc.max_bad_fraction, rec_name=dc.rec_name
        )
        self.sampler = DistributedPKSampler(
            self.dataset.labels, dc.p, dc.k, info.world_size, info.rank, dc.seed, drop_last=True
        )
        self.loader = build_face_loader(
            self.dataset, self.sampler, num_workers=dc.num_workers, pin_memory=dc.pin_memory
        )
        self.accum = cfg.optim.grad_accum
        self.total_steps, _ = optimizer_steps(cfg.schedule, self.sampler.steps_per_epoch, self.accum)
        self.steps_per_epoch = self.total_steps // cfg.schedule.epochs
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.val_sets = self._load_val_sets()

        # Model: identical initialisation on every rank (DDP also broadcasts rank 0's).
        torch.manual_seed(cfg.train.seed)
        mc = cfg.model
        backbone = create_model(
            mc.name, num_features=mc.num_features, dropout=mc.dropout, grad_checkpoint=mc.grad_checkpoint
        )
        if mc.init_from:  # facems or insightface weights, checked key by key (fine-tuning)
            backbone.load_state_dict(open_backbone(mc.init_from, mc.name, mc.num_features)[0].state_dict())
        head = None
        if cfg.loss.margin_head is not None:
            num_classes = int(self.dataset.labels.max()) + 1
            head = MarginHead(
                mc.num_features, num_classes, cfg.loss.margin_head, cfg.loss.margin_scale, cfg.loss.margin
            )
        fmt = torch.channels_last if mc.channels_last else torch.contiguous_format
        self.net = _Net(backbone, head).to(self.device).to(memory_format=fmt)
        self.backbone = backbone
        self.ddp: nn.Module = self.net
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.net, device_ids=ids, **_no_buffer_sync())
        self.model_fn: nn.Module = torch.compile(self.ddp) if mc.compile else self.ddp  # type: ignore[assignment]
        # Normalisation-layer buffers (running statistics, batch counters), put back after a bad step.
        self._bn_buffers = [b for m in self.net.modules() if isinstance(m, NORM_LAYERS) for b in m.buffers()]
        self._bn_backup = [b.detach().clone() for b in self._bn_buffers]

        # Loss, optimizer, schedule, scaler, memory.
        self.pair_loss = CrossRankLoss(build_pair_loss(cfg))
        self.memory = (
            CrossBatchMemory(cfg.loss.xbm_size, mc.num_features).to(self.device)
            if cfg.loss.xbm_size
            else None
        )
        self.optimizer = build_optimizer(self.net, cfg.optim)
        self.scheduler = build_scheduler(
            self.optimizer, cfg.schedule, self.sampler.steps_per_epoch, self.accum
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

        # Progress.
        self.step = 0
        self.epoch = 0
        self.micro = 0  # micro-batches done in the current epoch (the sampler's position)
        self.bad_streak = 0
        self.bad_total = 0
        self.scale_skips = 0
        self.images_total = 0  # global images trained on (all ranks), restored on resume
        self.best_score = -math.inf
        self.best_step = -1
        self.best_eval: dict[str, dict[str, float]] = {}
        self.last_eval: dict[str, dict[str, float]] = {}
        self.last_eval_step = -1
        self.ckpt = CheckpointManager(self.run_dir, keep=cfg.train.keep_checkpoints)
        self.resumed_from = self._resume()
        if info.is_main:
            save_config(cfg, str(self.run_dir / "config.yaml"))
        self.meter = ThroughputMeter()  # per log window
        self.total_meter = ThroughputMeter()  # whole run (this process's part of it)
        self.tlog = TrainLogger(
            self.run_dir,
            info.rank,
            info.world_size,
            self.total_steps,
            start_step=self.step,
            every_steps=cfg.log.every_steps,
            tensorboard=cfg.log.tensorboard,
            progress=info.is_main,
        )
        self.log.info(
            "run %s: %s, %d images, %d identities, world %d, global batch %d, %d steps/epoch, %d steps, "
            "precision %s, device %s%s",
            cfg.name,
            mc.name,
            len(self.dataset),
            self.dataset.num_classes,
            info.world_size,
            self.sampler.batch_size * info.world_size * self.accum,
            self.steps_per_epoch,
            self.total_steps,
            self.precision,
            self.device,
            f", resumed from {self.resumed_from} at step {self.step}" if self.resumed_from else "",
        )

    # ------------------------------------------------------------------------------- set-up helpers

    def _configure_backends(self) -> None:
        if self.cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def _load_val_sets(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for name in self.cfg.data.val_targets:
            path = Path(self.cfg.data.root) / f"{name}.bin"
            if not path.is_file():
                raise FileNotFoundError(
                    f"data.val_targets: {name!r} needs {path}, which does not exist "
                    "(remove it from data.val_targets or put the .bin file there)"
                )
            size = self.cfg.data.image_size
            out[name] = load_bin(path, (size, size))
        return out

    def _resume(self) -> Path | None:
        mode = self.cfg.train.resume
        if mode == "none":
            return None
        if mode == "auto":
            found = self.ckpt.load_latest(map_location="cpu")
            if found is None:
                return None
            state, path = found
        else:
            path = Path(mode)
            state = load_checkpoint(path)
        self._load_state(state, path)
        return path

    def _load_state(self, state: dict[str, Any], path: Path) -> None:
        where = f"checkpoint {path}"
        for key in ("model", "optimizer", "scheduler", "scaler", "sampler", "step", "epoch", "rng", "config"):
            if key not in state:
                raise CheckpointError(f"{where}: missing key {key!r}")
        saved = config_from_dict(state["config"])
        for section in ("model", "loss"):
            if getattr(saved, section) != getattr(self.cfg, section):
                raise CheckpointError(
                    f"{where}: its {section} section differs from this run's; resume with the same "
                    f"{section} settings (saved: {getattr(saved, section)})"
                )
        self.backbone.load_state_dict(state["model"])
        if self.net.head is not None:
            if state.get("head") is None:
                raise CheckpointError(f"{where}: has no margin-head weights but loss.margin_head is set")
            self.net.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.memory is not None and state.get("memory") is not None:
            self.memory.load_state_dict(state["memory"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        sampler_state = dict(state["sampler"])
        old_world = int(sampler_state["num_replicas"])
        if old_world == self.info.world_size:
            self.scheduler.load_state_dict(state["scheduler"])
        else:  # same fraction of the epoch's images; schedule rebuilt for the new epoch length
            frac = sampler_state["steps_done"] / max(1, _steps_for(sampler_state))
            sampler_state["num_replicas"] = self.info.world_size
            sampler_state["steps_done"] = min(
                self.sampler.steps_per_epoch, int(frac * self.sampler.steps_per_epoch)
            )
            sampler_state["steps_done"] -= sampler_state["steps_done"] % self.accum
            self.scheduler.last_epoch = self.step
            for group, factor, base in zip(
                self.optimizer.param_groups, self.scheduler.lr_lambdas, self.scheduler.base_lrs
            ):
                group["lr"] = base * factor(self.step)
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
            self.log.warning(
                "%s was written by %d processes, this run has %d: the global batch changes; the epoch "
                "continues at %.1f%% of its images",
                where,
                old_world,
                self.info.world_size,
                100 * frac,
            )
        self.sampler.load_state_dict(sampler_state)
        self.micro = self.sampler.start_step
        rng = state["rng"]
        if self.info.rank < len(rng):
            restore_rng_state(rng[self.info.rank])
        progress = state.get("progress", {})
        self.bad_total = int(progress.get("bad_total", 0))
        self.scale_skips = int(progress.get("scale_skips", 0))
        self.images_total = int(progress.get("images_total", 0))
        self.best_score = float(progress.get("best_score", -math.inf))
        self.best_step = int(progress.get("best_step", -1))
        self._bn_backup = [b.detach().clone() for b in self._bn_buffers]

    # ----------------------------------------------------------------------------------- training

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        # The loader's worker seeds must not come from the global RNG (a resumed run creates its
        # iterator at another point of the RNG stream): fork it around the iterator's creation.
        with torch.random.fork_rng(devices=[]):
            it = iter(self.loader)
        return it

    def _loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Total loss of one micro-batch, and the embeddings (detached) for the memory."""
        non_blocking = self.device.type == "cuda"
        images = images.to(self.device, non_blocking=non_blocking)
        labels = labels.to(self.device, non_blocking=non_blocking)
        flip = _flip_mask(self.cfg.data.seed, self.epoch, self.micro, self.info.rank, images.shape[0])
        x = normalize_faces(images, flip.to(self.device), self.cfg.model.channels_last)
        with _autocast(self.device, self.precision):
            emb, head_loss = self.model_fn(x, labels)
        loss = self.pair_loss(emb, labels)
        lc = self.cfg.loss
        if self.memory is not None and self.step >= lc.xbm_start_step and len(self.memory) > 0:
            loss = loss + lc.xbm_weight * xbm_loss(self.pair_loss.loss, self.memory, emb, labels)
        if head_loss is not None:
            loss = loss + lc.margin_weight * head_loss
        return loss, emb.detach()

    def _enqueue(self, emb: Tensor, labels: Tensor) -> None:
        """Add the global batch to the memory (a collective: every rank calls it every micro-batch)."""
        if self.memory is None:
            return
        labels = labels.to(self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            emb, labels = all_gather_no_grad(emb), all_gather_no_grad(labels)
        if bool(torch.isfinite(emb).all()):  # the same gathered values, so the same decision, on every rank
            self.memory.enqueue(emb, labels)

    def train_one_epoch(self) -> bool:
        """Train the rest of the current epoch; ``False`` when ``total_steps`` was reached inside it."""
        cfg = self.cfg
        self.sampler.set_epoch(self.epoch)
        usable = (self.sampler.steps_per_epoch // self.accum) * self.accum
        params = [p for p in self.net.parameters() if p.requires_grad]
        stats = [0.0] * 5  # finite loss sum, its samples, non-finite count, data wait, images (this step)
        window = [0.0] * 5  # the same summed over ranks and over the steps of this log window
        self.optimizer.zero_grad(set_to_none=True)
        batches = self._batches()
        t_wait = time.perf_counter()
        for images, labels in batches:
            if self.micro >= usable or self.step >= self.total_steps:
                break
            stats[3] += time.perf_counter() - t_wait
            last_micro = (self.micro + 1) % self.accum == 0
            sync = contextlib.nullcontext() if last_micro or self.ddp is self.net else self.ddp.no_sync()  # type: ignore[operator]
            with sync:
                loss, emb = self._loss(images, labels)
                self.scaler.scale(loss / self.accum).backward()
            lv = float(loss.detach())
            finite = math.isfinite(lv)
            n = labels.shape[0]
            stats[0] += lv * n if finite else 0.0
            stats[1] += n if finite else 0
            stats[2] += 0.0 if finite else 1.0
            stats[4] += n
            self._enqueue(emb, labels)
            self.micro += 1
            if last_micro:
                window_add = self._optimizer_step(params, stats)
                window = [w + a for w, a in zip(window, window_add)]
                self.images_total += int(window_add[4])
                stats = [0.0] * 5
                self.step += 1
                self.tlog.step()
                if self.step % cfg.log.every_steps == 0 or self.step == self.total_steps:
                    self._log(window)
                    window = [0.0] * 5
                if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
                    self.evaluate()
                if self.step % cfg.train.checkpoint_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
            t_wait = time.perf_counter()
        del batches
        if self.step >= self.total_steps:
            return False
        self.epoch += 1
        self.micro = 0
        return True

    def _optimizer_step(self, params: list[nn.Parameter], stats: list[float]) -> list[float]:
        """Reduce the step's statistics over ranks; update, or skip a non-finite step. Returns window deltas."""
        cfg = self.cfg
        scaler = self.scaler
        if scaler.is_enabled():
            scaler.unscale_(self.optimizer)
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)
        norm = float(grad_norm)
        reduced = all_reduce_sum(stats, self.device)
        loss_sum, nonfinite = reduced[0], reduced[2]
        bad = nonfinite > 0 or (not scaler.is_enabled() and not math.isfinite(norm))
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            if self._bn_buffers:  # the bad forward pass may have updated running statistics
                torch._foreach_copy_(self._bn_buffers, self._bn_backup)
            if scaler.is_enabled():
                scaler.update()  # lowers the scale as for an overflow
            self.bad_streak += 1
            self.bad_total += 1
            self.log.warning(
                "step %d: non-finite loss or gradient norm (loss sum %s, norm %s); step skipped (%d in a row)",
                self.step,
                loss_sum,
                norm,
                self.bad_streak,
            )
            if self.bad_streak >= cfg.train.max_bad_steps:
                raise TrainingDiverged(
                    f"{self.bad_streak} consecutive steps (up to step {self.step}) had a non-finite loss or "
                    f"gradient norm (train.max_bad_steps = {cfg.train.max_bad_steps}); stopped without "
                    f"writing a checkpoint from this state. Lower optim.lr, set optim.grad_clip, or try "
                    f"train.precision=fp32; the last good checkpoint is in {self.run_dir}"
                )
        else:
            scale_before = scaler.get_scale() if scaler.is_enabled() else 1.0
            scaler.step(self.optimizer)
            scaler.update()
            if scaler.is_enabled() and scaler.get_scale() < scale_before:
                self.scale_skips += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_streak = 0
            if self._bn_buffers:
                torch._foreach_copy_(self._bn_backup, self._bn_buffers)
        with _quiet_scheduler_warning():
            self.scheduler.step()
        self._last_norm = norm
        reduced[3] /= self.info.world_size  # mean data wait of a rank
        return reduced

    def _log(self, window: list[float]) -> None:
        loss_sum, samples, _, wait, images = window
        self.meter.add(int(images))
        self.meter.add_data_wait(wait)
        self.total_meter.add(int(images))
        metrics: dict[str, float | int | None] = {
            "loss": loss_sum / samples if samples else None,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "images_per_s": self.meter.rate(),
            "data_wait_fraction": self.meter.data_wait_fraction(),
            "grad_norm": getattr(self, "_last_norm", None),
            "loss_scale": float(self.scaler.get_scale()) if self.scaler.is_enabled() else None,
            "images": self.images_total,
            "skipped_steps": self.bad_total,
            "loss_scale_skips": self.scale_skips,
        }
        self.meter.reset_window()
        self.tlog.log(self.step, self.epoch, metrics)

    # --------------------------------------------------------------------------------- evaluation

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Pair accuracy on every ``data.val_targets`` set (all ranks embed a shard); keeps the best model."""
        if not self.val_sets:
            return {}
        with self.meter.excluded(), self.total_meter.excluded():
            results: dict[str, dict[str, float]] = {}
            for name, (images, issame) in self.val_sets.items():
                r = verify_bin(
                    self.backbone,
                    (images, issame),
                    batch_size=self.cfg.eval.batch_size,
                    flip=self.cfg.eval.flip,
                    device=self.device,
                    precision=self.precision,
                    distributed=True,
                )
                results[name] = {"accuracy": float(r.accuracy), "std": float(r.std), "xnorm": float(r.xnorm)}
            score = float(np.mean([v["accuracy"] for v in results.values()]))
            self.last_eval, self.last_eval_step = results, self.step
            if self.info.is_main:
                self.tlog.log_eval(self.step, results)
                save_model_pt(self.backbone.state_dict(), self.run_dir / "model.pt")
                if score > self.best_score:
                    save_model_pt(self.backbone.state_dict(), self.run_dir / "model_best.pt")
            if score > self.best_score:
                self.best_score, self.best_step, self.best_eval = score, self.step, results
        return results

    # -------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (only types that ``torch.load(weights_only=True)`` accepts)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "facems_version": facems.__version__,
            "model": self.backbone.state_dict(),
            "head": self.net.head.state_dict() if self.net.head is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "memory": self.memory.state_dict() if self.memory is not None else None,
            "sampler": self.sampler.state_dict(steps_done=self.micro),
            "step": self.step,
            "epoch": self.epoch,
            "progress": {
                "bad_total": self.bad_total,
                "scale_skips": self.scale_skips,
                "images_total": self.images_total,
                "best_score": self.best_score,
                "best_step": self.best_step,
            },
            "config": config_to_dict(self.cfg),
        }

    def save_checkpoint(self) -> None:
        """Rank 0 writes ``checkpoint_<step>.pt`` / ``checkpoint_last.pt`` with every rank's RNG state."""
        with self.meter.excluded(), self.total_meter.excluded():
            rng = all_gather_objects(capture_rng_state())  # a collective: every rank calls it
            if not self.info.is_main:
                return
            tensors = [t for t in self.net.state_dict().values()]
            if not _all_finite(tensors):
                raise CheckpointError(
                    f"step {self.step}: the model holds non-finite values; refusing to write a checkpoint"
                )
            state = self.state_dict()
            state["rng"] = rng
            self.ckpt.save(state, self.step)
            save_model_pt(self.backbone.state_dict(), self.run_dir / "model.pt")

    # ------------------------------------------------------------------------------------------ fit

    def fit(self) -> FitResult:
        """Train to ``total_steps``, evaluating and checkpointing on the way and at the end."""
        cfg = self.cfg
        self.meter.start()
        self.total_meter.start()
        try:
            if cfg.eval.at_start and self.resumed_from is None and self.step == 0:
                self.evaluate()
            while self.step < self.total_steps and self.train_one_epoch():
                pass
            if self.last_eval_step != self.step:  # not evaluated at this step yet
                self.evaluate()
            self.save_checkpoint()
        finally:
            self.tlog.close()
        return FitResult(
            run_dir=self.run_dir,
            step=self.step,
            epoch=self.epoch,
            bad_steps_total=self.bad_total,
            images_per_s=self.total_meter.rate(),
            last_eval=self.last_eval,
            best_eval=self.best_eval,
            best_score=self.best_score,
            best_step=self.best_step,
        )


def _steps_for(sampler_state: dict[str, Any]) -> int:
    per_step = sampler_state["p"] * sampler_state["k"] * sampler_state["num_replicas"]
    return int(sampler_state["num_images"] // per_step)


@contextlib.contextmanager
def _quiet_scheduler_warning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        yield


def fit(cfg: Config, device: str = "auto") -> FitResult:
    """Run training as configured, as one process or as one rank of a ``torchrun`` launch."""
    info = init_distributed(device)
    try:
        trainer = Trainer(cfg, info)
        return trainer.fit()
    except BaseException:
        logging.getLogger("facems").exception("training failed on rank %d", info.rank)
        sys.stderr.flush()
        raise
    finally:
        cleanup_distributed(info)
