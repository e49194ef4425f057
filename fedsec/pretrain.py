"""Contrastively pretrain the embedded tiny CLIP (``fedsec-tiny-clip``, ``fedsec-tiny-clip-v2``).

Run ``python -m fedsec.pretrain`` for v1 (about 14 minutes on 2 CPU cores) or
``python -m fedsec.pretrain --model fedsec-tiny-clip-v2 --canonical-share S
--bf16 --threads 2`` for v2 (see ``docs/embedded-model.md`` for the exact
command and the chosen ``S``). It is deterministic from ``--seed`` on a given
machine and thread count and writes ``fedsec/models/weights/<model>.pt`` (fp16
state dict) plus a manifest with its SHA-256, the exact command, the caption
recipe and the measured zero-shot accuracy.

Corpus: the ``pretrain`` half of Fashion-MNIST's train split (30,000 images,
disjoint from the clients' ``train`` half and from the ``test`` split), each
image paired with captions drawn from its class's caption pool
(:func:`fedsec.models.captions.caption_pool`): 16 templates x 10 synonyms,
of which a share ``--canonical-share`` is replaced by captions with the
canonical class name (0 for v1, whose captions never use the canonical names).

Model selection without the test set: ``--holdout N`` keeps ``N`` images of
the pretraining split out of training (a seeded choice) and reports, after
every epoch, zero-shot accuracy and shared-context 16-shot CoOp accuracy on
them (``--no-test-eval`` skips the test-set figure of the manifest).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedsec.data import k_shot_indices, load_dataset, prepare_images
from fedsec.models.captions import TEMPLATES, caption_pool, uses_canonical_name
from fedsec.models.factory import WEIGHTS_DIR, FrozenCLIP, create_clip, register_configs, sha256_file

#: Seed of the choice of held-out validation images inside the pretraining split.
HOLDOUT_SEED = 12345


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


def holdout_split(n: int, holdout: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, validation)`` of the pretraining split; ``holdout`` images go to validation.

    Parameters
    ----------
    n : int
        Size of the pretraining split.
    holdout : int
        Validation images (0: everything trains).
    """
    if holdout <= 0:
        return np.arange(n), np.arange(0)
    perm = np.random.default_rng(HOLDOUT_SEED).permutation(n)
    return np.sort(perm[holdout:]), np.sort(perm[:holdout])


@torch.no_grad()
def _frozen(model: torch.nn.Module, tokenizer, name: str) -> FrozenCLIP:
    """A frozen eval-mode copy of a model under training, as a :class:`FrozenCLIP`."""
    import open_clip

    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    mean, std = tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD)
    return FrozenCLIP(frozen, tokenizer, name, "", "", "", 32, mean, std)


def validate(
    clip: FrozenCLIP,
    images: torch.Tensor,
    labels: np.ndarray,
    classnames: list[str],
    k_shot: int = 16,
    steps: int = 500,
    seed: int = 0,
) -> dict[str, float]:
    """Zero-shot and shared-context CoOp accuracy on held-out pretraining images.

    ``k_shot`` images per class train a shared 4-token context (init ``a photo
    of a``, SGD lr 0.002, momentum 0.9, batch 32, as ``experiments/centralized_coop.py``);
    both figures are measured on the other held-out images.

    Parameters
    ----------
    clip : FrozenCLIP
        The model to validate.
    images : torch.Tensor
        Held-out images in ``[0, 1]`` at 32 px.
    labels : np.ndarray
        Their labels.
    classnames : list of str
        Canonical class names.
    k_shot, steps, seed : int
        CoOp shots per class, steps and seed.
    """
    from fedsec.metrics import accuracy, predict
    from fedsec.metrics import zero_shot_accuracy as zs_acc
    from fedsec.models.prompt import prompt_model
    from fedsec.training import train_on_features

    with torch.random.fork_rng():
        feats = clip.encode_images_batched(images)
        shots = k_shot_indices(labels, np.arange(len(labels)), k_shot, seed)
        rest = np.setdiff1d(np.arange(len(labels)), shots)
        y = torch.from_numpy(labels)
        zs = zs_acc(clip, classnames, feats[rest], y[rest], "a photo of a {}.")
        model = prompt_model(clip, classnames, 4, "a photo of a", "end", False, seed)
        train_on_features(model, feats[shots], y[shots], steps, 32, 0.002, 0.9, 0.0, seed)
        coop = accuracy(predict(model, feats[rest]), y[rest])
    return {"val_zero_shot": zs, "val_coop_shared": coop}


