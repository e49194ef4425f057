"""Sweeps over run configs, resumable, and reports (CSV, Markdown, PNG) from run directories.

A grid file (``experiments/grids/*.toml``)::

    [sweep]
    name = "matrix"          # results go to experiments/results/<name>.{csv,md,png}
    num-supernodes = 10
    runs-root = "runs/sweeps"  # relative to the app folder

    [base]                   # run-config values every run shares
    num-server-rounds = 10

    [grid]                   # Cartesian product of these lists
    attack = ["none", "badpromptfl"]
    strategy = ["fedavg", "krum"]
    seed = [0, 1]

Each run's directory is named from its grid values; a run whose ``summary.json``
exists is skipped, so a sweep killed at any point (even ``kill -9``) resumes
where it stopped when started again: an unfinished run continues from its newest
checkpoint (``resume=true``), or, without one, is moved aside
(``<name>.replaced-<time>``) and started over. A run that fails is listed with
its reason below the report's table and in ``<name>.failed.md``.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import statistics
import time
from pathlib import Path

from fedsec.evaluation import format_table

METRICS = (
    "clean_acc",
    "asr",
    "clean_acc_nobounds",
    "asr_nobounds",
    "trigger_only_asr",
    "trigger_zs_asr",
    "clean_target_rate",
    "det_tpr",
    "det_fpr",
    "zero_shot_acc",
    "wall_s",
)


def load_grid(path: Path) -> tuple[dict, dict, dict[str, list]]:
    """Read a grid file: (sweep settings, base config, grid lists)."""
    from fedsec.launch import load_toml

    data = load_toml(Path(path))  # a syntax error names the file and the line
    sweep = dict(data.get("sweep", {}))
    sweep.setdefault("name", Path(path).stem)
    base = dict(data.get("base", {}))
    grid = {k: (v if isinstance(v, list) else [v]) for k, v in data.get("grid", {}).items()}
    return sweep, base, grid


def expand(base: dict, grid: dict[str, list]) -> list[tuple[str, dict]]:
    """All (run name, run config) pairs of the grid, in a stable order.

    A value that is a table (``defense = [{strategy = "fedavg", activation-bounds = true}, ...]``) sets
    several keys at once; the axis name itself is then only a label.
    """
    keys = list(grid)
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        cfg, parts = dict(base), []
        for key, value in zip(keys, combo, strict=False):
            if isinstance(value, dict):
                cfg.update(value)
                parts.append("-".join(f"{k}={v}" for k, v in value.items()))
            else:
                cfg[key] = value
                parts.append(f"{key}={value}")
        name = ("-".join(parts) or "base").replace("/", "_").replace(" ", "")
        out.append((short_name(name), cfg))
    return out


#: Longest run-directory name; longer ones are cut and made unique by a hash (file systems allow 255 bytes).
MAX_NAME = 160


def short_name(name: str) -> str:
    """``name`` itself, or its first characters and a hash of the whole when it exceeds :data:`MAX_NAME`."""
    if len(name.encode()) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return name.encode()[: MAX_NAME - 13].decode(errors="ignore") + "-" + digest


def grid_keys(grid: dict[str, list]) -> list[str]:
    """The config keys a grid varies (the keys inside table values, else the axis name)."""
    out: list[str] = []
    for axis, values in grid.items():
        for key in [k for v in values if isinstance(v, dict) for k in v] or [axis]:
            if key not in out:
                out.append(key)
    return out


def run_sweep(
    grid_file: Path, app_dir: Path = Path("."), results_dir: Path | None = None, dry_run: bool = False
) -> list[dict]:
    """Run every unfinished run of a grid, then write the report. Returns the summaries."""
    from tqdm import tqdm

    from fedsec.launch import run

    sweep, base, grid = load_grid(grid_file)
    app_dir = app_dir.resolve()
    root = (app_dir / sweep.get("runs-root", "runs/sweeps") / sweep["name"]).resolve()
    runs = expand(base, grid)
    todo = [(n, c) for n, c in runs if not (root / n / "summary.json").exists()]
    print(f"sweep {sweep['name']}: {len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to run -> {root}")
    if dry_run:
        return []
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=sweep["name"], unit="run")
    failures: dict[str, str] = {}
    for name, cfg in todo:
        bar.set_postfix_str(name)
        t0 = time.time()
        try:
            run(
                app_dir,
                {**cfg, "run-dir": str(root / name), **_continue(root / name, cfg)},
                None,
                int(sweep.get("num-supernodes", 10)),
                float(sweep.get("cpus-per-client", 1.0)),
                quiet=True,
                overwrite=True,  # an unfinished cell that cannot be resumed is moved aside, never deleted
            )
        except (RuntimeError, ValueError) as exc:  # RunFailed, ConfigError, RunDirError, LaunchError
            failures[name] = str(getattr(exc, "cause", "") or exc)
            tqdm.write(f"run {name} failed after {time.time() - t0:.0f}s: {exc}")
        bar.update(1)
    bar.close()
    dirs = [root / n for n, _ in runs if (root / n / "summary.json").exists()]
    results = Path(results_dir) if results_dir else app_dir / "experiments" / "results"
    write_failures(results / sweep["name"], failures)
    if not dirs:
        print(f"sweep {sweep['name']}: no run finished; failures in {results / sweep['name']}.failed.md")
        return []
    return report(dirs, results / sweep["name"], grid_keys(grid), failures=failures)


def _continue(run_dir: Path, cfg: dict) -> dict:
    """``{"resume": True}`` when ``run_dir`` holds an unfinished run of this cell with a checkpoint, else ``{}``."""
    from fedsec.rundir import run_progress

    if not run_dir.is_dir():
        return {}
    state = run_progress(run_dir)
    if state["finished"] or max(state["rounds"], default=0) < 1 or not state["config"]:
        return {}
    same = all(state["config"].get(k) == v for k, v in cfg.items())
    return {"resume": True} if same else {}


def write_failures(out_stem: Path, failures: dict[str, str]) -> Path | None:
    """Write the failed cells and their reasons to ``<out_stem>.failed.md`` (removed when none failed)."""
    path = Path(str(out_stem) + ".failed.md")
    if not failures:
        path.unlink(missing_ok=True)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["| failed run | reason |", "|---|---|"]
    lines += [f"| {n} | {r.replace('|', '/')} |" for n, r in failures.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _load(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"dir": str(run_dir), "summary": summary, "config": config, "rows": rows}


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.pstdev(vals) if len(vals) > 1 else 0.0)


def report(
    run_dirs: list[Path], out_stem: Path, group_keys: list[str] | None = None, failures: dict[str, str] | None = None
) -> list[dict]:
    """Aggregate runs into ``<out_stem>.csv``, ``.md`` and ``.png`` (mean ± std over seeds).

    Parameters
    ----------
    run_dirs : list of Path
        Finished run directories.
    out_stem : Path
        Output path without extension.
    group_keys : list of str, optional
        Config keys that define a method (default: every key that differs
        between the runs, except ``seed`` and ``run-dir``).
    failures : dict, optional
        Run name -> reason of the runs that failed: listed below the table.
    """
    runs = [_load(Path(d)) for d in run_dirs]
    if not runs:
        raise ValueError("no finished runs to report")
    if group_keys is None:
        keys = set().union(*(r["config"] for r in runs))
        group_keys = sorted(
            k for k in keys if k not in ("seed", "run-dir") and len({json.dumps(r["config"].get(k)) for r in runs}) > 1
        )
    group_keys = [k for k in group_keys if k != "seed"]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r["config"].get(k) for k in group_keys), []).append(r)
    table = []
    for key, members in groups.items():
        row: dict = dict(zip(group_keys, key, strict=False))
        row["seeds"] = len(members)
        for m in METRICS:
            mean, std = _mean_std([x["summary"].get(m) for x in members])
            row[m], row[m + "_std"] = mean, std
        table.append(row)
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    with open(out_stem.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    shown = tuple(group_keys) + tuple(m for m in METRICS if any(r[m] is not None for r in table)) + ("seeds",)
    md = format_table([{k: _key_cell(r[k]) if k in group_keys else _pm(r, k) for k in shown} for r in table], shown)
    if failures:
        md += "\n\n**Failed runs** (not in the table):\n\n| run | reason |\n|---|---|\n"
        md += "\n".join(f"| {n} | {r.replace('|', '/')} |" for n, r in failures.items())
    out_stem.with_suffix(".md").write_text(md + "\n")
    _plot(groups, group_keys, out_stem.with_suffix(".png"))
    print(md)
    return table


def _key_cell(value: object) -> str:
    """A grid key's value as a table cell: floats with 4 significant digits (e.g. 8/255 -> 0.03137)."""
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _pm(row: dict, key: str):
    if key + "_std" not in row:
        return row[key]
    mean, std = row[key], row[key + "_std"]
    if mean is None:
        return None
    pct = key.removesuffix("_nobounds").endswith(("acc", "asr", "tpr", "fpr", "rate"))
    scale = 100 if pct else 1
    return f"{scale * mean:.1f}{'%' if pct else ''}" + (f" ± {scale * std:.1f}" if row["seeds"] > 1 else "")


