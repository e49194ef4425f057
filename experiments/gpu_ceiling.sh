#!/usr/bin/env bash
# The BadPromptFL ceiling grid (experiments/ceiling.py, issue 16) on a lent GPU machine: every cell in its own
# process, all at once, each with a wall-clock limit; finished cells land in $OUT/ceiling/<cell>.json.
# Needs .gpu-carry/ (git-ignored, made by the recipe in docs/gpu.md): fm/ (Fashion-MNIST; the pretraining half of
# the training images zeroed, which no FL run reads) and whl/ (flwr, open_clip and the few wheels the GPU image lacks).
# With TWINS=1 one more process per cell-name suffix (cells named <design>-seedN) makes the no-attack twins meanwhile
# (--twins-only; log twin-seedN.txt). Results and logs come back as two tarballs (the tool returns at most 8 files).
# Usage: OUT=/some/dir CELL_TIMEOUT=480 [TWINS=1] bash experiments/gpu_ceiling.sh [grid.toml]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/fedsec-gpu-ceiling}; mkdir -p "$OUT/ceiling" "$OUT/logs"
GRID=${1:-experiments/grids/ceiling.toml}
rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-carry/whl/*.whl >"$OUT/pip.txt" 2>&1
mkdir -p /tmp/fm && python3 - <<'PY'
import lzma, pathlib, shutil
for f in pathlib.Path(".gpu-carry/fm").iterdir():
    dst = pathlib.Path("/tmp/fm") / f.name.removesuffix(".xz")
    if f.suffix == ".xz":
        dst.write_bytes(lzma.decompress(f.read_bytes()))
    else:
        shutil.copy(f, dst)
PY
export PYTHONPATH=/tmp/site:$PWD FEDSEC_FASHION_MNIST=/tmp/fm HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
nvidia-smi -L
cells=$(python3 -c "import tomllib,sys; print(' '.join(c['name'] for c in tomllib.load(open(sys.argv[1],'rb'))['cell']))" "$GRID")
if [ "${TWINS:-0}" = 1 ]; then
  for sfx in $(for c in $cells; do echo "${c##*-}"; done | sort -u); do
    timeout "${CELL_TIMEOUT:-480}" python3 experiments/ceiling.py "$GRID" --twins-only --out "$OUT/ceiling" \
      --set "device='cuda'" --only $(for c in $cells; do [ "${c##*-}" = "$sfx" ] && echo "$c"; done) \
      >"$OUT/logs/twin-$sfx.txt" 2>&1 &
  done
fi
for c in $cells; do
  timeout "${CELL_TIMEOUT:-480}" python3 experiments/ceiling.py "$GRID" --only "$c" --out "$OUT/ceiling" \
    --set "device='cuda'" >"$OUT/logs/$c.txt" 2>&1 &
done
wait
nvidia-smi --query-gpu=name,memory.used --format=csv
grep -h "^\[ceiling\]" "$OUT"/logs/*.txt
python3 experiments/ceiling.py "$GRID" --from-logs "$OUT/logs" || true
ls -R "$OUT/ceiling" | head -40
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
tar czf "$OUT/ceiling.tgz" -C "$OUT" ceiling && rm -rf "$OUT/ceiling"