def class_contrastive_loss(logits: torch.Tensor, y: torch.Tensor, cap_cls: torch.Tensor) -> torch.Tensor:
    """Class-aware (UniCL-style) symmetric contrastive loss of the pretraining.

    An image's positives are all captions of its class in the batch and vice
    versa; the targets of each row (column) are spread uniformly over them.

    Parameters
    ----------
    logits : torch.Tensor
        ``images x captions`` scaled cosine similarities.
    y : torch.Tensor
        Class of every image (a poisoned pair carries its caption's class).
    cap_cls : torch.Tensor
        Class of every caption.

    Notes
    -----
    A caption whose class has no image in the batch (a class drawn out of a
    batch, e.g. when poisoned pairs take its places) has no target: it stays a
    negative of every image but gets no term of its own, as an image without a
    caption of its class does. Without this its targets were ``0 / 0`` and the
    whole build turned NaN (seed 1 at a 10% rate).
    """
    pos = (y.view(-1, 1) == cap_cls.view(1, -1)).float()
    rows, cols = pos.sum(1) > 0, pos.sum(0) > 0
    return 0.5 * (
        F.cross_entropy(logits[rows], (pos / pos.sum(1, keepdim=True).clamp_min(1))[rows])
        + F.cross_entropy(logits.T[cols], (pos / pos.sum(0, keepdim=True).clamp_min(1)).T[cols])
    )


