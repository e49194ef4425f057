"""DECREE: trigger inversion on a (possibly backdoored) image encoder (Feng et al., CVPR 2023).

DECREE looks for the smallest mask ``m`` and pattern ``p`` such that every image stamped with them,
``(1 - m) * x + m * p``, gets nearly the same embedding (mean pairwise cosine similarity above
``threshold``, 0.99): a backdoored encoder has such a shortcut with a small mask, a clean one needs
most of the image. The statistic is the L1 norm of the smallest such mask (over the 3 channels),
and its share of the image, ``pl1 = l1 / (3 H W)``.

Everything follows the authors' ``main.py`` (GitHub ``GiantSeaweed/DECREE``) for 32-px encoders
(their CIFAR-10 setting, the size of fedsec's embedded CLIP): a ``H x W`` mask and an
``H x W x 3`` pattern through ``tanh(.) / (2 - eps) + 0.5``, random initialisation; Adam with betas
(0.5, 0.9) at lr 1e-3 for 30 epochs, 0.1 until epoch 50, then 0.05; loss ``-cos + lambda * L1``
with lambda starting at 1e-3, times or over 5 after more than 5 steps above or below the
threshold, floor 1e-5; early stop when an epoch's mean similarity is above the threshold and the
best mask has not shrunk for more than 10 steps; at most 1000 epochs; 50 clean images (their
``sample(0.005)`` of the CIFAR-10 test set) as one batch. The defender's clean images here come from
the clients' pool, never the test split.

Run::

    python -m fedsec.decree runs/backdoored-v2-final/badclip/model.pt embedded --out experiments/results/decree.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-6


def self_cosine(features: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between different rows of ``features`` (the authors' ``compute_self_cos_sim``)."""
    f = F.normalize(features, dim=-1)
    sim = f @ f.T
    off = ~torch.eye(len(f), dtype=torch.bool, device=f.device)
    return sim[off].mean()


def _squash(param: torch.Tensor) -> torch.Tensor:
    """The authors' map of an unconstrained tensor to (0, 1)."""
    return torch.tanh(param) / (2 - EPS) + 0.5


def _unsquash(value: torch.Tensor) -> torch.Tensor:
    return torch.arctanh((value - 0.5) * (2 - EPS))


def lr_at(epoch: int, base_lr: float, thresholds: tuple[int, int] = (30, 50)) -> float:
    """The authors' ``adjust_learning_rate`` for 32-px encoders: ``base_lr``, then 0.1, then 0.05."""
    if epoch < thresholds[0]:
        return base_lr
    return 0.1 if epoch < thresholds[1] else 0.05


def invert(
    encode,
    images: torch.Tensor,
    *,
    threshold: float = 0.99,
    lr: float = 1e-3,
    epochs: int = 1000,
    batch_size: int = 256,
    lambda_init: float = 1e-3,
    lambda_min: float = 1e-5,
    adapt: float = 5.0,
    patience: int = 5,
    early_stop_patience: int = 10,
    seed: int = 0,
) -> dict:
    """DECREE's inversion against ``encode`` (``[0, 1]`` images -> embeddings).

    Parameters
    ----------
    encode : callable
        The frozen image encoder (gradients must flow to its input).
    images : torch.Tensor
        ``N x 3 x H x W`` clean images in ``[0, 1]`` (the defender's).
    threshold, lr, epochs, batch_size, lambda_init, lambda_min, adapt, patience, early_stop_patience, seed
        As the authors' ``main.py`` (see the module docstring).

    Returns
    -------
    dict
        ``l1`` (smallest successful mask's L1 over 3 channels; ``inf`` if none reached the threshold),
        ``pl1`` (``l1 / (3 H W)``), ``mask`` / ``pattern`` (numpy, or ``None``), ``epochs``, ``steps``,
        ``history`` (per epoch: mean similarity, mean L1, lambda).
    """
    gen = torch.Generator().manual_seed(seed)
    _, _, h, w = images.shape
    mask_p = _unsquash(torch.rand(h, w, generator=gen, dtype=torch.float64)).requires_grad_(True)
    pattern_p = _unsquash(torch.rand(3, h, w, generator=gen, dtype=torch.float64)).requires_grad_(True)
    opt = torch.optim.Adam([mask_p, pattern_p], lr=lr, betas=(0.5, 0.9))
    lam, up, down, lam_set = lambda_init, 0, 0, 0
    best, best_mask, best_pattern = float("inf"), None, None
    stop_best, stop_count = float("inf"), 0
    history, steps = [], 0
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["lr"] = lr_at(epoch, lr)
        sims, regs = [], []
        for idx in torch.randperm(len(images), generator=gen).split(batch_size):
            m = _squash(mask_p).clamp(0, 1).float()
            p = _squash(pattern_p).clamp(0, 1).float()
            stamped = ((1 - m) * images[idx] + m * p).clamp(0, 1)
            cos = self_cosine(encode(stamped))
            reg = 3 * m.sum()  # the authors' L1 of the (H, W, 3) mask
            loss = -cos + lam * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            c, r = float(cos.detach()), float(reg.detach())
            sims.append(c)
            regs.append(r)
            if c > threshold and r < best:
                best, best_mask, best_pattern = r, m.detach().clone(), p.detach().clone()
            if best < float("inf"):
                stop_count = stop_count + 1 if best >= stop_best else 0
            stop_best = min(best, stop_best)
            if lam < lambda_min and c > threshold:
                lam_set += 1
                if lam_set > 2 * patience:
                    lam, up, down = lambda_init, 0, 0
            else:
                lam_set = 0
            up, down = (up + 1, 0) if c > threshold else (0, down + 1)
            if up > patience:
                lam, up = (lam * adapt if lam < 1e5 else lam), 0
            elif down > patience:
                lam, down = (lam / adapt if lam >= lambda_min else lam), 0
        history.append({"epoch": epoch, "cos": float(np.mean(sims)), "l1": float(np.mean(regs)), "lambda": lam})
        if np.mean(sims) > threshold and stop_count > early_stop_patience:
            break
    return {
        "l1": best,
        "pl1": best / (3 * h * w),
        "mask": None if best_mask is None else best_mask.numpy(),
        "pattern": None if best_pattern is None else best_pattern.numpy(),
        "epochs": len(history),
        "steps": steps,
        "history": history,
    }


