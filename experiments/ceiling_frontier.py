"""What the model and the prompt allow, with no federation: the clean-accuracy / ASR frontier of one context.

The ceiling grid (``experiments/ceiling.py``) measures attacks; this measures the
model. Take a fixed trigger (e.g. the one a federated attack ended with) and the
federation's whole training pool (the ``clients`` clients' ``k-shot`` images,
1,600 by default), and train a single context centrally on

    ``CE(clean) + lam * CE(target | trigger(x))``

from the configured initial prompt, for every ``lam`` of a grid (``lam = 0`` is
the benign-only reference). Every image's clean and triggered frozen features are
encoded once, so a point of the frontier costs seconds. If no ``lam`` gives an
ASR of at least 90% at clean accuracy within 2 points of ``lam = 0``, no
aggregation scheme can: the context itself cannot hold both (for that trigger,
model and prompt length).

Each point is measured on the test split: clean accuracy on all images, ASR on
all non-target images with the trigger. Writes ``<out>/<name>.json`` (config,
trigger file and SHA-256, every point) and prints a table.

Run: ``.venv/bin/python experiments/ceiling_frontier.py --trigger DIR [-c "n-ctx=16 ctx-init=''"]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedsec.attacks.store import AttackerStore  # noqa: E402
from fedsec.config import RunConfig  # noqa: E402
from fedsec.data import load_dataset, prepare_images  # noqa: E402
from fedsec.metrics import accuracy, attack_success_rate, predict  # noqa: E402
from fedsec.models.prompt import get_ctx, set_ctx  # noqa: E402
from fedsec.node import clip_for, local_data_for, prompt_model_for  # noqa: E402
from fedsec.training import batches, sgd_for  # noqa: E402
from fedsec.triggers import trigger_from_dict  # noqa: E402


def train_point(
    model, clean: torch.Tensor, triggered: torch.Tensor, labels: torch.Tensor, target: int, lam: float, cfg, steps: int
) -> None:
    """Train ``model``'s context in place on ``CE(clean) + lam * CE(target | triggered)`` (SGD as the clients)."""
    ctx = model.prompt_learner.ctx
    opt = sgd_for(ctx, cfg.lr, cfg.momentum, cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    tgt = torch.full((len(labels),), target, dtype=torch.long)
    for idx in batches(len(labels), cfg.batch_size, steps, gen):
        loss = F.cross_entropy(model.logits_from_features(clean[idx]), labels[idx])
        if lam > 0:
            loss = loss + lam * F.cross_entropy(model.logits_from_features(triggered[idx]), tgt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trigger", required=True, help="attacker store folder (round_NNNN/p*.pt; newest round averaged)")
    ap.add_argument("-c", "--config", default="", help="run-config overrides (TOML), e.g. \"n-ctx=16 ctx-init=''\"")
    ap.add_argument("--clients", type=int, default=10, help="clients whose k-shot pools form the training set")
    ap.add_argument("--lams", default="0,0.05,0.1,0.2,0.5,1,2", help="comma-separated backdoor weights")
    ap.add_argument("--steps", type=int, default=1000, help="SGD steps per point")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "ceiling" / "frontier"))
    ap.add_argument("--name", default="frontier")
    args = ap.parse_args()
    import tomllib

    cfg = RunConfig.from_mapping(tomllib.loads(args.config.replace(" ", "\n")) if args.config else {})
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    clip = clip_for(cfg)
    state = AttackerStore(Path(args.trigger)).load()
    if state is None:
        raise SystemExit(f"no trigger under {args.trigger} (expected round_NNNN/p*.pt)")
    trigger = trigger_from_dict(state)
    files = sorted(Path(args.trigger).glob("round_*/p*.pt"))
    newest = [f for f in files if f.parent == files[-1].parent]
    pool = [local_data_for(cfg, pid, args.clients)[0] for pid in range(args.clients)]
    images = torch.cat([d.images for d in pool])
    labels = torch.cat([d.labels for d in pool])
    clean = torch.cat([d.features for d in pool])
    with torch.no_grad():
        triggered = clip.encode_images_batched(trigger(images))
        test = load_dataset(cfg.dataset, "test", cfg.data_root)
        timg = prepare_images(test.images, clip.image_size, test.fit)
        tfeat = clip.encode_images_batched(timg)
        nontarget = np.flatnonzero(test.labels != cfg.target_label)
        ttrig = clip.encode_images_batched(trigger(timg[nontarget]))
    model = prompt_model_for(cfg, tuple(test.classnames))
    init = get_ctx(model)
    points = []
    for lam in [float(x) for x in args.lams.split(",")]:
        set_ctx(model, init)
        train_point(model, clean, triggered, labels, cfg.target_label, lam, cfg, args.steps)
        with torch.no_grad():
            acc = accuracy(predict(model, tfeat), test.labels)
            asr = attack_success_rate(predict(model, ttrig), test.labels[nontarget], cfg.target_label)
        points.append({"lam": lam, "clean_acc": acc, "asr": asr})
        print(f"lam {lam:<5} clean {100 * acc:.1f}%  asr {100 * asr:.1f}%", flush=True)
    ref = points[0]["clean_acc"] if points and points[0]["lam"] == 0 else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "name": args.name,
        "config": args.config,
        "model": cfg.model,
        "checkpoint_sha256": clip.checkpoint_sha256,
        "n_ctx": cfg.n_ctx,
        "ctx_init": cfg.ctx_init,
        "class_specific": cfg.class_specific,
        "trigger_files": {
            str(f.relative_to(ROOT) if f.is_relative_to(ROOT) else f): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in newest
        },
        "train_images": len(labels),
        "steps": args.steps,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "points": points,
        "benign_clean_acc": ref,
        "wall_s": round(time.perf_counter() - t0, 1),
        "command": "python experiments/ceiling_frontier.py " + " ".join(sys.argv[1:]),
    }
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    if ref is not None:
        ok = [p for p in points if p["asr"] >= 0.9 and p["clean_acc"] >= ref - 0.02]
        print(f"points with ASR >= 90% and clean within 2 points of lam=0 ({100 * ref:.1f}%): {[p['lam'] for p in ok]}")


if __name__ == "__main__":
    main()
