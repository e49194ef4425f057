#!/usr/bin/env bash
# Issue 14, items 2-5: build the backdoored CLIPs (BadCLIP, BadNets, Blended), defend each
# (CleanCLIP, clean fine-tuning), evaluate all. Checkpoints go to $R (git-ignored);
# manifests and triggers are copied to experiments/results/backdoored/.
# Every command is independent of the others except for its --source; by default the three chains run in
# parallel (one torch thread each); SERIAL=1 runs them one after the other (a 2-core machine shared with other
# jobs). Budgets are the CLI's defaults (docs/badclip.md); poisoned captions name the target
# (--poison-caption name, the authors' create_backdoor_data.py).
# Usage: [R=runs/backdoored-v2] [RATE=0.003] [TARGET=0] [SEED=0] [DEFENSES="cleanclip finetune"] [SERIAL=0] \
#        [PROMPTFL_ROUNDS=20] [OUT=experiments/results/backdoored_model.csv] bash experiments/backdoored_model.sh [attacks...]
# Session 9's table (10% poisoned pairs): RATE=0.1 R=runs/backdoored-v2-r10 bash experiments/backdoored_model.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
R=${R:-runs/backdoored-v2}
OUT=${OUT:-experiments/results/backdoored_model.csv}
RATE=${RATE:-0.003}
TARGET=${TARGET:-0}
SEED=${SEED:-0}
DEFENSES=${DEFENSES:-cleanclip finetune}
SERIAL=${SERIAL:-0}
PROMPTFL_ROUNDS=${PROMPTFL_ROUNDS:-20}
mkdir -p $R/logs
ATTACKS=${*:-badclip badnets blended}
chain() {  # attack, then its defenses (in parallel unless SERIAL=1)
  local a=$1
  [ -f $R/$a/model.json ] || $PY -m fedsec.backdoor_clip $a --rate "$RATE" --target "$TARGET" --seed "$SEED" \
    --threads 1 --out $R/$a > $R/logs/$a.log 2>&1
  for d in $DEFENSES; do
    if [ "$SERIAL" = 1 ]; then
      [ -f $R/$a+$d/model.json ] || $PY -m fedsec.backdoor_clip $d --source $R/$a/model.pt --seed "$SEED" \
        --threads 1 --out $R/$a+$d > $R/logs/$a+$d.log 2>&1
    else
      [ -f $R/$a+$d/model.json ] || $PY -m fedsec.backdoor_clip $d --source $R/$a/model.pt --seed "$SEED" \
        --threads 1 --out $R/$a+$d > $R/logs/$a+$d.log 2>&1 &
    fi
  done
  wait
}
for a in $ATTACKS; do
  if [ "$SERIAL" = 1 ]; then chain $a; else chain $a & fi
done
wait
$PY experiments/backdoored_model.py --runs $R --target "$TARGET" --promptfl-rounds "$PROMPTFL_ROUNDS" \
  --out "$OUT" > $R/logs/eval.log 2>&1
