"""In-process check of activation bounds against the final poisoned prompt of an fm-poison run.

Usage: ``python experiments/fm_bounds_check.py [granularity:quantile:steps:penalty ...]``, e.g.
``channel:0.95:20:0.5 neuron:0.7:20:0.5``. Reads ``runs/fm-poison/final_prompt.npz`` (from
``fedsec run experiments/conf/fm_poison.toml -c "run-dir='$PWD/runs/fm-poison'"``); 1,000 test images.
"""

from __future__ import annotations

import sys
import tempfile
import time

import numpy as np
import tomllib
import torch

from fedsec.activation_bounds import bounded, init_bounds, optimize_bounds, resolve_layers
from fedsec.attacks.fm_poison import FMPoison
from fedsec.config import RunConfig
from fedsec.data import load_dataset, prepare_images
from fedsec.metrics import accuracy, attack_success_rate, predict
from fedsec.node import clip_for, prompt_model_for, set_ctx
from fedsec.synthetic import synthetic_provider


def main(specs: list[str]) -> None:
    """Print clean accuracy and ASR without bounds, then for each bound spec after init and optimisation."""
    torch.set_num_threads(1)
    cfg = RunConfig.from_mapping(tomllib.loads(open("experiments/conf/fm_poison.toml").read()))
    clip = clip_for(cfg)
    test = load_dataset(cfg.dataset, "test", cfg.data_root)
    keep = np.sort(np.random.default_rng(1).choice(len(test), 1000, replace=False))
    images = prepare_images(test.images[keep], clip.image_size, test.fit)
    labels = torch.from_numpy(test.labels[keep])
    nontarget = np.flatnonzero(test.labels[keep] != cfg.target_label)
    store = tempfile.mkdtemp()
    synthetic = synthetic_provider(cfg, test.classnames, clip.image_size, store)()
    triggered = FMPoison(cfg, store).load_trigger()(images[nontarget])
    model = prompt_model_for(cfg, tuple(test.classnames))
    set_ctx(model, np.load("runs/fm-poison/final_prompt.npz")["ctx"])
    with torch.no_grad():
        text = model.text_features()

    def evaluate(bounds) -> str:
        with bounded(clip.model, bounds):
            acc = accuracy(predict(model, clip.encode_images_batched(images)), labels)
            pred = predict(model, clip.encode_images_batched(triggered))
        return f"acc {acc:.3f} asr {attack_success_rate(pred, labels[nontarget], cfg.target_label):.3f}"

    print("no bounds", evaluate(None), flush=True)
    layers = resolve_layers(clip.model, ["visual.transformer.resblocks.*"])
    for spec in specs:
        gran, quantile, steps, penalty = spec.split(":")
        t0 = time.time()
        bounds = init_bounds(clip.model, clip.encode_images, synthetic.images, layers, gran, float(quantile))
        after_init = evaluate(bounds)
        stats = optimize_bounds(
            clip.model,
            lambda x: clip.logit_scale * clip.encode_images(x) @ text.T,
            synthetic.images,
            bounds,
            steps=int(steps),
            lr=0.05,
            penalty=float(penalty),
        )
        print(spec, "init", after_init, "opt", evaluate(bounds), f"shrink {stats['bound-shrink']:.2f}", flush=True)
        print(f"  {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
