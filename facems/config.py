"""Typed training configuration: defaults -> preset or YAML file -> dotted overrides -> frozen dataclasses.

A run is described by one :class:`Config`, made of one frozen dataclass per section (``data``,
``model``, ``loss``, ``optim``, ``schedule``, ``train``, ``eval``, ``log``) plus a ``name``.
:func:`load_config` resolves it in three layers, each checked as it is applied:

1. the dataclass defaults below;
2. a named preset (``facems/configs/<name>.yaml``, shipped with the package; ``synthetic_demo``
   when nothing is given) or the path of a YAML file. A file may start from another with
   ``inherit: <preset name or path>`` (a path is taken relative to the including file);
3. dotted overrides ``section.key=value`` (``optim.lr=0.05``, ``loss.mining=false``,
   ``data.val_targets=[calfw,cplfw]``, ``loss.margin_head=null``, ``name=my_run``), each value read
   with ``yaml.safe_load``.

YAML is only ever read with ``yaml.safe_load``: a file cannot construct Python objects. An unknown
section or key, a value of the wrong type or outside its choices, and a value out of range all raise
:class:`ConfigError`, whose message names the dotted key, the value, what was expected and where the
value came from (for an unknown key: the closest valid key and all valid keys of the section).

Types follow the annotations strictly: an integer is accepted for a float field, never a bool for
an integer or a number, never ``0``/``1`` for a bool. One leniency: PyYAML (YAML 1.1) reads ``1e-3``
(no dot) as a string, so a string that spells a decimal number is accepted for a float field.

The run name sets the default output folder (``train.output_dir`` defaults to ``work_dirs/{name}``;
``{name}`` is replaced by the run name). The name defaults to the preset's name or the YAML file's
stem; a ``name:`` key in the requested file or a ``name=`` override sets it explicitly, while a
``name:`` in an inherited file is ignored (the child is a different run).

:func:`config_to_dict` / :func:`config_from_dict` turn a config into plain YAML/JSON types and back
(checkpoints store the dict); :func:`save_config` writes the resolved YAML atomically, and
``load_config(path_to_that_file)`` gives back an equal config.
"""

import dataclasses
import difflib
import math
import os
import re
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ClassVar, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from facems import __version__
from facems.fileio import atomic_write

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LogConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "list_presets",
    "load_config",
    "save_config",
]

DEFAULT_PRESET = "synthetic_demo"

LossName = Literal["ms", "contrastive", "triplet", "lifted", "binomial"]
MarginHead = Literal["arcface", "cosface"]
OptimName = Literal["sgd", "adam", "adamw"]
ScheduleName = Literal["poly", "cosine", "constant", "step"]
Precision = Literal["bf16", "fp16", "fp32", "auto"]
DataKind = Literal["face", "retrieval"]
RetrievalName = Literal["cub", "cars", "sop", "inshop"]


class ConfigError(ValueError):
    """A configuration that cannot be used: unknown key, wrong type, value out of range, bad file.

    Attributes:
        key: the dotted key at fault, where one is (range checks set it, so that :func:`load_config`
            can name the file or override that set the value).
    """

    def __init__(self, message: str, key: Optional[str] = None) -> None:
        super().__init__(message)
        self.key = key


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80


