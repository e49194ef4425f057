"""The same federated prompt learning as the Flower app, as a plain in-process loop.

FedAvg over ctx (weighted by examples) with the same data, partitions, model,
local training (benign, or the configured attack wrapping it) and evaluation
code as the ClientApp and ServerApp; ASR is measured on the test set with the
attackers' newest trigger. Used for quick hyper-parameter checks and as the in-process side of
the Flower-overhead benchmark (``experiments/bench.py``).

Run: ``.venv/bin/python experiments/inprocess_fl.py -c "lr=0.002 local-steps=25"``
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedsec.attacks import get_attack, malicious_partitions
from fedsec.config import RunConfig
from fedsec.data import load_dataset, prepare_images
from fedsec.launch import parse_overrides
from fedsec.metrics import accuracy, attack_success_rate, predict, zero_shot_accuracy
from fedsec.node import clip_for, get_ctx, local_data_for, prompt_model_for, seed_everything, set_ctx
from fedsec.training import train_on_features


def run_inprocess(
    cfg: RunConfig,
    num_clients: int,
    verbose: bool = True,
    store: Path | None = None,
    local_eval: bool | None = None,
    init_ctx: np.ndarray | None = None,
) -> dict:
    """FedAvg over ``num_clients`` clients; returns per-round accuracies, ASR and timings.

    ``verbose`` prints one line per round; ``local_eval`` (default: ``verbose``) also evaluates
    every malicious client's local prompt and trigger, which costs an encoding per attacker.
    ``init_ctx`` starts the federation from that context instead of the configured initial prompt
    (e.g. a converged benign prompt, to study an attack on it).
    """
    local_eval = verbose if local_eval is None else local_eval
    t0 = time.perf_counter()
    store = Path(store or tempfile.mkdtemp(prefix="fedsec-inprocess-")) / "attacker"
    malicious = (
        malicious_partitions(num_clients, cfg.num_malicious, cfg.seed, str(cfg.get("malicious-ids")))
        if cfg.attack != "none"
        else []
    )
    seed_everything(cfg.seed)
    clip = clip_for(cfg)
    test = load_dataset(cfg.dataset, "test", cfg.data_root)
    feats = clip.encode_images_batched(prepare_images(test.images, clip.image_size, test.fit))
    labels = torch.from_numpy(test.labels)
    images = prepare_images(test.images, clip.image_size, test.fit)
    nontarget = np.flatnonzero(test.labels != cfg.target_label)
    asr_idx = np.sort(
        np.random.default_rng(cfg.seed).choice(
            nontarget, size=min(cfg.asr_eval_samples or 10**9, len(nontarget)), replace=False
        )
    )
    asrs: list[float | None] = [None]
    model = prompt_model_for(cfg, tuple(test.classnames))
    zs = zero_shot_accuracy(clip, test.classnames, feats, labels, cfg.prompt_template)
    if init_ctx is not None:
        set_ctx(model, np.asarray(init_ctx, dtype=np.float32))
    ctx = get_ctx(model)
    accs = [accuracy(predict(model, feats), labels)]
    t_clients = 0.0
    round_s: list[float] = []
    for rnd in range(1, cfg.num_server_rounds + 1):
        t_round = time.perf_counter()
        new, weights = [], []
        tc = time.perf_counter()
        for pid in range(num_clients):
            data, _ = local_data_for(cfg, pid, num_clients)
            set_ctx(model, ctx)
            seed = cfg.seed * 100_003 + rnd * 1_009 + pid
            seed_everything(seed)
            if pid in malicious:
                attack = get_attack(cfg.attack)(cfg, store)
                if not attack.is_active(rnd):
                    attack = get_attack("none")(cfg, store)
                stats = attack.run(model, data, clip, rnd, pid, seed)
                if local_eval and attack.name != "none":
                    local_trig = attack.load_trigger()  # written by this round's attackers so far
                    with torch.no_grad():
                        tf = clip.encode_images_batched(local_trig(images[asr_idx]))
                    local_asr = attack_success_rate(predict(model, tf), test.labels[asr_idx], cfg.target_label)
                    print(
                        f"  malicious {pid}: local clean_acc {100 * accuracy(predict(model, feats), labels):.1f}%"
                        f"  local asr {100 * local_asr:.1f}%"
                        f"  {stats}",
                        flush=True,
                    )
            else:
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
        trigger = get_attack(cfg.attack)(cfg, store).load_trigger() if malicious else None
        if trigger is not None:
            with torch.no_grad():
                trig_feats = clip.encode_images_batched(trigger(images[asr_idx]))
            asrs.append(attack_success_rate(predict(model, trig_feats), test.labels[asr_idx], cfg.target_label))
        else:
            asrs.append(None)
        round_s.append(time.perf_counter() - t_round)
        if verbose:
            asr = "-" if asrs[-1] is None else f"{100 * asrs[-1]:.1f}%"
            print(f"round {rnd}: clean_acc {100 * accs[-1]:.1f}%  asr {asr}", flush=True)
    return {
        "zero_shot_acc": zs,
        "accs": accs,
        "asrs": asrs,
        "final_acc": accs[-1],
        "final_asr": asrs[-1],
        "final_ctx": ctx,
        "test_features": feats,  # the frozen test-set features, for callers that evaluate further
        "wall_s": time.perf_counter() - t0,
        "client_s": t_clients,
        "round_s": round_s,
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
    print(
        json.dumps(
            {k: v for k, v in res.items() if k not in ("accs", "asrs", "round_s", "final_ctx", "test_features")},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
