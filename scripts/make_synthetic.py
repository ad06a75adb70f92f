"""Write the synthetic face set (training pack, calfw/cplfw bins, IJB-C-like release, CUB layout).

    python scripts/make_synthetic.py --root data/synthetic --scale tiny   # seconds: tests and smoke runs
    python scripts/make_synthetic.py --root data/synthetic --scale demo   # minutes: the CPU demo
    python scripts/make_synthetic.py --root data/synthetic --scale full   # adds IJB-C meta at real size

Everything is deterministic from --seed. See facems.data.synthetic for the face model and its knobs.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import cv2

from facems.data.synthetic_release import SCALES, write_synthetic_root


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="data/synthetic", help="output folder")
    parser.add_argument("--scale", default="tiny", choices=sorted(SCALES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes rendering the training pack (all CPUs)",
    )
    args = parser.parse_args()
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    cv2.setNumThreads(1)
    start = time.perf_counter()
    counts = write_synthetic_root(args.root, args.scale, args.seed, workers=args.workers)
    print(
        json.dumps(
            {
                "root": args.root,
                "scale": args.scale,
                **counts,
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
