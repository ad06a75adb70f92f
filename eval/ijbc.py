r"""IJB-C / IJB-B evaluation: 1:1 TAR@FAR and 1:N identification, at parity with insightface's eval_ijbc.py.

    python eval/ijbc.py --model work_dirs/ms1mv2_r50/model.pt --image-path /data/IJB_release/IJBC \
        --result-dir results/ [--target IJBC|IJBB] [--batch-size 128] [--job NAME] [--model-name iresnet50] \
        [--no-use-flip-test] [--no-use-norm-score] [--no-use-detector-score]

Writes under RESULT_DIR/JOB: <target>.npy (pair scores in pair-file order), <target>.json and the ROC
points <target>_roc.csv with the curve in <target>_roc.png and .pdf. The raw embeddings (image and
mirror) are cached in RESULT_DIR/<target>_features_<fingerprint>.npz, keyed by the model file and the
image list: a rerun with other switches reads them and runs no network.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from facems.embed import PRECISIONS
from facems.fileio import write_json
from facems.models import WeightsError, list_models, load_backbone
from facems.protocols import ijb


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="backbone weights (model.pt / backbone.pth / checkpoint)")
    p.add_argument("--image-path", required=True, help="release folder holding loose_crop/ and meta/")
    p.add_argument("--result-dir", required=True, help="where the results and the feature cache go")
    p.add_argument("--target", default="IJBC", choices=ijb.TARGETS)
    p.add_argument("--job", default="facems", help="sub-folder of --result-dir for this run's results")
    p.add_argument("--model-name", default=None, choices=list_models(), help="default: read from the weights")
    p.add_argument("--num-features", type=int, default=None, help="default: read from the weights")
    p.add_argument("--batch-size", type=int, default=128, help="faces per forward pass")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding and aligning")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS), help="autocast precision")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for pooling and pair scoring")
    for name, what in (
        ("flip-test", "image feature = emb + flip_emb (F1)"),
        ("norm-score", "keep each image feature's norm (N1)"),
        ("detector-score", "weight each image feature by its detector score (D1)"),
    ):
        p.add_argument(f"--use-{name}", action=argparse.BooleanOptionalAction, default=True, help=what)
    return p


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        meta = ijb.read_ijb_meta(args.image_path, args.target)
    except ijb.IJBMetaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = meta.counts()
    print(f"## {args.target}: counts\n\n{ijb.format_counts(counts, args.target)}\n")
    for warning in ijb.check_counts(counts, args.target):
        print(f"warning: {warning}")
    fingerprint = ijb.feature_fingerprint(
        args.model, meta.paths["name_5pts_score"], args.model_name, args.precision
    )
    os.makedirs(args.result_dir, exist_ok=True)
    cache = os.path.join(args.result_dir, f"{args.target.lower()}_features_{fingerprint[:16]}.npz")
    cached = ijb.load_feature_cache(cache, fingerprint)
    if cached is not None:
        emb, flip_emb, _ = cached
        print(f"features: {emb.shape[0]:,} faces read from the cache {cache} (no forward pass)")
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            model = load_backbone(args.model, args.model_name, args.num_features).to(device)
        except WeightsError as e:
            raise SystemExit(f"error: {e}") from None
        t = time.perf_counter()
        emb, flip_emb = ijb.extract_features(
            model,
            os.path.join(args.image_path, "loose_crop"),
            meta.names,
            meta.landmarks,
            batch_size=args.batch_size,
            num_workers=args.workers,
            device=device,
            precision=args.precision,
            progress=lambda done, n: (
                print(f"embedded {done:,}/{n:,} faces", flush=True)
                if done == n or done // args.batch_size % 100 == 0
                else None
            ),
        )
        ijb.save_feature_cache(cache, fingerprint, emb, flip_emb, meta.detector_scores)
        print(
            f"features: {emb.shape[0]:,} faces embedded in {time.perf_counter() - t:.1f} s, cached in {cache}"
        )
    result = ijb.evaluate_ijb(
        meta,
        emb,
        flip_emb,
        use_flip_test=args.use_flip_test,
        use_norm_score=args.use_norm_score,
        use_detector_score=args.use_detector_score,
        num_threads=args.threads,
    )
    label = f"{args.job}-{args.target} ({result.test_mode})"
    print(f"\n## 1:1 verification, TAR (%) @ FAR\n\n{ijb.format_tar_table(result.tar, label)}\n")
    if result.identification is not None:
        table = ijb.format_identification_table(result.identification)
        print(f"## 1:N identification (%)\n\n{table}\n")
    out_dir = os.path.join(args.result_dir, args.job)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, args.target.lower())
    np.save(stem + ".npy", result.scores)
    written = [stem + ".npy", *ijb.write_roc(stem + "_roc", result.tar, label)]
    payload = {
        "model": args.model,
        "model_name": args.model_name,
        "image_path": args.image_path,
        "job": args.job,
        "feature_cache": cache,
        "features_from_cache": cached is not None,
        **result.to_dict(),
        "count_warnings": ijb.check_counts(counts, args.target),
        "total_seconds": time.perf_counter() - start,
    }
    write_json(stem + ".json", payload)
    written.append(stem + ".json")
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