def with_pair_captions(
    text: torch.Tensor,
    cap_cls: torch.Tensor,
    y: torch.Tensor,
    own: torch.Tensor,
    pair_tokens: torch.Tensor,
    n_cls: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give the batch's images that carry their own caption (``own >= 0``) that caption, CLIP-style.

    Each such image gets a fresh class id ``n_cls + k`` shared only with its own caption
    (``pair_tokens[own]``), appended to the batch's captions, so in
    :func:`class_contrastive_loss` its one positive is its caption and the caption's one
    positive is the image, while the caption is a negative for every other image of the batch
    (a poisoned pair of ``backdoor/create_backdoor_data.py`` in a CLIP batch).

    Parameters
    ----------
    text, cap_cls : torch.Tensor
        The batch's class-pool captions (``C x ctx`` tokens) and their classes.
    y : torch.Tensor
        Class of every image of the batch.
    own : torch.Tensor
        Per image, the row of ``pair_tokens`` it is paired with, or -1.
    pair_tokens : torch.Tensor
        ``P x ctx`` tokenized own captions.
    n_cls : int
        Number of classes (the first free id).

    Returns
    -------
    tuple
        ``(text, cap_cls, y)`` with the own captions appended and the images relabelled.
    """
    mask = own >= 0
    k = int(mask.sum())
    if k == 0:
        return text, cap_cls, y
    ids = torch.arange(n_cls, n_cls + k, dtype=cap_cls.dtype)
    y = y.clone()
    y[mask] = ids.to(y.dtype)
    return torch.cat([text, pair_tokens[own[mask]]]), torch.cat([cap_cls, ids]), y


def train_contrastive(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    tokens: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    warmup_steps: int = 200,
    captions_per_class: int = 3,
    gen: torch.Generator | None = None,
    max_steps: int = 0,
    bf16: bool = False,
    extra_loss=None,
    on_epoch_end=None,
    desc: str = "pretrain",
    late_tokens: torch.Tensor | None = None,
    late_epoch: int = 0,
    pair_tokens: torch.Tensor | None = None,
    pair_of: torch.Tensor | None = None,
    augment: bool = True,
    device: str | torch.device = "cpu",
) -> list[float]:
    """The pretraining loop on given pairs, from the model's current weights.

    ``python -m fedsec.pretrain`` calls it on a fresh model; ``fedsec.backdoor_clip``
    calls it on a loaded checkpoint with poisoned pairs (an image's class is
    its caption's class) or clean pairs plus CleanCLIP's in-modal term.

    Parameters
    ----------
    model : torch.nn.Module
        open_clip CLIP, trained in place (train mode is set here).
    images : torch.Tensor
        ``N x 3 x 32 x 32`` images in ``[0, 1]``.
    labels : torch.Tensor
        Caption class of every image.
    tokens : torch.Tensor
        ``classes x captions x ctx`` tokenized caption pools.
    epochs, batch_size, lr, weight_decay, warmup_steps, captions_per_class : int or float
        As ``python -m fedsec.pretrain`` (AdamW, linear warmup, cosine decay).
    gen : torch.Generator, optional
        Source of every random draw (default: a generator seeded 0).
    max_steps : int
        Stop after this many steps (0: all epochs).
    bf16 : bool
        bf16 autocast.
    extra_loss : callable, optional
        ``extra_loss(model, batch) -> Tensor`` added to the loss; ``batch`` holds
        ``x`` (augmented ``[0, 1]`` images), ``img_f``, ``txt_f``, ``text``,
        ``cap_cls``, ``cap``, ``y``, ``gen``.
    on_epoch_end : callable, optional
        ``on_epoch_end(epoch, step, total, bar)`` after every epoch.
    desc : str
        Progress-bar label.
    late_tokens : torch.Tensor, optional
        Caption pools (same shape as ``tokens``) used from epoch ``late_epoch`` on.
    late_epoch : int
        First (0-based) epoch that draws from ``late_tokens``.
    pair_tokens, pair_of : torch.Tensor, optional
        Own captions (``P x ctx``) and, per image, the row of its own caption or -1: such an
        image is paired with that caption alone (:func:`with_pair_captions`), as a poisoned
        pair with a fixed caption is in CLIP training.
    augment : bool
        The random flip and 2-px shift of :func:`_augment` on every image.
    device : str or torch.device
        Where the model is trained. Every random draw stays on the CPU generator ``gen`` and each
        batch moves to ``device`` just before the forward pass, so the batches are the same on
        every device (the weights differ in float rounding only).

    Returns
    -------
    list of float
        The loss every 50 steps.
    """
    import open_clip
    from tqdm import tqdm

    if extra_loss is not None and pair_tokens is not None:
        raise ValueError("train_contrastive: extra_loss and pair_tokens cannot be combined (it sees pool captions)")
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    device = torch.device(device)
    model.to(device).train()
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=device).view(1, 3, 1, 1)
    n_cls, n_caps = tokens.shape[0], tokens.shape[1]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    steps_per_epoch = len(labels) // batch_size
    total = steps_per_epoch * epochs
    if max_steps:
        total = min(total, max_steps)

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        frac = (step - warmup_steps) / max(1, total - warmup_steps)
        return lr * 0.5 * (1 + math.cos(math.pi * frac))

    step = 0
    losses: list[float] = []
    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stdout, mininterval=5)
    for epoch in range(epochs):
        perm = torch.randperm(len(labels), generator=gen)
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[b * batch_size : (b + 1) * batch_size]
            raw = _augment(images[idx], gen) if augment else images[idx]
            x = (raw.to(device) - mean) / std
            y = labels[idx]
            # Class-aware contrastive loss (UniCL style): a few captions per
            # class in every batch; an image's positives are all captions of
            # its class and vice versa. Encoding 30 captions instead of one
            # per image makes a step ~2x cheaper on CPU.
            cap_cls = torch.arange(n_cls).repeat_interleave(captions_per_class)
            cap = torch.randint(0, n_caps, (len(cap_cls),), generator=gen)
            pool = tokens if late_tokens is None or epoch < late_epoch else late_tokens
            text = pool[cap_cls, cap]
            if pair_tokens is not None and pair_of is not None:
                text, cap_cls, y = with_pair_captions(text, cap_cls, y, pair_of[idx], pair_tokens, n_cls)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                img_f = F.normalize(model.encode_image(x), dim=-1)
                txt_f = F.normalize(model.encode_text(text.to(device)), dim=-1)
                logits = model.logit_scale.exp() * img_f.float() @ txt_f.float().T
            loss = class_contrastive_loss(logits, y.to(device), cap_cls.to(device))
            if extra_loss is not None:
                batch = {"x": raw, "img_f": img_f, "txt_f": txt_f, "text": text, "cap_cls": cap_cls, "cap": cap}
                batch["device"] = device
                loss = loss + extra_loss(model, {**batch, "y": y, "gen": gen})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            bar.update(1)
            if step % 50 == 0:
                losses.append(round(loss.item(), 4))
                bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, step, total, bar)
        if step >= total:
            break
    bar.close()
    return losses


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
    ap.add_argument("--model", default="fedsec-tiny-clip", help="model config name (fedsec-tiny-clip, -v2)")
    ap.add_argument("--canonical-share", type=float, default=0.0, help="share of captions with the canonical name")
    ap.add_argument("--caption-pool", type=int, default=160, help="captions per class pool (share resolution)")
    ap.add_argument(
        "--canonical-epochs", type=int, default=0, help="use canonical captions only in the first N epochs (0: all)"
    )
    ap.add_argument("--caption-seed", type=int, default=0, help="seed of the caption pools")
    ap.add_argument("--holdout", type=int, default=0, help="pretraining images kept out for validation")
    ap.add_argument("--val-every", type=int, default=1, help="validate every N epochs (and after the last)")
    ap.add_argument("--no-test-eval", action="store_true", help="do not measure test zero-shot (model selection)")
    ap.add_argument("--out", default="", help="checkpoint path (default: fedsec/models/weights/<model>.pt)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fast only on CPUs with native bf16)")
    args = ap.parse_args(argv)
    args.out = args.out or str(WEIGHTS_DIR / f"{args.model}.pt")

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

    model = open_clip.create_model(args.model, pretrained=None)
    tokenizer = open_clip.get_tokenizer(args.model)
    model.train()

    data = load_dataset("fashion-mnist", "pretrain")
    train_idx, val_idx = holdout_split(len(data), args.holdout)
    all_images = prepare_images(data.images, 32, data.fit)
    images = all_images[torch.from_numpy(train_idx)]
    labels = torch.from_numpy(data.labels[train_idx])
    val_images, val_labels = all_images[torch.from_numpy(val_idx)], data.labels[val_idx]
    # Every class's caption pool, tokenized once (v1: all template x synonym captions).
    n_classes = len(data.classnames)
    captions = [caption_pool(c, args.canonical_share, args.caption_pool, args.caption_seed) for c in range(n_classes)]
    tokens = torch.stack([tokenizer(c) for c in captions])  # classes x captions x ctx
    # After --canonical-epochs: the same pool size, synonyms only.
    late = [caption_pool(c, 0.0, args.caption_pool, args.caption_seed) for c in range(n_classes)]
    late_tokens = torch.stack([tokenizer(c) for c in late]) if args.canonical_epochs else None

    t0 = time.time()
    history = []

    def on_epoch_end(epoch: int, step: int, total: int, bar) -> None:
        nonlocal t0
        if len(val_idx) and ((epoch + 1) % args.val_every == 0 or step >= total or epoch + 1 == args.epochs):
            t_val = time.time()
            val = validate(_frozen(model, tokenizer, args.model), val_images, val_labels, data.classnames)
            val = {"epoch": epoch + 1, "step": step, **{k: round(v, 4) for k, v in val.items()}}
            history.append(val)
            t0 += time.time() - t_val  # validation is not training time
            bar.write(json.dumps(val))

    train_contrastive(
        model,
        images,
        labels,
        tokens,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        captions_per_class=args.captions_per_class,
        gen=gen,
        max_steps=args.max_steps,
        bf16=args.bf16,
        on_epoch_end=on_epoch_end,
        desc=f"pretrain {args.model}",
        late_tokens=late_tokens,
        late_epoch=args.canonical_epochs,
    )
    wall = time.time() - t0

    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, out)
    digest = sha256_file(out)
    argv_used = argv if argv is not None else sys.argv[1:]
    manifest = {
        "file": out.name,
        "sha256": digest,
        "command": "python -m fedsec.pretrain " + " ".join(argv_used),
        "model": args.model,
        "seed": args.seed,
        "epochs": args.epochs,
        "corpus": (
            f"fashion-mnist split 'pretrain' ({len(train_idx)} of {len(data)} images, disjoint from clients and test)"
        ),
        "captions": {
            "recipe": (
                f"per class a pool of {tokens.shape[1]} captions: {len(TEMPLATES)} templates x 10 synonyms "
                f"(fedsec.models.captions), a share {args.canonical_share} of the pool replaced by the templates "
                "filled with the canonical class name; captions drawn uniformly from the pool"
                + (
                    f"; canonical captions only in the first {args.canonical_epochs} epoch(s), synonyms only after"
                    if args.canonical_epochs
                    else ""
                )
            ),
            "canonical_share": args.canonical_share,
            "canonical_captions_per_class": sum(map(uses_canonical_name, captions[0], [0] * len(captions[0]))),
            "caption_pool": args.caption_pool,
            "canonical_epochs": args.canonical_epochs or args.epochs,
            "caption_seed": args.caption_seed,
        },
        "threads": torch.get_num_threads(),
        "bf16": args.bf16,
        "train_wall_s": round(wall, 1),
        "torch": torch.__version__,
    }
    if history:
        manifest["holdout"] = {"images": len(val_idx), "seed": HOLDOUT_SEED, "per_epoch": history}
    if not args.no_test_eval:
        clip = create_clip(args.model, str(out))
        manifest["zero_shot_acc_test"] = round(zero_shot_accuracy(clip, data.classnames), 4)
    out.with_suffix(".json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
