"""Benchmarks of issue 6, measured side by side in one run; writes JSON + Markdown.

1. **Flower vs in-process**: the same federated prompt learning (benign
   clients, FedAvg over ``ctx``, same data, partitions, model, local training
   and server evaluation) run once through ``flwr run`` on a simulation
   SuperLink (:func:`fedsec.launch.run`) and once as a plain Python loop
   (:func:`experiments.inprocess_fl.run_inprocess`). Reported: the ratio of
   the steady-state round times (rounds 2..R, Flower's from the ServerApp's
   metrics) and the ratio of the end-to-end wall times (Flower's includes
   starting the SuperLink and the simulation runtime).
2. **Client step vs text-encoder floor**: ``experiments/bench_step.py``.
3. **Scale**: 10, 100 and 1000 simulated clients (SuperNodes) with at most
   ``--sampled`` of them trained per round; round time and the peak memory
   of the whole process tree (SuperLink, simulation runtime, ServerApp and
   every client actor; not this benchmark process), sampled from ``/proc``
   every 0.5 s (sum of RSS and sum of PSS; PSS counts shared pages once).

Run: ``.venv/bin/python experiments/bench.py`` (about 20 minutes on 2 cores);
``--only flower,step,scale`` picks parts, ``--scale-clients 10,100,1000``.
Writes ``experiments/results/bench.json`` and ``bench.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.inprocess_fl import run_inprocess  # noqa: E402
from fedsec.config import RunConfig  # noqa: E402
from fedsec.launch import descendants, run  # noqa: E402


class TreeMemory:
    """Peak total RSS and PSS of all descendants of this process (the run, not the benchmark), polled."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def _read(pid: int) -> tuple[int, int]:
        rss = pss = 0
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return rss, pss

    def _poll(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            tot_rss = tot_pss = 0
            for pid in descendants(me):
                rss, pss = self._read(pid)
                tot_rss += rss
                tot_pss += pss
            self.peak_rss = max(self.peak_rss, tot_rss)
            self.peak_pss = max(self.peak_pss, tot_pss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _round_times(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [float(r["round_s"]) for r in rows if r.get("round", 0) >= 1]


def bench_flower(rounds: int, clients: int, work: Path) -> dict:
    """Flower simulation vs the in-process loop, same config, one after the other."""
    overrides = {"num-server-rounds": rounds, "k-shot": 16, "local-steps": 25, "lr": 0.002, "seed": 0}
    t0 = time.perf_counter()
    summary = run(ROOT, {**overrides, "run-dir": str(work / "flower")}, num_supernodes=clients, quiet=True)
    flower_wall = time.perf_counter() - t0
    flower_rounds = _round_times(Path(summary["run_dir"]))

    cfg = RunConfig.from_mapping(overrides)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    inproc = run_inprocess(cfg, clients, verbose=False)
    steady_f = statistics.mean(flower_rounds[1:])
    steady_i = statistics.mean(inproc["round_s"][1:])
    return {
        "clients": clients,
        "rounds": rounds,
        "flower_wall_s": flower_wall,
        "inprocess_wall_s": inproc["wall_s"],
        "flower_round_s": steady_f,
        "inprocess_round_s": steady_i,
        "round_ratio": steady_f / steady_i,
        "wall_ratio": flower_wall / inproc["wall_s"],
        "flower_final_acc": summary["clean_acc"],
        "inprocess_final_acc": inproc["final_acc"],
    }


def bench_scale(n_clients: int, sampled: int, rounds: int, work: Path) -> dict:
    """One simulation with ``n_clients`` SuperNodes, ``sampled`` trained per round."""
    frac = min(1.0, sampled / n_clients)
    overrides = {
        "num-server-rounds": rounds,
        "k-shot": 0,  # every client keeps its whole (small) iid partition
        "local-steps": 25,
        "fraction-train": frac,
        "min-train-nodes": min(n_clients, sampled),
        "seed": 0,
        "run-dir": str(work / f"scale-{n_clients}"),
    }
    with TreeMemory() as mem:
        t0 = time.perf_counter()
        summary = run(ROOT, overrides, num_supernodes=n_clients, quiet=True)
        wall = time.perf_counter() - t0
    times = _round_times(Path(summary["run_dir"]))
    return {
        "clients": n_clients,
        "sampled_per_round": round(frac * n_clients),
        "rounds": rounds,
        "wall_s": wall,
        "mean_round_s": statistics.mean(times),
        "max_round_s": max(times),
        "peak_rss_gib": mem.peak_rss / 2**30,
        "peak_pss_gib": mem.peak_pss / 2**30,
        "final_acc": summary["clean_acc"],
    }


def to_markdown(res: dict) -> str:
    out = [f"# fedsec benchmarks ({res['machine']})", ""]
    if "flower" in res:
        f = res["flower"]
        out += [
            f"## Flower simulation vs in-process loop ({f['clients']} clients, {f['rounds']} rounds)",
            "",
            "| | Flower | in-process | ratio (goal ≤ 1.2) |",
            "|---|---|---|---|",
            f"| steady round time (rounds 2..R) | {f['flower_round_s']:.2f} s | {f['inprocess_round_s']:.2f} s "
            f"| {f['round_ratio']:.2f} |",
            f"| end-to-end wall (Flower: SuperLink + runtime start-up) | {f['flower_wall_s']:.1f} s "
            f"| {f['inprocess_wall_s']:.1f} s | {f['wall_ratio']:.2f} |",
            f"| final clean accuracy | {100 * f['flower_final_acc']:.1f}% | {100 * f['inprocess_final_acc']:.1f}% | |",
            "",
        ]
    if "step" in res:
        s = res["step"]
        out += [
            "## Benign client step vs text-encoder floor",
            "",
            f"client step {s['client_step_ms']:.1f} ms, floor {s['text_encoder_fwd_bwd_ms']:.1f} ms, "
            f"ratio {s['ratio']:.2f} (goal ≤ 1.3)",
            "",
        ]
    if "scale" in res:
        out += [
            "## Scale (simulation, 1 CPU per client actor)",
            "",
            "| clients | sampled/round | rounds | wall | mean round | max round | peak RSS (sum) | peak PSS | ACC |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res["scale"]:
            out.append(
                f"| {r['clients']} | {r['sampled_per_round']} | {r['rounds']} | {r['wall_s']:.0f} s "
                f"| {r['mean_round_s']:.1f} s | {r['max_round_s']:.1f} s | {r['peak_rss_gib']:.2f} GiB "
                f"| {r['peak_pss_gib']:.2f} GiB | {100 * r['final_acc']:.1f}% |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="flower,step,scale")
    ap.add_argument("--flower-rounds", type=int, default=10)
    ap.add_argument("--flower-clients", type=int, default=10)
    ap.add_argument("--scale-clients", default="10,100,1000")
    ap.add_argument("--sampled", type=int, default=100)
    ap.add_argument("--scale-rounds", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "bench"))
    args = ap.parse_args()
    parts = set(args.only.split(","))
    res: dict = {"machine": f"{os.cpu_count()} CPU cores", "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.with_suffix(".json").write_text(json.dumps(res, indent=2))
        out.with_suffix(".md").write_text(to_markdown(res))

    with tempfile.TemporaryDirectory(prefix="fedsec-bench-") as tmp:
        work = Path(tmp)
        if "flower" in parts:
            res["flower"] = bench_flower(args.flower_rounds, args.flower_clients, work)
            print(json.dumps(res["flower"], indent=2), flush=True)
            save()
        if "step" in parts:
            step_out = work / "step.json"
            cmd = [sys.executable, str(ROOT / "experiments" / "bench_step.py"), "--out", str(step_out)]
            subprocess.run(cmd, check=True)
            res["step"] = json.loads(step_out.read_text())
            save()
        if "scale" in parts:
            res["scale"] = []
            for n in [int(x) for x in args.scale_clients.split(",")]:
                res["scale"].append(bench_scale(n, args.sampled, args.scale_rounds, work))
                print(json.dumps(res["scale"][-1], indent=2), flush=True)
                save()
    save()
    print(to_markdown(res))


if __name__ == "__main__":
    main()
