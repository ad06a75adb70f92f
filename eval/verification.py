"""Pair verification on insightface ``.bin`` files, at parity with insightface's ``verification.py``.

    python eval/verification.py --model work_dirs/ms1mv2_r50/model.pt --bins /data/faces_emore \
        --targets calfw cplfw [lfw cfp_fp agedb_30] [--model-name iresnet50] [--json results.json]

``--model`` is facems' ``model.pt``, a facems training checkpoint, an insightface ``model.pt`` /
``backbone.pth`` (read with ``torch.load(weights_only=True)``; the network is inferred from the keys
unless ``--model-name`` is given) or an exported ``.onnx`` file (run by onnxruntime). Each target is read from
``BINS/<target>.bin``. Prints one markdown table per target; ``--json`` writes every result.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from facems.embed import PRECISIONS
from facems.fileio import write_json
from facems.models import WeightsError, list_models, load_backbone
from facems.protocols.pairs import PairResult, verify_bin


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="backbone state_dict file (model.pt)")
    p.add_argument("--bins", required=True, help="folder holding <target>.bin files")
    p.add_argument("--targets", nargs="+", required=True, help="pair sets, e.g. calfw cplfw lfw")
    p.add_argument(
        "--model-name", default=None, choices=list_models(), help="architecture (default: inferred)"
    )
    p.add_argument("--num-features", type=int, default=None, help="embedding size (default: inferred)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--no-flip", action="store_true", help="skip the flip test")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS), help="autocast precision")
    p.add_argument("--nfolds", type=int, default=10, help="folds of the k-fold accuracy")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    return p


def format_table(target: str, r: PairResult) -> str:
    """A markdown table of one target's result, accuracies in % as insightface prints them."""
    tar = r.tar_at_far_1e3
    return "\n".join(
        [
            f"### {target} ({r.num_pairs} pairs)",
            "",
            "| Accuracy-Flip (%) | XNorm | best threshold | TAR@FAR=1e-3 nearest (%) | TAR@FAR=1e-3 conservative (%) |",
            "|---|---|---|---|---|",
            f"| {r.accuracy * 100:.2f}+-{r.std * 100:.2f} | {r.xnorm:.4f} | {r.threshold:.4f} "
            f"| {tar['nearest'] * 100:.2f} | {tar['conservative'] * 100:.2f} |",
            "",
        ]
    )


def main(args: argparse.Namespace) -> int:
    paths = {t: os.path.join(args.bins, f"{t}.bin") for t in args.targets}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        print(f"error: missing pair files: {', '.join(missing)}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model = load_backbone(args.model, args.model_name, args.num_features).to(device).eval()
    except WeightsError as e:
        raise SystemExit(f"error: {e}") from None
    results: dict[str, PairResult] = {}
    for target, path in paths.items():
        results[target] = verify_bin(
            model,
            path,
            batch_size=args.batch_size,
            flip=not args.no_flip,
            device=device,
            precision=args.precision,
            distributed=False,
            nfolds=args.nfolds,
        )
        print(format_table(target, results[target]), flush=True)
    if args.json:
        payload = {
            "model": args.model,
            "model_name": args.model_name,
            "flip": not args.no_flip,
            "precision": args.precision,
            "nfolds": args.nfolds,
            "results": {t: r.to_dict() for t, r in results.items()},
        }
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
