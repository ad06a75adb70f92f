"""Benchmark the Multi-Similarity loss: forward + backward time and peak extra memory.

    python scripts/bench_loss.py                       # CPU, 2 threads, batch 256 1024 4096, dim 512
    python scripts/bench_loss.py --device cuda --batches 1024 4096 16384
    python scripts/bench_loss.py --loop-max-batch 4096 # also time the official loop at 4096 (minutes)

Methods: facems' MultiSimilarityLoss (default automatic chunks of about 2^20 similarities, and the
whole matrix at once), pytorch-metric-learning's
MultiSimilarityMiner + MultiSimilarityLoss, a per-anchor loop written after the official
research-ms-loss code, and the floor: the similarity matmul alone, forward + backward. Inputs are
random fp32 embeddings with K = 4 images per label (almost every pair is mined: the worst case).
Each (method, batch) runs in its own subprocess so that the CPU peak RSS belongs to it alone; time
is the median of --repeats runs after --warmup runs, the device synchronised.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Callable

import torch

METHODS = ("facems", "facems_unchunked", "pml", "official_loop", "matmul_floor")


def official_loop(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One anchor at a time, as the official code does (self pair dropped by value, S < 1 - 1e-5)."""
    xn = torch.nn.functional.normalize(x, dim=1)
    sim = xn @ xn.t()
    losses = []
    for i in range(x.shape[0]):
        pos_all = sim[i][y == y[i]]
        pos_all = pos_all[pos_all < 1 - 1e-5]
        neg_all = sim[i][y != y[i]]
        if len(pos_all) == 0 or len(neg_all) == 0:
            continue
        neg = neg_all[neg_all + 0.1 > torch.min(pos_all)]
        pos = pos_all[pos_all - 0.1 < torch.max(neg_all)]
        if len(neg) < 1 or len(pos) < 1:
            continue
        pos_loss = 1.0 / 2 * torch.log(1 + torch.sum(torch.exp(-2 * (pos - 0.5))))
        neg_loss = 1.0 / 40 * torch.log(1 + torch.sum(torch.exp(40 * (neg - 0.5))))
        losses.append(pos_loss + neg_loss)
    return sum(losses) / x.shape[0] if losses else sim.sum() * 0


def make_step(method: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    from facems.losses import MultiSimilarityLoss

    if method.startswith("facems"):
        loss = MultiSimilarityLoss(chunk_size=0 if method.endswith("unchunked") else None)
        return lambda: loss(x, y).backward()
    if method == "pml":
        from pytorch_metric_learning import losses, miners

        miner, pml = miners.MultiSimilarityMiner(epsilon=0.1), losses.MultiSimilarityLoss(2.0, 40.0, 0.5)
        return lambda: pml(x, y, miner(x, y)).backward()
    if method == "official_loop":
        return lambda: official_loop(x, y).backward()
    return lambda: (x @ x.t()).sum().backward()


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(method: str, batch: int, args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, args.dim, generator=g).to(dev).requires_grad_(True)
    y = torch.arange(batch // args.k).repeat_interleave(args.k).to(dev)
    step = make_step(method, x, y)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    slow = method == "official_loop" and batch > 1024
    warmup, repeats = (0, 1) if slow else (args.warmup, args.repeats)
    base_mb = torch.cuda.memory_allocated() / 2**20 if dev.type == "cuda" else current_rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + repeats):
        x.grad = None
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times.sort()
    return {"ms": 1000 * times[len(times) // 2], "peak_mb": peak_mb - base_mb, "runs": len(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=4, help="images per label")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--loop-max-batch", type=int, default=1024, help="largest batch for the official loop")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args)))
        return
    passthrough = sys.argv[1:]
    print(
        f"torch {torch.__version__}, device {args.device}, threads {args.threads}, dim {args.dim}, K {args.k}, fp32"
    )
    print(f"{'batch':>6} {'method':<16} {'ms':>10} {'runs':>4} {'peak MB':>9} {'/facems':>8} {'/floor':>7}")
    for batch in args.batches:
        rows = {}
        for method in args.methods:
            if method == "official_loop" and batch > args.loop_max_batch:
                continue
            cmd = [sys.executable, __file__, *passthrough, "--worker", method, str(batch)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows[method] = json.loads(out.strip().splitlines()[-1])
        for method, r in rows.items():
            vs_ours = r["ms"] / rows["facems"]["ms"] if "facems" in rows else float("nan")
            vs_floor = r["ms"] / rows["matmul_floor"]["ms"] if "matmul_floor" in rows else float("nan")
            print(
                f"{batch:>6} {method:<16} {r['ms']:>10.1f} {r['runs']:>4} {r['peak_mb']:>9.0f} "
                f"{vs_ours:>8.2f} {vs_floor:>7.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
