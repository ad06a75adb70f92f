#!/usr/bin/env bash
# The GPU checks of one short device session, in one go: the CUDA-only test, the training benchmark
# (iresnet50/100, batch 128, bf16 channels_last, with and without torch.compile; arcface_torch's
# workload on the same card) and the training loop end to end on CUDA (the demo preset, then a larger
# backbone on the same data). Every step has its own time limit, so one that hangs costs only its share.
#
#   OUT=/tmp/gpu bash scripts/gpu_checks.sh            # on a machine with one CUDA GPU
#
# Results: $OUT/log.txt (everything), $OUT/*.json (benchmark rows), $OUT/*_metrics.jsonl (training).
# Needs python3 with torch, numpy, opencv, pyyaml, scikit-learn, tqdm, pytest; facems from this checkout.
set -u
OUT=${OUT:?set OUT to the folder for results}
PY=${PY:-python3}
SCALE_STEPS=${SCALE_STEPS:-30}
SYN=${SYN:-/tmp/facems_syn}
RUNS=${RUNS:-/tmp/facems_runs}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

step() { echo; echo "=== $(date +%T) $*"; }

step "machine"
nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
nproc

step "CUDA-only tests"
timeout 90 $PY -m pytest -q -p no:cacheprovider -m gpu tests/data/test_loader.py

step "bench: iresnet50, batch 128, no compile (MS step bf16/fp16; arcface_torch workload fp16/bf16)"
timeout 120 $PY scripts/bench_train.py --model iresnet50 --batch 128 --precision bf16 fp16 --loss ms arcface \
    --steps "$SCALE_STEPS" --warmup 5 --json "$OUT/r50.json"

step "bench: iresnet100, batch 128, no compile"
timeout 120 $PY scripts/bench_train.py --model iresnet100 --batch 128 --precision bf16 fp16 --loss ms arcface \
    --steps "$SCALE_STEPS" --warmup 5 --json "$OUT/r100.json"

step "synthetic demo set"
timeout 180 $PY scripts/make_synthetic.py --root "$SYN" --scale demo --workers "$(nproc)"

step "train: the demo preset on CUDA, bf16, one process with the demo's global batch (16 x 8)"
timeout 150 $PY scripts/train.py data.root="$SYN" train.output_dir="$RUNS/demo" train.resume=none \
    data.p=16 data.num_workers=8 data.pin_memory=true train.precision=bf16 log.tensorboard=false
cp "$RUNS/demo/metrics.jsonl" "$OUT/demo_metrics.jsonl"

step "train: iresnet18 on the same data and schedule, bf16, torch.compile"
timeout 200 $PY scripts/train.py data.root="$SYN" train.output_dir="$RUNS/r18" train.resume=none \
    data.p=16 data.num_workers=8 data.pin_memory=true train.precision=bf16 log.tensorboard=false \
    model.name=iresnet18 model.compile=true
cp "$RUNS/r18/metrics.jsonl" "$OUT/r18_metrics.jsonl"

step "bench: torch.compile, bf16 MS step (iresnet50, then iresnet100)"
timeout 150 $PY scripts/bench_train.py --model iresnet50 --batch 128 --precision bf16 --compile \
    --steps "$SCALE_STEPS" --warmup 5 --json "$OUT/r50_compile.json"
timeout 200 $PY scripts/bench_train.py --model iresnet100 --batch 128 --precision bf16 --compile \
    --steps "$SCALE_STEPS" --warmup 5 --json "$OUT/r100_compile.json"
step "done"