def defender_images(n: int, seed: int, model_name: str) -> torch.Tensor:
    """``n`` seeded clean images of the clients' pool (the defender's side; never the test split)."""
    from fedsec.caches import train_pool
    from fedsec.data import prepare_images
    from fedsec.models import catalog

    pool = train_pool("fashion-mnist", "")
    idx = np.sort(np.random.default_rng([seed, 0xDEC]).choice(len(pool), size=n, replace=False))
    size = int(catalog.model_config(model_name)["vision_cfg"]["image_size"])
    return prepare_images(pool.images[idx], size, pool.fit)


def summary(path: Path) -> str:
    """``<path>.md`` from the rows of ``python -m fedsec.decree`` runs: each checkpoint's PL1 per seed and mean.

    A checkpoint is *flagged* when its mean PL1 is under the smallest PL1 any seed gave the clean model
    (the defender's reference: the same inversion on an encoder known to be clean).
    """
    import pandas as pd

    df = pd.read_csv(path)
    clean = df[(df.attack == "none") & (df.defense == "none")].pl1
    ref = float(clean.min()) if len(clean) else float("nan")
    lines = [
        "# DECREE on the embedded CLIP and its backdoored / defended versions",
        "",
        f"From `{path.name}` (`python -m fedsec.decree ... --seed N`); PL1 = L1 of the smallest inverted mask reaching "
        "mean pairwise cosine 0.99, over 3 x H x W; each seed also draws the defender's 50 clean images. Flagged: "
        f"mean PL1 under the clean model's smallest ({ref:.4f}).",
        "",
        "| attack | defense | PL1 per seed | mean | flagged |",
        "|---|---|---|---|---|",
    ]
    for (attack, defense), g in df.groupby(["attack", "defense"], sort=False):
        g = g.sort_values("seed")
        per = " / ".join(f"{v:.4f}" for v in g.pl1)
        mean = float(g.pl1.mean())
        flag = "yes" if mean < ref and attack != "none" else ("reference" if attack == "none" else "no")
        lines.append(f"| {attack} | {defense} | {per} | {mean:.4f} | {flag} |")
    text = "\n".join(lines) + "\n"
    path.with_suffix(".md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    """Invert a trigger on each checkpoint given (``embedded`` = the clean shipped model); append rows to ``--out``."""
    from fedsec.backdoor_clip import load_checked, manifest_path
    from fedsec.config import RunConfig
    from fedsec.models.factory import create_clip

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="*", help="<dir>/model.pt written by fedsec.backdoor_clip, or 'embedded'")
    ap.add_argument("--summary", default="", help="a CSV of earlier runs: write its .md summary and stop")
    ap.add_argument("--model", default=RunConfig.model)
    ap.add_argument("--images", type=int, default=50, help="defender's clean images (the authors' 32-px setting: 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="", help="CSV to append one row per checkpoint to")
    args = ap.parse_args(argv)
    if args.summary:
        print(summary(Path(args.summary)))
        return
    torch.set_num_threads(args.threads)
    images = defender_images(args.images, args.seed, args.model)
    rows = []
    for ck in args.checkpoints:
        t0 = time.time()
        if ck == "embedded":
            clip, info = create_clip(args.model, "embedded"), {"attack": "none", "defense": "none"}
        else:
            clip = load_checked(ck)
            m = json.loads(manifest_path(ck).read_text())
            info = {"attack": m.get("attack", "none"), "defense": m.get("defense", "none")}
        for p in clip.model.parameters():
            p.requires_grad_(False)
        res = invert(clip.encode_images, images, seed=args.seed)
        row = {
            "checkpoint": ck,
            **info,
            "checkpoint_sha256": clip.checkpoint_sha256,
            "l1": round(res["l1"], 2),
            "pl1": round(res["pl1"], 4),
            "epochs": res["epochs"],
            "final_cos": round(res["history"][-1]["cos"], 4),
            "images": args.images,
            "seed": args.seed,
            "wall_s": round(time.time() - t0, 1),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        if res["mask"] is not None and ck != "embedded":
            np.savez(Path(ck).parent / "decree_trigger.npz", mask=res["mask"], pattern=res["pattern"])
    if args.out:
        path = Path(args.out)
        new = not path.exists()
        with path.open("a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
