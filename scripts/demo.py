"""The CPU demo behind `make demo`: synthetic data -> 2-process training -> accuracy before and after.

    python scripts/demo.py [--root data/synthetic] [--nproc 2] [overrides ...]

1. writes the demo-scale synthetic set under --root unless that version of it is already there
   (2,000 identities x 20 images, calfw/cplfw bins, IJB-C-like and CUB-like sets: about 2 minutes);
2. runs `torchrun --standalone --nproc_per_node=2 scripts/train.py` with the default preset
   (synthetic_demo) into work_dirs/synthetic_demo, which is emptied first (it is the demo's own folder);
   the run evaluates the synthetic calfw/cplfw pairs at initialisation, during and after training;
3. exports model.pt to model.onnx (checked against torch with onnxruntime), runs eval/ijbc.py on the
   IJB-C-like release (1:1 TAR@FAR, 1:N) and prints a summary: accuracy at initialisation and after
   training, time taken, where the files are.
Extra arguments are passed to train.py as dotted overrides (e.g. schedule.epochs=1 for a shorter run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from facems.config import load_config
from facems.data.synthetic_release import RELEASE_VERSION, write_synthetic_root
from facems.export.onnx import export_onnx
from facems.models import open_backbone

TARGET = ("cplfw", 0.90)


def _stamp_version(stamp: Path) -> object:
    try:
        return json.loads(stamp.read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default="data/synthetic", help="synthetic data folder (data/synthetic)")
    parser.add_argument("--nproc", type=int, default=2, help="training processes (2)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides passed to scripts/train.py")
    args = parser.parse_args()
    t0 = time.perf_counter()
    root = Path(args.root)
    stamp = root / ".facems-demo-scale"  # what was written, and by which version of the generator
    if _stamp_version(stamp) != RELEASE_VERSION:
        print(f"[demo] writing the demo-scale synthetic set to {root} ...", flush=True)
        counts = write_synthetic_root(str(root), "demo", seed=0, workers=os.cpu_count() or 1)
        stamp.write_text(json.dumps(counts) + "\n")
    t_data = time.perf_counter() - t0
    print(f"[demo] data ready in {t_data:.0f} s: {stamp.read_text().strip()}", flush=True)

    overrides = [f"data.root={root}", "train.resume=none", *args.overrides]
    cfg = load_config(None, overrides)
    run_dir = Path(cfg.train.output_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    here = Path(__file__).resolve().parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    cmd += [str(here / "train.py"), *overrides]
    print(f"[demo] {' '.join(cmd[2:])}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t1 = time.perf_counter()
    rc = subprocess.call(cmd, env=env)
    t_train = time.perf_counter() - t1
    if rc != 0:
        print(f"[demo] training failed with exit status {rc}; see {run_dir}/train.log", file=sys.stderr)
        return rc

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    train = [r for r in records if "loss" in r]
    first, last = evals[0], evals[-1]
    print("\n| set | accuracy at step 0 (initialisation) | accuracy after training | best |")
    print("|-----|------|------|------|")
    for name in last["eval"]:
        best = max(e["eval"][name]["accuracy"] for e in evals)
        print(
            f"| synthetic {name} | {first['eval'][name]['accuracy']:.4f} (step {first['step']}) | "
            f"{last['eval'][name]['accuracy']:.4f} (step {last['step']}) | {best:.4f} |"
        )
    rate = sum(r["images_per_s"] for r in train) / max(1, len(train))
    t2 = time.perf_counter()
    model, network, _ = open_backbone(run_dir / "model.pt", cfg.model.name, cfg.model.num_features)
    report = export_onnx(model, str(run_dir / "model.onnx"), network)
    print(
        f"\nONNX: {report.path} (opset {report.opset}, dynamic batch), onnxruntime vs torch max abs diff "
        f"{max(report.max_abs_diff.values()):.2g} (relative {report.relative_error:.1g}), "
        f"{time.perf_counter() - t2:.0f} s"
    )
    t3 = time.perf_counter()
    ijbc = [sys.executable, str(here.parent / "eval" / "ijbc.py"), "--model", str(run_dir / "model.pt")]
    ijbc += ["--image-path", str(root / "IJBC"), "--result-dir", str(run_dir / "ijbc"), "--job", "demo"]
    ijbc += ["--model-name", cfg.model.name, "--num-features", str(cfg.model.num_features)]
    print(f"\n[demo] IJB-C-like evaluation: {' '.join(ijbc[1:])}", flush=True)
    if subprocess.call(ijbc, env=env) != 0:
        print("[demo] the IJB-C-like evaluation failed (see above)", file=sys.stderr)
    print(f"[demo] IJB-C-like evaluation: {time.perf_counter() - t3:.0f} s", flush=True)
    total = time.perf_counter() - t0
    print(
        f"\ntrained {train[-1]['step']} steps ({train[-1]['images']} images) on {args.nproc} processes, "
        f"mean {rate:.1f} img/s; data {t_data:.0f} s, training + evaluation {t_train:.0f} s, total {total:.0f} s"
    )
    print(
        f"artefacts: {run_dir}/ (model.pt, model.onnx, ijbc/, model_best.pt, checkpoint_last.pt, metrics.jsonl, train.log, tb/)"
    )
    name, goal = TARGET
    reached = last["eval"].get(name, {}).get("accuracy", 0.0)
    verdict = "met" if reached >= goal else "NOT met"
    print(f"goal: synthetic {name} >= {goal:.2f} after training: {verdict} ({reached:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
