"""Benchmark training throughput on synthetic in-memory batches: img/s of all ranks, step time split.

    python scripts/bench_train.py --model iresnet_tiny --batch 64 --precision fp32 bf16 --steps 10
    torchrun --standalone --nproc_per_node=2 scripts/bench_train.py --model iresnet_tiny --batch 32
    torchrun --standalone --nproc_per_node=8 scripts/bench_train.py --model iresnet50 --batch 128 \\
        --precision bf16 --compile-both          # GPUs: with and without torch.compile
    python scripts/bench_train.py --model iresnet50 --batch 128 --precision fp16 --loss arcface
                                                 # arcface_torch's workload on the same card

Each step: host uint8 P x K batch -> device, random flip of half the images, (x/255-0.5)/0.5,
channels_last (data); backbone under autocast + MS loss across ranks (forward); backward (with the
DDP all-reduce); SGD momentum 0.9 (optimizer). The device is synchronised around each phase; --warmup
steps (where torch.compile compiles) are not timed. img/s = images of all ranks / wall time of the
slowest rank. Peak memory: torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on CPU
(largest rank). Under torchrun the process group is gloo on CPU and NCCL on CUDA; rank 0 prints.
The library side is facems.train.bench.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from facems.train.bench import BENCH_LOSSES, PRECISIONS, BenchResult, bench_train, format_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="iresnet_tiny", help="backbone name (facems.models.list_models())")
    p.add_argument("--batch", type=int, default=64, help="images per rank per step (P x K)")
    p.add_argument("--k", type=int, default=4, help="images per identity")
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS)
    p.add_argument(
        "--loss",
        nargs="+",
        default=["ms"],
        choices=BENCH_LOSSES,
        help="ms: facems's step; arcface: insightface arcface_torch's workload (backbone + ArcFace FC)",
    )
    p.add_argument(
        "--num-classes", type=int, default=85742, help="classes of the ArcFace layer (MS1MV2: 85742)"
    )
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true", help="run the model under torch.compile")
    p.add_argument("--compile-both", action="store_true", help="run with and without torch.compile")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE (rank 0)")
    return p.parse_args(argv)


def init_distributed(device_arg: str) -> torch.device:
    """Create the process group under torchrun (gloo on CPU, NCCL on CUDA); return this rank's device."""
    use_cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            timeout=timedelta(minutes=10),
            device_id=device if use_cuda else None,
        )
    return device


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = init_distributed(args.device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    compiles = [False, True] if args.compile_both else [args.compile]
    rows: list[BenchResult] = []
    try:
        for objective, precision, compiled in itertools.product(args.loss, args.precision, compiles):
            rows.append(
                bench_train(
                    model=args.model,
                    batch=args.batch,
                    k=args.k,
                    precision=precision,
                    channels_last=args.channels_last,
                    compile=compiled,
                    steps=args.steps,
                    warmup=args.warmup,
                    device=device,
                    seed=args.seed,
                    loss=objective,
                    num_classes=args.num_classes,
                )
            )
            if rank == 0:
                print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(f"\ntorch {torch.__version__}, {args.steps} timed steps after {args.warmup} warm-up steps\n")
        print(format_table(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump([r.as_dict() for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
