"""Benchmark: a benign client's training step vs the text-encoder-only floor, side by side.

The image encoder is frozen and a benign client trains on cached features, so
its step should cost little more than one forward+backward of the text
encoder over the class prompts. Both are timed interleaved in one process
(``--repeats`` rounds of ``--steps`` each) and reported as a ratio.
Writes ``experiments/results/bench_step.json``.

Run: ``.venv/bin/python experiments/bench_step.py``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fedsec.config import RunConfig
from fedsec.node import local_data_for, prompt_model_for
from fedsec.training import train_on_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a simulated client gets 1)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_step.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = RunConfig.from_mapping({})
    data, names = local_data_for(cfg, 0, 10)
    model = prompt_model_for(cfg, tuple(names))
    pl, enc = model.prompt_learner, model.text_encoder

    def client_steps() -> float:
        t0 = time.perf_counter()
        train_on_features(model, data.features, data.labels, args.steps, cfg.batch_size, cfg.lr, cfg.momentum)
        return (time.perf_counter() - t0) / args.steps

    def floor_steps() -> float:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            out = enc(pl(), pl.tokenized)
            out.sum().backward()
            pl.ctx.grad = None
        return (time.perf_counter() - t0) / args.steps

    client_steps(), floor_steps()  # warm-up
    client, floor = [], []
    for _ in range(args.repeats):
        client.append(client_steps())
        floor.append(floor_steps())
    res = {
        "client_step_ms": 1000 * statistics.median(client),
        "text_encoder_fwd_bwd_ms": 1000 * statistics.median(floor),
        "ratio": statistics.median(client) / statistics.median(floor),
        "threads": args.threads,
        "batch_size": cfg.batch_size,
        "num_classes": len(names),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
