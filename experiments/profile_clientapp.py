"""Profile one deployment ClientApp ``train`` message in a fresh Python process.

In a Flower 1.41 deployment every ClientApp message runs in a new ``flwr-clientapp``
process, so nothing cached in memory survives between rounds. This script replays
what such a process does for one ``train`` message of fedsec, phase by phase, in the
process it runs in (start it fresh each time), and reports each phase's wall time and
CPU time (``cpu``; the figure to trust on a shared machine):

``import_flwr_runtime``
    what ``flwr-clientapp`` imports before it receives its task;
``import_clientapp``
    loading ``clients.client_app`` (light: the handlers import the rest);
``import_torch``
    torch;
``import_open_clip``
    open_clip, with what it pulls in (torchvision, which imports ``torch._dynamo``, and timm);
``import_fedsec``
    what the ``train`` handler imports (``fedsec.node``, the attacks, training);
``run_config``
    ``RunConfig.from_mapping`` of the run config (it imports the attack and strategy registries);
``clip``
    the frozen CLIP (``fedsec.node.clip_for``: the fast format of :mod:`fedsec.models.fastload`
    once the disk cache has it, else open_clip creation, checkpoint check and load);
``local_data``
    the client's k-shot data with its frozen features (``fedsec.node.local_data_for``): on a
    miss of the on-disk cache the dataset, the partitioner and the encoding, on a hit one file;
    ``--breakdown`` first times the uncached steps one by one (``data.load_dataset``,
    ``data.partition``, ``data.k_shot``, ``data.encode``);
``prompt_model``
    the prompt learner (``fedsec.node.prompt_model_for``);
``train_call``
    the real ``train`` handler on a real ``Message`` (local training and the reply),
    with every cache above now warm;
``process_wall``
    the child's wall time seen from outside (adds interpreter start and exit).

The children get ``OMP_NUM_THREADS=1`` (as every Flower process of ``fedsec.launch.flower_env``)
and a fresh ``FEDSEC_CACHE_DIR`` shared by the repetitions (``--cache-dir`` to choose one), so
the first repetition misses the on-disk cache and the others hit it.

``--warm`` runs each repetition as a child of a forkserver that preloaded what
``fedsec.warm_superexec`` preloads (``PRELOAD``), as the warm deployment does
(``deploy.py --warm-clientapp``). ``--importtime`` adds ``python -X importtime`` of the same
imports in a fresh interpreter, summed per phase and per package that the ClientApp's
imports pull in (microseconds of wall time, inflated by the measurement itself).

Run it a few times (the first run fills the on-disk cache of ``fedsec.diskcache``)::

    nice -n 10 .venv/bin/python experiments/profile_clientapp.py --repeat 3 --importtime
    nice -n 10 .venv/bin/python experiments/profile_clientapp.py --repeat 3 --warm
    nice -n 10 .venv/bin/python experiments/profile_clientapp.py --repeat 3 --no-disk-cache

Each repetition is a fresh process; the report is JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The small settings of the deployment tests and ``bench_deploy.py``.
SMALL = {"k-shot": 4, "local-steps": 5, "eval-samples": 1000, "asr-eval-samples": 300}


def _data_phases(cfg, partition_id: int, num_partitions: int, lap, t: float) -> float:
    """Time the uncached steps of ``fedsec.node.local_data_for`` one by one (``--breakdown``)."""
    from fedsec.data import client_indices, k_shot_indices, load_dataset, prepare_images
    from fedsec.models.factory import pick_device
    from fedsec.models.fastload import cached_clip

    pool = load_dataset(cfg.dataset, "train", cfg.data_root)
    t = lap("data.load_dataset", t)
    idx = client_indices(
        pool.labels,
        partition_id,
        num_partitions,
        cfg.partitioner,
        cfg.seed,
        cfg.dirichlet_alpha,
        cfg.classes_per_client,
    )
    t = lap("data.partition", t)
    idx = k_shot_indices(pool.labels, idx, cfg.k_shot, cfg.seed + 1000 * (partition_id + 1))
    part = pool.subset(idx)
    t = lap("data.k_shot", t)
    clip = cached_clip(cfg.model, cfg.pretrained, pick_device(cfg.device))
    clip.encode_images_batched(prepare_images(part.images, clip.image_size, part.fit))
    return lap("data.encode", t)


#: What the ClientApp's ``train`` handler imports, by phase (also the ``--importtime`` statement).
IMPORTS = {
    "import_flwr_runtime": "import flwr.supernode.runtime.run_clientapp",
    "import_clientapp": "import clients.client_app",
    "import_torch": "import torch",
    "import_open_clip": "import open_clip",
    "import_fedsec": ("import fedsec.activation_bounds, fedsec.attacks, fedsec.node, fedsec.training, fedsec.config"),
}


def _one(partition_id: int, num_partitions: int, overrides: dict, breakdown: bool) -> dict:
    """The phases of one ``train`` message in this (fresh) process: wall times, and CPU times under ``cpu``."""
    t_start, c_start = time.perf_counter(), time.process_time()
    phases: dict[str, object] = {}
    cpu: dict[str, float] = {}
    last_cpu = [c_start]

    def lap(name: str, t0: float) -> float:
        now, c = time.perf_counter(), time.process_time()
        phases[name] = round(now - t0, 3)
        cpu[name] = round(c - last_cpu[0], 3)
        last_cpu[0] = c
        return now

    t = t_start
    for phase, statement in IMPORTS.items():
        exec(statement, {})  # noqa: S102 - fixed import statements, timed one by one
        t = lap(phase, t)
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

    import clients.client_app as client_app
    from fedsec import node
    from fedsec.config import RunConfig

    run_config = {**RunConfig.defaults(), **SMALL, **overrides}
    cfg = RunConfig.from_mapping(run_config)
    t = lap("run_config", t)
    node.clip_for(cfg)
    t = lap("clip", t)
    if breakdown:
        t = _data_phases(cfg, partition_id, num_partitions, lap, t)
    data, classnames = node.local_data_for(cfg, partition_id, num_partitions)
    t = lap("local_data", t)
    model = node.prompt_model_for(cfg, tuple(classnames))
    t = lap("prompt_model", t)
    ctx = node.get_ctx(model)
    content = RecordDict({"arrays": ArrayRecord({"ctx": Array(ctx)}), "config": ConfigRecord({"server-round": 2})})
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as pull_task_input sets them
    msg = Message(content=content, dst_node_id=1, message_type="train")
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config=run_config,
    )
    reply = client_app.train(msg, context)
    t = lap("train_call", t)
    assert "ctx" in reply.content["arrays"]
    phases["total_in_process"] = round(t - t_start, 3)
    cpu["total_in_process"] = round(time.process_time() - c_start, 3)
    phases["cpu"] = cpu
    return phases


def _warm_child(args: tuple, out) -> None:
    """A ``--warm`` repetition in a forkserver child: the app's modules come fresh, as in the warm SuperExec."""
    from fedsec.warm_superexec import drop_app_modules

    drop_app_modules()
    sys.path.insert(0, str(ROOT))
    out.put(_one(*args))