def _show(value: Any) -> str:
    """A bounded repr of a value read from YAML, for messages: YAML aliases can make a small file hold
    a value whose full repr is exponentially long (or too deeply nested for ``repr``)."""
    return _REPR.repr(value)


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise a :class:`ConfigError` naming ``key``, ``value`` and ``expected`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} = {value!r}: expected {expected}", key)


# Annotations below use typing.Optional (not ``X | None``) because they are evaluated at run time
# to check values, and the package supports Python 3.9.


@dataclass(frozen=True)
class DataConfig:
    """Training data and the verification sets.

    Two kinds of data feed the same sampler, loop and loss: ``face`` (an insightface pack, the
    default) and ``retrieval`` (a metric-learning benchmark read by ``facems.protocols.retrieval``:
    trained on its training classes, evaluated with its Recall@K and MAP@R on its test classes).

    Attributes:
        kind: ``face`` or ``retrieval``.
        root: ``face``: folder holding ``<rec_name>.rec``, ``<rec_name>.idx``, ``property`` and the
            ``.bin`` verification sets (an insightface data pack); ``retrieval``: the data set's folder
            (layouts in ``facems/protocols/retrieval.py``). Image and class counts are read from the
            files at run time, never configured.
        dataset: ``retrieval`` only: ``cub``, ``cars``, ``sop`` or ``inshop`` (null for ``face``).
        rec_name: ``face`` only: stem of the ``.rec``/``.idx`` pair inside ``root``.
        image_size: side of the square model input, in pixels: the aligned face crop (112), or the
            retrieval crop (227 for BN-Inception, 224 for ResNet-50; train and test).
        resize: ``retrieval`` only: shorter image side before the crop (train: then
            RandomResizedCrop; test: then the centre crop); >= ``image_size``.
        crop_scale: ``retrieval`` only: RandomResizedCrop's range of the crop area, as fractions of
            the resized image (``0 < lo <= hi <= 1``; aspect ratios in torchvision's (3/4, 4/3)).
        flip: random horizontal flip with probability 0.5 (``face``: on the device; ``retrieval``: in
            the data workers, with the crop).
        p: identities per rank per step (the global batch is ``p * k * world_size`` images).
        k: images per identity per step (>= 2: every pair loss needs a positive).
        num_workers: data-loading worker processes per rank (0: load in the training process).
        pin_memory: pin host batches for faster copies to a CUDA device (ignored on CPU).
        max_bad_fraction: largest fraction of undecodable images tolerated, in [0, 1].
        val_targets: ``face`` only: names of the ``<root>/<name>.bin`` pair sets evaluated during
            training (ignored for ``retrieval``, which evaluates on the data set's test split).
        seed: seed of the P x K sampler and of data augmentation (with the epoch number).
    """

    section: ClassVar[str] = "data"

    kind: DataKind = "face"
    root: str = "data/synthetic"
    dataset: Optional[RetrievalName] = None
    rec_name: str = "train"
    image_size: int = 112
    resize: int = 256
    crop_scale: tuple[float, float] = (0.16, 1.0)
    flip: bool = True
    p: int = 16
    k: int = 4
    num_workers: int = 2
    pin_memory: bool = True
    max_bad_fraction: float = 0.001
    val_targets: list[str] = field(default_factory=lambda: ["calfw", "cplfw"])
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.root != "", "data.root", self.root, "a non-empty folder path")
        _require(self.rec_name != "", "data.rec_name", self.rec_name, "a non-empty file stem")
        _require(self.image_size >= 1, "data.image_size", self.image_size, "an integer >= 1 (pixels)")
        _require(self.resize >= 1, "data.resize", self.resize, "an integer >= 1 (pixels)")
        lo, hi = self.crop_scale
        _require(
            0.0 < lo <= hi <= 1.0,
            "data.crop_scale",
            list(self.crop_scale),
            "two area fractions [lo, hi] with 0 < lo <= hi <= 1",
        )
        if self.kind == "retrieval":
            _require(
                self.dataset is not None,
                "data.dataset",
                self.dataset,
                "one of 'cub', 'cars', 'sop', 'inshop' with data.kind='retrieval'",
            )
            _require(
                self.resize >= self.image_size,
                "data.resize",
                self.resize,
                f"an integer >= data.image_size={self.image_size} (the test crop is cut from the resized image)",
            )
        else:
            _require(
                self.dataset is None,
                "data.dataset",
                self.dataset,
                "null with data.kind='face' (set data.kind=retrieval to train on a retrieval data set)",
            )
        _require(self.p >= 1, "data.p", self.p, "an integer >= 1 (identities per rank per step)")
        _require(self.k >= 1, "data.k", self.k, "an integer >= 1 (images per identity)")
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "an integer >= 0")
        _require(
            0.0 <= self.max_bad_fraction <= 1.0,
            "data.max_bad_fraction",
            self.max_bad_fraction,
            "a number in [0, 1]",
        )
        for i, target in enumerate(self.val_targets):
            _require(target != "", f"data.val_targets[{i}]", target, "a non-empty set name")
        _require(
            len(set(self.val_targets)) == len(self.val_targets),
            "data.val_targets",
            self.val_targets,
            "names without duplicates",
        )


@dataclass(frozen=True)
class ModelConfig:
    """The backbone.

    Attributes:
        name: a model registered in ``facems.models`` (``iresnet_tiny``, ``iresnet50``, ...).
        num_features: embedding dimension.
        dropout: dropout probability before the embedding layer, in [0, 1).
        grad_checkpoint: recompute activations in the backward pass to save memory.
        channels_last: run convolutions in NHWC memory format.
        compile: wrap the model in ``torch.compile``.
        init_from: optional backbone ``state_dict`` file (insightface key layout) to start from.
        pretrained: retrieval networks only: ImageNet weights of the trunk, a local file
            (``bn_inception-52deb4733.pth`` for ``bninception``) or ``torchvision`` (``resnet50``:
            torchvision's cached file); null: random initialisation. Nothing is ever downloaded.
        freeze_bn: keep BatchNorm running statistics frozen while training (the official MS-loss
            code does; affine parameters still train). Null: the model's default (``bninception``
            and ``resnet50``: frozen); only models that take the option accept true or false.

    The input transform is not configured: it belongs to the weights, so each model carries its own
    (``preprocess`` of the retrieval networks: Caffe BGR 0..255 minus [104, 117, 128] for
    ``bninception``, ImageNet mean/std for ``resnet50``; ``(x / 255 - 0.5) / 0.5`` for the face
    backbones) and training and evaluation both use it.
    """

    section: ClassVar[str] = "model"

    name: str = "iresnet_tiny"
    num_features: int = 512
    dropout: float = 0.0
    grad_checkpoint: bool = False
    channels_last: bool = True
    compile: bool = False
    init_from: Optional[str] = None
    pretrained: Optional[str] = None
    freeze_bn: Optional[bool] = None

    def __post_init__(self) -> None:
        _require(self.name != "", "model.name", self.name, "a registered model name")
        _require(
            self.pretrained != "", "model.pretrained", self.pretrained, "null, a file path or 'torchvision'"
        )
        _require(self.num_features >= 1, "model.num_features", self.num_features, "an integer >= 1")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a probability in [0, 1)")
        _require(self.init_from != "", "model.init_from", self.init_from, "null or a file path")


@dataclass(frozen=True)
class LossConfig:
    """The metric-learning loss, optional cross-batch memory and optional margin head.

    Attributes:
        name: ``ms`` (Multi-Similarity) or a GPW pair loss for comparison.
        alpha: MS positive scale (official default 2; pytorch-metric-learning's is 2).
        beta: MS negative scale (official default 40; pytorch-metric-learning's is 50).
        base: MS similarity offset lambda (official default 0.5).
        epsilon: MS mining margin (official default 0.1).
        mining: apply MS pair mining before weighting.
        chunk_size: anchors per chunk when building the similarity matrix (null: all at once).
        xbm_size: cross-batch memory size in embeddings (0: no memory).
        xbm_start_step: optimizer step from which the memory loss is added.
        xbm_weight: weight of the memory loss (total = batch loss + weight * memory loss).
        margin_head: optional classification head for hybrid training (classes from the pack).
        margin_weight: weight of the margin-head loss.
        margin_scale: logit scale s of the margin head.
        margin: additive angular (ArcFace, radians) or cosine (CosFace) margin m.
    """

    section: ClassVar[str] = "loss"

    name: LossName = "ms"
    alpha: float = 2.0
    beta: float = 40.0
    base: float = 0.5
    epsilon: float = 0.1
    mining: bool = True
    chunk_size: Optional[int] = None
    xbm_size: int = 0
    xbm_start_step: int = 0
    xbm_weight: float = 1.0
    margin_head: Optional[MarginHead] = None
    margin_weight: float = 1.0
    margin_scale: float = 64.0
    margin: float = 0.5

    def __post_init__(self) -> None:
        _require(self.alpha > 0, "loss.alpha", self.alpha, "a number > 0")
        _require(self.beta > 0, "loss.beta", self.beta, "a number > 0")
        _require(-1.0 <= self.base <= 1.0, "loss.base", self.base, "a cosine similarity in [-1, 1]")
        _require(self.epsilon >= 0, "loss.epsilon", self.epsilon, "a number >= 0")
        _require(
            self.chunk_size is None or self.chunk_size >= 1,
            "loss.chunk_size",
            self.chunk_size,
            "null or >= 1",
        )
        _require(self.xbm_size >= 0, "loss.xbm_size", self.xbm_size, "an integer >= 0 (0: no memory)")
        _require(self.xbm_start_step >= 0, "loss.xbm_start_step", self.xbm_start_step, "an integer >= 0")
        _require(self.xbm_weight >= 0, "loss.xbm_weight", self.xbm_weight, "a number >= 0")
        _require(self.margin_weight >= 0, "loss.margin_weight", self.margin_weight, "a number >= 0")
        _require(self.margin_scale > 0, "loss.margin_scale", self.margin_scale, "a number > 0")
        _require(self.margin >= 0, "loss.margin", self.margin, "a number >= 0")


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer.

    Attributes:
        name: ``sgd``, ``adam`` (L2 decay added to the gradient, as the official MS-loss code's
            ``torch.optim.Adam``) or ``adamw`` (decoupled decay).
        lr: peak learning rate (after warmup), for the whole global batch.
        momentum: SGD momentum, in [0, 1).
        nesterov: SGD Nesterov momentum (needs momentum > 0).
        weight_decay: L2 weight decay (decoupled for AdamW).
        betas: Adam/AdamW (beta1, beta2), each in [0, 1).
        no_decay_on_norm_bias_prelu: no weight decay on BatchNorm, bias and PReLU parameters.
        grad_clip: maximum global gradient norm over all parameters (null: no clipping).
        grad_accum: micro-batches accumulated per optimizer step.
    """

    section: ClassVar[str] = "optim"

    name: OptimName = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    no_decay_on_norm_bias_prelu: bool = True
    grad_clip: Optional[float] = None
    grad_accum: int = 1

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", self.lr, "a learning rate > 0")
        _require(0.0 <= self.momentum < 1.0, "optim.momentum", self.momentum, "a number in [0, 1)")
        _require(
            not (self.nesterov and self.name == "sgd" and self.momentum == 0),
            "optim.nesterov",
            self.nesterov,
            "false when optim.momentum is 0 (Nesterov needs momentum)",
        )
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a number >= 0")
        _require(
            all(0.0 <= b < 1.0 for b in self.betas), "optim.betas", list(self.betas), "two numbers in [0, 1)"
        )
        _require(
            self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", self.grad_clip, "null or > 0"
        )
        _require(self.grad_accum >= 1, "optim.grad_accum", self.grad_accum, "an integer >= 1")


@dataclass(frozen=True)
class ScheduleConfig:
    """The learning-rate schedule, stepped once per optimizer step.

    Linear warmup from 0 to ``optim.lr`` over ``warmup_epochs``, then ``poly``
    (``min_lr + (lr - min_lr) * (1 - t) ** power``), ``cosine`` (to ``min_lr``) or ``constant``, where
    ``t`` runs from 0 to 1 over the remaining steps, or ``step``: ``lr * gamma ** m`` where ``m`` is
    the number of ``milestones`` (fractions of the whole run) already reached. Warmup is given in
    epochs (a float, so 0.5 is half an epoch) because the training length is in epochs too; the loop converts both to optimizer steps
    with the number of steps per epoch, which depends on the pack and the world size.

    Attributes:
        name: ``poly``, ``cosine``, ``constant`` or ``step``.
        warmup_epochs: warmup length in epochs (>= 0, < ``epochs``).
        epochs: training length in epochs (``train.max_steps`` may stop earlier).
        power: exponent of the polynomial decay.
        min_lr: learning rate at the end of the decay (<= ``optim.lr``; not used by ``step`` and
            ``constant``).
        milestones: ``step`` only: where the rate is multiplied by ``gamma``, as increasing fractions
            of the run's optimizer steps in (0, 1) (the official MS-loss CUB recipe: 1,200 and 2,400 of
            3,000 iterations, i.e. [0.4, 0.8]).
        gamma: ``step`` only: the factor applied at each milestone, in (0, 1].
    """

    section: ClassVar[str] = "schedule"

    name: ScheduleName = "poly"
    warmup_epochs: float = 0.0
    epochs: int = 20
    power: float = 2.0
    min_lr: float = 0.0
    milestones: list[float] = field(default_factory=lambda: [0.4, 0.8])
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "schedule.epochs", self.epochs, "an integer >= 1")
        _require(
            0.0 <= self.warmup_epochs < self.epochs,
            "schedule.warmup_epochs",
            self.warmup_epochs,
            f"a number in [0, schedule.epochs={self.epochs})",
        )
        _require(self.power > 0, "schedule.power", self.power, "a number > 0")
        _require(self.min_lr >= 0, "schedule.min_lr", self.min_lr, "a number >= 0")
        ms = list(self.milestones)
        _require(
            all(0.0 < m < 1.0 for m in ms) and all(a < b for a, b in zip(ms, ms[1:])),
            "schedule.milestones",
            ms,
            "increasing fractions of the run in (0, 1), e.g. [0.4, 0.8]",
        )
        _require(0.0 < self.gamma <= 1.0, "schedule.gamma", self.gamma, "a factor in (0, 1]")


@dataclass(frozen=True)
class TrainConfig:
    """The run: output, precision, determinism, resume, checkpoints.

    Attributes:
        output_dir: run folder (``{name}`` is replaced by the run name).
        precision: ``bf16`` autocast, ``fp16`` autocast with a gradient scaler, ``fp32``, or ``auto``
            (bf16 where the device runs it fast, else fp32).
        seed: seed of model initialisation and of every other random draw (per rank offsets added).
        deterministic: request deterministic kernels (slower).
        resume: ``auto`` (the newest loadable checkpoint in ``output_dir``, if any), ``none`` (start
            afresh), or the path of a checkpoint.
        checkpoint_every: optimizer steps between checkpoints (one is also written at the end).
        keep_checkpoints: checkpoints kept on disk.
        max_bad_steps: consecutive non-finite-loss steps after which training stops.
        max_steps: stop after this many optimizer steps (null: run all ``schedule.epochs``).
    """

    section: ClassVar[str] = "train"

    output_dir: str = "work_dirs/{name}"
    precision: Precision = "auto"
    seed: int = 0
    deterministic: bool = False
    resume: str = "auto"
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    max_bad_steps: int = 20
    max_steps: Optional[int] = None

    def __post_init__(self) -> None:
        _require(self.output_dir != "", "train.output_dir", self.output_dir, "a non-empty folder path")
        _require(self.resume != "", "train.resume", self.resume, "'auto', 'none' or a checkpoint path")
        _require(
            self.checkpoint_every >= 1, "train.checkpoint_every", self.checkpoint_every, "an integer >= 1"
        )
        _require(
            self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints, "an integer >= 1"
        )
        _require(self.max_bad_steps >= 1, "train.max_bad_steps", self.max_bad_steps, "an integer >= 1")
        _require(
            self.max_steps is None or self.max_steps >= 1, "train.max_steps", self.max_steps, "null or >= 1"
        )


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation during training: ``data.val_targets`` (face) or the data set's test split (retrieval).

    ``model.pt`` is always the newest evaluated model. Face runs also keep ``model_best.pt``, the model
    with the best mean ``.bin`` accuracy. Retrieval runs have no validation split (the benchmarks'
    protocol trains on one half of the classes and tests on the other), so they select nothing by
    default: the result of a retrieval recipe is the last model. ``keep_best_on_test`` opts in to
    the official code's choice (keep the model with the best test Recall@1), which selects on the
    test split and overstates the result.

    Attributes:
        every_steps: optimizer steps between evaluations (0: only at the end of training).
        batch_size: images per forward pass, per rank.
        flip: add the embedding of the horizontally flipped image (flip test; off in the
            metric-learning protocol).
        at_start: also evaluate before the first step of a fresh run (the accuracy at initialisation).
        keep_best_on_test: retrieval only: also write ``model_best.pt`` by test-split Recall@1.
    """

    section: ClassVar[str] = "eval"

    every_steps: int = 2000
    batch_size: int = 256
    flip: bool = True
    at_start: bool = False
    keep_best_on_test: bool = False

    def __post_init__(self) -> None:
        _require(
            self.every_steps >= 0, "eval.every_steps", self.every_steps, "an integer >= 0 (0: at the end)"
        )
        _require(self.batch_size >= 1, "eval.batch_size", self.batch_size, "an integer >= 1")


@dataclass(frozen=True)
class LogConfig:
    """Logging.

    Attributes:
        every_steps: optimizer steps between log lines, ``metrics.jsonl`` records and scalars.
        tensorboard: also write TensorBoard scalars.
    """

    section: ClassVar[str] = "log"

    every_steps: int = 10
    tensorboard: bool = True

    def __post_init__(self) -> None:
        _require(self.every_steps >= 1, "log.every_steps", self.every_steps, "an integer >= 1")


_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Config:
    """A whole training run. Build it with :func:`load_config` or :func:`config_from_dict`.

    Attributes:
        name: run name (letters, digits, ``_ . -``); sets the default output folder.
    """

    name: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        _require(
            isinstance(self.name, str) and _NAME_RE.fullmatch(self.name) is not None,
            "name",
            self.name,
            "a run name of letters, digits, '_', '.', '-' (not starting with a dot or dash)",
        )
        _require(
            self.data.k >= 2,
            "data.k",
            self.data.k,
            f"an integer >= 2 for loss.name={self.loss.name!r} (each identity needs a positive pair)",
        )
        _require(
            self.schedule.min_lr <= self.optim.lr,
            "schedule.min_lr",
            self.schedule.min_lr,
            f"a number <= optim.lr={self.optim.lr}",
        )
        _require(
            not (self.eval.keep_best_on_test and self.data.kind == "face"),
            "eval.keep_best_on_test",
            self.eval.keep_best_on_test,
            "false with data.kind='face' (face runs keep model_best.pt by the .bin accuracy)",
        )
        if "{name}" in self.train.output_dir:
            out = self.train.output_dir.replace("{name}", self.name)
            # The dataclass is frozen; this is its own construction, finishing the default.
            object.__setattr__(self, "train", dataclasses.replace(self.train, output_dir=out))


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "log": LogConfig,
}
_TOP_KEYS = ("name", *SECTIONS)
_FILE_KEYS = ("inherit", *_TOP_KEYS)


# ---------------------------------------------------------------------------------------------
# Type checking against the annotations


# A decimal number as YAML 1.2 spells it; PyYAML leaves "1e-3" (no dot) a string.
_FLOAT_RE = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")


def _describe(tp: Any) -> str:
    """Words for what a value of annotation ``tp`` must be."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Union:
        inner = [a for a in args if a is not type(None)]
        return "null or " + " or ".join(_describe(a) for a in inner)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return "a list of strings" if args[0] is str else f"a list of ({_describe(args[0])})"
    if origin is tuple:
        return f"a list of {len(args)} numbers"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (int -> float, list -> tuple).

    Raises:
        ConfigError: naming ``key``, the value and the expected type.
    """
    origin, args = get_origin(tp), get_args(tp)
    wrong = ConfigError(f"{key} = {_show(value)}: expected {_describe(tp)}")
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        try:
            return _coerce(value, inner, key)
        except ConfigError:
            raise wrong from None
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        text = value if isinstance(value, str) else _show(value)
        close = difflib.get_close_matches(text[:200], [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{wrong}{hint}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise wrong
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise wrong
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} = {value!r}: expected a finite number")
            return float(value)
        raise wrong
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{wrong} (quote it in YAML if it is meant as text)")
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")


def _unknown(key: str, valid: Sequence[str], where: str, scope: str) -> ConfigError:
    """An unknown-key error naming the closest valid key, then all valid keys of ``scope``."""
    name = key.rsplit(".", 1)[-1]
    prefix = key[: len(key) - len(name)]
    close = difflib.get_close_matches(name, list(valid), n=1)
    hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
    return ConfigError(f"unknown key {key!r} in {where}{hint} Valid keys of {scope}: {', '.join(valid)}")


def _merge_layer(
    merged: dict[str, Any], layer: Mapping[str, Any], where: str, origins: Optional[dict[str, str]] = None
) -> None:
    """Check every key and value of ``layer`` and write the converted values into ``merged``.

    ``merged`` holds ``name`` and one dict per section; ``layer`` may hold any part of them. Each key
    set is recorded in ``origins`` (dotted key -> ``where``) when it is given.
    """
    origins = {} if origins is None else origins
    for top, body in layer.items():
        if top == "name":
            try:
                merged["name"] = _coerce(body, str, "name")
            except ConfigError as e:
                raise ConfigError(f"{e} (in {where})") from None
            origins["name"] = where
            continue
        if top not in SECTIONS:
            raise _unknown(str(top), _TOP_KEYS, where, "the top level")
        if not isinstance(body, Mapping):
            raise ConfigError(f"{top} = {_show(body)} in {where}: expected a mapping of {top}.* keys")
        hints = _field_types(SECTIONS[top])
        for key, value in body.items():
            dotted = f"{top}.{key}"
            if key not in hints:
                raise _unknown(dotted, sorted(hints), where, f"section {top!r}")
            try:
                merged[top][key] = _coerce(value, hints[key], dotted)
            except ConfigError as e:
                raise ConfigError(f"{e} (in {where})") from None
            origins[dotted] = where


def _field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of every field of dataclass ``cls`` (class variables excluded)."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _defaults() -> dict[str, Any]:
    """Every section's default values, as the plain dicts layers are merged into."""
    return {
        name: {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
        for name, cls in SECTIONS.items()
    }


def _build(merged: Mapping[str, Any]) -> Config:
    """Construct the frozen config from checked values (range checks run in ``__post_init__``)."""
    sections = {name: cls(**merged[name]) for name, cls in SECTIONS.items()}
    return Config(name=merged["name"], **sections)


# ---------------------------------------------------------------------------------------------
# Files and presets


def _preset_dir() -> Any:
    return resources.files("facems") / "configs"


def list_presets() -> list[str]:
    """Names of the presets shipped in ``facems/configs``, sorted."""
    return sorted(p.name[: -len(".yaml")] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def _is_path(ref: str) -> bool:
    """A reference is a file path (not a preset name) if it names a YAML file or a folder."""
    return ref.endswith((".yaml", ".yml")) or "/" in ref or os.sep in ref or os.path.isfile(ref)


def _read_yaml(text: str, where: str) -> dict[str, Any]:
    """Parse ``text`` with ``yaml.safe_load``; the top level must be a mapping (or empty)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not plain YAML (only safe YAML is read, no Python tags): {e}") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    except Exception as e:  # a constructor's own error, e.g. an integer of more than 4300 digits
        raise ConfigError(f"{where}: YAML value not readable: {type(e).__name__}: {str(e)[:200]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: expected a mapping of sections at the top level, got {type(data).__name__}"
        )
    for key in data:
        if key not in _FILE_KEYS:
            raise _unknown(str(key), _FILE_KEYS, where, "the top level")
    return data


def _locate(ref: str, base_dir: Optional[str]) -> tuple[str, str, str]:
    """Find a preset name or a YAML path; returns (identity for cycle checks, description, text)."""
    if _is_path(ref):
        path = ref if os.path.isabs(ref) or base_dir is None else os.path.join(base_dir, ref)
        path = os.path.abspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                return path, f"file {path}", f.read()
        except OSError as e:
            raise ConfigError(f"config file {path}: cannot be read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path}: not UTF-8 text (byte offset {e.start})") from None
    presets = list_presets()
    if ref not in presets:
        close = difflib.get_close_matches(ref, presets, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown preset {ref!r}{hint} Presets: {', '.join(presets)} (or give the path of a YAML file)"
        )
    text = (_preset_dir() / f"{ref}.yaml").read_text(encoding="utf-8")
    return f"preset:{ref}", f"preset {ref} (facems/configs/{ref}.yaml)", text


def _file_layers(
    ref: str, base_dir: Optional[str], chain: tuple[str, ...]
) -> list[tuple[str, dict[str, Any]]]:
    """The layers of ``ref``: those of its ``inherit`` chain first, then its own. Detects cycles."""
    ident, where, text = _locate(ref, base_dir)
    if ident in chain:
        names = [c.removeprefix("preset:") for c in (*chain, ident)]
        raise ConfigError(f"{where}: 'inherit' forms a cycle: {' -> '.join(names)}")
    data = _read_yaml(text, where)
    parent = data.pop("inherit", None)
    layers: list[tuple[str, dict[str, Any]]] = []
    if parent is not None:
        if not isinstance(parent, str) or parent == "":
            raise ConfigError(f"inherit = {_show(parent)} in {where}: expected a preset name or a YAML path")
        own_dir = os.path.dirname(ident) if not ident.startswith("preset:") else None
        for parent_where, parent_data in _file_layers(parent, own_dir, (*chain, ident)):
            parent_data.pop("name", None)  # an inherited file's name is not the child's
            layers.append((parent_where, parent_data))
    layers.append((where, data))
    return layers


def _parse_override(text: str) -> dict[str, Any]:
    """``section.key=value`` (or ``name=value``) as a one-entry layer; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected section.key=value (e.g. optim.lr=0.05)")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not plain YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"override {text[:80]!r}: the value is nested too deeply") from None
    except Exception as e:
        raise ConfigError(
            f"override {text[:80]!r}: value not readable: {type(e).__name__}: {str(e)[:200]}"
        ) from None
    parts = key.split(".")
    if parts == ["name"]:
        return {"name": value}
    if len(parts) != 2 or not all(parts):
        raise ConfigError(
            f"override {text!r}: expected section.key=value with one dot; sections: {', '.join(SECTIONS)}"
        )
    return {parts[0]: {parts[1]: value}}


def load_config(preset_or_path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Resolve a run's configuration: defaults -> preset or YAML file -> dotted overrides.

    Args:
        preset_or_path: a preset name (see :func:`list_presets`), the path of a YAML file (one that
            ends in ``.yaml``/``.yml``, contains a slash or exists), or None for ``synthetic_demo``.
        overrides: ``section.key=value`` strings applied in order, values read with ``yaml.safe_load``.

    Returns:
        The frozen, validated :class:`Config`.

    Raises:
        ConfigError: unknown preset, section or key; wrong type; value out of range; unreadable or
            unsafe YAML; an ``inherit`` cycle.
    """
    ref = DEFAULT_PRESET if preset_or_path is None else preset_or_path
    if _is_path(ref):
        stem = os.path.splitext(os.path.basename(ref))[0]
    else:
        stem = ref
    merged: dict[str, Any] = {"name": stem, **_defaults()}
    origins = {"name": f"the name of {ref!r}"}  # where each key was set, to name it in range errors
    for where, data in _file_layers(ref, None, ()):
        _merge_layer(merged, data, where, origins)
    if isinstance(overrides, str):
        raise ConfigError(f"overrides = {overrides!r}: expected a list of section.key=value strings")
    for text in overrides:
        _merge_layer(merged, _parse_override(text), f"override {text!r}", origins)
    try:
        return _build(merged)
    except ConfigError as e:
        source = origins.get((e.key or "").split("[")[0])
        if source is None:
            raise
        raise ConfigError(f"{e} (set in {source})", e.key) from None


# ---------------------------------------------------------------------------------------------
# Dicts and saved files


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain YAML/JSON types (dicts, lists, str, int, float, bool, None).

    Safe to store in a checkpoint read with ``torch.load(weights_only=True)``.
    """
    out: dict[str, Any] = {"name": cfg.name}
    for name in SECTIONS:
        section = getattr(cfg, name)
        out[name] = {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
    return out


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Rebuild a config from :func:`config_to_dict`'s output, with the same checks as :func:`load_config`.

    Keys missing from ``d`` take their defaults (a checkpoint from an older facems lacks new keys);
    ``name`` is required.

    Raises:
        ConfigError: as :func:`load_config`.
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"config dict: expected a mapping, got {type(d).__name__}")
    if "name" not in d:
        raise ConfigError("config dict: missing the key 'name'")
    for key in d:
        if key not in _TOP_KEYS:
            raise _unknown(str(key), _TOP_KEYS, "config dict", "the top level")
    merged: dict[str, Any] = {"name": None, **_defaults()}
    _merge_layer(merged, d, "config dict")
    return _build(merged)


def save_config(cfg: Config, path: str) -> None:
    """Write ``cfg`` as YAML to ``path`` atomically (temporary file in the same folder, fsync, rename).

    ``load_config(path)`` gives back an equal config.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    text = f"# Resolved facems {__version__} configuration; load with facems.config.load_config(path).\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
