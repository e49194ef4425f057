#!/usr/bin/env bash
# Backdoored CLIP builds over seeds and poisoning rates (issue 14) on a lent GPU machine.
#
# Every chain is one attack build (`python -m fedsec.backdoor_clip <attack>`, BadCLIP's trigger optimised afresh with
# the chain's seed) followed by CleanCLIP and clean fine-tuning of the result; chains run side by side, one process and
# one CPU thread each, all on the one GPU. Then `experiments/backdoored_model.py` evaluates every run folder on the
# test split and on the clients' split (held-out pool images: the attacker's and defender's side). Results come back
# as one tarball: the CSV/MD tables, every manifest and trigger, and the logs.
#
# Needs, beside the working tree, in git-ignored folders named in the device tool's `carry`:
#   .gpu-carry/fmgz/    the four Fashion-MNIST .gz files of /usr/share/datasets/fashion-mnist (the pretraining split
#                       is half of the training images, so the whole file travels)
#   .gpu-carry/whl-bd/  open_clip_torch, ftfy and wcwidth wheels (the GPU image has torch, torchvision, sklearn, tqdm)
#
# The carry (32 MB) and the working tree must fit the device tool's 64 MiB: session 11 kept the two weight files no
# build reads (fedsec-tiny-clip.pt, fedsec-tiny-clip-v2-1ep.pt) out of its calls with `git rm --cached` and two
# lines in .git/info/exclude, restored with `git reset HEAD -- fedsec/models/weights/` afterwards.
#
# Usage: OUT=/some/dir [SEEDS="0 1 2"] [RATES="03:0.03 01:0.01"] [PAPER=1] bash experiments/gpu_backdoored.sh
#        SMOKE=1 OUT=/tmp/x bash experiments/gpu_backdoored.sh    # CPU plumbing check: 3 steps per build, seed 0
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/fedsec-gpu-backdoored}
RUNS=${RUNS:-/tmp/bdgpu}
mkdir -p "$OUT" "$RUNS/logs"
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu PY=${PY:-.venv/bin/python} P=2 SEEDS="0" EVAL_LIMIT=120
  QUICK="--steps 3 --warmup-steps 1" TRIG="--trigger-steps 2 --trigger-images 64 --positives 64"
  PAPER_STEPS=4 EVAL="--samples 200 --probe-per-class 10"
else
  rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    .gpu-carry/whl-bd/*.whl >"$OUT/pip.txt" 2>&1
  export PYTHONPATH=/tmp/site:$PWD FEDSEC_FASHION_MNIST=$PWD/.gpu-carry/fmgz
  DEV=cuda PY=python3 P=${P:-12} SEEDS=${SEEDS:-"0 1 2"} EVAL_LIMIT=150
  QUICK="" TRIG="" PAPER_STEPS=2340 EVAL=""
  nvidia-smi -L
fi
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
BD="$PY -m fedsec.backdoor_clip"
COMMON="--device $DEV --threads 1 --record ''"

# One chain per line: <run folder> <attack> <rate> <seed> <extra build args>, in the order of RATES (<tag>:<rate>
# pairs), the clean continuation (no poisoned pair, same budget) in the first rate's folder; PAPER=1 adds the paper's
# rate and epochs (0.3%, 10 epochs = PAPER_STEPS) for seed 0.
RATES=${RATES:-"03:0.03 01:0.01"}
jobs="$RUNS/jobs.txt"
: >"$jobs"
first=1
for tr in $RATES; do
  for s in $SEEDS; do for a in badclip badnets blended; do echo "s$s-r${tr%%:*} $a ${tr#*:} $s" >>"$jobs"; done; done
  if [ $first = 1 ]; then for s in $SEEDS; do echo "s$s-r${tr%%:*} clean-continuation 0 $s" >>"$jobs"; done; fi
  first=0
done
if [ "${PAPER:-1}" = 1 ]; then
  for a in badclip badnets blended; do echo "s0-r003-paper $a 0.003 0 --steps $PAPER_STEPS" >>"$jobs"; done
fi

chain() {  # <run folder> <attack> <rate> <seed> [extra build args]
  local run=$1 dir=$RUNS/$1 name=$2 rate=$3 seed=$4; shift 4
  local attack=$name extra="$QUICK $*" log=$RUNS/logs/$run-$name.txt
  [ "$name" = clean-continuation ] && attack=badnets
  [ "$attack" = badclip ] && extra="$extra $TRIG"
  {
    eval "$BD $attack --rate $rate --seed $seed $COMMON $extra --out $dir/$name" || exit 1
    if [ "$name" != clean-continuation ]; then
      for d in cleanclip finetune; do
        eval "$BD $d --seed $seed $COMMON $QUICK --source $dir/$name/model.pt --out $dir/$name+$d" || exit 1
      done
    fi
  } >"$log" 2>&1
  echo "[chain] $run $name done $(date +%T)"
}
export -f chain
export RUNS BD COMMON QUICK TRIG
t0=$(date +%s)
timeout -k 5 "${CHAIN_LIMIT:-380}" xargs -P "$P" -L 1 bash -c 'chain "$@"' _ <"$jobs"
echo "[chains] $(($(date +%s) - t0)) s"

mkdir -p "$OUT/tables"
for dir in "$RUNS"/s*; do
  for split in test train; do
    timeout -k 5 "$EVAL_LIMIT" $PY experiments/backdoored_model.py --runs "$dir" --split "$split" --promptfl-rounds 0 \
      --device "$DEV" $EVAL --out "$OUT/tables/$(basename "$dir")_$split.csv" >"$RUNS/logs/eval-$(basename "$dir")-$split.txt" 2>&1 &
  done
done
wait
echo "[eval] $(($(date +%s) - t0)) s"
grep -h "build_wall_s" "$RUNS"/logs/*.txt | sort | uniq -c | head -3
(cd "$RUNS" && find . -name model.json -o -name trigger.pt -o -name "*.txt" | tar czf "$OUT/backdoored_gpu.tgz" -T - )
tar czf "$OUT/tables.tgz" -C "$OUT" tables && rm -rf "$OUT/tables"
ls -la "$OUT"
