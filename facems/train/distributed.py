"""Process-group set-up for ``torchrun`` and plain ``python`` launches, and small collective helpers.

The process group is created by :func:`init_distributed`, called from the training entry point, never
at import. Launch rules:

* ``python scripts/train.py`` (none of ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set): one process, no
  process group; the collectives below then act on the local values.
* ``torchrun ... scripts/train.py``: all three variables are set; NCCL on CUDA (device
  ``cuda:LOCAL_RANK``), gloo on CPU, with a timeout so a rank that died does not hang the others.
* anything in between (some variables set, values out of range, more local ranks than GPUs) is a
  launch error with a message saying what was found and how to launch.

Restarts (``torchrun --max-restarts=K``): the agent hosts one key-value store for the whole job
(``TORCHELASTIC_USE_AGENT_STORE=True``) and ``init_process_group("env://")`` writes its keys there
(each rank's gloo address, NCCL's unique id) without the attempt number. After a restart, a rank that
reaches ``init_process_group`` before a peer reads that peer's key from the failed attempt and fails
("Connection refused", or NCCL waits on a dead id); with torch 2.14 a peer a few seconds slower was
enough. :func:`init_distributed` therefore joins through a :class:`torch.distributed.PrefixStore`
named after ``TORCHELASTIC_RESTART_COUNT``, so each attempt has its own keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "LaunchError",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "cleanup_distributed",
    "init_distributed",
]

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class LaunchError(RuntimeError):
    """The process was started in a way the trainer cannot run (names what was found and expected)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, its ``local_rank`` and ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def _env_int(name: str, env: dict[str, str]) -> int:
    text = env[name]
    try:
        return int(text)
    except ValueError:
        raise LaunchError(
            f"environment variable {name}={text!r}: expected an integer (set by torchrun)"
        ) from None


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes, or run as one process without one.

    Args:
        device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
        timeout_s: collective timeout in seconds (a rank that died makes the others fail, not hang).

    Returns:
        The process's :class:`DistInfo`. ``initialized_here`` tells :func:`cleanup_distributed`
        whether this call created the group (a group created by the caller is left alone).

    Raises:
        LaunchError: a partial or inconsistent launch environment, or CUDA requested but missing.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise LaunchError(f"device={device!r}: expected 'auto', 'cpu' or 'cuda'")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise LaunchError("device='cuda' was requested but torch.cuda.is_available() is False")
    env = dict(os.environ)
    present = [name for name in _LAUNCH_VARS if name in env]
    if dist.is_available() and dist.is_initialized():  # a caller (e.g. a test harness) set it up
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", env) if "LOCAL_RANK" in env else rank
        return DistInfo(rank, world, local, _device(use_cuda, local), initialized_here=False)
    if not present:
        return DistInfo(0, 1, 0, _device(use_cuda, 0), initialized_here=False)
    if len(present) != len(_LAUNCH_VARS):
        missing = [name for name in _LAUNCH_VARS if name not in env]
        raise LaunchError(
            f"found {', '.join(present)} but not {', '.join(missing)} in the environment: launch with "
            "`torchrun --nproc_per_node=N scripts/train.py ...` (sets all of RANK, WORLD_SIZE, "
            "LOCAL_RANK) or with plain `python scripts/train.py ...` (sets none)"
        )
    rank, world, local = (_env_int(name, env) for name in _LAUNCH_VARS)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise LaunchError(
            f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}: expected WORLD_SIZE >= 1, "
            "0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0"
        )
    if use_cuda and local >= torch.cuda.device_count():
        raise LaunchError(
            f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} CUDA device(s): "
            "use --nproc_per_node <= the number of GPUs"
        )
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in env:
            raise LaunchError(f"{name} is not set: launch with torchrun, which sets it")
    dev = _device(use_cuda, local)
    if use_cuda:
        torch.cuda.set_device(dev)
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        rank=rank,
        world_size=world,
        timeout=timeout,
        device_id=dev if use_cuda else None,
        store=_attempt_store(env, rank, world, timeout),
    )
    return DistInfo(rank, world, local, dev, initialized_here=True)


def _attempt_store(env: dict[str, str], rank: int, world: int, timeout: timedelta) -> dist.Store | None:
    """Under torchrun: the job's store with keys private to this attempt; ``None`` (env://) otherwise."""
    attempt = env.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    port_text = env["MASTER_PORT"]
    try:
        port = int(port_text)
    except ValueError:
        raise LaunchError(f"MASTER_PORT={port_text!r}: expected a port number (set by torchrun)") from None
    # As torch's env:// does: the agent serves the store at MASTER_ADDR:MASTER_PORT when it says so,
    # otherwise rank 0 hosts it.
    agent_hosts = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(
        env["MASTER_ADDR"],
        port,
        world_size=world,
        is_master=not agent_hosts and rank == 0,
        timeout=timeout,
        multi_tenant=not agent_hosts,
    )
    return dist.PrefixStore(f"facems/attempt_{attempt}", base)


def _device(use_cuda: bool, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def cleanup_distributed(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few float64 numbers over all ranks (one collective); the local values without a group."""
    if not _active():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, small), in rank order; ``[obj]`` without a group."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op without a group)."""
    if _active():
        dist.barrier()
