#!/usr/bin/env bash
# The prepared GPU check (one short script for a lent GPU machine; see docs/benchmarks.md).
# 1. experiments/bench_gpu.py at full size (ViT-B/16, 224 px, random weights) -> $OUT/bench_gpu.{json,md}
# 2. the real client/attack/evaluation path on CUDA: experiments/inprocess_fl.py, BadPromptFL, sklearn digits
# 3. the Flower app itself on the GPU: fedsec run, ViT-B/16 at 224 px (random weights), 4 clients at 0.25 GPU each
# Usage: OUT=/some/dir bash experiments/gpu_check.sh [bench|smoke|app ...]   (default: all three)
# Packages the machine lacks (flwr, ray, open_clip, ...) are installed first from .whl/ when it exists.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/fedsec-gpu-check}; mkdir -p "$OUT"
if [ -d .whl ]; then
  rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >"$OUT/pip.txt" 2>&1
  for t in .whl/*.tar.xz; do [ -f "$t" ] && tar xJf "$t" -C /tmp/site; done
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi -L || true
parts=("$@"); [ ${#parts[@]} -eq 0 ] && parts=(bench smoke app)
rc=0
for part in "${parts[@]}"; do
  echo "=== $part"
  case $part in
    bench) timeout 420 "$PY" experiments/bench_gpu.py --out "$OUT/bench_gpu.json" 2>&1 | grep -v "INFO \|^\s*$" | tail -40 || rc=1 ;;
    smoke) timeout 240 "$PY" experiments/inprocess_fl.py --num-clients 3 -c "dataset='digits' attack='badpromptfl' \
             num-malicious=1 num-server-rounds=2 device='cuda' asr-eval-samples=200" 2>&1 | tail -25 || rc=1 ;;
    app) PATH=/tmp/site/bin:$PATH timeout 420 "$PY" -m fedsec.cli run --num-supernodes 4 --gpus-per-client 0.25 \
           -c "dataset='digits' model='ViT-B-16' pretrained='none' device='cuda' num-server-rounds=2 attack='badpromptfl' \
           num-malicious=1 k-shot=4 local-steps=5 eval-samples=300 asr-eval-samples=200 run-dir='/tmp/fedsec-gpu-app'" \
           2>&1 | tail -12 || rc=1
         for f in summary.json metrics.jsonl; do cp /tmp/fedsec-gpu-app/$f "$OUT/app-$f" 2>/dev/null; done
         tail -40 /tmp/fedsec-gpu-app/flwr.log > "$OUT/app-flwr-tail.log" 2>/dev/null ;;
    *) echo "unknown part $part (bench, smoke, app)"; rc=2 ;;
  esac
done
exit $rc
