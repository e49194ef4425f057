#!/usr/bin/env bash
# The prepared GPU check (one short script for a lent GPU machine; see docs/benchmarks.md).
# 1. experiments/bench_gpu.py at full size (ViT-B/16, 224 px, random weights) -> $OUT/bench_gpu.{json,md}
# 2. the real client/attack/evaluation path on CUDA: experiments/inprocess_fl.py, BadPromptFL, sklearn digits
# Usage: OUT=/some/dir bash experiments/gpu_check.sh [bench|smoke ...]   (default: both)
# Packages the machine lacks (flwr, ray, open_clip, ...) are installed first from .whl/ when it exists.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/fedsec-gpu-check}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >"$OUT/pip.txt" 2>&1
  for t in .whl/*.tar.xz; do [ -f "$t" ] && tar xJf "$t" -C /tmp/site; done
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi -L || true
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(bench smoke)
rc=0
for part in "${parts[@]}"; do
  echo "=== $part"
  case $part in
    bench) timeout 420 "$PY" experiments/bench_gpu.py --out "$OUT/bench_gpu.json" 2>&1 | grep -v "INFO \|^\s*$" | tail -40 || rc=1 ;;
    smoke) timeout 240 "$PY" experiments/inprocess_fl.py --num-clients 3 -c "dataset='digits' attack='badpromptfl' \
             num-malicious=1 num-server-rounds=2 device='cuda' asr-eval-samples=200" 2>&1 | tail -25 || rc=1 ;;
    *) echo "unknown part $part (bench, smoke)"; rc=2 ;;
  esac
done
exit $rc
