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

Faults (docs/reliability.md lists each with its test):

* SIGTERM or SIGINT during :meth:`Trainer.fit` (from the main thread) does not stop the process at
  once: the current optimizer step finishes, a checkpoint of that step is written, and
  :class:`TrainingInterrupted` is raised (``scripts/train.py`` then exits with ``128 + signal``, as a
  process killed by that signal would, so schedulers and ``torchrun`` see an unfinished run). Ranks
  agree on the stop through the per-step all-reduce, so all of them stop after the same step and no
  collective is left waiting. A second signal stops at once. Data-loader workers start with both
  signals blocked (a Ctrl-C reaches the whole process group); they exit with the training process.
* A checkpoint that cannot be written (disk full, I/O error, a non-finite model) stops every rank
  with :class:`CheckpointError` after the failed write, leaving the previous checkpoint as it was;
  ranks agree on it with one all-reduce, so none waits for a peer that gave up.
* Under DDP every rank takes part in evaluation (each embeds a shard), and during it every rank uses
  rank 0's BatchNorm statistics, so the reported accuracy is that of the ``model.pt`` rank 0 writes.
* ``FACEMS_FAULT_KILL_AT_STEP=S:R`` (a test hook): rank ``R`` kills itself with SIGKILL right after
  optimizer step ``S`` (and that step's checkpoint, if any), only in the first attempt of a job
  (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so that a ``torchrun --max-restarts`` restart runs on.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import inspect
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import facems
from facems.config import Config, ConfigError, config_from_dict, config_to_dict, save_config
from facems.data.binfile import load_bin
from facems.data.datasets import RecordFaceDataset
from facems.data.loader import build_face_loader
from facems.data.retrieval_train import (
    RetrievalTrainDataset,
    build_retrieval_loader,
    evaluate_retrieval_sharded,
    model_input,
)
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
from facems.models import create_model, list_models, open_backbone
from facems.protocols.pairs import verify_bin
from facems.protocols.retrieval import RetrievalDataset, read_retrieval_dataset
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
    "TrainingInterrupted",
    "build_pair_loss",
    "cpu_supports_bf16",
    "fit",
    "preflight",
    "resolve_precision",
    "tune_cpu_allocator",
]

logger = logging.getLogger("facems.train")

CHECKPOINT_FORMAT = 1


class TrainingDiverged(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient norm."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT stopped training after a finished step whose checkpoint was written.

    Attributes:
        signum: the signal (``signal.SIGTERM`` if any rank received it, else ``signal.SIGINT``).
        step: the optimizer step the run stopped after (the step of the checkpoint).
    """

    def __init__(self, signum: int, step: int, run_dir: Path) -> None:
        self.signum = int(signum)
        self.step = int(step)
        self.run_dir = Path(run_dir)
        name = signal.Signals(self.signum).name
        super().__init__(
            f"{name} received: stopped after step {self.step} and wrote its checkpoint in {run_dir}; "
            "run the same command again (train.resume=auto) to continue"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (e.g. out of a worker process) with its fields
        return (type(self), (self.signum, self.step, self.run_dir))


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


def _create_backbone(cfg: Config) -> nn.Module:
    """The configured backbone; ``model.pretrained`` / ``model.freeze_bn`` are passed only when set."""
    mc = cfg.model
    kwargs: dict[str, Any] = {
        "num_features": mc.num_features,
        "dropout": mc.dropout,
        "grad_checkpoint": mc.grad_checkpoint,
    }
    if mc.pretrained is not None:
        kwargs["pretrained"] = mc.pretrained
    if mc.freeze_bn is not None:
        kwargs["freeze_bn"] = mc.freeze_bn
    try:
        backbone = create_model(mc.name, **kwargs)
    except TypeError as e:  # an option this model's entry point does not take
        raise ValueError(
            f"model.name = {mc.name!r} does not take one of the options "
            f"{', '.join(f'model.{k}' for k in kwargs)} ({e}); leave model.pretrained and "
            "model.freeze_bn null for the face backbones"
        ) from None
    size = getattr(backbone, "input_size", None)
    if cfg.data.kind == "retrieval" and isinstance(size, int) and size != cfg.data.image_size:
        logger.warning("data.image_size=%d, but %s's recipe crops %d", cfg.data.image_size, mc.name, size)
    return backbone


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


# ------------------------------------------------------------------------- checks, signals, faults

FAULT_KILL_ENV = "FACEMS_FAULT_KILL_AT_STEP"
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _launch_world_size() -> int:
    """Processes of this launch: the process group's size, else torchrun's ``WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:  # init_distributed names the malformed variable
        return 1


def _pack_identities(root: Path) -> int | None:
    """The identity count of an insightface pack's ``property`` file (``classes,height,width``), if readable."""
    try:
        first = (root / "property").read_text(encoding="utf-8").strip().split(",")[0]
        return int(first)
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # RecordFaceDataset reports a missing or malformed property file in full


def preflight(cfg: Config, world_size: int | None = None) -> None:
    """Check what a run needs before any process group, data loader or model exists.

    :func:`fit` calls it first, so that a wrong value fails in a second, the same way on every rank,
    instead of after a cluster start-up. Checked: ``model.name`` is registered; ``data.root`` is a
    folder; for face data, the pack's ``<rec_name>.rec`` and ``.idx`` and every ``data.val_targets``
    ``.bin`` file exist, and the pack (its ``property`` file) holds at least ``data.p * world_size``
    identities, the distinct identities one global step draws. The global batch is ``p * k *
    world_size`` by construction (``data.p`` is per rank), so every world size divides it.

    Args:
        cfg: the resolved run configuration.
        world_size: processes of the launch; by default the process group's size, else the
            ``WORLD_SIZE`` that ``torchrun`` sets, else 1.

    Raises:
        ConfigError: one line naming the key, its value, what is wrong and what is allowed.
    """
    world = _launch_world_size() if world_size is None else world_size
    models = list_models()
    if cfg.model.name not in models:
        raise ConfigError(
            f"model.name = {cfg.model.name!r}: expected a registered model, one of {', '.join(models)}"
        )
    dc = cfg.data
    root = Path(dc.root)
    if not root.is_dir():
        what = "an insightface pack" if dc.kind == "face" else f"the {dc.dataset} data set"
        raise ConfigError(
            f"data.root = {dc.root!r}: expected an existing folder holding {what} "
            f"({'does not exist' if not root.exists() else 'not a folder'}; see data/README.md)"
        )
    if dc.kind != "face":
        return  # the retrieval readers check their own layouts
    for suffix in (".rec", ".idx"):
        if not (root / f"{dc.rec_name}{suffix}").is_file():
            raise ConfigError(
                f"data.root = {dc.root!r}: no {dc.rec_name}{suffix} in it; expected an insightface pack "
                f"({dc.rec_name}.rec, {dc.rec_name}.idx, property; data.rec_name sets the stem)"
            )
    for name in dc.val_targets:
        if not (root / f"{name}.bin").is_file():
            raise ConfigError(
                f"data.val_targets = {dc.val_targets!r}: {root / (name + '.bin')} does not exist; expected "
                f"the .bin pair sets present in data.root (or data.val_targets=[])"
            )
    identities = _pack_identities(root)
    if identities is not None and dc.p * world > identities:
        raise ConfigError(
            f"data.p = {dc.p} with {world} process(es): a global step draws p * world_size = {dc.p * world} "
            f"distinct identities but {root / 'property'} lists {identities}; expected data.p <= "
            f"{max(1, identities // world)} for {world} process(es), or at most {max(1, identities // dc.p)} processes"
        )


def _fault_kill_step(rank: int) -> int | None:
    """The step after which this rank kills itself, from ``FACEMS_FAULT_KILL_AT_STEP=S:R`` (a test hook)."""
    text = os.environ.get(FAULT_KILL_ENV, "")
    if not text:
        return None
    try:
        step, target = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"{FAULT_KILL_ENV}={text!r}: expected STEP:RANK, two integers (e.g. 6:1)") from None
    if step < 1 or target < 0:
        raise ValueError(f"{FAULT_KILL_ENV}={text!r}: expected STEP >= 1 and RANK >= 0")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return None  # a restarted attempt runs on
    return step if target == rank else None


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Block SIGTERM and SIGINT in this thread meanwhile; processes started meanwhile keep them blocked.

    Data-loader workers are started inside this block, so a Ctrl-C (sent to the whole process group)
    or a SIGTERM to every process does not kill them under the trainer, which stops after its step.
    Signals that arrive for this process meanwhile are delivered when the block ends, not lost.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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

        # Data: sizes come from the pack (property, idx) or the data set's lists, never from the config.
        dc = cfg.data
        self.retrieval: RetrievalDataset | None = None
        self.dataset: RecordFaceDataset | RetrievalTrainDataset
        if dc.kind == "retrieval":
            assert dc.dataset is not None  # the config checks it
            self.retrieval = read_retrieval_dataset(dc.dataset, dc.root)
            self.dataset = RetrievalTrainDataset(
                self.retrieval.train, dc.resize, dc.image_size, dc.crop_scale, flip=dc.flip
            )
        else:
            self.dataset = RecordFaceDataset(
                dc.root, (dc.image_size, dc.image_size), dc.max_bad_fraction, rec_name=dc.rec_name
            )
        self.sampler = DistributedPKSampler(
            self.dataset.labels, dc.p, dc.k, info.world_size, info.rank, dc.seed, drop_last=True
        )
        self.loader: Any
        if isinstance(self.dataset, RetrievalTrainDataset):
            self.loader = build_retrieval_loader(
                self.dataset, self.sampler, num_workers=dc.num_workers, pin_memory=dc.pin_memory
            )
        else:
            self.loader = build_face_loader(
                self.dataset, self.sampler, num_workers=dc.num_workers, pin_memory=dc.pin_memory
            )
        self.accum = cfg.optim.grad_accum
        self.total_steps, _ = optimizer_steps(cfg.schedule, self.sampler.steps_per_epoch, self.accum)
        self.steps_per_epoch = self.total_steps // cfg.schedule.epochs
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.val_sets = self._load_val_sets() if self.retrieval is None else {}

        # Model: identical initialisation on every rank (DDP also broadcasts rank 0's).
        torch.manual_seed(cfg.train.seed)
        mc = cfg.model
        backbone = _create_backbone(cfg)
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
        # uint8 batch -> model input: the retrieval networks carry their own (see facems.models.heads).
        self.preprocess = getattr(backbone, "preprocess", normalize_faces)
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
        self._signal: int | None = None  # SIGTERM/SIGINT received by this process (set by the handler)
        self._stop_signum: int | None = None  # the stop every rank agreed on (from the step all-reduce)
        self._ckpt_step = -1  # the step of the newest checkpoint written in this process's run
        self._kill_at = _fault_kill_step(info.rank)
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
        # Workers start with SIGTERM/SIGINT blocked: the trainer decides when to stop.
        with torch.random.fork_rng(devices=[]), _signals_blocked():
            it = iter(self.loader)
        return it

    def _loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Total loss of one micro-batch, and the embeddings (detached) for the memory."""
        non_blocking = self.device.type == "cuda"
        images = images.to(self.device, non_blocking=non_blocking)
        labels = labels.to(self.device, non_blocking=non_blocking)
        flip = None
        if self.cfg.data.flip and self.retrieval is None:  # retrieval images were flipped in the workers
            mask = _flip_mask(self.cfg.data.seed, self.epoch, self.micro, self.info.rank, images.shape[0])
            flip = mask.to(self.device)
        x = self.preprocess(images, flip, self.cfg.model.channels_last)
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
                if self._kill_at == self.step:
                    self._fault_kill()
                if self._stop_signum is not None:
                    break
            t_wait = time.perf_counter()
        del batches
        if self.step >= self.total_steps or self._stop_signum is not None:
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
        # Two more sums ride on the same all-reduce: how many ranks received SIGINT and SIGTERM, so
        # that every rank decides to stop after this very step.
        got = self._signal
        reduced = all_reduce_sum(
            [*stats, float(got == signal.SIGINT), float(got == signal.SIGTERM)], self.device
        )
        n_term, n_int = reduced.pop(), reduced.pop()
        if (n_term or n_int) and self._stop_signum is None:
            self._stop_signum = signal.SIGTERM if n_term else signal.SIGINT
            self.log.warning(
                "%s received by %d of %d process(es): stopping after step %d with a checkpoint",
                signal.Signals(self._stop_signum).name,
                int(n_term + n_int),
                self.info.world_size,
                self.step + 1,
            )
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
        """Pair accuracy on every ``data.val_targets`` set (all ranks embed a shard); keeps the best model.

        Retrieval runs: :meth:`evaluate_retrieval` instead.
        """
        if self.retrieval is not None:
            return self.evaluate_retrieval()
        if not self.val_sets:
            return {}
        with self.meter.excluded(), self.total_meter.excluded(), self._rank0_buffers():
            results: dict[str, dict[str, float]] = {}
            for name, (images, issame) in self.val_sets.items():
                r = verify_bin(
                    model_input(self.backbone),  # the backbone itself unless it has its own preprocess
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

            def write() -> None:
                save_model_pt(self.backbone.state_dict(), self.run_dir / "model.pt")
                if score > self.best_score:
                    save_model_pt(self.backbone.state_dict(), self.run_dir / "model_best.pt")

            self._write_on_rank0("model.pt", write)
            if score > self.best_score:
                self.best_score, self.best_step, self.best_eval = score, self.step, results
        return results

    @contextlib.contextmanager
    def _rank0_buffers(self) -> Iterator[None]:
        """Under DDP: the backbone holds rank 0's buffers meanwhile, and its own ones again afterwards.

        BatchNorm statistics are rank-local (as in arcface_torch) and a checkpoint and ``model.pt`` hold
        rank 0's; evaluating each shard with its own rank's statistics would report the accuracy of no
        saved model. Every rank's training continues from its own statistics.
        """
        buffers = [b for b in self.backbone.buffers()]
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1) or not buffers:
            yield
            return
        own = [b.detach().clone() for b in buffers]
        with torch.no_grad():
            for b in buffers:
                dist.broadcast(b, src=0)
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in zip(buffers, own):
                    b.copy_(saved)

    def evaluate_retrieval(self) -> dict[str, dict[str, float]]:
        """Recall@K (the data set's K), MAP@R and R-precision on the test split (all ranks embed a share).

        Logged as ``{dataset: {"recall@1": ..., "map@r": ..., ...}}`` like the face results.
        ``model.pt`` is the evaluated (newest) model; ``model_best.pt`` (best test Recall@1) is written
        only with ``eval.keep_best_on_test``, since that selects on the test split.
        """
        assert self.retrieval is not None
        ec, dc = self.cfg.eval, self.cfg.data
        with self.meter.excluded(), self.total_meter.excluded(), self._rank0_buffers():
            r = evaluate_retrieval_sharded(
                self.backbone,
                self.retrieval,
                resize=dc.resize,
                crop=dc.image_size,
                batch_size=ec.batch_size,
                flip=ec.flip,
                device=self.device,
                precision=self.precision,
                num_workers=dc.num_workers,
            )
            results = {self.retrieval.name: {k: float(v) for k, v in r.metrics.items()}}
            score = results[self.retrieval.name]["recall@1"]
            self.last_eval, self.last_eval_step = results, self.step
            better = ec.keep_best_on_test and score > self.best_score
            if self.info.is_main:
                self.tlog.log_eval(self.step, results)

            def write() -> None:
                save_model_pt(self.backbone.state_dict(), self.run_dir / "model.pt")
                if better:
                    save_model_pt(self.backbone.state_dict(), self.run_dir / "model_best.pt")

            self._write_on_rank0("model.pt", write)
            if better:
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
        """Rank 0 writes ``checkpoint_<step>.pt`` / ``checkpoint_last.pt`` with every rank's RNG state.

        Every rank calls it (it gathers the RNG states). When the write fails (disk full, I/O error, a
        non-finite model), every rank raises :class:`CheckpointError` and the previous checkpoint's
        files are as they were (each file is written under a temporary name, then renamed).
        """
        with self.meter.excluded(), self.total_meter.excluded():
            rng = all_gather_objects(capture_rng_state())  # a collective: every rank calls it

            def write() -> None:
                tensors = [t for t in self.net.state_dict().values()]
                if not _all_finite(tensors):
                    raise CheckpointError("the model holds non-finite values; refusing to write a checkpoint")
                state = self.state_dict()
                state["rng"] = rng
                self.ckpt.save(state, self.step)
                save_model_pt(self.backbone.state_dict(), self.run_dir / "model.pt")

            self._write_on_rank0(f"the checkpoint of step {self.step}", write)
            self._ckpt_step = self.step

    def _write_on_rank0(self, what: str, write: Callable[[], None]) -> None:
        """Run ``write`` on rank 0; if it fails, every rank raises :class:`CheckpointError` (one all-reduce).

        Without the agreement the other ranks would go on to the next step's collectives and wait
        there for a rank 0 that has given up, until the process-group timeout.
        """
        error: Exception | None = None
        if self.info.is_main:
            try:
                write()
            except Exception as e:  # any failure to write stops the run on every rank
                error = e
        if all_reduce_sum([0.0 if error is None else 1.0], self.device)[0] == 0:
            return
        if error is None:
            raise CheckpointError(
                f"step {self.step}: rank 0 could not write {what} (its log says why); rank {self.info.rank} stops too"
            )
        files = self.ckpt.step_files()
        kept = (
            f"the newest checkpoint on disk is {files[-1][1]}, which train.resume=auto continues from"
            if files
            else "no checkpoint was written before"
        )
        raise CheckpointError(
            f"step {self.step}: writing {what} in {self.run_dir} failed: {error}; {kept}"
        ) from error

    def _fault_kill(self) -> None:
        """``FACEMS_FAULT_KILL_AT_STEP``: die as a crashed or OOM-killed worker does (SIGKILL, no clean-up)."""
        self.log.warning(
            "%s: rank %d kills itself with SIGKILL after step %d (fault-injection test hook)",
            FAULT_KILL_ENV,
            self.info.rank,
            self.step,
        )
        logging.shutdown()  # the line above reaches the log file
        os.kill(os.getpid(), signal.SIGKILL)

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """While inside: SIGTERM/SIGINT only record a stop request (main thread only; elsewhere a no-op).

        A second signal restores the previous handlers and re-sends itself: it stops the process at once.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old if old is not None else signal.SIG_DFL)

        def handler(signum: int, frame: Any) -> None:
            if self._signal is not None:
                restore()
                signal.raise_signal(signum)
                return
            self._signal = signum

        for sig in _STOP_SIGNALS:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            restore()

    # ------------------------------------------------------------------------------------------ fit

    def fit(self) -> FitResult:
        """Train to ``total_steps``, evaluating and checkpointing on the way and at the end."""
        cfg = self.cfg
        self.meter.start()
        self.total_meter.start()
        try:
            with self._stop_on_signals():
                if cfg.eval.at_start and self.resumed_from is None and self.step == 0:
                    self.evaluate()
                while self.step < self.total_steps and self.train_one_epoch():
                    pass
                if self._stop_signum is not None:  # SIGTERM/SIGINT: checkpoint this step, no evaluation
                    if self._ckpt_step != self.step:
                        self.save_checkpoint()
                    raise TrainingInterrupted(self._stop_signum, self.step, self.run_dir)
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
    """Run training as configured, as one process or as one rank of a ``torchrun`` launch.

    Raises:
        ConfigError: :func:`preflight` found a value that cannot work (before any process group).
        TrainingInterrupted: SIGTERM/SIGINT stopped the run after a step and its checkpoint.
        TrainingDiverged: ``train.max_bad_steps`` consecutive non-finite steps.
        CheckpointError: a checkpoint could not be written, or none of those present loads.
    """
    preflight(cfg)
    info = init_distributed(device)
    try:
        trainer = Trainer(cfg, info)
        return trainer.fit()
    except TrainingInterrupted as e:
        logging.getLogger("facems").warning("rank %d: %s", info.rank, e)
        raise
    except BaseException:
        logging.getLogger("facems").exception("training failed on rank %d", info.rank)
        sys.stderr.flush()
        raise
    finally:
        cleanup_distributed(info)
