"""Retrieval Recall@K, MAP@R and R-precision on CUB-200-2011, Cars196, Stanford Online Products or In-Shop.

    python eval/retrieval.py --model work_dirs/cub_r50/model.pt --model-name NAME --dataset cub \
        --root /data/CUB_200_2011 [--json results.json]
    python eval/retrieval.py --model model.pt --model-name iresnet50 --dataset sop --root /data/SOP \
        --resize 112 --crop 112 --normalize face          # a face backbone (112x112 input, [-1, 1])

``--model`` is a backbone file that ``facems.models.load_backbone`` reads (facems or insightface weights,
a training checkpoint, an ``.onnx`` file; the network is inferred unless ``--model-name`` is given). Images: shorter side to ``--resize`` (256), centre crop ``--crop`` (224; 227
for BN-Inception), ImageNet mean/std (``--normalize imagenet``) or ``(x - 0.5) / 0.5`` (``face``).
Recall@K at the data set's customary K unless ``--ks`` is given. Prints a markdown table; ``--json``
writes the result. The layouts and splits are described in facems/protocols/retrieval.py.
"""

from __future__ import annotations

import argparse
import sys

import torch

from facems.embed import PRECISIONS
from facems.fileio import write_json
from facems.models import WeightsError, list_models, load_backbone
from facems.protocols.retrieval import (
    DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RetrievalResult,
    evaluate_retrieval,
    read_retrieval_dataset,
)

NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "face": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="backbone state_dict file (model.pt)")
    p.add_argument("--dataset", required=True, choices=DATASETS, help="retrieval benchmark")
    p.add_argument("--root", required=True, help="the data set's folder")
    p.add_argument(
        "--model-name", default=None, choices=list_models(), help="architecture (default: inferred)"
    )
    p.add_argument("--num-features", type=int, default=None, help="embedding size (default: inferred)")
    p.add_argument("--resize", type=int, default=256, help="shorter side before the centre crop")
    p.add_argument("--crop", type=int, default=224, help="side of the centre crop (227 for BN-Inception)")
    p.add_argument("--normalize", default="imagenet", choices=sorted(NORMALIZATIONS), help="input statistics")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="K of Recall@K (default: the data set's)")
    p.add_argument("--flip", action="store_true", help="add the embedding of the mirrored image")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers decoding images")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS), help="autocast precision")
    p.add_argument("--json", default=None, help="write the result to this JSON file")
    return p


def format_table(r: RetrievalResult) -> str:
    """A markdown table of the result, metrics in %."""
    names = [f"R@{k}" for k in r.ks] + ["MAP@R", "RP"]
    keys = [f"recall@{k}" for k in r.ks] + ["map@r", "r_precision"]
    refs = "themselves" if r.num_references == r.num_queries else f"{r.num_references} gallery images"
    return "\n".join(
        [
            f"### {r.dataset} ({r.num_queries} queries searched in {refs}, dim {r.embedding_dim})",
            "",
            "| " + " | ".join(names) + " |",
            "|" + "---|" * len(names),
            "| " + " | ".join(f"{r.metrics[k] * 100:.2f}" for k in keys) + " |",
            "",
        ]
    )


def main(args: argparse.Namespace) -> int:
    try:
        dataset = read_retrieval_dataset(args.dataset, args.root)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model = load_backbone(args.model, args.model_name, args.num_features).to(device).eval()
    except WeightsError as e:
        raise SystemExit(f"error: {e}") from None
    mean, std = NORMALIZATIONS[args.normalize]
    result = evaluate_retrieval(
        model,
        dataset,
        ks=args.ks,
        batch_size=args.batch_size,
        resize=args.resize,
        crop=args.crop,
        mean=mean,
        std=std,
        flip=args.flip,
        device=device,
        precision=args.precision,
        num_workers=args.workers,
    )
    print(format_table(result), flush=True)
    if args.json:
        payload = {
            "model": args.model,
            "model_name": args.model_name,
            "root": dataset.root,
            "resize": args.resize,
            "crop": args.crop,
            "normalize": args.normalize,
            "flip": args.flip,
            "precision": args.precision,
            "result": result.to_dict(),
        }
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
