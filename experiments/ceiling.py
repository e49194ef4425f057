"""BadPromptFL ceiling analysis: what the model allows vs what aggregation dilutes.

Each cell is a federated run in the plain in-process loop of
``experiments/inprocess_fl.py`` (the same data, model, attack and FedAvg as the
Flower app, without Flower's start-up), so a grid of long runs fits a CPU:

- **central**: one client holding the whole pool (``k-shot`` x clients images) and
  malicious: joint trigger + prompt optimisation with no averaging at all;
- **all malicious**, then 1, 2, 3 of 10: how much averaging with benign
  clients dilutes the backdoor;
- patch size and position, trigger frozen after ``trigger-rounds`` vs
  re-optimised every round (``trigger-rounds = 0``), 20 / 50 / 100 rounds (one
  long run gives the shorter ones: its per-round ASR is recorded).

Every cell is measured at the end on the whole test set: clean accuracy; ASR
(non-target images with the attackers' final trigger, predicted as the target);
the trigger's two baselines, under the hand-written zero-shot prompt and under
the **benign-only** prompt (the final prompt of the same cell's configuration
without attack, which the grid runs too); the clean target rate (the same
images without the trigger predicted as the target); and the clean accuracy of
that no-attack run, for the "within 2 points" criterion.

Cells are listed in a TOML file (``[base]`` run-config keys for every cell, then
``[[cell]]`` tables with ``name``, ``clients`` and run-config keys). Finished
cells (``<out>/<name>.json``) are skipped, so the grid resumes. Writes
``<out>/ceiling.{csv,md}``.

Run: ``.venv/bin/python experiments/ceiling.py experiments/grids/ceiling.toml [--only NAME ...]``
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tomllib
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedsec.attacks import get_attack  # noqa: E402
from fedsec.config import RunConfig  # noqa: E402
from fedsec.data import load_dataset, prepare_images  # noqa: E402
from fedsec.metrics import accuracy, predict, target_rates  # noqa: E402
from fedsec.node import clip_for, prompt_model_for, set_ctx  # noqa: E402

COLUMNS = [
    "cell",
    "clients",
    "malicious",
    "rounds",
    "clean_acc",
    "no_attack_acc",
    "asr",
    "asr_min_last5",
    "asr_at",
    "trigger_zs_asr",
    "trigger_benign_asr",
    "clean_target_rate",
    "wall_s",
    "command",
]


def load_cells(path: Path) -> tuple[dict, list[dict]]:
    """The ``[base]`` keys and the ``[[cell]]`` tables of a ceiling grid."""
    data = tomllib.loads(Path(path).read_text())
    base = dict(data.get("base", {}))
    cells = [dict(c) for c in data.get("cell", [])]
    for c in cells:
        if "name" not in c or "clients" not in c:
            raise SystemExit(f"{path}: every [[cell]] needs name and clients; got {sorted(c)}")
    return base, cells


def cell_config(base: dict, cell: dict, attack: bool = True) -> tuple[RunConfig, int]:
    """The run config of a cell (``attack=False``: the same cell without attack) and its client count."""
    values = {**base, **{k: v for k, v in cell.items() if k not in ("name", "clients")}}
    if not attack:
        # Attack keys cannot change a run without attack: reset them, so cells that differ only in
        # the attack's settings share one no-attack reference run.
        from fedsec.attacks.base import ATTACKS

        values.update({p.key: p.default for p in ATTACKS.params()})
        values.update({"attack": "none", "num-malicious": 0, "malicious-ids": ""})
    return RunConfig.from_mapping(values), int(cell["clients"])


def command(base: dict, cell: dict) -> str:
    """The in-process command that runs the cell alone."""
    values = {**base, **{k: v for k, v in cell.items() if k not in ("name", "clients")}}
    overrides = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}" for k, v in values.items())
    return f"python experiments/inprocess_fl.py --num-clients {cell['clients']} -c {shlex.quote(overrides)}"


def run_cell(cfg: RunConfig, clients: int, store: Path) -> dict:
    """One in-process federated run; returns its per-round figures and final ``ctx``."""
    from experiments.inprocess_fl import run_inprocess

    torch.set_num_threads(max(1, torch.get_num_threads()))
    return run_inprocess(cfg, clients, verbose=True, store=store, local_eval=False)


def final_metrics(
    cfg: RunConfig, ctx: np.ndarray, benign_ctx: np.ndarray, store: Path, feats: torch.Tensor | None = None
) -> dict:
    """Whole-test-set clean accuracy, ASR, both trigger baselines and the clean target rate.

    ``feats``: the test set's frozen features when the caller has them (the run encoded them already).
    """
    clip = clip_for(cfg)
    test = load_dataset(cfg.dataset, "test", cfg.data_root)
    images = prepare_images(test.images, clip.image_size, test.fit)
    if feats is None:
        feats = clip.encode_images_batched(images)
    model = prompt_model_for(cfg, tuple(test.classnames))
    set_ctx(model, ctx)
    out = {"clean_acc": accuracy(predict(model, feats), test.labels)}
    trigger = get_attack(cfg.attack)(cfg, store / "attacker").load_trigger()
    if trigger is None:
        return out
    idx = np.flatnonzero(test.labels != cfg.target_label)
    with torch.no_grad():
        trig = clip.encode_images_batched(trigger(images[idx]))
        tokens = clip.tokenizer([cfg.prompt_template.format(c) for c in test.classnames]).to(clip.device)
        zs = torch.nn.functional.normalize(clip.model.encode_text(tokens), dim=-1).cpu()
        text = model.text_features().cpu()
        set_ctx(model, benign_ctx)
        benign = model.text_features().cpu()
    rates = target_rates(
        trig, feats[idx], test.labels[idx], cfg.target_label, {"global": text, "zero_shot": zs, "benign": benign}
    )
    out.update(
        {
            "asr": rates["asr_global"],
            "trigger_zs_asr": rates["asr_zero_shot"],
            "trigger_benign_asr": rates["asr_benign"],
            "clean_target_rate": rates["clean_target_rate"],
        }
    )
    return out


def save_artifacts(out: Path, name: str, ctx: np.ndarray, benign_ctx: np.ndarray, store: Path) -> None:
    """What re-computes a cell's figures without fedsec's training code.

    ``<name>.npz`` holds the final global context (``ctx``) and the no-attack twin's
    (``benign_ctx``); ``<name>.attacker/`` the attackers' stored state of the last round
    (their triggers, whose average the final ASR uses).
    """
    np.savez(out / f"{name}.npz", ctx=np.asarray(ctx), benign_ctx=np.asarray(benign_ctx))
    rounds = sorted((store / "attacker").glob("round_*"))
    if rounds:
        shutil.copytree(rounds[-1], out / f"{name}.attacker" / rounds[-1].name, dirs_exist_ok=True)


class TwinCache:
    """The no-attack twins of the cells, kept on disk so later grids reuse them.

    A twin holds its whole resolved config, the client count and the checkpoint's
    SHA-256 beside its final context (the benign-only prompt) and final clean
    accuracy. A config hits a stored twin when the client count and checkpoint
    match and every key either has the same value in both configs or exists in
    only one of them at its current default (keys added to fedsec since the twin
    ran do not force a re-run, keys it no longer has are ignored; a changed value
    always does). Attack keys never count: a twin runs without attack, and they were
    reset to the attack defaults of the day it ran (which change, as in session 8).
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def _key(cfg: RunConfig, clients: int) -> dict:
        return {**cfg.to_dict(), "clients": clients, "checkpoint_sha256": clip_for(cfg).checkpoint_sha256}

    @staticmethod
    def _compatible(stored: dict, wanted: dict) -> bool:
        from fedsec.attacks.base import ATTACKS

        defaults = RunConfig.from_mapping({}).to_dict()
        attack_keys = {p.key for p in ATTACKS.params()} - {"attack"}
        for k in set(stored) | set(wanted):
            if k not in defaults and k not in ("clients", "checkpoint_sha256"):
                continue  # a key fedsec no longer has cannot change today's run
            if k in attack_keys:
                continue  # a twin runs without attack: its attack keys (reset to the defaults of its day) do nothing
            if k in stored and k in wanted:
                if json.dumps(stored[k], default=str) != json.dumps(wanted[k], default=str):
                    return False
            elif json.dumps(stored.get(k, wanted.get(k)), default=str) != json.dumps(defaults.get(k), default=str):
                return False
        return True

    def get(self, cfg: RunConfig, clients: int) -> dict | None:
        """The twin of ``cfg`` if it was run before, else ``None``."""
        wanted = json.loads(json.dumps(self._key(cfg, clients), default=str))
        for path in sorted(self.root.glob("*.npz")) if self.root.exists() else []:
            try:
                with np.load(path) as z:
                    stored = json.loads(str(z["key"])) if "key" in z.files else None
                    if stored is not None and self._compatible(stored, wanted):
                        return {"ctx": z["ctx"], "acc": float(z["acc"])}
            except (OSError, ValueError, KeyError):  # unreadable: another process is writing it (see put)
                continue
        return None

    def put(self, cfg: RunConfig, clients: int, ctx: np.ndarray, acc: float) -> dict:
        """Store a finished twin; returns it."""
        key = json.dumps(self._key(cfg, clients), sort_keys=True, default=str)
        path = self.root / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a --twins-only process beside the attacked cells never exposes half a file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        os.close(fd)
        with open(tmp, "wb") as fh:
            np.savez(fh, ctx=np.asarray(ctx), acc=np.float64(acc), key=key)
        os.replace(tmp, path)
        return {"ctx": np.asarray(ctx), "acc": float(acc)}

    def adopt(self, cfg: RunConfig, clients: int, artifacts: Path, row: dict) -> None:
        """Store the twin of a finished cell (its ``benign_ctx`` and ``no_attack_acc``) if missing."""
        if artifacts.exists() and row.get("checkpoint_sha256") == clip_for(cfg).checkpoint_sha256:
            if self.get(cfg, clients) is None:
                with np.load(artifacts) as z:
                    self.put(cfg, clients, z["benign_ctx"], row["no_attack_acc"])


