"""The issue-5 comparison table: (fm-poison, badpromptfl, badnets) x (FedAvg, activation bounds, FLAME, FLTrust, Krum).

Usage::

    python experiments/fm_table.py            # writes experiments/results/fm_comparison.{md,csv}

Every run has server fusion on the synthetic set (the FM-FL setting), 10 clients and 10 rounds. The cells
come from ``fedsec sweep experiments/grids/fm_clients.toml`` and ``fm_rules.toml`` (``runs/sweeps/fm``) and,
for fm-poison with FedAvg and the bounds, from the named runs (``fedsec run experiments/conf/<name>.toml -c
"run-dir='$PWD/runs/<dir>'"``), which have the same settings as the grid's cells. Missing runs are left out.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

SWEEP = Path("runs/sweeps/fm")
#: Defense label -> (grid run-name suffix, or None for a named run).
DEFENSES = {
    "FedAvg": "strategy=fedavg-activation-bounds=False",
    "bounds as in the paper": "strategy=fedavg-activation-bounds=True",
    "bounds, recommended": "strategy=fedavg-activation-bounds=True-bounds-data=filtered-bounds-two-sided=True-bou",
    "FLAME": "strategy=flame-activation-bounds=False",
    "FLTrust": "strategy=fltrust-activation-bounds=False",
    "Krum": "strategy=krum-activation-bounds=False",
}
ATTACKS = {"fm-poison": 0, "badpromptfl": 2, "badnets": 2}
#: fm-poison cells that are named runs (same settings as the grid's cells).
NAMED = {
    ("fm-poison", "FedAvg"): Path("runs/fm-poison"),
    ("fm-poison", "bounds as in the paper"): Path("runs/fm-poison-bounds"),
    ("fm-poison", "bounds, recommended"): Path("runs/fm-poison-bounds-recommended"),
}
COLUMNS = ["clean_acc", "asr", "clean_acc_nobounds", "asr_nobounds", "trigger_only_asr", "det_tpr", "det_fpr"]


def _cell(attack: str, defense: str) -> Path | None:
    if (attack, defense) in NAMED:
        return NAMED[attack, defense]
    prefix = f"attack={attack}-num-malicious={ATTACKS[attack]}-{DEFENSES[defense]}"
    hits = []
    for d in sorted(SWEEP.glob("attack=*")):
        if not d.name.startswith(prefix) or not (d / "summary.json").exists():
            continue
        cfg = json.loads((d / "config.json").read_text())
        # the recommended column: the grid's current setting (clients train unclamped)
        if defense == "bounds, recommended" and cfg.get("bounds-client-training", True):
            continue
        if defense != "bounds, recommended" and d.name != prefix:
            continue
        hits.append(d)
    return hits[0] if hits else None


def main(out: Path = Path("experiments/results/fm_comparison")) -> list[dict]:
    """Write ``out.md`` and ``out.csv``; return the rows."""
    rows = []
    for attack in ATTACKS:
        for defense in DEFENSES:
            run = _cell(attack, defense)
            if run is None or not (run / "summary.json").exists():
                continue
            summary = json.loads((run / "summary.json").read_text())
            rows.append(
                {
                    "attack": attack,
                    "defense": defense,
                    **{c: summary.get(c) for c in COLUMNS},
                    "wall_s": summary.get("wall_s"),
                    "run": str(run),
                }
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    def pct(v) -> str:
        return "-" if v is None else f"{100 * float(v):.1f}%"

    lines = [
        "| attack | defense | clean ACC | ASR | without bounds: ACC / ASR | trigger-only ASR | det. TPR / FPR |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        nob = "-" if r["clean_acc_nobounds"] is None else f"{pct(r['clean_acc_nobounds'])} / {pct(r['asr_nobounds'])}"
        det = "-" if r["det_fpr"] is None else f"{pct(r['det_tpr'])} / {pct(r['det_fpr'])}"
        lines.append(
            f"| {r['attack']} | {r['defense']} | {pct(r['clean_acc'])} | {pct(r['asr'])} | {nob} | "
            f"{pct(r['trigger_only_asr'])} | {det} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
