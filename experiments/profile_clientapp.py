"""Profile one deployment ClientApp ``train`` message in a fresh Python process.

In a Flower 1.41 deployment every ClientApp message runs in a new ``flwr-clientapp``
process, so nothing cached in memory survives between rounds. This script replays
what such a process does for one ``train`` message of fedsec, phase by phase, in the
process it runs in (start it fresh each time):

``import_flwr_runtime``
    what ``flwr-clientapp`` imports before it receives its task;
``import_clientapp``
    loading ``clients.client_app`` (fedsec, torch, open_clip, ...);
``run_config``
    ``RunConfig.from_mapping`` of the run config (it imports the attack and strategy registries);
``clip``
    the frozen CLIP (open_clip model creation, checkpoint load and SHA-256 check);
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

Run it a few times (the first run fills the on-disk cache of ``fedsec.diskcache``)::

    nice -n 10 .venv/bin/python experiments/profile_clientapp.py --repeat 3
    nice -n 10 .venv/bin/python experiments/profile_clientapp.py --repeat 3 --no-disk-cache

Each repetition is a fresh subprocess; the report is JSON on stdout.
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
    from fedsec.models.factory import cached_clip, pick_device

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


def _one(partition_id: int, num_partitions: int, overrides: dict, breakdown: bool) -> dict:
    """The phases of one ``train`` message in this (fresh) process."""
    t_start = time.perf_counter()
    phases: dict[str, float] = {}

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        phases[name] = round(now - t0, 3)
        return now

    t = t_start
    import flwr.supernode.runtime.run_clientapp  # noqa: F401  (what flwr-clientapp loads first)

    t = lap("import_flwr_runtime", t)
    import clients.client_app as client_app

    t = lap("import_clientapp", t)
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

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
    return phases


def main(argv: list[str] | None = None) -> int:
    """Command line; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1, help="fresh processes to run")
    ap.add_argument("--partition-id", type=int, default=0)
    ap.add_argument("--num-partitions", type=int, default=3)
    ap.add_argument("--no-disk-cache", action="store_true", help="set FEDSEC_DISK_CACHE=0 in the children")
    ap.add_argument("--cache-dir", default=None, help="FEDSEC_CACHE_DIR of the children (default: a fresh temp dir)")
    ap.add_argument("--breakdown", action="store_true", help="time the uncached data steps one by one first")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("-c", "--run-config", default="{}", help="JSON object of run-config overrides")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_one(args.partition_id, args.num_partitions, json.loads(args.run_config), args.breakdown)))
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # as fedsec.launch.flower_env gives every Flower process
    tmp = tempfile.TemporaryDirectory(prefix="fedsec-profile-cache-")
    env["FEDSEC_CACHE_DIR"] = args.cache_dir or tmp.name
    if args.no_disk_cache:
        env["FEDSEC_DISK_CACHE"] = "0"
    runs = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
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
    report = {"disk_cache": not args.no_disk_cache, "loadavg": [round(x, 2) for x in os.getloadavg()], "runs": runs}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
