"""Benign PromptFL with learners that have weights in the image path (issue 15, item 1), in-process.

FedAvg over each learner's named arrays (:func:`fedsec.models.prompt.get_arrays`), 10 clients x 16 shots, the
run config's local training (:func:`fedsec.training.train_learner`: cached features for CoOp, images through the
prompted encoder for VPT), the same data and partitions as the Flower app. Learners:

* ``coop``: the shared learned text context (the app's default);
* ``vpt-shallow``: visual prompt tuning, ``--tokens`` tokens before the first block, text prompt fixed at its
  initialisation ("a photo of a");
* ``vpt-deep``: the same with fresh tokens before every block;
* ``clip-adapter``: CLIP-Adapter's visual adapter on the cached features, text prompt fixed.

Evaluated every ``--eval-every`` rounds on the test split (``eval-samples``, seeded) and on a validation split from
the clients' side (``--val`` images of the training pool that no client holds, seeded): the learning rate of each
learner is chosen on the validation split only. Also the local step's cost, CoOp's and each learner's, measured side
by side in this process (median of ``--step-repeats`` timed local rounds of one client).

Run::

    python experiments/learners.py --learner vpt-shallow --lr 0.1 \
        --out experiments/results/learners/vpt-shallow-lr0.1.json
    python experiments/learners.py --summary experiments/results/learners   # -> learners.{csv,md}
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fedsec.caches import client_shots, train_pool
from fedsec.config import RunConfig
from fedsec.data import load_dataset, prepare_images
from fedsec.launch import parse_overrides
from fedsec.metrics import accuracy
from fedsec.models.learners import LEARNERS
from fedsec.models.prompt import PromptCLIP, get_arrays, set_arrays
from fedsec.node import clip_for, learner_model_for, local_data_for, seed_everything
from fedsec.training import train_learner


def build(cfg: RunConfig, learner: str, tokens: int, classnames: tuple[str, ...]) -> PromptCLIP:
    """The run's model of ``learner`` (the app's registry, ``fedsec.models.learners``), at its initial arrays."""
    return learner_model_for(
        RunConfig.from_mapping({**cfg.to_dict(), "learner": learner, "vpt-tokens": tokens}), classnames
    )


def validation_split(cfg: RunConfig, num_clients: int, n: int) -> np.ndarray:
    """``n`` seeded indices of the training pool that no client holds (the clients' side, never the test split)."""
    pool = train_pool(cfg.dataset, cfg.data_root)
    c = cfg
    held = np.concatenate(
        [
            client_shots(
                pool.labels, pid, num_clients, c.partitioner, c.seed, c.dirichlet_alpha, c.classes_per_client, c.k_shot
            )
            for pid in range(num_clients)
        ]
    )
    free = np.setdiff1d(np.arange(len(pool)), held)
    return np.sort(np.random.default_rng([cfg.seed, 77]).choice(free, size=min(n, len(free)), replace=False))


def step_cost(cfg: RunConfig, models: dict[str, PromptCLIP], data, repeats: int) -> dict[str, float]:
    """Median wall time of one local step (``local-steps`` steps timed together) per learner, side by side."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(repeats):
        for name, model in models.items():
            saved = get_arrays(model)
            t = time.perf_counter()
            train_learner(model, data, cfg.local_steps, cfg.batch_size, cfg.lr, momentum=cfg.momentum, seed=r)
            times[name].append((time.perf_counter() - t) / cfg.local_steps)
            set_arrays(model, saved)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def run(cfg: RunConfig, learner: str, tokens: int, num_clients: int, eval_every: int, n_val: int) -> dict:
    """FedAvg of ``learner`` over ``num_clients`` benign clients; accuracies on the test and validation splits."""
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    clip = clip_for(cfg)
    test = load_dataset(cfg.dataset, "test", cfg.data_root)
    n_test = cfg.eval_samples or len(test)  # 0: all, as the app
    keep = np.sort(np.random.default_rng(cfg.seed).choice(len(test), size=n_test, replace=False))
    test = test.subset(keep)
    test_x, test_y = prepare_images(test.images, clip.image_size, test.fit), torch.from_numpy(test.labels)
    pool = train_pool(cfg.dataset, cfg.data_root)
    val_idx = validation_split(cfg, num_clients, n_val)
    val = pool.subset(val_idx)
    val_x, val_y = prepare_images(val.images, clip.image_size, val.fit), torch.from_numpy(val.labels)
    model = build(cfg, learner, tokens, tuple(test.classnames))
    arrays = get_arrays(model)

    def evaluate(rnd: int) -> dict:
        set_arrays(model, arrays)
        out = {"round": rnd}
        for split, (x, y) in {"test": (test_x, test_y), "val": (val_x, val_y)}.items():
            logits = model.logits_from_features(model.encode_images_batched(x).to(clip.device))
            out[f"{split}_acc"] = accuracy(logits.argmax(-1).cpu(), y)
        print(json.dumps(out), flush=True)
        return out

    history = [evaluate(0)]
    for rnd in range(1, cfg.num_server_rounds + 1):
        new, weights = [], []
        for pid in range(num_clients):
            data, _ = local_data_for(cfg, pid, num_clients)
            set_arrays(model, arrays)
            seed = cfg.seed * 100_003 + rnd * 1_009 + pid
            seed_everything(seed)
            train_learner(
                model, data, cfg.local_steps, cfg.batch_size, cfg.lr, momentum=cfg.momentum,
                weight_decay=cfg.weight_decay, seed=seed,
            )  # fmt: skip
            new.append(get_arrays(model))
            weights.append(len(data))
        arrays = {
            k: np.average(np.stack([a[k] for a in new]), axis=0, weights=weights).astype(np.float32) for k in new[0]
        }
        if rnd % eval_every == 0 or rnd == cfg.num_server_rounds:
            history.append(evaluate(rnd))
    return {
        "learner": learner,
        "tokens": tokens if "vpt" in arrays else 0,
        "lr": cfg.lr,
        "rounds": cfg.num_server_rounds,
        "clients": num_clients,
        "final_test_acc": history[-1]["test_acc"],
        "final_val_acc": history[-1]["val_acc"],
        "history": history,
        "arrays": {k: list(v.shape) for k, v in arrays.items()},
        "val_indices_sha256": __import__("hashlib").sha256(val_idx.astype(np.int64).tobytes()).hexdigest(),
        "test_indices_sha256": __import__("hashlib").sha256(keep.astype(np.int64).tobytes()).hexdigest(),
        "wall_s": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
    }


def summary(folder: Path) -> None:
    """``learners.{csv,md}`` from the runs' JSON files; per learner, the lr with the best validation accuracy."""
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if p.name != "step_cost.json"]
    best = {}
    for r in runs:
        if r["learner"] not in best or r["final_val_acc"] > best[r["learner"]]["final_val_acc"]:
            best[r["learner"]] = r
    cost = json.loads((folder / "step_cost.json").read_text()) if (folder / "step_cost.json").exists() else {}
    cols = ["learner", "tokens", "lr", "chosen", "final_val_acc", "final_test_acc", "ms_per_step", "step_vs_coop"]
    rows = []
    for r in sorted(runs, key=lambda r: (r["learner"], r["lr"])):
        ms = cost.get("ms_per_step", {}).get(r["learner"])
        coop = cost.get("ms_per_step", {}).get("coop")
        rows.append(
            {
                "learner": r["learner"],
                "tokens": r["tokens"],
                "lr": r["lr"],
                "chosen": "yes" if best[r["learner"]] is r else "",
                "final_val_acc": round(r["final_val_acc"], 4),
                "final_test_acc": round(r["final_test_acc"], 4),
                "ms_per_step": round(ms, 1) if ms else "",
                "step_vs_coop": round(ms / coop, 1) if ms and coop else "",
            }
        )
    with (folder.parent / "learners.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    lines = [
        "# Benign PromptFL per learner (10 clients x 16 shots, FedAvg, in-process; `experiments/learners.py`)",
        "",
        "The lr of each learner is chosen on the clients' validation split (`final_val_acc`); `ms_per_step` is the",
        "median local step, all learners timed side by side in one process (`step_cost.json`).",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (folder.parent / "learners.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    """Run one learner, the step-cost comparison, or the summary."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--learner", choices=LEARNERS.names(), default="coop")
    ap.add_argument("--tokens", type=int, default=4, help="visual prompt tokens per block")
    ap.add_argument("--lr", type=float, default=None, help="local lr (default: the run config's)")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--val", type=int, default=1000, help="validation images from the clients' side")
    ap.add_argument("--step-cost", action="store_true", help="time every learner's local step instead")
    ap.add_argument("--step-repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summary", default="", help="folder of run JSONs: write the summary table and stop")
    ap.add_argument("-c", "--config", default="", help="run-config overrides, as fedsec run -c")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.summary:
        summary(Path(args.summary))
        return
    torch.set_num_threads(args.threads)
    over = parse_overrides(args.config.split()) if args.config else {}
    if args.lr is not None:
        over["lr"] = args.lr
    cfg = RunConfig.from_mapping(over)
    if args.step_cost:
        data, names = local_data_for(cfg, 0, args.clients)
        models = {k: build(cfg, k, args.tokens, tuple(names)) for k in LEARNERS.names()}
        res = {"ms_per_step": step_cost(cfg, models, data, args.step_repeats), "tokens": args.tokens}
        res.update({"local_steps": cfg.local_steps, "batch_size": cfg.batch_size, "threads": args.threads})
    else:
        res = run(cfg, args.learner, args.tokens, args.clients, args.eval_every, args.val)
    print(json.dumps({k: v for k, v in res.items() if k != "history"}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
