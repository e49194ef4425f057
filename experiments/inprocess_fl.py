"""The same federated prompt learning as the Flower app, as a plain in-process loop.

Benign clients only (FedAvg over ctx, weighted by examples), the same data,
partitions, model, local training and evaluation code as the ClientApp and
ServerApp. Used for quick hyper-parameter checks and as the in-process side of
the Flower-overhead benchmark (``experiments/bench_flower.py``).

Run: ``.venv/bin/python experiments/inprocess_fl.py -c "lr=0.002 local-steps=25"``
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fedsec.config import RunConfig
from fedsec.data import load_dataset, prepare_images
from fedsec.launch import parse_overrides
from fedsec.metrics import accuracy, predict, zero_shot_accuracy
from fedsec.node import clip_for, get_ctx, local_data_for, prompt_model_for, seed_everything, set_ctx
from fedsec.training import train_on_features


def run_inprocess(cfg: RunConfig, num_clients: int, verbose: bool = True) -> dict:
    """FedAvg over ``num_clients`` benign clients; returns per-round accuracies and timings."""
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    clip = clip_for(cfg)
    test = load_dataset(cfg.dataset, "test", cfg.data_root)
    feats = clip.encode_images_batched(prepare_images(test.images, clip.image_size, test.fit))
    labels = torch.from_numpy(test.labels)
    model = prompt_model_for(cfg, tuple(test.classnames))
    zs = zero_shot_accuracy(clip, test.classnames, feats, labels, cfg.prompt_template)
    ctx = get_ctx(model)
    accs = [accuracy(predict(model, feats), labels)]
    t_clients = 0.0
    for rnd in range(1, cfg.num_server_rounds + 1):
        new, weights = [], []
        tc = time.perf_counter()
        for pid in range(num_clients):
            data, _ = local_data_for(cfg, pid, num_clients)
            set_ctx(model, ctx)
            seed = cfg.seed * 100_003 + rnd * 1_009 + pid
            seed_everything(seed)
            train_on_features(
                model,
                data.features,
                data.labels,
                cfg.local_steps,
                cfg.batch_size,
                cfg.lr,
                cfg.momentum,
                cfg.weight_decay,
                seed,
            )
            new.append(get_ctx(model))
            weights.append(len(data))
        t_clients += time.perf_counter() - tc
        ctx = np.average(np.stack(new), axis=0, weights=weights).astype(np.float32)
        set_ctx(model, ctx)
        accs.append(accuracy(predict(model, feats), labels))
        if verbose:
            print(f"round {rnd}: clean_acc {100 * accs[-1]:.1f}%", flush=True)
    return {
        "zero_shot_acc": zs,
        "accs": accs,
        "final_acc": accs[-1],
        "wall_s": time.perf_counter() - t0,
        "client_s": t_clients,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-c", "--run-config", action="append", default=[])
    ap.add_argument("--num-clients", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = RunConfig.from_mapping(parse_overrides(args.run_config))
    res = run_inprocess(cfg, args.num_clients)
    print(json.dumps({k: v for k, v in res.items() if k != "accs"}, indent=2))


if __name__ == "__main__":
    main()
