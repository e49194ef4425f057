#!/usr/bin/env bash
# Issue 14, items 2-5: build the backdoored CLIPs (BadCLIP, BadNets, Blended), defend each
# (CleanCLIP, clean fine-tuning), evaluate all. Checkpoints go to $R (git-ignored);
# manifests and triggers are copied to experiments/results/backdoored/.
# Every command is independent of the others except for its --source; run them in parallel
# on a shared machine (one torch thread each). Budgets are the CLI's defaults (docs/badclip.md); poisoned captions
# name the target (--poison-caption name, the authors' create_backdoor_data.py).
# Usage: [R=runs/backdoored-v2] [RATE=0.003] [OUT=experiments/results/backdoored_model.csv] \
#        bash experiments/backdoored_model.sh [attacks...]
# Session 9's table (10% poisoned pairs): RATE=0.1 R=runs/backdoored-v2-r10 bash experiments/backdoored_model.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
R=${R:-runs/backdoored-v2}
OUT=${OUT:-experiments/results/backdoored_model.csv}
RATE=${RATE:-0.003}
mkdir -p $R/logs
ATTACKS=${*:-badclip badnets blended}
chain() {  # attack, then its two defenses in parallel
  local a=$1
  [ -f $R/$a/model.json ] || $PY -m fedsec.backdoor_clip $a --rate "$RATE" --seed 0 --out $R/$a > $R/logs/$a.log 2>&1
  for d in cleanclip finetune; do
    [ -f $R/$a+$d/model.json ] || $PY -m fedsec.backdoor_clip $d --source $R/$a/model.pt --out $R/$a+$d \
      > $R/logs/$a+$d.log 2>&1 &
  done
  wait
}
for a in $ATTACKS; do chain $a & done
wait
$PY experiments/backdoored_model.py --runs $R --out "$OUT" > $R/logs/eval.log 2>&1