def _plot(groups: dict[tuple, list[dict]], group_keys: list[str], path: Path) -> None:
    """ACC and ASR per round per method (one row of panels per value of the first key when it varies
    and there are more keys, e.g. one row per attack of an attack x defense matrix), plus ASR vs the
    number of malicious clients when the grid varies it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_mal = "num-malicious" in group_keys
    ncols = 3 if with_mal else 2
    split = len(group_keys) >= 2 and len({k[0] for k in groups}) > 1 and group_keys[0] != "num-malicious"
    row_values = sorted({k[0] for k in groups}, key=str) if split else [None]
    fig, axes = plt.subplots(len(row_values), ncols, figsize=(6 * ncols, 4.2 * len(row_values)), squeeze=False)
    for i, row_value in enumerate(row_values):
        ax_acc, ax_asr = axes[i][0], axes[i][1]
        for ax in (ax_acc, ax_asr):
            ax.set_prop_cycle(color=plt.cm.tab20.colors)  # 11+ methods stay distinguishable
        for key, members in groups.items():
            if split and key[0] != row_value:
                continue
            keys, values = (group_keys[1:], key[1:]) if split else (group_keys, key)
            label = ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=False)) or "run"
            rows = members[0]["rows"]
            rounds = [r["round"] for r in rows]
            ax_acc.plot(rounds, [100 * r["clean_acc"] for r in rows], marker=".", label=label)
            if any(r.get("asr") is not None for r in rows):
                asr = [100 * r["asr"] if r.get("asr") is not None else float("nan") for r in rows]
                ax_asr.plot(rounds, asr, marker=".", label=label)
        prefix = f"{group_keys[0]}={row_value}: " if split else ""
        ax_acc.set(title=f"{prefix}clean accuracy per round", xlabel="round", ylabel="%")
        ax_asr.set(title=f"{prefix}ASR per round", xlabel="round", ylabel="%")
        ax_acc.legend(fontsize=6, ncol=2)
        if ax_asr.lines:
            ax_asr.legend(fontsize=6, ncol=2)
        else:
            ax_asr.text(0.5, 0.5, "no ASR (no attack)", ha="center", va="center", transform=ax_asr.transAxes)
    if with_mal:
        series: dict[tuple, list[tuple[int, float]]] = {}
        idx = group_keys.index("num-malicious")
        for key, members in groups.items():
            rest = key[:idx] + key[idx + 1 :]
            mean, _ = _mean_std([m["summary"].get("asr") for m in members])
            if mean is not None:
                series.setdefault(rest, []).append((int(key[idx]), 100 * mean))
        ax = axes[0][2]
        for rest, pts in series.items():
            pts.sort()
            others = [k for k in group_keys if k != "num-malicious"]
            lab = ", ".join(f"{k}={v}" for k, v in zip(others, rest, strict=False))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lab or "ASR")
        ax.set(title="ASR vs malicious clients", xlabel="malicious clients (of 10)", ylabel="%")
        ax.legend(fontsize=7)
        for extra in axes[1:]:
            extra[2].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main_sweep(argv: list[str]) -> None:
    """``fedsec sweep <grid.toml> [--dry-run]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="fedsec sweep")
    ap.add_argument("grid")
    ap.add_argument("--app", default=".")
    ap.add_argument("--results", default=None, help="results folder (default experiments/results)")
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    from fedsec.launch import LaunchError

    try:
        run_sweep(Path(a.grid), Path(a.app), Path(a.results) if a.results else None, a.dry_run)
    except LaunchError as exc:
        raise SystemExit(f"fedsec sweep: error: {exc}") from None


def main_report(argv: list[str]) -> None:
    """``fedsec report <run-dir>... [--out stem]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="fedsec report")
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--out", default="experiments/results/report")
    a = ap.parse_args(argv)
    dirs = [Path(d) for d in a.run_dirs if (Path(d) / "summary.json").exists()]
    failures = {str(d): unfinished_reason(Path(d)) for d in a.run_dirs if not (Path(d) / "summary.json").exists()}
    if not dirs:
        raise SystemExit(f"fedsec report: no finished run among {len(a.run_dirs)} directories: {failures}")
    report(dirs, Path(a.out), failures=failures)


def unfinished_reason(run_dir: Path) -> str:
    """Why a run directory holds no ``summary.json``: the ServerApp's error from its ``flwr.log``, or its progress."""
    from fedsec.launch import failure_cause
    from fedsec.rundir import run_progress

    if not run_dir.is_dir():
        return "no such directory"
    log = run_dir / "flwr.log"
    cause = failure_cause(log.read_text(errors="replace")) if log.exists() else ""
    rounds = run_progress(run_dir)["rounds"]
    done = f"stopped after round {max(rounds)}" if rounds else "no round finished"
    return f"{cause} ({done})" if cause else f"unfinished: {done}"
