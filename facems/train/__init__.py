"""Training: the loop (:func:`fit`), launch, optimizer and schedule builders, checkpoints, RNG state,
logging and the throughput benchmark."""

from facems.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    atomic_save,
    load_checkpoint,
    save_model_pt,
)
from facems.train.logging import ThroughputMeter, TrainLogger, setup_logging
from facems.train.loop import FitResult, Trainer, TrainingDiverged, fit
from facems.train.optim import build_optimizer, param_groups
from facems.train.rng import capture_rng_state, restore_rng_state
from facems.train.schedule import build_scheduler, lr_at, optimizer_steps

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "FitResult",
    "ThroughputMeter",
    "TrainLogger",
    "Trainer",
    "TrainingDiverged",
    "atomic_save",
    "build_optimizer",
    "build_scheduler",
    "capture_rng_state",
    "fit",
    "load_checkpoint",
    "lr_at",
    "optimizer_steps",
    "param_groups",
    "restore_rng_state",
    "save_model_pt",
    "setup_logging",
]
