"""Benchmark the procedural synthetic faces: images per second on one CPU core.

    python scripts/bench_synthetic.py                      # 2000 images per row, 3 repeats, difficulty 0 1 2
    python scripts/bench_synthetic.py --images 5000 --repeats 5 --difficulties 1

Rows: ``render_face`` alone (identity and nuisance drawn beforehand), a full ``SyntheticFaces``
item (seeding, drawing the identity and the nuisance, rendering; a new identity each item), and
``render_loose_crop`` at 160x160. OpenCV is held to one thread. The time is the median of
``--repeats`` runs after one warm-up run; each run renders ``--images`` images.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import cv2
import numpy as np

from facems.data.synthetic import (
    SyntheticFaces,
    render_face,
    render_loose_crop,
    sample_identity,
    sample_nuisance,
)


def time_per_image(fn: Callable[[int], object], n: int, repeats: int) -> float:
    """Median seconds per call of ``fn(i)`` for ``i`` in ``range(n)``, after one warm-up run."""
    for i in range(min(n, 200)):
        fn(i)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(n):
            fn(i)
        runs.append((time.perf_counter() - start) / n)
    return statistics.median(runs)


def cases(difficulty: float, n: int) -> dict[str, Callable[[int], object]]:
    rng = np.random.default_rng(0)
    identities = [sample_identity(rng) for _ in range(256)]
    nuisances = [sample_nuisance(rng, strength=difficulty) for _ in range(n)]
    loose_rng = np.random.default_rng(1)

    ds = SyntheticFaces(100_000, 8, seed=0, difficulty=difficulty)

    def item(i: int) -> object:
        return ds[(i * 7919 * 8 + i % 8) % len(ds)]  # a new identity each time: no cache hits

    return {
        "render_face": lambda i: render_face(identities[i % 256], nuisances[i]),
        "SyntheticFaces[i]": item,
        "render_loose_crop 160": lambda i: render_loose_crop(identities[i % 256], nuisances[i], loose_rng),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="images per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median reported)")
    parser.add_argument("--difficulties", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    args = parser.parse_args()

    cv2.setNumThreads(1)
    print(
        f"OpenCV {cv2.__version__}, numpy {np.__version__}, cv2 threads {cv2.getNumThreads()}, CPUs {os.cpu_count()}"
    )
    print(f"{'case':<24}{'difficulty':>11}{'images/s':>11}{'us/image':>11}")
    for difficulty in args.difficulties:
        for name, fn in cases(difficulty, args.images).items():
            sec = time_per_image(fn, args.images, args.repeats)
            print(f"{name:<24}{difficulty:>11.1f}{1.0 / sec:>11.0f}{sec * 1e6:>11.0f}")


if __name__ == "__main__":
    main()