def import_profile(env: dict[str, str]) -> dict:
    """``python -X importtime`` of :data:`IMPORTS` in a fresh interpreter, summed per phase and package.

    Returns
    -------
    dict
        ``phases_us``: the cumulative microseconds of each phase's statement; ``packages_us``:
        within them, the first import of each heavy package (what pulls in what); ``self_us_by_top``:
        self time summed per top-level package.
    """
    statement = "; ".join(IMPORTS.values())
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement], env=env, capture_output=True, text=True, check=True
    )
    rows = []
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line or "self [us]" in line:
            continue
        head, cumulative, name = line.split("|")
        depth = len(name) - len(name.lstrip())
        rows.append((int(head.split(":")[1]), int(cumulative), depth, name.strip()))
    top = [r for r in rows if r[2] == min(x[2] for x in rows)]
    names = [r[3] for r in top]
    phases: dict[str, int] = {}
    for phase, stmt in IMPORTS.items():
        mods = [m.strip() for m in stmt.replace("import ", "").split(",")]
        phases[phase] = sum(r[1] for r in top if any(r[3] == m or m.startswith(r[3] + ".") for m in mods))
    first: dict[str, int] = {}
    for _, cumulative, _, name in rows:
        if name in ("torch", "torchvision", "timm", "open_clip", "torch._dynamo", "sympy", "flwr", "numpy", "grpc"):
            first.setdefault(name, cumulative)
    by_top: dict[str, int] = {}
    for self_us, _, _, name in rows:
        key = name.split(".")[0]
        by_top[key] = by_top.get(key, 0) + self_us
    heavy = dict(sorted(by_top.items(), key=lambda kv: -kv[1])[:15])
    return {"phases_us": phases, "packages_us": first, "self_us_by_top": heavy, "top_level": names[:40]}