def runs_from_log(text: str) -> list[list[tuple[float, float | None]]]:
    """The per-round ``(clean_acc, asr)`` of each run in a cell's log (a run restarts at round 1).

    A cell's log holds its attacked run and, when the twin was not stored yet, its no-attack
    reference run (whose ASR is ``-`` in every round); the lines are those
    ``experiments/inprocess_fl.py`` prints (``round N: clean_acc X%  asr Y%``).
    """
    runs: list[list[tuple[float, float | None]]] = []
    for line in text.splitlines():
        m = re.match(r"round (\d+): clean_acc ([\d.]+)%  asr (-|[\d.]+%)", line)
        if not m:
            continue
        if int(m.group(1)) == 1 or not runs:
            runs.append([])
        asr = None if m.group(3) == "-" else float(m.group(3)[:-1]) / 100
        runs[-1].append((float(m.group(2)) / 100, asr))
    return runs


def partial_table(log_dir: Path) -> str:
    """A table of the rounds each cell's log reached (for cells cut off before their end).

    A cell's no-attack reference is the run without ASR in its own log or, failing that, in
    ``twin-<last part of the cell name>.txt`` (e.g. ``twin-seed0.txt`` for ``pool-seed0``), the
    log of a ``--twins-only`` process, if that log holds exactly one twin (cells sharing the suffix
    share their no-attack twin, as cells differing only in attack keys do; otherwise no gap is given).
    """
    cols = ["cell", "attacked rounds seen", "ASR r10", "ASR r20", "ASR last", "min ASR last 5", "clean last"]
    cols += ["no-attack clean same round", "gap"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    log_dir = Path(log_dir)

    def reference(runs: list, only: bool = False) -> list | None:
        refs = [r for r in runs if all(a is None for _, a in r)]
        if only and len(refs) != 1:
            return None  # a twin log with several twins: which one belongs to the cell is unknown
        return refs[0] if refs else None

    for log in sorted(log_dir.glob("*.txt")):
        if log.stem.startswith("twin-"):
            continue
        runs = runs_from_log(log.read_text())
        att = next((r for r in runs if any(a is not None for _, a in r)), None)
        ref = reference(runs)
        twin_log = log_dir / f"twin-{log.stem.rsplit('-', 1)[-1]}.txt"
        if ref is None and twin_log.exists():
            ref = reference(runs_from_log(twin_log.read_text()), only=True)
        if att is None:
            lines.append(f"| {log.stem} | 0 | - | - | - | - | - | - | - |")
            continue
        n = len(att)
        asr = [a for _, a in att]
        seen = [a for a in asr if a is not None]

        def at(r: int, asr: list = asr, n: int = n) -> str:
            return "-" if r > n or asr[r - 1] is None else f"{100 * asr[r - 1]:.1f}%"

        ref_acc = ref[n - 1][0] if ref is not None and n <= len(ref) else None
        gap = "-" if ref_acc is None else f"{100 * (att[-1][0] - ref_acc):+.1f}"
        lines.append(
            f"| {log.stem} | {len(seen)} | {at(10)} | {at(20)} | {at(n)} | {100 * min(seen[-5:]):.1f}% "
            f"| {100 * att[-1][0]:.1f}% | {'-' if ref_acc is None else f'{100 * ref_acc:.1f}%'} | {gap} |"
        )
    return "\n".join(lines) + "\n"


def fmt(v: object) -> str:
    """Percent for rates, plain otherwise."""
    if isinstance(v, float):
        return f"{100 * v:.1f}%" if v <= 1.0 else f"{v:.0f}"
    return "-" if v is None else str(v)


def write_table(out: Path, rows: list[dict]) -> None:
    """``ceiling.csv`` and ``ceiling.md`` from the finished cells."""
    with open(out / "ceiling.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS[:-1]) + " |", "|" + "---|" * (len(COLUMNS) - 1)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in COLUMNS[:-1]) + " |")
    lines += ["", "Commands:", ""] + [f"- `{r['cell']}`: `{r['command']}`" for r in rows]
    (out / "ceiling.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", help="ceiling grid TOML, e.g. experiments/grids/ceiling.toml")
    ap.add_argument("--only", nargs="*", default=None, help="run only these cells")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "ceiling"))
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a [base] run-config key (TOML value), e.g. --set device='cuda'",
    )
    ap.add_argument("--twins", default="", help="folder of the no-attack twins (default: <out>/twins)")
    ap.add_argument(
        "--twins-only",
        action="store_true",
        help="only run and store the no-attack twins of the selected cells (to run beside the attacked cells)",
    )
    ap.add_argument(
        "--from-logs",
        metavar="DIR",
        help="instead of running: table of the rounds reached by the cell logs in DIR (cut-off runs)",
    )
    args = ap.parse_args()
    if args.from_logs:
        table = partial_table(Path(args.from_logs))
        (Path(args.from_logs) / "partial.md").write_text(table)
        print(table)
        return
    base, cells = load_cells(Path(args.grid))
    for item in args.set:
        key, _, value = item.partition("=")
        base[key.strip()] = tomllib.loads(f"v = {value}")["v"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    twins = TwinCache(Path(args.twins) if args.twins else out / "twins")
    for cell in cells:
        if args.only and cell["name"] not in args.only:
            continue
        path = out / f"{cell['name']}.json"
        cfg, clients = cell_config(base, cell)
        ref_cfg, _ = cell_config(base, cell, attack=False)
        if path.exists():
            twins.adopt(ref_cfg, clients, out / f"{cell['name']}.npz", json.loads(path.read_text()))
            print(f"[ceiling] {cell['name']}: done, skipped", flush=True)
            continue
        t0 = time.perf_counter()
        if args.twins_only:
            if twins.get(ref_cfg, clients) is None:
                with tempfile.TemporaryDirectory() as tmp:
                    ref = run_cell(ref_cfg, clients, Path(tmp))
                twins.put(ref_cfg, clients, ref["final_ctx"], ref["final_acc"])
            print(f"[ceiling] {cell['name']}: twin stored in {twins.root}", flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            res = run_cell(cfg, clients, Path(tmp))
            # The twin is looked up after the attacked run, so a separate --twins-only process can make it meanwhile.
            twin = twins.get(ref_cfg, clients)
            if twin is None:
                with tempfile.TemporaryDirectory() as tmp_ref:
                    ref = run_cell(ref_cfg, clients, Path(tmp_ref))
                twin = twins.put(ref_cfg, clients, ref["final_ctx"], ref["final_acc"])
            final = final_metrics(cfg, res["final_ctx"], twin["ctx"], Path(tmp), res["test_features"])
            save_artifacts(out, cell["name"], res["final_ctx"], twin["ctx"], Path(tmp))
        asrs = [a for a in res["asrs"][1:] if a is not None]
        row = {
            "cell": cell["name"],
            "clients": clients,
            "malicious": cfg.num_malicious,
            "rounds": cfg.num_server_rounds,
            "no_attack_acc": twin["acc"],
            "asr_min_last5": min(asrs[-5:]) if asrs else None,
            "asr_at": ", ".join(f"{r}: {100 * asrs[r - 1]:.1f}%" for r in (20, 50, 100) if r <= len(asrs)),
            "asr_per_round": asrs,
            "acc_per_round": res["accs"],
            "wall_s": time.perf_counter() - t0,
            "checkpoint_sha256": clip_for(cfg).checkpoint_sha256,
            "artifacts": [f"{cell['name']}.npz", f"{cell['name']}.attacker/"],
            "device": torch.cuda.get_device_name() if cfg.device != "cpu" and torch.cuda.is_available() else "cpu",
            "command": command(base, cell),
            **final,
        }
        path.write_text(json.dumps(row, indent=2, default=float) + "\n")
        print(f"[ceiling] {cell['name']}: " + "  ".join(f"{c} {fmt(row.get(c))}" for c in COLUMNS[4:12]), flush=True)
    rows = [json.loads((out / f"{c['name']}.json").read_text()) for c in cells if (out / f"{c['name']}.json").exists()]
    if rows:
        write_table(out, rows)
        print((out / "ceiling.md").read_text())


if __name__ == "__main__":
    main()
