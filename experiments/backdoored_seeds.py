"""Backdoored CLIP over seeds: summarise the per-seed tables of ``experiments/gpu_backdoored.sh`` (issue 14).

Reads ``<tables>/s<seed>-r<tag>_<split>.csv`` (each written by ``experiments/backdoored_model.py`` on one run
folder: one seed, one poisoning rate) and writes two tables per split:

* ``<out>.csv`` / ``.md``: one row per rate x attack x defense, the mean, min and max over seeds of zero-shot clean
  accuracy, its change against the clean model, zero-shot ASR and linear-probe ASR, and each seed's ASR;
* the ``.md`` also holds issue 14's checks per rate and seed: BadCLIP's ASR and clean change before any defense,
  and after CleanCLIP BadCLIP's ASR minus BadNets' and minus Blended's.

Run::

    python experiments/backdoored_seeds.py    # -> experiments/results/backdoored_model_seeds{,_val}.{csv,md}
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
NAME = re.compile(r"s(?P<seed>\d+)-r(?P<tag>[^_]+)_(?P<split>test|train)\.csv$")


def load(tables: Path, split: str) -> list[dict]:
    """Every row of every ``s<seed>-r<tag>_<split>.csv``, with ``seed`` and ``run`` added."""
    rows = []
    for path in sorted(tables.glob(f"s*-r*_{split}.csv")):
        m = NAME.search(path.name)
        if not m:
            continue
        for r in csv.DictReader(path.open()):
            rows.append({**r, "seed": int(m["seed"]), "run": path.stem.removesuffix(f"_{split}")})
    return rows


def summarise(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The per-setting summary over seeds and the per-seed checks of issue 14."""
    clean_acc = {}  # seed -> zero-shot clean accuracy of the clean model
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["attack"] == "none":
            clean_acc[r["seed"]] = float(r["clean_acc"])
            continue
        label = "clean-continuation" if r["model"].endswith("clean-continuation") else r["attack"]
        tag = r["run"].split("-r", 1)[1]
        groups[(tag, float(r["rate"]), label, r["defense"])].append(r)
    summary = []
    for (tag, rate, attack, defense), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][3])):
        rs = sorted(rs, key=lambda r: r["seed"])
        asr = [float(r["asr"]) for r in rs]
        acc = [float(r["clean_acc"]) for r in rs]
        delta = [a - clean_acc[r["seed"]] for a, r in zip(acc, rs, strict=True)]
        lp = [float(r["linear_probe_asr"]) for r in rs]
        summary.append(
            {
                "run": tag,
                "rate": rate,
                "attack": attack,
                "defense": defense,
                "seeds": " ".join(str(r["seed"]) for r in rs),
                "clean_acc_mean": sum(acc) / len(acc),
                "clean_delta_mean": sum(delta) / len(delta),
                "clean_delta_min": min(delta),
                "clean_delta_max": max(delta),
                "asr_mean": sum(asr) / len(asr),
                "asr_min": min(asr),
                "asr_max": max(asr),
                "asr_per_seed": " / ".join(f"{100 * a:.1f}" for a in asr),
                "linear_probe_asr_mean": sum(lp) / len(lp),
            }
        )
    by = {(r["run"].split("-r", 1)[1], r["seed"], r["attack"], r["defense"]): r for r in rows if r["attack"] != "none"}
    checks = []
    for tag, seed in sorted({(k[0], k[1]) for k in by}):
        bc, cc = by.get((tag, seed, "badclip", "none")), by.get((tag, seed, "badclip", "cleanclip"))
        if bc is None:
            continue
        row = {
            "run": tag,
            "seed": seed,
            "badclip_asr": float(bc["asr"]),
            "badclip_clean_delta": float(bc["clean_acc"]) - clean_acc[seed],
        }
        for base in ("badnets", "blended"):
            other = by.get((tag, seed, base, "cleanclip"))
            if cc is not None and other is not None:
                row[f"cleanclip_gap_{base}"] = float(cc["asr"]) - float(other["asr"])
        checks.append(row)
    return summary, checks


def fmt(v) -> str:
    """Percent with one decimal for fractions, as they are otherwise."""
    return f"{100 * v:.1f}" if isinstance(v, float) else str(v)


def main() -> None:
    """Write the summaries of both splits."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", default=str(RESULTS / "backdoored_gpu" / "tables"))
    ap.add_argument("--out", default=str(RESULTS / "backdoored_model_seeds"), help="path stem")
    args = ap.parse_args()
    for split, suffix in (("test", ""), ("train", "_val")):
        summary, checks = summarise(load(Path(args.tables), split))
        if not summary:
            continue
        out = Path(args.out + suffix)
        with out.with_suffix(".csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(summary[0]))
            w.writeheader()
            w.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in summary)
        head = list(summary[0])
        shown = Path(args.tables).resolve()
        shown = shown.relative_to(Path.cwd()) if shown.is_relative_to(Path.cwd()) else shown
        lines = [
            f"# Backdoored CLIP over seeds ({split} split; all figures in %)",
            "",
            f"From `{shown}` by `python experiments/backdoored_seeds.py`; clean change = zero-shot clean "
            "accuracy minus the clean model's on the same images.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        lines += ["| " + " | ".join(fmt(r[k]) if k != "rate" else str(r[k]) for k in head) + " |" for r in summary]
        ck = ["run", "seed", "badclip_asr", "badclip_clean_delta", "cleanclip_gap_badnets", "cleanclip_gap_blended"]
        lines += [
            "",
            "## Issue 14's checks per seed: BadCLIP ASR >= 95 at a clean change within 2 points; after CleanCLIP, "
            "BadCLIP's ASR minus BadNets' and Blended's >= 30",
            "",
            "| " + " | ".join(ck) + " |",
            "|" + "---|" * len(ck),
        ]
        lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in ck) + " |" for r in checks]
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
