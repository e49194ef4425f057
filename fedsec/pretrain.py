"""Contrastively pretrain the embedded tiny CLIP (``fedsec-tiny-clip``).

Run ``python -m fedsec.pretrain`` (about 13 minutes on 2 CPU cores). It is
deterministic from ``--seed`` on a given machine and writes
``fedsec/models/weights/fedsec-tiny-clip.pt`` (fp16 state dict) plus a
manifest with its SHA-256, the exact command and the measured zero-shot
accuracy.

Corpus: the ``pretrain`` half of Fashion-MNIST's train split (30,000 images,
disjoint from the clients' ``train`` half and from the ``test`` split), each
image paired with a caption drawn from 16 templates x 10 synonyms of its class
(:mod:`fedsec.models.captions`). The captions never use the canonical class
names, so zero-shot prompts with the canonical names are weak, as real CLIP is
on hard datasets, and prompt learning has something to learn.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fedsec.data import load_dataset, prepare_images
from fedsec.models.captions import SYNONYMS, TEMPLATES
from fedsec.models.factory import WEIGHTS_DIR, create_clip, register_configs, sha256_file


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a shift of up to 2 pixels."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def zero_shot_accuracy(clip, classnames: list[str], template: str = "a photo of a {}.") -> float:
    """Zero-shot accuracy on the Fashion-MNIST test split with one template."""
    test = load_dataset("fashion-mnist", "test")
    feats = clip.encode_images_batched(prepare_images(test.images, clip.image_size, test.fit))
    with torch.no_grad():
        text = F.normalize(clip.model.encode_text(clip.tokenizer([template.format(c) for c in classnames])), dim=-1)
    pred = (feats @ text.T).argmax(-1).numpy()
    return float((pred == test.labels).mean())


def main(argv: list[str] | None = None) -> None:
    """Pretrain and write the checkpoint and its manifest."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=7)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (smoke tests)")
    ap.add_argument("--captions-per-class", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup-steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--out", default=str(WEIGHTS_DIR / "fedsec-tiny-clip.pt"))
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fast only on CPUs with native bf16)")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    # AdamW moments of the ~49k token-embedding rows the captions never use decay
    # into denormal floats after a few hundred steps, which makes every step ~3x
    # slower on x86 CPUs: flush them to zero.
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    register_configs()
    import open_clip

    model = open_clip.create_model("fedsec-tiny-clip", pretrained=None)
    tokenizer = open_clip.get_tokenizer("fedsec-tiny-clip")
    model.train()
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

    data = load_dataset("fashion-mnist", "pretrain")
    images = prepare_images(data.images, 32, data.fit)
    labels = torch.from_numpy(data.labels)
    # Every (class, template, synonym) caption, tokenized once.
    captions = [[t.format(s) for t in TEMPLATES for s in syns] for syns in SYNONYMS]
    tokens = torch.stack([tokenizer(c) for c in captions])  # classes x captions x ctx
    n_cls, n_caps = tokens.shape[0], tokens.shape[1]

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    steps_per_epoch = len(labels) // args.batch_size
    total = steps_per_epoch * args.epochs
    if args.max_steps:
        total = min(total, args.max_steps)

    def lr_at(step: int) -> float:
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        frac = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
        return args.lr * 0.5 * (1 + math.cos(math.pi * frac))

    t0 = time.time()
    step = 0
    bar = tqdm(total=total, desc="pretrain fedsec-tiny-clip", unit="step", file=sys.stdout, mininterval=5)
    for _ in range(args.epochs):
        perm = torch.randperm(len(labels), generator=gen)
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[b * args.batch_size : (b + 1) * args.batch_size]
            x = (_augment(images[idx], gen) - mean) / std
            y = labels[idx]
            # Class-aware contrastive loss (UniCL style): a few captions per
            # class in every batch; an image's positives are all captions of
            # its class and vice versa. Encoding 30 captions instead of one
            # per image makes a step ~2x cheaper on CPU.
            cap_cls = torch.arange(n_cls).repeat_interleave(args.captions_per_class)
            cap = torch.randint(0, n_caps, (len(cap_cls),), generator=gen)
            text = tokens[cap_cls, cap]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                img_f = F.normalize(model.encode_image(x), dim=-1)
                txt_f = F.normalize(model.encode_text(text), dim=-1)
                logits = model.logit_scale.exp() * img_f.float() @ txt_f.float().T
            pos = (y.view(-1, 1) == cap_cls.view(1, -1)).float()
            loss = 0.5 * (
                F.cross_entropy(logits, pos / pos.sum(1, keepdim=True))
                + F.cross_entropy(logits.T, (pos / pos.sum(0, keepdim=True)).T)
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    bar.close()
    wall = time.time() - t0

    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, out)
    digest = sha256_file(out)
    clip = create_clip("fedsec-tiny-clip", str(out))
    zs = zero_shot_accuracy(clip, data.classnames)
    argv_used = argv if argv is not None else sys.argv[1:]
    manifest = {
        "file": out.name,
        "sha256": digest,
        "command": "python -m fedsec.pretrain " + " ".join(argv_used),
        "seed": args.seed,
        "epochs": args.epochs,
        "corpus": "fashion-mnist split 'pretrain' (30k, disjoint from clients and test); synonym captions",
        "train_wall_s": round(wall, 1),
        "torch": torch.__version__,
        "zero_shot_acc_test": round(zs, 4),
    }
    out.with_suffix(".json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