def main(argv: list[str] | None = None) -> int:
    """Command line; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1, help="fresh processes to run")
    ap.add_argument("--partition-id", type=int, default=0)
    ap.add_argument("--num-partitions", type=int, default=3)
    ap.add_argument("--no-disk-cache", action="store_true", help="set FEDSEC_DISK_CACHE=0 in the children")
    ap.add_argument("--cache-dir", default=None, help="FEDSEC_CACHE_DIR of the children (default: a fresh temp dir)")
    ap.add_argument("--breakdown", action="store_true", help="time the uncached data steps one by one first")
    ap.add_argument("--warm", action="store_true", help="fork each repetition from a preloaded forkserver")
    ap.add_argument("--importtime", action="store_true", help="add python -X importtime of the same imports")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("-c", "--run-config", default="{}", help="JSON object of run-config overrides")
    args = ap.parse_args(argv)
    one_args = (args.partition_id, args.num_partitions, json.loads(args.run_config), args.breakdown)
    if args.child:
        print(json.dumps(_one(*one_args)))
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # as fedsec.launch.flower_env gives every Flower process
    tmp = tempfile.TemporaryDirectory(prefix="fedsec-profile-cache-")
    env["FEDSEC_CACHE_DIR"] = args.cache_dir or tmp.name
    if args.no_disk_cache:
        env["FEDSEC_DISK_CACHE"] = "0"
    runs = []
    ctx = None
    if args.warm:
        import multiprocessing

        from fedsec.warm_superexec import PRELOAD

        os.environ.update({k: env[k] for k in ("FEDSEC_CACHE_DIR", "OMP_NUM_THREADS", "HF_HUB_OFFLINE")})
        if args.no_disk_cache:
            os.environ["FEDSEC_DISK_CACHE"] = "0"
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(PRELOAD))
        t0 = time.perf_counter()
        warmup = ctx.Process(target=time.sleep, args=(0,))
        warmup.start()
        warmup.join()
        print(json.dumps({"forkserver_start_s": round(time.perf_counter() - t0, 3)}), file=sys.stderr, flush=True)
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        if ctx is not None:
            queue = ctx.Queue()
            child = ctx.Process(target=_warm_child, args=(one_args, queue))
            child.start()
            phases = queue.get(timeout=600)
            child.join()
        else:
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--partition-id", str(args.partition_id)]
                + ["--num-partitions", str(args.num_partitions), "-c", args.run_config]
                + (["--breakdown"] if args.breakdown else []),
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            phases = json.loads(out.stdout.strip().splitlines()[-1])
        phases["process_wall"] = round(time.perf_counter() - t0, 3)
        runs.append(phases)
        print(json.dumps(phases), file=sys.stderr, flush=True)
    tmp.cleanup()
    report = {
        "mode": "warm (forkserver child)" if args.warm else "fresh process",
        "disk_cache": not args.no_disk_cache,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "runs": runs,
    }
    if args.importtime:
        report["importtime"] = import_profile(env)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
