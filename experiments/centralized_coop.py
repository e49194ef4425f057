"""Centralized 16-shot CoOp on the embedded model: the reference federated prompt learning is compared to.

Trains one prompt on k-shot-per-class examples drawn from the clients' pool
(the same pool and k as the federated default) and reports zero-shot and
CoOp accuracy on the test split. Writes ``experiments/results/centralized_coop.json``.

Run: ``.venv/bin/python experiments/centralized_coop.py [--steps 500]``; on model v2 with one shared
context: ``.venv/bin/python experiments/centralized_coop.py -c "model='fedsec-tiny-clip-v2' class-specific=false"
--out experiments/results/centralized_coop_v2_shared.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedsec.config import RunConfig
from fedsec.data import k_shot_indices, load_dataset, prepare_images
from fedsec.metrics import accuracy, predict, zero_shot_accuracy
from fedsec.node import clip_for, prompt_model_for, seed_everything
from fedsec.training import train_on_features


def main() -> None:
    """Train and evaluate centralized CoOp over ``--seeds`` and write the summary."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--k-shot", type=int, default=16)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("-c", "--run-config", action="append", default=[], help="key=value (prompt layout etc.)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "centralized_coop.json"))
    args = ap.parse_args()

    from fedsec.launch import parse_overrides

    cfg = RunConfig.from_mapping(parse_overrides(args.run_config))
    clip = clip_for(cfg)
    pool, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    test_feats = clip.encode_images_batched(prepare_images(test.images, clip.image_size, test.fit))
    test_labels = torch.from_numpy(test.labels)
    zs = zero_shot_accuracy(clip, test.classnames, test_feats, test_labels, cfg.prompt_template)
    results = []
    for seed in args.seeds:
        seed_everything(seed)
        t0 = time.perf_counter()
        idx = k_shot_indices(pool.labels, np.arange(len(pool)), args.k_shot, seed)
        part = pool.subset(idx)
        feats = clip.encode_images_batched(prepare_images(part.images, clip.image_size, part.fit))
        model = prompt_model_for(cfg, tuple(test.classnames))  # at the initial context for every seed
        train_on_features(
            model,
            feats,
            torch.from_numpy(part.labels),
            args.steps,
            cfg.batch_size,
            args.lr,
            cfg.momentum,
            cfg.weight_decay,
            seed,
        )
        acc = accuracy(predict(model, test_feats), test_labels)
        results.append({"seed": seed, "coop_acc": acc, "train_examples": len(idx), "wall_s": time.perf_counter() - t0})
        print(f"seed {seed}: centralized {args.k_shot}-shot CoOp {100 * acc:.1f}%  ({len(idx)} examples)")
    accs = [r["coop_acc"] for r in results]
    out = {
        "zero_shot_acc": zs,
        "coop_acc_mean": float(np.mean(accs)),
        "coop_acc_std": float(np.std(accs)),
        "k_shot": args.k_shot,
        "steps": args.steps,
        "lr": args.lr,
        "config": {k: cfg.get(k) for k in ("model", "n-ctx", "ctx-init", "class-specific", "class-token-position")},
        "runs": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    mean, std = 100 * out["coop_acc_mean"], 100 * out["coop_acc_std"]
    print(f"zero-shot {100 * zs:.1f}%  centralized CoOp {mean:.1f} ± {std:.1f}%")


if __name__ == "__main__":
    main()
