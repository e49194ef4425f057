"""Issue 15's table: fm-poison (fixed / optimised trigger, adaptive) and BadPromptFL per learner, per defense.

Reads the finished runs of the grids ``learners_fm``, ``learners_fm_optimized``, ``learners_fm_adapter`` and
``learners_fm_adaptive`` (``runs/sweeps/<grid>/*/``) and writes ``experiments/results/learners_fm_table.{md,csv}``:
one row per run, its last round's clean accuracy and ASR with the bounds (the deployed model) and the same global
model without them, and the cost of the bounds (clean accuracy without minus with). Unfinished runs are listed
below the table. No training code runs here: only ``config.json``, ``metrics.jsonl`` and ``summary.json``.
With ``--runs`` it reads the given run folders instead (e.g. the committed ones of session 13,
``experiments/results/bounds_tuned/*``) and writes the table to ``--out``.

    python experiments/learners_fm_table.py
    python experiments/learners_fm_table.py --runs experiments/results/bounds_tuned/* \
        --out experiments/results/bounds_tuned_table
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

GRIDS = ("learners_fm", "learners_fm_optimized", "learners_fm_adapter", "learners_fm_adaptive")
COLUMNS = ("grid", "learner", "attack", "trigger", "adaptive", "strategy", "fusion", "seed", "defense", "clean_acc",
           "asr", "peak_asr", "clean_acc_nobounds", "asr_nobounds", "bounds_cost", "max_round_cost",
           "asr_raised_rounds", "trigger_zs_asr", "rounds", "run")  # fmt: skip


def defense_name(cfg: dict) -> str:
    """The defense of a run config, named for what it is."""
    if not cfg.get("activation-bounds"):
        return "none"
    layers = cfg.get("bounds-layers", "visual.transformer.resblocks.*")
    data = cfg.get("bounds-data", "all")
    if data == "all" and not cfg.get("bounds-two-sided"):
        return f"bounds as in the paper ({layers})"
    reference = cfg.get("bounds-reference", "shadow")
    name = f"two-sided, {data} ({'initial model' if reference == 'initial' else 'unfused shadow'})"
    if cfg.get("bounds-tune", "none") != "none":
        return f"{name}, quantile tuned on synthetic data"
    return f"{name}, q {cfg.get('bounds-init-quantile', 1.0):g}"


def trigger_name(cfg: dict) -> str:
    """fm-poison's trigger, its surrogate (optimised) and its labels (dirty / clean-label); ``-`` otherwise."""
    if cfg.get("attack") != "fm-poison":
        return "-"
    name = str(cfg.get("fm-trigger", "patch"))
    if name == "optimized" and cfg.get("fm-trigger-surrogate", "coop") != "coop":
        name += f" ({cfg['fm-trigger-surrogate']} surrogate)"
    if cfg.get("fm-poison-label", "dirty") == "clean":
        name += ", clean-label"
    return name


def row_of(grid: str, run: Path) -> dict | None:
    """The table row of a finished run, or ``None``."""
    if not (run / "summary.json").exists():
        return None
    cfg = json.loads((run / "config.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = rows[-1]
    bounded = last.get("clean_acc_nobounds") is not None
    trained = [r for r in rows if r["round"] > 0 and r.get("clean_acc_nobounds") is not None]
    raised = [r["round"] for r in trained if r.get("asr") is not None and r["asr"] > r["asr_nobounds"]]
    pct = lambda v: None if v is None else round(100 * float(v), 1)  # noqa: E731
    return {
        "grid": grid,
        "learner": cfg.get("learner", "coop"),
        "attack": cfg.get("attack"),
        "trigger": trigger_name(cfg),
        "adaptive": bool(cfg.get("attack-under-bounds", False)),
        "strategy": cfg.get("strategy", "fedavg"),
        "fusion": cfg.get("server-fusion", "none"),
        "seed": cfg.get("seed", 0),
        "defense": defense_name(cfg),
        "clean_acc": pct(last["clean_acc"]),
        "asr": pct(last.get("asr")),
        "peak_asr": pct(max((r["asr"] for r in rows if r["round"] > 0 and r.get("asr") is not None), default=None)),
        "clean_acc_nobounds": pct(last.get("clean_acc_nobounds")) if bounded else None,
        "asr_nobounds": pct(last.get("asr_nobounds")) if bounded else None,
        "bounds_cost": round(100 * (last["clean_acc_nobounds"] - last["clean_acc"]), 1) if bounded else None,
        "max_round_cost": round(max(100 * (r["clean_acc_nobounds"] - r["clean_acc"]) for r in trained), 1)
        if trained
        else None,
        "asr_raised_rounds": " ".join(map(str, raised)) if trained else None,
        "trigger_zs_asr": pct(last.get("trigger_zs_asr")),
        "rounds": last["round"],
        "run": str(run),
    }


def main(argv: list[str] | None = None) -> None:
    """Write the table from every finished run of the grids (or of ``--runs``)."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="*", help="run folders to read instead of the grids' (runs/sweeps/<grid>/*)")
    ap.add_argument("--out", default="experiments/results/learners_fm_table", help="output stem (.md, .csv)")
    a = ap.parse_args(argv)
    if a.runs:
        runs = [("-", Path(r)) for r in sorted(a.runs)]
    else:
        runs = [(grid, run) for grid in GRIDS for run in sorted(Path("runs/sweeps", grid).glob("*"))]
    out, missing = [], []
    for grid, run in runs:
        if not run.is_dir() or ".replaced-" in run.name:
            continue
        row = row_of(grid, run)
        (out.append(row) if row else missing.append(str(run)))
    order = {"coop": 0, "clip-adapter": 1, "vpt-deep": 2}
    out.sort(
        key=lambda r: (
            order.get(r["learner"], 9),
            r["attack"],
            r["trigger"],
            r["adaptive"],
            r["strategy"],
            r["defense"],
            r["seed"],
        )  # fmt: skip
    )
    stem = Path(a.out)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(out)
    fmt = lambda v: "-" if v is None else (f"{v}%" if isinstance(v, float) else str(v))  # noqa: E731
    head = ("learner", "attack", "trigger", "adaptive", "strategy", "fusion", "seed", "defense", "clean_acc", "asr",
            "peak_asr", "clean_acc_nobounds", "asr_nobounds", "bounds_cost", "max_round_cost", "asr_raised_rounds",
            "trigger_zs_asr", "run")  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in out:
        cost = ("bounds_cost", "max_round_cost")
        cells = [fmt(r[k]) if k not in cost else ("-" if r[k] is None else f"{r[k]:+.1f}") for k in head[:-1]]
        cells.append(Path(r["run"]).name)
        lines.append("| " + " | ".join(cells) + " |")
    if missing:
        lines += ["", "Unfinished (not in the table):", *(f"- `{m}`" for m in missing)]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
