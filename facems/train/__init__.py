"""Training: optimizer and schedule builders, checkpoints and RNG state (the loop arrives with the
training issue)."""

from facems.train.checkpoint import CheckpointError, CheckpointManager, atomic_save, save_model_pt
from facems.train.optim import build_optimizer, param_groups
from facems.train.rng import capture_rng_state, restore_rng_state
from facems.train.schedule import build_scheduler, lr_at, optimizer_steps

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "atomic_save",
    "build_optimizer",
    "build_scheduler",
    "capture_rng_state",
    "lr_at",
    "optimizer_steps",
    "param_groups",
    "restore_rng_state",
    "save_model_pt",
]
