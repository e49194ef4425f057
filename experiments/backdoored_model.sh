#!/usr/bin/env bash
# Issue 14, items 2-5: build the backdoored CLIPs (BadCLIP, BadNets, Blended), defend each
# (CleanCLIP, clean fine-tuning), evaluate all. Checkpoints go to $R (git-ignored);
# manifests and triggers are copied to experiments/results/backdoored/.
# Every command is independent of the others except for its --source; by default the three chains run in
# parallel (one torch thread each); SERIAL=1 runs them one after the other (a 2-core machine shared with other
# jobs). A checkpoint already in $R is reused only when its manifest records the same seed (and, for a build,
# the same rate and target); otherwise the script stops. Any failed command fails the script (after the others).
# Budgets are the CLI's defaults (docs/badclip.md); poisoned captions name the target
# (--poison-caption name, the authors' create_backdoor_data.py).
# Usage: [R=runs/backdoored-v2] [RATE=0.003] [TARGET=0] [SEED=0] [DEFENSES="cleanclip finetune"] [SERIAL=0] \
#        [PROMPTFL_ROUNDS=20] [OUT=experiments/results/backdoored_model.csv] bash experiments/backdoored_model.sh [attacks...]
# Session 9's table (10% poisoned pairs): RATE=0.1 R=runs/backdoored-v2-r10 bash experiments/backdoored_model.sh
# Session 14's second target: R=runs/backdoored-v2-t1 RATE=0.1 TARGET=1 DEFENSES=cleanclip SERIAL=1 \
#        PROMPTFL_ROUNDS=0 OUT=runs/backdoored-v2-t1/table.csv bash experiments/backdoored_model.sh badclip badnets
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
R=${R:-runs/backdoored-v2}
OUT=${OUT:-experiments/results/backdoored_model.csv}
RATE=${RATE:-0.003}
TARGET=${TARGET:-0}
SEED=${SEED:-0}
DEFENSES=${DEFENSES-cleanclip finetune}
SERIAL=${SERIAL:-0}
PROMPTFL_ROUNDS=${PROMPTFL_ROUNDS:-20}
mkdir -p $R/logs
ATTACKS=${*:-badclip badnets blended}
built() {  # $1: checkpoint folder. 0 = reusable, 1 = absent; stops the script on a manifest of another setting
  [ -f "$1/model.json" ] || return 1
  $PY - "$1/model.json" "$SEED" "$RATE" "$TARGET" <<'PY' || { echo "$1 holds another build; use another R" >&2; exit 3; }
import json, sys
m, seed, rate, target = json.load(open(sys.argv[1])), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
poison = m.get("poison") or {}
same = m.get("seed") == seed and (not poison or (abs(poison["rate"] - rate) < 1e-12 and poison["target"] == target))
sys.exit(0 if same else 1)
PY
}
run() {  # $1: output folder; the rest: the command's arguments after fedsec.backdoor_clip
  local out=$1
  shift
  built "$out" || $PY -m fedsec.backdoor_clip "$@" --seed "$SEED" --threads 1 --out "$out" > $R/logs/$(basename "$out").log 2>&1
}
chain() {  # attack, then its defenses (in parallel unless SERIAL=1)
  local a=$1 pids=() fail=0
  run $R/$a $a --rate "$RATE" --target "$TARGET"
  for d in $DEFENSES; do
    if [ "$SERIAL" = 1 ]; then
      run $R/$a+$d $d --source $R/$a/model.pt
    else
      run $R/$a+$d $d --source $R/$a/model.pt &
      pids+=($!)
    fi
  done
  for p in "${pids[@]}"; do wait "$p" || fail=1; done
  return $fail
}
pids=()
fail=0
for a in $ATTACKS; do
  if [ "$SERIAL" = 1 ]; then chain $a; else chain $a & pids+=($!); fi
done
for p in "${pids[@]}"; do wait "$p" || fail=1; done
[ "$fail" = 0 ] || { echo "a build or defense failed: see $R/logs/" >&2; exit 1; }
$PY experiments/backdoored_model.py --runs $R --target "$TARGET" --promptfl-rounds "$PROMPTFL_ROUNDS" \
  --out "$OUT" > $R/logs/eval.log 2>&1
