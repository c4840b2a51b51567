#!/usr/bin/env bash
# ResNet-18 at 32x32 on one GPU: images/s of the project's path (trainer=gpu: bf16-mixed, channels-last)
# vs a plain PyTorch loop (per-sample DataLoader, float32), in one process; the time of the CIFAR recipe
# (train=sgd) on CIFAR-shaped synthetic data; a profile of ours' steps. A few minutes on an H100/H200.
#   bench/gpu.sh                 # numbers -> $OUT/bench_gpu.json (OUT defaults to outputs/bench)
#   bench/gpu.sh --compile       # + ours with torch.compile(network) (adds its compile time, about a minute)
# Arguments go to python -m bench.gpu (--help). Exit code 2: no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-outputs/bench}"
mkdir -p "$OUT"
PY="${PY:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader | tee "$OUT/nvidia_smi.txt" || true
fi
"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
exec "$PY" -m bench.gpu "$@"
