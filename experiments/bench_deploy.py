"""Benchmark: round time of a Flower *deployment* vs the *simulation* runtime, same config.

Runs the same experiment two or three times, one after the other (never at once):

1. a loopback deployment (``fedsec/deploy.py``): a SuperLink and ``--nodes``
   SuperNodes, TLS and SuperNode authentication on (``--insecure`` turns both off), every
   ClientApp message in a fresh ``flwr-clientapp`` process;
2. with ``--warm``, the same deployment with warm ClientApp processes (``deploy.py
   --warm-clientapp``: SuperNodes in ``--isolation process``, each with a
   ``fedsec.warm_superexec`` whose ClientApp processes fork from a parent that has imported
   Flower, torch and open_clip once; still one process per message);
3. the simulation runtime (``fedsec.launch.run``): ``--nodes`` simulated SuperNodes in Ray
   actors, 1 CPU each.

Each run's ``metrics.jsonl`` gives ``round_s`` per round (round 0 = waiting for the nodes +
zero-shot evaluation; round r >= 1 = the clients' training + aggregation + the server's
evaluation, ``eval_s`` of it) and ``summary.json`` its ServerApp ``wall_s``; around them, the
launcher's wall time (FAB build and upload, ServerApp start, ...) and, for the deployment, its
set-up (SuperLink, key registration, SuperNodes online). The load average is recorded: on a
shared machine the figures are upper bounds.

Both runs use a fresh on-disk cache (``FEDSEC_CACHE_DIR``, :mod:`fedsec.diskcache`) unless
``--cache-dir`` names one, so round 1 pays for building the clients' data and later rounds
read it. ``--baseline OLD.json`` adds the deployment column of an earlier result (e.g. before a
change) to the Markdown report. ``--superlink-port`` / ``--node-port-base`` pick the ports.

Writes ``experiments/results/bench_deploy.json`` and ``bench_deploy.md``.

Run::

    nice -n 10 .venv/bin/python experiments/bench_deploy.py --nodes 3 --rounds 3 --warm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedsec.launch import parse_overrides, run  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
#: The small settings of the deployment tests.
SMALL = {"k-shot": 4, "local-steps": 5, "eval-samples": 1000, "asr-eval-samples": 300}


def _load_deploy():
    import fedsec.deploy

    return fedsec.deploy


def round_stats(run_dir: Path) -> dict:
    """Per-round times of a finished run directory.

    Parameters
    ----------
    run_dir : Path
        A run directory with ``metrics.jsonl`` and ``summary.json``.

    Returns
    -------
    dict
        ``round_s`` and ``eval_s`` (lists, round 0 first), ``train_round_s`` (rounds >= 1),
        their mean and median, ``serverapp_wall_s`` and the final ``clean_acc``.
    """
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    train = [float(r["round_s"]) for r in rows if r["round"] >= 1]
    return {
        "round_s": [round(float(r["round_s"]), 2) for r in rows],
        "eval_s": [round(float(r["eval_s"]), 2) for r in rows],
        "train_round_s": [round(x, 2) for x in train],
        "mean_train_round_s": round(statistics.fmean(train), 2) if train else None,
        "median_train_round_s": round(statistics.median(train), 2) if train else None,
        "steady_round_s": steady_round(train),
        "serverapp_wall_s": round(float(summary.get("wall_s", 0.0)), 2),
        "clean_acc": summary.get("clean_acc"),
    }


def final_prompts_identical(work: Path) -> dict[str, bool]:
    """Whether each run's ``final_prompt.npz`` equals the simulation's, bit for bit (``run-*`` under ``work``)."""
    import numpy as np

    prompts = {p.parent.name: np.load(p)["ctx"] for p in sorted(work.glob("run-*/final_prompt.npz"))}
    ref = prompts.get("run-sim")
    if ref is None:
        return {}
    return {
        k: bool(v.dtype == ref.dtype and v.tobytes() == ref.tobytes()) for k, v in prompts.items() if k != "run-sim"
    }


def steady_round(train_round_s: list[float]) -> float | None:
    """Mean of the training rounds after the first (the first one also starts the simulation's actors)."""
    later = train_round_s[1:]
    return round(statistics.fmean(later), 2) if later else None


def bench_deployment(
    values: dict,
    nodes: int,
    work: Path,
    insecure: bool,
    ports: tuple[int, int] = (19091, 19092),
    warm: bool = False,
) -> dict:
    """Start a loopback deployment, run ``values``, stop it; return its timings.

    ``ports`` are the SuperLink's port and the first SuperNode Runtime API port; ``warm``
    forks the ClientApp processes from a pre-imported parent (``deploy.py --warm-clientapp``).
    """
    tag = "deploy-warm" if warm else "deploy"
    deploy = _load_deploy()
    cfg = deploy.DeployConfig(
        work_dir=work / tag,
        num_nodes=nodes,
        insecure=insecure,
        startup_timeout_s=300,
        superlink_port=ports[0],
        node_port_base=ports[1],
        warm_clientapp=warm,
    )
    run_dir = work / f"run-{tag}"
    summary, dep = deploy.deploy_and_run(cfg, {**values, "run-dir": str(run_dir)}, quiet=True, timeout_s=3600)
    out = round_stats(run_dir)
    out.update(
        {
            "mode": "deployment, warm ClientApp processes" if warm else "deployment",
            "warm_clientapp": warm,
            "tls": not insecure,
            "node_auth": cfg.node_auth,
            "setup_s": round(dep.timings.get("setup_s", 0.0), 2),
            "launcher_wall_s": round(summary["deploy_run_wall_s"], 2),
            "total_s": round(summary["deploy_total_s"], 2),
            "phases_s": {k: round(v, 2) for k, v in dep.timings.items()},
        }
    )
    return out


def bench_simulation(values: dict, nodes: int, work: Path) -> dict:
    """Run ``values`` on the simulation runtime (``nodes`` SuperNodes, 1 CPU each); return its timings."""
    run_dir = work / "run-sim"
    t0 = time.perf_counter()
    summary = run(ROOT, {**values, "run-dir": str(run_dir)}, num_supernodes=nodes, cpus_per_client=1, quiet=True)
    out = round_stats(run_dir)
    out.update(
        {
            "mode": "simulation",
            "launcher_wall_s": round(summary["launcher_wall_s"], 2),
            "total_s": round(time.perf_counter() - t0, 2),
        }
    )
    return out


def markdown_rows(d: dict, s: dict) -> list[tuple[str, object, object]]:
    """``(label, deployment, simulation)`` rows of the report."""
    return [
        ("set-up (SuperLink, keys, SuperNodes online)", d.get("setup_s"), "-"),
        ("launcher wall time (`flwr run`, FAB, ServerApp)", d["launcher_wall_s"], s["launcher_wall_s"]),
        ("ServerApp wall time (`summary.json` `wall_s`)", d["serverapp_wall_s"], s["serverapp_wall_s"]),
        ("round 0 (`round_s`: nodes + zero-shot evaluation)", d["round_s"][0], s["round_s"][0]),
        ("training rounds `round_s`", ", ".join(map(str, d["train_round_s"])), ", ".join(map(str, s["train_round_s"]))),
        ("mean training round", d["mean_train_round_s"], s["mean_train_round_s"]),
        ("median training round", d["median_train_round_s"], s["median_train_round_s"]),
        ("steady training round (mean of rounds >= 2)", d["steady_round_s"], s["steady_round_s"]),
        ("server evaluation per round (`eval_s`, mean)", _mean(d["eval_s"][1:]), _mean(s["eval_s"][1:])),
        ("final clean accuracy", d["clean_acc"], s["clean_acc"]),
    ]


def markdown(result: dict, baseline: dict | None = None) -> str:
    """The result as a Markdown report (with the deployment column of ``baseline`` first, if given)."""
    d, s = result["deployment"], result["simulation"]
    w = result.get("deployment_warm")
    rows = markdown_rows(d, s)
    cfg = " ".join(f"{k}={v}" for k, v in result["config"].items())
    columns: list[tuple[str, dict]] = []
    if baseline is not None:
        columns.append(("deployment before", {a: b for a, b, _ in markdown_rows(baseline["deployment"], s)}))
    columns.append(("deployment", {a: b for a, b, _ in rows}))
    if w is not None:
        columns.append(("deployment, warm ClientApp", {a: b for a, b, _ in markdown_rows(w, s)}))
    columns.append(("simulation", {a: c for a, _, c in rows}))
    head = "| | " + " | ".join(name for name, _ in columns) + " |"
    rule = "|---|" + "---|" * len(columns)
    table = [f"| {a} | " + " | ".join(str(col.get(a, "-")) for _, col in columns) + " |" for a, _, _ in rows]
    warm_line = (
        [
            "",
            f"Warm ClientApp processes: steady round **{w['steady_round_s']}** s, "
            f"**{result.get('ratio_steady_round_warm')}x** simulation. Every message still runs in its own "
            "process, forked from a `fedsec.warm_superexec` forkserver that imported Flower's runtime, torch "
            "and open_clip once (SuperNodes in `--isolation process`).",
        ]
        if w is not None
        else []
    )
    lines = [
        "# Deployment vs simulation round time",
        "",
        f"{result['nodes']} SuperNodes, `{cfg}`; deployment on loopback with TLS "
        f"{'on' if d['tls'] else 'off'} and node authentication {'on' if d['node_auth'] else 'off'}; "
        "simulation with 1 CPU per simulated SuperNode. Seconds.",
        "",
        head,
        rule,
        *table,
        "",
        f"Mean training round, deployment / simulation: **{result['ratio_mean_train_round']}x**; "
        f"steady rounds (>= 2): **{result['ratio_steady_round']}x**. A deployment runs every ClientApp "
        "message in a fresh `flwr-clientapp` process (Python, Flower's runtime, torch and open_clip are "
        "imported and the CLIP model is loaded again every round; the client's k-shot data and frozen "
        "features, and the frozen model in a fast format, come from the on-disk cache after round 1); "
        "simulation actors live for the whole run and keep everything cached in memory (`fedsec/node.py`), "
        "so only their first round pays for it.",
        *warm_line,
        *(
            [
                "",
                f"Deployment before: `{baseline['command']}` on {baseline.get('date', '?')}, load average "
                f"{baseline['machine']['loadavg_before']} before, {baseline['machine']['loadavg_after']} after.",
            ]
            if baseline is not None
            else []
        ),
        "",
        f"Final prompt bit-identical to the simulation's: {result.get('final_prompt_identical', '-')}.",
        *(["", f"Note: {result['note']}"] if result.get("note") else []),
        "",
        f"Settings: {result.get('settings', {})}.",
        "",
        f"Machine: {result['machine']['cpus']} CPUs ({result['machine']['platform']}); load average "
        f"{result['machine']['loadavg_before']} before, {result['machine']['loadavg_after']} after "
        "(a shared machine: upper bounds). Command: "
        f"`{result['command']}`.",
        "",
    ]
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _mean(xs: list[float]) -> float | None:
    return round(statistics.fmean(xs), 2) if xs else None


def main(argv: list[str] | None = None) -> int:
    """Command line; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=3, help="SuperNodes (= partitions) in both runs")
    ap.add_argument("--rounds", type=int, default=3, help="num-server-rounds")
    ap.add_argument("--insecure", action="store_true", help="deployment without TLS and node authentication")
    ap.add_argument("-c", "--run-config", action="append", default=[], help="extra key=value run-config overrides")
    ap.add_argument("--out", default=str(RESULTS / "bench_deploy"), help="output stem (.json and .md are added)")
    ap.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md (and derived fields) from the .json")
    ap.add_argument("--cache-dir", default=None, help="FEDSEC_CACHE_DIR of both runs (default: a fresh one)")
    ap.add_argument("--baseline", default=None, help="an earlier result .json whose deployment column is shown too")
    ap.add_argument("--superlink-port", type=int, default=19091, help="the deployment's SuperLink port")
    ap.add_argument("--node-port-base", type=int, default=19092, help="SuperNode k's Runtime API port is this + k")
    ap.add_argument("--warm", action="store_true", help="also run the deployment with warm ClientApp processes")
    args = ap.parse_args(argv)
    out = Path(args.out)
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    if args.render:
        result = json.loads(out.with_suffix(".json").read_text())
        for part in [p for p in ("deployment", "deployment_warm", "simulation") if p in result]:
            result[part]["steady_round_s"] = steady_round(result[part]["train_round_s"])
        result["ratio_steady_round"] = _ratio(
            result["deployment"]["steady_round_s"], result["simulation"]["steady_round_s"]
        )
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(result, baseline))
        print(markdown(result, baseline))
        return 0
    values = {"num-server-rounds": args.rounds, "min-train-nodes": args.nodes, **SMALL}
    values.update(parse_overrides(args.run_config))
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        work = Path(args.work_dir).resolve() if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ["FEDSEC_CACHE_DIR"] = str(Path(args.cache_dir).resolve() if args.cache_dir else work / "cache")
        settings = {  # the effective values (in the environment, else the defaults of fedsec and deploy.py)
            "FEDSEC_CACHE_DIR": os.environ["FEDSEC_CACHE_DIR"],
            "FEDSEC_DISK_CACHE": os.environ.get("FEDSEC_DISK_CACHE", "1"),
            "FEDSEC_GRID_POLL_S": os.environ.get("FEDSEC_GRID_POLL_S", "0.5"),
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2"),
        }
        print(f"[bench] deployment: {args.nodes} SuperNodes, {args.rounds} rounds", flush=True)
        ports = (args.superlink_port, args.node_port_base)
        dep = bench_deployment(values, args.nodes, work, args.insecure, ports)
        print(f"[bench] deployment round_s {dep['round_s']}", flush=True)
        warm = None
        if args.warm:
            print(f"[bench] deployment, warm ClientApp processes: {args.nodes} SuperNodes", flush=True)
            warm_ports = (ports[0] + 10, ports[1] + 10)  # not the ports the first deployment just released
            warm = bench_deployment(values, args.nodes, work, args.insecure, warm_ports, warm=True)
            print(f"[bench] deployment (warm) round_s {warm['round_s']}", flush=True)
        print(f"[bench] simulation: {args.nodes} SuperNodes, {args.rounds} rounds", flush=True)
        sim = bench_simulation(values, args.nodes, work)
        print(f"[bench] simulation round_s {sim['round_s']}", flush=True)
        same_prompt = final_prompts_identical(work)
    result = {
        "nodes": args.nodes,
        "config": values,
        "deployment": dep,
        "simulation": sim,
        "ratio_mean_train_round": round(dep["mean_train_round_s"] / sim["mean_train_round_s"], 2),
        "ratio_steady_round": _ratio(dep["steady_round_s"], sim["steady_round_s"]),
        **(
            {"deployment_warm": warm, "ratio_steady_round_warm": _ratio(warm["steady_round_s"], sim["steady_round_s"])}
            if warm is not None
            else {}
        ),
        "final_prompt_identical": same_prompt,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": settings,
        "command": "python experiments/bench_deploy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result, baseline))
    print(markdown(result, baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
