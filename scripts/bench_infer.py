"""Inference speed: embeddings per second of face backbones in torch eager, torch.compile and onnxruntime.

    python scripts/bench_infer.py                                   # iresnet_tiny mbf iresnet50, batch 1 32 128
    python scripts/bench_infer.py --models iresnet100 --device cuda --backends eager compile

Each backbone is randomly initialised (speed does not depend on the weights), in eval mode under
torch.inference_mode, fp32 on the CPU (``--precision bf16|fp16`` autocast on CUDA), channels_last for
eager and compile. onnxruntime runs the file that facems.export.onnx.export_onnx writes (dynamic batch,
CPU provider, or CUDA provider when ``--device cuda`` and onnxruntime-gpu are present). Each cell: one
warm-up call (compile: until compiled), then calls until ``--seconds`` have passed; the best of
``--repeats`` such windows is shown. Threads: torch and onnxruntime use every core.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from facems.export.onnx import export_onnx
from facems.models import create_model, list_models

BACKENDS = ("eager", "compile", "onnxruntime")


def rate(
    fn: Callable[[], object], batch: int, seconds: float, repeats: int, sync: Callable[[], None]
) -> float:
    """Best images/s over ``repeats`` windows of at least ``seconds`` each (after one warm-up call)."""
    fn()
    sync()
    best = 0.0
    for _ in range(repeats):
        calls, t0 = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            sync()
            spent = time.perf_counter() - t0
            if spent >= seconds:
                break
        best = max(best, calls * batch / spent)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["iresnet_tiny", "mbf", "iresnet50"], choices=list_models())
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast (torch only)"
    )
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(
        f"device: {card}; torch {torch.__version__}, {torch.get_num_threads()} threads; precision {args.precision}"
    )
    load = os.getloadavg()[0]
    if dev.type == "cpu" and load > 0.5:  # OpenMP threads then wait on each other: 10x slower or worse
        print(
            f"warning: load average {load:.1f} before the run; CPU numbers are only meaningful on an idle machine"
        )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_infer-") as tmp:
        for name in args.models:
            model = create_model(name).eval()
            for backend in args.backends:
                if backend == "onnxruntime":
                    import onnxruntime as ort

                    path = os.path.join(tmp, f"{name}.onnx")
                    export_onnx(model, path, name, verify=False)
                    providers = ["CPUExecutionProvider"]
                    if dev.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
                        providers.insert(0, "CUDAExecutionProvider")
                    session = ort.InferenceSession(path, providers=providers)
                    label = f"onnxruntime ({session.get_providers()[0]})"
                    for b in args.batches:
                        x = np.random.default_rng(0).uniform(-1, 1, (b, 3, 112, 112)).astype(np.float32)
                        call = partial(session.run, None, {"data": x})
                        rows.append((name, label, b, rate(call, b, args.seconds, args.repeats, lambda: None)))
                    continue
                net = model.to(dev).to(memory_format=torch.channels_last)
                fwd = torch.compile(net) if backend == "compile" else net
                for b in args.batches:
                    xt = (torch.rand(b, 3, 112, 112, device=dev) * 2 - 1).to(
                        memory_format=torch.channels_last
                    )

                    def run(x: torch.Tensor = xt, fwd: Callable[..., object] = fwd) -> object:
                        with (
                            torch.inference_mode(),
                            torch.autocast(dev.type, dtype=amp, enabled=amp is not None),
                        ):
                            return fwd(x)

                    t0 = time.perf_counter()
                    run()  # compile happens here
                    first = time.perf_counter() - t0
                    label = backend if backend == "eager" else f"compile (first call {first:.0f} s)"
                    rows.append((name, label, b, rate(run, b, args.seconds, args.repeats, sync)))
                print(f"{name} {backend} done", flush=True)
    print("\n| model | backend | batch | embeddings/s |\n|---|---|---|---|")
    for name, label, b, r in rows:
        print(f"| {name} | {label} | {b} | {r:,.1f} |")


if __name__ == "__main__":
    main()
