"""IJB-C 1:1 at full size: facems against a straightforward implementation of the same protocol.

    python scripts/bench_ijb.py [--meta-dir DIR] [--repeats 3] [--threads N]

Meta files of the real IJB-C size from ``write_ijbc_meta_at_scale`` (or --meta-dir, e.g. the root of
``make_synthetic.py --scale full``), random 512-d float32 image features. Each run is its own process
(own peak RSS); the best of --repeats is shown. "reference" restates insightface's eval_ijbc.py:
np.where loops per template, pairs in float64 batches of 100,000, sklearn roc_curve and its nearest-
point table (np.loadtxt stands in for pandas, which facems does not depend on).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from sklearn.metrics import roc_curve
from sklearn.preprocessing import normalize

FARS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]


Run = tuple[dict[str, float], np.ndarray, list[float]]


def reference(meta: str, feats: np.ndarray, threads: int | None = None) -> Run:
    t = [time.perf_counter()]
    faces = np.loadtxt(os.path.join(meta, "ijbc_face_tid_mid.txt"), dtype=np.int64, usecols=(1, 2))
    pairs = np.loadtxt(os.path.join(meta, "ijbc_template_pair_label.txt"), dtype=np.int64)
    templates, medias, p1, p2, label = faces[:, 0], faces[:, 1], pairs[:, 0], pairs[:, 1], pairs[:, 2]
    t.append(time.perf_counter())
    unique = np.unique(templates)
    tfeats = np.zeros((len(unique), feats.shape[1]))
    for k, uqt in enumerate(unique):
        (ind_t,) = np.where(templates == uqt)
        face_feats, face_medias = feats[ind_t], medias[ind_t]
        media = [np.mean(face_feats[face_medias == u], axis=0, keepdims=True) for u in np.unique(face_medias)]
        tfeats[k] = np.sum(np.array(media), axis=0)
    tfeats = normalize(tfeats)
    t.append(time.perf_counter())
    template2id = np.zeros(unique.max() + 1, dtype=int)
    template2id[unique] = np.arange(len(unique))
    score = np.zeros(len(p1))
    for s in range(0, len(p1), 100_000):
        f1, f2 = tfeats[template2id[p1[s : s + 100_000]]], tfeats[template2id[p2[s : s + 100_000]]]
        score[s : s + 100_000] = np.sum(f1 * f2, -1)
    t.append(time.perf_counter())
    fpr, tpr = (np.flipud(a) for a in roc_curve(label, score)[:2])
    table = [float(tpr[min(zip(abs(fpr - x), range(len(fpr))))[1]]) for x in FARS]
    t.append(time.perf_counter())
    return _stages(t), score, table


def facems(meta: str, feats: np.ndarray, threads: int | None) -> Run:
    from facems.protocols import ijb

    t = [time.perf_counter()]
    _, templates, medias = ijb.read_face_tid_mid(os.path.join(meta, "ijbc_face_tid_mid.txt"))
    p1, p2, label = ijb.read_template_pair_list(os.path.join(meta, "ijbc_template_pair_label.txt"))
    t.append(time.perf_counter())
    tfeats, unique = ijb.image_to_template_features(feats, templates, medias, num_threads=threads)
    t.append(time.perf_counter())
    score = ijb.verify_pairs(tfeats, unique, p1, p2, num_threads=threads)
    t.append(time.perf_counter())
    readout = ijb.tar_at_far_readout(label, score, FARS)  # both read-outs
    t.append(time.perf_counter())
    return _stages(t), score, list(readout.nearest.values())


def _stages(t: list[float]) -> dict[str, float]:
    names = ("meta read", "pooling", "pair scoring", "read-out")
    return {**{n: b - a for n, a, b in zip(names, t, t[1:])}, "features to TAR table": t[-1] - t[1]}


def worker(args: argparse.Namespace) -> None:
    n_faces = sum(1 for _ in open(os.path.join(args.meta_dir, "ijbc_face_tid_mid.txt"), "rb"))
    feats = np.random.default_rng(0).standard_normal((n_faces, 512), dtype=np.float32)
    impl = facems if args.worker == "facems" else reference
    stages, score, table = impl(args.meta_dir, feats, args.threads)
    np.save(args.scores_out, score)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"stages": stages, "table": table, "peak_mb": peak}))


def report(best: dict[str, dict], scores_dir: str) -> None:
    impls = list(best)
    cols = [*impls, "speed-up"] if len(impls) == 2 else impls
    print("| stage | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|")
    for stage in best[impls[0]]["stages"]:
        vals = [best[i]["stages"][stage] for i in impls]
        cells = [f"{v:.2f} s" for v in vals] + ([f"{vals[1] / vals[0]:.1f}x"] if len(vals) == 2 else [])
        print(f"| {stage} | " + " | ".join(cells) + " |")
    peaks = [f"{best[i]['peak_mb']:.0f} MB" for i in impls]
    print("| peak RSS | " + " | ".join(peaks) + " |" * (len(cols) - len(impls) + 1))
    for i in impls:
        print(f"{i}: TAR@FAR " + ", ".join(f"{f:.0e}: {v:.2%}" for f, v in zip(FARS, best[i]["table"])))
    if len(impls) == 2:
        a, b = (np.load(os.path.join(scores_dir, f"{i}.npy")) for i in impls)
        print(f"max |score difference| {np.abs(a - b).max():.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meta-dir", default=None, help="full-size ijbc_*.txt (default: write them)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each implementation; the best is shown")
    p.add_argument("--threads", type=int, default=None, help="facems threads (default: usable cores)")
    p.add_argument("--impls", nargs="+", default=["facems", "reference"], choices=["facems", "reference"])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scores-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    tmp = tempfile.TemporaryDirectory()
    subs = ("", "IJBC/meta", "IJBC_full/IJBC/meta", "meta")
    found = [os.path.join(args.meta_dir or "", d) for d in subs if args.meta_dir]
    found = [d for d in found if os.path.isfile(os.path.join(d, "ijbc_template_pair_label.txt"))]
    if found:
        meta = found[0]
    else:
        from facems.data.synthetic_release import write_ijbc_meta_at_scale

        print("writing full-size IJB-C meta files (about 1.5 minutes) ...", flush=True)
        write_ijbc_meta_at_scale(tmp.name)
        meta = os.path.join(tmp.name, "IJBC", "meta")
    best: dict[str, dict] = {}
    for impl in args.impls:
        for r in range(args.repeats):
            cmd = [sys.executable, __file__, "--worker", impl, "--meta-dir", meta]
            cmd += ["--scores-out", os.path.join(tmp.name, f"{impl}.npy")]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            run = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            total = run["stages"]["features to TAR table"]
            print(f"{impl} run {r + 1}: {total:.2f} s, peak {run['peak_mb']:.0f} MB", flush=True)
            if impl not in best or total < best[impl]["stages"]["features to TAR table"]:
                best[impl] = run
    print(f"\nIJB-C size, {meta}; {os.cpu_count()} CPUs, facems threads {args.threads or 'default'}\n")
    report(best, tmp.name)


if __name__ == "__main__":
    main()
