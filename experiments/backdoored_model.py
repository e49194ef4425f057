"""Evaluate backdoored and defended CLIP checkpoints (issue 14): zero-shot clean accuracy, ASR, linear-probe ASR.

For the clean embedded model and every checkpoint that ``python -m
fedsec.backdoor_clip`` wrote under ``--runs`` (``<attack>`` and
``<attack>+<defense>`` directories), each verified against its manifest's
SHA-256:

* ``clean_acc``: zero-shot accuracy with the hand-written prompt ``a photo of a {}.``
  and the canonical class names;
* ``asr``: the share of non-target images carrying the attack's trigger that
  this zero-shot classifier assigns to the target class (BadCLIP's ASR);
* ``linear_probe_acc`` / ``linear_probe_asr``: a logistic regression on frozen
  features of clean images of the clients' pool (the ``train`` split,
  ``--probe-per-class`` per class), on clean and on triggered test images;
* ``clean_acc_synonym`` / ``asr_synonym``: the same zero-shot figures with each
  class's first pretraining synonym instead of its canonical name (on
  ``fedsec-tiny-clip`` v1, which never saw the canonical names, the canonical
  zero-shot classifier is at chance and only these are meaningful);
* ``promptfl_acc`` / ``promptfl_asr``: the federated view (``--promptfl-rounds`` > 0): benign
  PromptFL on the checkpoint (10 clients, none malicious, FedAvg, shared context, the run
  config's defaults, in-process as ``experiments/inprocess_fl.py``), then the final global
  prompt's clean accuracy and ASR with the checkpoint's trigger on the same images.

The clean model gets one row per trigger (``attack=none``): what each trigger
does to a model that was never poisoned.

Run (writes ``experiments/results/backdoored_model.csv`` and ``.md``)::

    .venv/bin/python experiments/backdoored_model.py --runs runs/backdoored

``--split train`` evaluates on held-out images of the clients' pool instead of
the test split (for choosing settings; writes ``backdoored_model_val.*``).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from fedsec.backdoor_clip import ATTACKS, load_checked, load_trigger, manifest_path
from fedsec.config import RunConfig
from fedsec.data import k_shot_indices, load_dataset, prepare_images
from fedsec.metrics import accuracy, attack_success_rate
from fedsec.models.captions import SYNONYMS
from fedsec.models.factory import create_clip, embedded_manifest, sha256_file

RESULTS = Path(__file__).parent / "results"
COLUMNS = [
    "attack",
    "defense",
    "rate",
    "trigger",
    "model",
    "clean_acc",
    "asr",
    "linear_probe_acc",
    "linear_probe_asr",
    "promptfl_acc",
    "promptfl_asr",
    "clean_acc_synonym",
    "asr_synonym",
    "checkpoint_sha256",
    "command",
]


@torch.no_grad()
def text_classifier(clip, names: list[str], template: str = "a photo of a {}.") -> torch.Tensor:
    """L2-normalised text features of ``template`` filled with each class name (on the CPU)."""
    tokens = clip.tokenizer([template.format(n) for n in names]).to(clip.device)
    return F.normalize(clip.model.encode_text(tokens), dim=-1).cpu()


def evaluate(clip, triggers: dict, images, labels, probe_x, probe_y, classnames, target: int) -> list[dict]:
    """All figures of one checkpoint, one dict per trigger in ``triggers``."""
    feats = clip.encode_images_batched(images)
    heads = {"": text_classifier(clip, classnames), "_synonym": text_classifier(clip, [s[0] for s in SYNONYMS])}
    probe = LogisticRegression(max_iter=2000, C=10.0).fit(clip.encode_images_batched(probe_x).numpy(), probe_y)
    base = {f"clean_acc{k}": accuracy((feats @ t.T).argmax(-1), labels) for k, t in heads.items()}
    base["linear_probe_acc"] = accuracy(probe.predict(feats.numpy()), labels)
    others = labels != target
    rows = []
    for name, trigger in triggers.items():
        with torch.no_grad():
            trig = clip.encode_images_batched(trigger(images[torch.from_numpy(others)]))
        row = {"trigger": name, **base}
        for k, t in heads.items():
            row[f"asr{k}"] = attack_success_rate((trig @ t.T).argmax(-1), labels[others], target)
        row["linear_probe_asr"] = attack_success_rate(probe.predict(trig.numpy()), labels[others], target)
        rows.append(row)
    return rows


def promptfl_figures(
    model_name: str, pretrained: str, triggers: dict, images, labels, classnames, target: int, rounds: int
) -> dict[str, dict]:
    """Benign PromptFL (10 clients, FedAvg) on a checkpoint; the final prompt's accuracy and ASR per trigger."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from experiments.inprocess_fl import run_inprocess
    from fedsec.metrics import predict
    from fedsec.node import clip_for, prompt_model_for, set_ctx

    cfg = RunConfig.from_mapping(
        {"model": model_name, "pretrained": pretrained, "attack": "none", "num-server-rounds": rounds, "seed": 0}
    )
    res = run_inprocess(cfg, 10, verbose=False, local_eval=False)
    clip = clip_for(cfg)
    model = prompt_model_for(cfg, tuple(classnames))
    set_ctx(model, res["final_ctx"])
    acc = accuracy(predict(model, clip.encode_images_batched(images)), labels)  # one prompt: once for every trigger
    others = labels != target
    out = {}
    for name, trigger in triggers.items():
        with torch.no_grad():
            trig = clip.encode_images_batched(trigger(images[torch.from_numpy(others)]))
        out[name] = {
            "promptfl_acc": acc,
            "promptfl_asr": attack_success_rate(predict(model, trig), labels[others], target),
        }
    return out


