"""In-process check of activation bounds against the final poisoned prompt of an fm-poison run.

Usage::

    python experiments/probes/fm_bounds_check.py [--split test|train] [--run DIR] [--round N] SPEC ...

    SPEC = layers:granularity:quantile:data:steps[:penalty[:sides[:trim]]]

e.g. ``visual.transformer.resblocks.*:neuron:0.95:clean:0``. ``layers`` are comma-separated module
patterns (see ``bounds-layers``); ``granularity`` is ``neuron`` or ``channel``; the bounds are
initialised at the ``quantile`` of the activations on ``data``, one of ``all`` (the poisoned synthetic
set, what the defense sees), ``clean`` (its unpoisoned part: an oracle the defender does not have) or
``filtered`` (the synthetic images whose label the run's benign-only, unfused prompt predicts: a filter
the server could run with the pre-fusion aggregate); then ``steps`` optimisation steps at ``penalty``
(default 0.5); ``sides`` is 1 (upper bounds, default) or 2 (also lower bounds at ``1 - quantile``);
``trim`` leaves the largest fraction of each batch's output distances out (``bounds-trim``, default 0).
Also prints the filter's precision and a check on the classifier head (per class and
embedding dimension upper bounds on the image-text similarity contributions).

Reads the global prompt of ``--run`` (default ``runs/fm-poison``, from
``fedsec run experiments/conf/fm_poison.toml -c "run-dir='$PWD/runs/fm-poison'"``): its final prompt, or with
``--round N`` the prompt of ``checkpoints/round_N.npz``. ``filtered`` uses the run's unfused shadow prompt
(the strategy state of a run with ``bounds-data = "filtered"``) where the run kept one for that round, else
the evaluation's benign-only prompt; a run with bounds also gets its own bounds evaluated. Evaluates on 1,000 images
(``--samples``, 0 = all)
of ``--split`` (``test`` by default; ``--split train`` takes them from the clients' half of the training set,
which no run evaluates on: choose settings there, then report them on the test set).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import tomllib
import torch

from fedsec.activation_bounds import ActivationBounds, bounded, init_bounds, optimize_bounds, resolve_layers
from fedsec.attacks.fm_poison import FMPoison
from fedsec.config import RunConfig
from fedsec.data import load_dataset, prepare_images
from fedsec.metrics import accuracy, attack_success_rate, predict
from fedsec.node import clip_for, prompt_model_for, set_ctx
from fedsec.synthetic import build_synthetic_set

RUN = Path("runs/fm-poison")


def main(
    specs: list[str], split: str = "test", run: Path = RUN, round_: int | None = None, samples: int = 1000
) -> None:
    """Print clean accuracy and ASR without bounds, then for each bound spec after init and optimisation."""
    torch.set_num_threads(1)
    cfg = RunConfig.from_mapping(tomllib.loads(Path("experiments/conf/fm_poison.toml").read_text()))
    clip = clip_for(cfg)
    test = load_dataset(cfg.dataset, split, cfg.data_root)
    n = len(test) if samples <= 0 else min(samples, len(test))
    keep = np.sort(np.random.default_rng(1).choice(len(test), n, replace=False))
    images = prepare_images(test.images[keep], clip.image_size, test.fit)
    labels = torch.from_numpy(test.labels[keep])
    nontarget = np.flatnonzero(test.labels[keep] != cfg.target_label)
    attack = FMPoison(cfg, tempfile.mkdtemp())
    clean = build_synthetic_set(cfg, test.classnames, clip.image_size)
    synth, synth_labels, poisoned_idx = attack.poison_synthetic(clean.images, clean.labels, int(cfg.seed))
    poisoned = np.zeros(len(synth_labels), dtype=bool)
    poisoned[poisoned_idx] = True
    triggered = attack.load_trigger()(images[nontarget])
    model = prompt_model_for(cfg, tuple(test.classnames))

    last = sorted((run / "checkpoints").glob("round_*.npz"))[-1]
    with np.load(last if round_ is None else run / "checkpoints" / f"round_{round_:04d}.npz") as ck:
        checkpoint = dict(ck)
    reference = checkpoint["shadow_ctx"]  # the evaluation's benign-only prompt: no fusion, no backdoor
    state_file = run / "checkpoints" / f"strategy_{int(checkpoint['round']):04d}.npz"
    if state_file.exists():
        with np.load(state_file) as st:
            shadow = [st[k] for k in st.files if k.endswith("bounds-shadow")]
        if shadow:
            reference = shadow[0]  # the defense's own unfused shadow prompt
            print(f"filter reference: the run's unfused shadow prompt ({state_file.name})", flush=True)
    set_ctx(model, reference)
    with torch.no_grad():
        agree = (predict(model, clip.encode_images_batched(synth)) == synth_labels).numpy()
    kept_bad, kept_good = (agree & poisoned).sum(), (agree & ~poisoned).sum()
    print(
        f"filter keeps {agree.sum()} of {len(agree)} synthetic images: "
        f"{kept_bad} of {poisoned.sum()} poisoned, {kept_good} of {(~poisoned).sum()} clean",
        flush=True,
    )
    subsets = {"all": np.ones_like(poisoned), "clean": ~poisoned, "filtered": agree}

    set_ctx(model, checkpoint["ctx"] if round_ is not None else np.load(run / "final_prompt.npz")["ctx"])
    with torch.no_grad():
        text = model.text_features()

    def evaluate(bounds) -> str:
        with bounded(clip.model, bounds):
            acc = accuracy(predict(model, clip.encode_images_batched(images)), labels)
            pred = predict(model, clip.encode_images_batched(triggered))
        return f"acc {acc:.3f} asr {attack_success_rate(pred, labels[nontarget], cfg.target_label):.3f}"

    print("no bounds", evaluate(None), flush=True)
    own = {k.split(":", 1)[1]: v for k, v in checkpoint.items() if k.startswith("bounds:")}
    if own:
        print("the run's own bounds", evaluate(ActivationBounds.from_arrays(own)), flush=True)
    _head_check(clip, text, synth, subsets, images, labels.numpy(), triggered, cfg.target_label)
    for spec in specs:
        layer_spec, gran, quantile, data, steps, *rest = spec.split(":")
        penalty = float(rest[0]) if rest else 0.5
        two_sided = len(rest) > 1 and rest[1] == "2"
        trim = float(rest[2]) if len(rest) > 2 else 0.0
        layers = resolve_layers(clip.model, layer_spec.split(","))
        x = synth[torch.from_numpy(subsets[data])]
        t0 = time.time()
        bounds = init_bounds(
            clip.model, clip.encode_images, x, layers, gran, float(quantile), two_sided=two_sided, channel_dim=-1
        )
        result = "init " + evaluate(bounds)
        if int(steps):
            optimize_bounds(
                clip.model,
                lambda z: clip.logit_scale * clip.encode_images(z) @ text.T,
                x,
                bounds,
                steps=int(steps),
                lr=0.05,
                penalty=penalty,
                trim=trim,
            )
            result += " | optimised " + evaluate(bounds)
        print(spec, result, f"({time.time() - t0:.0f} s)", flush=True)


def _head_check(clip, text, synth, subsets, images, labels, triggered, target) -> None:
    """Upper bounds on the per-(class, dimension) contributions ``img_d * text_cd`` of the similarity."""
    with torch.no_grad():

        def feats(x: torch.Tensor) -> np.ndarray:
            return torch.nn.functional.normalize(clip.encode_images_batched(x), dim=-1).numpy()

        fs, ft, fg = feats(synth), feats(images), feats(triggered)
    t = text.numpy()

    def scores(f: np.ndarray, tau: np.ndarray) -> np.ndarray:
        return np.minimum(f[:, None, :] * t[None], tau[None]).sum(-1)

    for data in ("clean", "all"):
        for q in (1.0, 0.95):
            tau = np.quantile(fs[subsets[data]][:, None, :] * t[None], q, axis=0)
            acc = (scores(ft, tau).argmax(1) == labels).mean()
            asr = (scores(fg, tau).argmax(1) == target).mean()
            print(f"head contributions, {data}, quantile {q}: acc {acc:.3f} asr {asr:.3f}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("specs", nargs="*", help="layers:granularity:quantile:data:steps[:penalty[:sides[:trim]]]")
    parser.add_argument("--split", default="test", choices=("test", "train"))
    parser.add_argument("--run", type=Path, default=RUN)
    parser.add_argument("--round", dest="round_", type=int, default=None)
    parser.add_argument("--samples", type=int, default=1000, help="evaluation images (0 = the whole split)")
    args = parser.parse_args()
    main(args.specs, args.split, args.run, args.round_, args.samples)
