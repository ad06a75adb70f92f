"""Export a face backbone to ONNX for onnxruntime and insightface's model zoo, then check the file.

    python scripts/export_onnx.py --model work_dirs/synthetic_demo/model.pt --output r.onnx
    python scripts/export_onnx.py --model backbone.pth --output r50.onnx --network iresnet50 --batch 1
    python scripts/export_onnx.py --model work_dirs/run/checkpoint_last.pt --output r.onnx --fp16

--model: a facems model.pt, a facems training checkpoint (the network and embedding size come from
its stored config) or an insightface arcface_torch backbone.pth / model.pt; without --network the
network is inferred from the keys. The graph takes `data`: float32 N x 3 x 112 x 112 RGB,
(x - 127.5) / 127.5, and returns the un-normalised embedding. After writing: onnx.checker, then
onnxruntime against torch at batch 1 and 8 on random inputs and synthetic faces; the largest
difference is printed and a failure exits 1 (bad arguments or weights: 2) without writing the file.
"""

from __future__ import annotations

import argparse
import json
import sys

from facems.export.onnx import FP16_NOTE, ExportError, export_onnx
from facems.fileio import write_json
from facems.models import WeightsError, list_models, open_backbone


def parse_batch(text: str) -> str | int:
    if text == "dynamic":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 'dynamic' or a positive integer, got {text!r}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model.pt, checkpoint or insightface backbone.pth")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--network", default=None, choices=list_models(), help="default: inferred from the file")
    p.add_argument("--num-features", type=int, default=None, help="embedding size (default: inferred)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (18; lower ones are converted)")
    p.add_argument("--batch", type=parse_batch, default="dynamic", help="'dynamic' (default) or a fixed size")
    p.add_argument("--fp16", action="store_true", help="fp16 weights and activations (fp32 input/output)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--json", default=None, help="write the export report to this file")
    return p


def main(args: argparse.Namespace) -> int:
    try:
        model, network, _ = open_backbone(args.model, args.network, args.num_features)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        report = export_onnx(
            model,
            args.output,
            network,
            opset=args.opset,
            batch=args.batch,
            fp16=args.fp16,
            verify=not args.no_verify,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {report.path}: {report.network}, opset {report.opset}, batch {report.batch}, {report.size_bytes:,} bytes"
    )
    print(f"metadata: {json.dumps(report.metadata)}")
    if report.max_abs_diff:
        print("| check | max abs diff (onnxruntime vs torch) |\n|---|---|")
        for check, diff in report.max_abs_diff.items():
            print(f"| {check} | {diff:.3g} |")
        print(
            f"largest |embedding| {report.max_abs_embedding:.4g}; relative error {report.relative_error:.3g} "
            f"<= {report.tolerance:g}"
        )
    if args.fp16:
        print(f"note: {FP16_NOTE}")
    if args.json:
        write_json(args.json, {**report.__dict__, "relative_error": report.relative_error})
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