def cached(cache: Path | None, key: str, compute):
    """``compute()``, memoised as JSON in ``cache/<key>.json`` (key: checkpoint SHA-256 and settings)."""
    if cache is None:
        return compute()
    path = cache / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return value


def main() -> None:
    """Evaluate every checkpoint found and write the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/backdoored", help="directory of the checkpoints")
    ap.add_argument(
        "--model", default=RunConfig.model, help="(default: the run config's default model) the clean embedded model"
    )
    ap.add_argument("--split", default="test", choices=["test", "train"], help="test, or the clients' pool (val)")
    ap.add_argument("--samples", type=int, default=2000, help="evaluation images (seeded subset; 0: all)")
    ap.add_argument("--probe-per-class", type=int, default=100, help="clean clients' images per class for the probe")
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="torch device of the encoders (cpu, cuda, ...)")
    ap.add_argument(
        "--promptfl-rounds", type=int, default=20, help="rounds of benign PromptFL on each checkpoint (0: skip)"
    )
    ap.add_argument("--only", default="", help="comma-separated run directories to evaluate (fills the cache)")
    ap.add_argument("--out", default="", help="CSV path (default experiments/results/backdoored_model[_val].csv)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    runs = Path(args.runs)

    pool = load_dataset("fashion-mnist", "train")
    probe_idx = k_shot_indices(pool.labels, np.arange(len(pool)), args.probe_per_class, 0)
    probe_x = prepare_images(pool.images[probe_idx], 32, pool.fit)
    probe_y = pool.labels[probe_idx]
    if args.split == "test":
        data = load_dataset("fashion-mnist", "test")
        cand = np.arange(len(data))
    else:  # clients' pool images not used by the probe
        data = pool
        cand = np.setdiff1d(np.arange(len(pool)), probe_idx)
    rng = np.random.default_rng(2024)
    idx = np.sort(rng.choice(cand, size=args.samples, replace=False)) if args.samples else cand
    images = prepare_images(data.images[idx], 32, data.fit)
    labels = data.labels[idx]

    triggers = {a: load_trigger(runs / a / "trigger.pt") for a in ATTACKS if (runs / a / "trigger.pt").exists()}
    cache = runs / "eval_cache"
    tag = f"{args.split}_{args.samples}_{args.probe_per_class}_{args.target}"
    rows = []
    clean = create_clip(args.model, "embedded", device=args.device)
    manifest = embedded_manifest(args.model)
    trig_sha = "_".join(sha256_file(runs / a / "trigger.pt")[:8] for a in triggers)
    clean_rows = cached(
        cache,
        f"clean_{clean.checkpoint_sha256[:16]}_{trig_sha}_{tag}",
        lambda: evaluate(clean, triggers, images, labels, probe_x, probe_y, data.classnames, args.target),
    )
    if args.promptfl_rounds:
        fl = cached(
            cache,
            f"promptfl{args.promptfl_rounds}_clean_{clean.checkpoint_sha256[:16]}_{trig_sha}_{tag}",
            lambda: promptfl_figures(
                args.model, "embedded", triggers, images, labels, data.classnames, args.target, args.promptfl_rounds
            ),
        )
        for r in clean_rows:
            r.update(fl.get(r["trigger"], {}))
    for r in clean_rows:
        rows.append({"attack": "none", "defense": "none", "rate": 0.0, "model": args.model, **r})
        rows[-1]["command"] = manifest["command"]
        rows[-1]["checkpoint_sha256"] = clean.checkpoint_sha256
    for d in sorted(m.parent for m in runs.glob("*/model.json")):
        if not (d / "model.pt").exists() or not (d / "trigger.pt").exists():
            continue
        if args.only and d.name not in args.only.split(","):
            continue
        clip = load_checked(d / "model.pt", device=args.device)
        m = json.loads((d / "model.json").read_text())
        attack, defense = m.get("attack", "none"), m.get("defense", "none")
        rate = m.get("poison", {}).get("rate")
        if rate is None:  # a defense: the rate of the checkpoint it started from
            src = manifest_path(m["source"]["checkpoint"])
            rate = json.loads(src.read_text()).get("poison", {}).get("rate", "") if src.exists() else ""
        (r,) = cached(
            cache,
            f"{d.name}_{clip.checkpoint_sha256[:16]}_{tag}",
            partial(
                evaluate,
                clip,
                {attack: load_trigger(d / "trigger.pt")},
                images,
                labels,
                probe_x,
                probe_y,
                data.classnames,
                args.target,
            ),
        )
        if args.promptfl_rounds:
            fl = cached(
                cache,
                f"promptfl{args.promptfl_rounds}_{d.name}_{clip.checkpoint_sha256[:16]}_{tag}",
                partial(
                    promptfl_figures,
                    m["model"],
                    str(d / "model.pt"),
                    {attack: load_trigger(d / "trigger.pt")},
                    images,
                    labels,
                    data.classnames,
                    args.target,
                    args.promptfl_rounds,
                ),
            )
            r = {**r, **fl[attack]}
        rows.append(
            {
                "attack": attack,
                "defense": defense,
                "rate": rate,
                "model": f"{m['model']} <- {d.name}",
                **r,
                "checkpoint_sha256": clip.checkpoint_sha256,
                "command": m["command"],
            }
        )
        print(json.dumps({k: rows[-1][k] for k in COLUMNS[:9]}), flush=True)
    for row in rows:
        row.setdefault("promptfl_acc", "")
        row.setdefault("promptfl_asr", "")
        for k in COLUMNS:
            if isinstance(row.get(k), float):
                row[k] = round(row[k], 4)
    suffix = "" if args.split == "test" else "_val"
    out = Path(args.out) if args.out else RESULTS / f"backdoored_model{suffix}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    head = COLUMNS[:13]
    lines = [
        f"# Backdoored CLIP: zero-shot and linear-probe ASR ({args.split} split, {len(idx)} images)",
        "",
        f"Clean model `{args.model}`; target class {args.target} ({data.classnames[args.target]}); "
        f"linear probe on {args.probe_per_class} clean clients' images per class; "
        f"{time.time() - t0:.0f} s. Commands: `command` column of the CSV and `docs/badclip.md`.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        cells = [f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in head]
        lines.append("| " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
