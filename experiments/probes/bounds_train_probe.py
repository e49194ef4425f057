"""How well does a prompt still learn on features clamped by activation bounds?

Usage::

    python experiments/probes/bounds_train_probe.py RUN_DIR ROUND [STEPS]

Learns two-sided bounds on ``visual.ln_pre`` and the image blocks at the global prompt of
``RUN_DIR/checkpoints/round_ROUND.npz`` (as the server does in that round: the synthetic images the
checkpoint's benign-only prompt agrees with, 0.9 / 0.1-quantiles, 20 KL steps with several penalties and
trims), then trains that prompt for ``STEPS`` (100) SGD steps on 1,600 training images encoded under the
bounds, as the clients do with ``bounds-client-training = true``, and prints the test accuracy (1,500
images) and ASR under the same bounds; the first line is the same training without bounds.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import tomllib
import torch

from fedsec.activation_bounds import bounded, init_bounds, optimize_bounds, resolve_layers
from fedsec.attacks.fm_poison import FMPoison
from fedsec.config import RunConfig
from fedsec.data import load_dataset, prepare_images
from fedsec.metrics import accuracy, attack_success_rate, predict
from fedsec.node import clip_for, prompt_model_for, set_ctx
from fedsec.synthetic import build_synthetic_set
from fedsec.training import train_on_features

#: (quantile, KL steps, penalty, trim) of the bounds compared.
VARIANTS = [(0.9, 20, 0.5, 0.0), (0.9, 20, 0.5, 0.05), (0.9, 20, 0.5, 0.1), (0.9, 20, 0.25, 0.1), (0.95, 20, 0.5, 0.1)]


def main(run: Path, round_: int, steps: int = 100) -> None:
    """Print accuracy and ASR after training under no bounds and under each variant."""
    torch.set_num_threads(1)
    cfg = RunConfig.from_mapping(tomllib.loads(Path("experiments/conf/fm_poison_bounds_twosided.toml").read_text()))
    clip = clip_for(cfg)
    train = load_dataset(cfg.dataset, "train", cfg.data_root)
    test = load_dataset(cfg.dataset, "test", cfg.data_root)
    rng = np.random.default_rng(5)
    tr = np.sort(rng.choice(len(train), 1600, replace=False))
    te = np.sort(rng.choice(len(test), 1500, replace=False))
    x_train = prepare_images(train.images[tr], clip.image_size, train.fit)
    y_train = torch.from_numpy(train.labels[tr])
    x_test = prepare_images(test.images[te], clip.image_size, test.fit)
    y_test = torch.from_numpy(test.labels[te])
    attack = FMPoison(cfg, tempfile.mkdtemp())
    clean = build_synthetic_set(cfg, test.classnames, clip.image_size)
    synth, synth_labels, _ = attack.poison_synthetic(clean.images, clean.labels, int(cfg.seed))
    nontarget = np.flatnonzero(test.labels[te] != cfg.target_label)
    triggered = attack.load_trigger()(x_test[nontarget])
    model = prompt_model_for(cfg, tuple(test.classnames))
    with np.load(run / "checkpoints" / f"round_{round_:04d}.npz") as ck:
        checkpoint = dict(ck)
    set_ctx(model, checkpoint["shadow_ctx"])
    with torch.no_grad():
        agree = (predict(model, clip.encode_images_batched(synth)) == synth_labels).numpy()
    kept = synth[torch.from_numpy(agree)]
    layers = resolve_layers(clip.model, str(cfg.get("bounds-layers")).split(","))

    def train_and_test(name: str, bounds) -> None:
        set_ctx(model, checkpoint["ctx"])
        with torch.no_grad(), bounded(clip.model, bounds):
            f_train = clip.encode_images_batched(x_train)
            f_test = clip.encode_images_batched(x_test)
            f_trig = clip.encode_images_batched(triggered)
        before = accuracy(predict(model, f_test), y_test)
        train_on_features(model, f_train, y_train, steps=steps, batch_size=32, lr=float(cfg.lr), seed=0)
        after = accuracy(predict(model, f_test), y_test)
        asr = attack_success_rate(predict(model, f_trig), y_test[nontarget], cfg.target_label)
        print(f"{name}: acc {before:.3f} -> {after:.3f} after {steps} steps, asr {asr:.3f}", flush=True)

    train_and_test("no bounds", None)
    for quantile, kl_steps, penalty, trim in VARIANTS:
        bounds = init_bounds(clip.model, clip.encode_images, kept, layers, "neuron", quantile, two_sided=True)
        set_ctx(model, checkpoint["ctx"])
        with torch.no_grad():
            text = model.text_features()
        optimize_bounds(
            clip.model,
            lambda z, text=text: clip.logit_scale * clip.encode_images(z) @ text.T,
            kept,
            bounds,
            steps=kl_steps,
            lr=0.05,
            penalty=penalty,
            trim=trim,
        )
        train_and_test(f"two-sided q {quantile}, {kl_steps} KL steps, penalty {penalty}, trim {trim}", bounds)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 100)
