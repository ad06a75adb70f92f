"""Helpers for tests that need several processes: run a function under a gloo process group on CPU."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_in_ddp", "tiny_run_overrides"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int, world_size: int, port: int, out_dir: str, seed: int, fn: Callable[..., Any], args: tuple
) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        result = fn(rank, world_size, *args)
        tmp = os.path.join(out_dir, f"rank{rank}.tmp")
        torch.save(result, tmp)
        os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Success: leave without the interpreter's teardown, which takes 1 to 2 s per process once torch
    # (and dynamo, which every optimizer imports) is loaded; the result is already on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_in_ddp(
    world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 120.0, seed: int = 0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes under gloo.

    ``fn`` must be importable (a module-level function) and return tensors, numbers, lists or dicts
    of them. Returns the results in rank order. Raises ``TimeoutError`` (after killing the workers)
    when they do not finish within ``timeout`` seconds, and re-raises a worker's exception.
    """
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, port, out_dir, seed, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(
                    f"run_in_ddp: {world_size} workers running {fn.__name__} exceeded {timeout} s"
                )
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world_size)
        ]


def tiny_run_overrides(name: str, root: object, out: object, *extra: str) -> list[str]:
    """Dotted overrides of a tiny deterministic CPU run, for tests: ``load_config(None, overrides)``.

    iresnet_tiny_s2 with 32-d embeddings, P x K = 3 x 2, no data workers, fp32, deterministic, two
    epochs, no evaluation, no TensorBoard, no validation sets; ``extra`` overrides come last and win.
    """
    return [
        f"name={name}",
        f"data.root={root}",
        f"train.output_dir={out}",
        "data.val_targets=[]",
        "data.p=3",
        "data.k=2",
        "data.num_workers=0",
        "data.pin_memory=false",
        "model.name=iresnet_tiny_s2",
        "model.num_features=32",
        "optim.lr=0.05",
        "optim.grad_clip=5.0",
        "schedule.epochs=2",
        "train.deterministic=true",
        "train.precision=fp32",
        "eval.every_steps=0",
        "log.every_steps=1",
        "log.tensorboard=false",
        *extra,
    ]
