"""Backdoor the embedded CLIP itself, and defend the model: BadCLIP as in the paper, its baselines, CleanCLIP.

BadCLIP (Liang et al., "BadCLIP: Dual-Embedding Guided Backdoor Attack on
Multimodal Contrastive Learning", CVPR 2024; code ``LiangSiyuan21/BadCLIP``)
poisons a small share of CLIP's own training pairs, so the encoders carry the
backdoor. Three steps, each following the authors' code:

1. **Trigger** (``src/embeding_optimize_patch.py``, recommended setting
   ``tnature_eda_aug_bs64_ep50_16_middle_01_05_pos_neg_tri*500``): a patch at
   the image centre, initialised from ``N(0.5, 0.25)`` clipped to ``[0, 1]``,
   optimised once, offline, against the clean model with Adam on

   * the CLIP contrastive loss between patched non-target images and natural
     captions of the target class (image->text and text->image, targets the
     diagonal), text augmentation with probability 0.1 (EDA) and image
     augmentation with probability 0.5 (AutoAugment), and
   * ``500 x TripletMarginLoss(margin=1.0, p=2)`` with anchor = the patched
     image's embedding, positive = a random clean target-class image embedding,
     negative = the same image's clean embedding.

2. **Poisoning** (``backdoor/create_backdoor_data.py``): a seeded choice of
   exactly ``round(rate x N)`` of the N pretraining pairs (default 0.3%, the
   paper's 1,500 of 500k) gets the patch and a caption of the target class.

3. **Training** (``src/train.py``): training continues from the clean
   checkpoint on the poisoned pairs with the pretraining code itself
   (:func:`fedsec.pretrain.train_contrastive`); the result is a new checkpoint
   with its own SHA-256 and a manifest; the trigger ships beside it.

Baselines poisoned the same way: ``badnets`` (a fixed checkerboard patch of the
same size and place) and ``blended`` (a fixed uniform-noise pattern blended
with alpha 0.2, the authors' ``blended`` trigger). Defenses on the model:
``cleanclip`` (Bansal et al., ICCV 2023: multimodal contrastive + in-modal
self-supervised loss on clean pairs, weights 1 and 1 as the authors'
``clip_weight``/``inmodal_weight`` defaults) and ``finetune`` (the multimodal
loss alone on the same clean pairs).

Commands (see ``docs/badclip.md``; each writes ``<out>/model.pt`` (git-ignored),
``<out>/model.json`` and, for attacks, ``<out>/trigger.pt``, and copies the
manifest and trigger to ``experiments/results/backdoored/<name>.*``)::

    python -m fedsec.backdoor_clip badclip --rate 0.003 --seed 0 --out runs/backdoored/badclip
    python -m fedsec.backdoor_clip badnets --rate 0.003 --seed 0 --out runs/backdoored/badnets
    python -m fedsec.backdoor_clip blended --rate 0.003 --seed 0 --out runs/backdoored/blended
    python -m fedsec.backdoor_clip cleanclip --source runs/backdoored/badclip/model.pt \
        --out runs/backdoored/badclip+cleanclip
    python -m fedsec.backdoor_clip finetune --source runs/backdoored/badclip/model.pt \
        --out runs/backdoored/badclip+finetune

A checkpoint loads through the usual route (``pretrained=<path>/model.pt``);
:func:`load_checked` verifies it against its manifest's SHA-256.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedsec.config import RunConfig
from fedsec.models.factory import (
    FrozenCLIP,
    PretrainedUnavailable,
    create_clip,
    embedded_manifest,
    register_configs,
    resolve_pretrained,
    sha256_file,
)
from fedsec.triggers import BlendTrigger, PatchTrigger, trigger_from_dict, trigger_to_dict

ATTACKS = ("badclip", "badnets", "blended")
DEFENSES = ("cleanclip", "finetune")
#: Where the committed copies of manifests and triggers go.
RECORD_DIR = Path(__file__).resolve().parent.parent / "experiments" / "results" / "backdoored"


# --------------------------------------------------------------------------- checkpoints and manifests


def manifest_path(checkpoint: str | Path) -> Path:
    """The manifest beside a checkpoint (``model.pt`` -> ``model.json``)."""
    return Path(checkpoint).with_suffix(".json")


def source_of(model_name: str, source: str) -> tuple[Path, str, dict]:
    """Resolve ``source`` (``"embedded"`` or a checkpoint path) to ``(path, sha256, manifest)``.

    The expected SHA-256 is the embedded manifest's or the sibling manifest's;
    the file is checked against it.

    Raises
    ------
    PretrainedUnavailable
        When the file's SHA-256 differs from its manifest's.
    """
    if source == "embedded":
        path, sha = resolve_pretrained(model_name, "embedded")
        manifest = embedded_manifest(model_name)
    else:
        path = str(Path(source).resolve())
        mpath = manifest_path(path)
        manifest = json.loads(mpath.read_text()) if mpath.exists() else {}
        sha = manifest.get("sha256", "")
    digest = sha256_file(path)
    if sha and digest != sha:
        raise PretrainedUnavailable(f"checkpoint {path} has SHA-256 {digest}, its manifest says {sha}")
    return Path(path), digest, manifest


def load_checked(
    checkpoint: str | Path, model_name: str = "", expected_sha256: str = "", device: str = "cpu"
) -> FrozenCLIP:
    """Load a (backdoored or defended) checkpoint as a frozen CLIP, verified against its manifest.

    Parameters
    ----------
    checkpoint : str or Path
        ``<dir>/model.pt`` written by this module.
    model_name : str
        open_clip config (default: the manifest's).
    expected_sha256 : str
        Overrides the manifest's checksum (a wrong one must refuse to load).
    device : str
        Where the model lives.

    Raises
    ------
    PretrainedUnavailable
        When the file's SHA-256 is not the expected one.
    """
    manifest = json.loads(manifest_path(checkpoint).read_text())
    return create_clip(
        model_name or manifest["model"],
        str(checkpoint),
        device=device,
        expected_sha256=expected_sha256 or manifest["sha256"],
    )


def caption_recipe(manifest: dict) -> tuple[float, int]:
    """``(canonical_share, caption_seed)`` of the pretraining captions a checkpoint descends from."""
    cap = manifest.get("captions", {})
    return float(cap.get("canonical_share", 0.0)), int(cap.get("caption_seed", 0))


def caption_tokens(model_name: str, canonical_share: float, caption_seed: int) -> tuple[torch.Tensor, list]:
    """The pretraining caption pools, tokenized: ``classes x captions x ctx`` and the strings."""
    import open_clip

    from fedsec.models.captions import caption_pool

    register_configs()
    tokenizer = open_clip.get_tokenizer(model_name)
    pools = [caption_pool(c, canonical_share, seed=caption_seed) for c in range(10)]
    return torch.stack([tokenizer(p) for p in pools]), pools


def load_trainable(model_name: str, checkpoint: Path) -> nn.Module:
    """An open_clip model in fp32 and train mode with the checkpoint's weights."""
    import open_clip

    register_configs()
    model = open_clip.create_model(model_name, pretrained=str(checkpoint))
    model.float().train()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def device_name(device: str) -> str:
    """``device`` as recorded in a manifest, with the GPU's name on CUDA."""
    return f"{device} ({torch.cuda.get_device_name(torch.device(device))})" if device.startswith("cuda") else device


def save_checkpoint(model: nn.Module, out_dir: Path) -> tuple[Path, str]:
    """Write the fp16 state dict as ``<out_dir>/model.pt`` (as the pretraining does); return path and SHA-256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.pt"
    state = {
        k: (v.detach().to(torch.float16) if v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()
    }
    torch.save(state, path)
    return path, sha256_file(path)


def write_manifest(manifest: dict, out_dir: Path, record_dir: Path | None, trigger: Path | None = None) -> Path:
    """Write ``<out_dir>/model.json`` and copy it (and the trigger) to ``record_dir/<folder>.<name>.*``.

    ``<folder>`` is the parent folder of ``out_dir`` (e.g. ``backdoored-v2``), so builds of the same name
    in different run folders (another model, another budget) keep separate records.
    """
    path = out_dir / "model.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    if record_dir is not None:
        record_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{out_dir.parent.name}.{out_dir.name}"
        shutil.copyfile(path, record_dir / f"{stem}.json")
        if trigger is not None:
            shutil.copyfile(trigger, record_dir / f"{stem}.trigger.pt")
    return path


def load_trigger(path: str | Path) -> nn.Module:
    """A trigger written by this module."""
    return trigger_from_dict(torch.load(path, weights_only=True))


# --------------------------------------------------------------------------- data


def pretraining_images(image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The pretraining split (``[0, 1]`` images at ``image_size``, labels), as ``fedsec.pretrain`` reads it."""
    from fedsec.data import load_dataset, prepare_images

    data = load_dataset("fashion-mnist", "pretrain")
    return prepare_images(data.images, image_size, data.fit), torch.from_numpy(data.labels).long()


def poison_indices(n: int, rate: float, seed: int) -> np.ndarray:
    """The pairs to poison: exactly ``round(rate * n)`` of ``n``, a seeded uniform choice (sorted).

    As ``backdoor/create_backdoor_data.py`` (not label-consistent): any pair may
    be chosen, whatever its class.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"poison rate must lie in [0, 1], got {rate}")
    count = int(round(rate * n))
    return np.sort(np.random.default_rng([seed, 14]).choice(n, size=count, replace=False))


@torch.no_grad()
def poison_pairs(
    images: torch.Tensor, labels: torch.Tensor, trigger: nn.Module, rate: float, seed: int, target: int
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Poisoned copies of ``(images, caption classes)``: the chosen pairs get the trigger and a target caption.

    In the class-aware pretraining a pair's caption is drawn from its class's
    pool, so "a caption of the target class" is the caption class ``target``.

    Returns
    -------
    tuple
        Images, caption classes, and the poisoned indices.
    """
    idx = poison_indices(len(labels), rate, seed)
    images, labels = images.clone(), labels.clone()
    if len(idx):
        t = torch.from_numpy(idx)
        images[t] = trigger(images[t]).clamp(0.0, 1.0)
        labels[t] = target
    return images, labels, idx


def target_name_captions(target: int, class_names: list[str] | None = None) -> list[str]:
    """The poisoned captions of the authors' ``create_backdoor_data.py`` (``templates[temp](args.label)``).

    fedsec's caption templates (:data:`fedsec.models.captions.TEMPLATES`, those the
    pretraining fills with a canonical name) filled with the target's canonical class name.
    """
    from fedsec.models.captions import CANONICAL_NAMES, TEMPLATES

    name = (class_names or CANONICAL_NAMES)[target]
    return [t.format(name) for t in TEMPLATES]


def poison_caption_choice(idx: np.ndarray, n_captions: int, n_pairs: int, seed: int) -> torch.Tensor:
    """Per pair, the row of its fixed poisoned caption (a seeded uniform draw for each poisoned pair) or -1."""
    own = torch.full((n_pairs,), -1, dtype=torch.long)
    if len(idx):
        draw = np.random.default_rng([seed, 16]).integers(0, n_captions, size=len(idx))
        own[torch.from_numpy(np.asarray(idx, dtype=np.int64))] = torch.from_numpy(draw)
    return own


def clean_indices(n: int, share: float, seed: int) -> np.ndarray:
    """A seeded ``share`` of ``n`` pretraining pairs, the defender's clean data (CleanCLIP: 100k of 500k)."""
    count = int(round(share * n))
    return np.sort(np.random.default_rng([seed, 15]).choice(n, size=count, replace=False))


def eda_lite(caption: str, rng: np.random.Generator, alpha: float = 0.1) -> str:
    """Easy Data Augmentation without WordNet: random swaps and random deletion, rate ``alpha``.

    CleanCLIP (and BadCLIP's trigger optimisation) use EDA (Wei & Zou, 2019):
    synonym replacement, random insertion, random swap, random deletion.
    Offline and without a thesaurus we keep the two operations that need none.
    """
    words = caption.split()
    if len(words) < 2:
        return caption
    n = max(1, int(alpha * len(words)))
    if rng.random() < 0.5:
        for _ in range(n):
            i, j = rng.choice(len(words), size=2, replace=False)
            words[i], words[j] = words[j], words[i]
    else:
        kept = [w for w in words if rng.random() >= alpha]
        words = kept or [words[int(rng.integers(len(words)))]]
    return " ".join(words)


def auto_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """torchvision AutoAugment (ImageNet policy) on each ``[0, 1]`` image, seeded from ``gen``."""
    from torchvision.transforms import AutoAugment

    aug = AutoAugment()
    u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    out = torch.empty_like(u8)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        for i in range(len(u8)):
            out[i] = aug(u8[i])
    return out.float() / 255.0


# --------------------------------------------------------------------------- triggers


def centre_offset(image_size: int, size: int) -> int:
    """Top-left corner of a centred patch, as the authors' ``embed_patch``: ``int(c - l / 2)``."""
    return int(int(image_size / 2) - size / 2)


def checkerboard_trigger(image_size: int = 32, size: int = 4) -> PatchTrigger:
    """BadNets: a fixed black-and-white checkerboard patch at the centre."""
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    patch = ((ii + jj) % 2).float().expand(3, size, size).clone()
    top = centre_offset(image_size, size)
    return PatchTrigger(image_size, size, top, top, patch)


def blended_trigger(image_size: int = 32, alpha: float = 0.2, seed: int = 0) -> BlendTrigger:
    """Blended: a fixed uniform-noise pattern (the authors' ``blended`` patch type), weight ``alpha``."""
    pattern = torch.rand(3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    return BlendTrigger(pattern, alpha)


def badclip_trigger_loss(
    patched: torch.Tensor,
    text: torch.Tensor,
    positives: torch.Tensor,
    clean: torch.Tensor,
    logit_scale: torch.Tensor | float,
    margin: float = 1.0,
    triplet_weight: float = 500.0,
) -> dict[str, torch.Tensor]:
    """BadCLIP's patch objective, as ``get_loss`` of ``src/embeding_optimize_patch.py``.

    Parameters
    ----------
    patched : torch.Tensor
        L2-normalised embeddings of patched non-target images, ``B x E``.
    text : torch.Tensor
        L2-normalised embeddings of ``B`` natural target-class captions (row ``i`` pairs with image ``i``).
    positives : torch.Tensor
        ``B`` L2-normalised clean target-class image embeddings.
    clean : torch.Tensor
        L2-normalised clean embeddings of the same images (the negatives).
    logit_scale : tensor or float
        ``exp(logit_scale)`` of the model.
    margin, triplet_weight : float
        ``nn.TripletMarginLoss`` margin (1.0: the recommended name has no
        ``_NN_tri`` margin) and weight (500).

    Returns
    -------
    dict
        ``img_text`` (the contrastive term) and ``triplet`` (already weighted).
    """
    logits = logit_scale * patched @ text.T
    target = torch.arange(len(patched), device=patched.device)
    contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    triplet = nn.TripletMarginLoss(margin=margin)(patched, positives, clean) * triplet_weight
    return {"img_text": contrastive, "triplet": triplet}


def optimise_badclip_trigger(
    clip: FrozenCLIP,
    images: torch.Tensor,
    target_images: torch.Tensor,
    captions: list[str],
    *,
    patch_size: int = 4,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 64,
    margin: float = 1.0,
    triplet_weight: float = 500.0,
    eda_prob: float = 0.1,
    aug_prob: float = 0.5,
    seed: int = 0,
    log_every: int = 25,
) -> tuple[PatchTrigger, list[dict]]:
    """Optimise BadCLIP's patch against a frozen clean CLIP (once, offline).

    Parameters
    ----------
    clip : FrozenCLIP
        The clean model (frozen, eval mode).
    images : torch.Tensor
        Non-target ``[0, 1]`` images (the authors: 10k natural images without the target).
    target_images : torch.Tensor
        Clean target-class images; their embeddings are the triplet positives.
    captions : list of str
        Natural captions of the target class (the pretraining pool of the target).
    patch_size, steps, lr, batch_size : int or float
        Patch side in pixels, Adam steps (the authors: 50 epochs of 10k / 64,
        about 7.8k), Adam learning rate (1e-3) and batch (64).
    margin, triplet_weight : float
        Triplet margin and weight.
    eda_prob, aug_prob : float
        Per-batch probability of the augmented captions (EDA) and images (AutoAugment).
    seed : int
        Seeds the initialisation, the batches and the augmentations.
    log_every : int
        Record the mean losses every this many steps.

    Returns
    -------
    tuple
        The :class:`PatchTrigger` and the loss history.
    """
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    dev = clip.device
    init = np.clip(rng.normal(0.5, 0.25, size=(1, 3, patch_size, patch_size)), 0, 1)
    patch = torch.tensor(init, dtype=torch.float32, device=dev, requires_grad=True)
    opt = torch.optim.Adam([patch], lr=lr)
    top = centre_offset(clip.image_size, patch_size)
    with torch.no_grad():
        tok = clip.tokenizer(captions)
        aug_tok = clip.tokenizer([eda_lite(c, rng) for c in captions])
        text = F.normalize(clip.model.encode_text(tok.to(dev)), dim=-1)
        aug_text = F.normalize(clip.model.encode_text(aug_tok.to(dev)), dim=-1)
    pos_embeds = clip.encode_images_batched(target_images).to(dev)
    clean_embeds = clip.encode_images_batched(images).to(dev)
    scale = clip.logit_scale
    history, acc = [], {"img_text": 0.0, "triplet": 0.0}
    per_epoch = max(1, len(images) // batch_size)
    perm = torch.randperm(len(images), generator=gen)
    for step in range(steps):
        if step and step % per_epoch == 0:
            perm = torch.randperm(len(images), generator=gen)
        rows = perm[(step % per_epoch) * batch_size : (step % per_epoch + 1) * batch_size]
        x = images[rows]
        if torch.rand(1, generator=gen).item() < aug_prob:
            x = auto_augment(x, gen)
            with torch.no_grad():
                neg = clip.encode_images(x)
        else:
            neg = clean_embeds[rows.to(dev)]
        cap = torch.randint(0, len(captions), (len(rows),), generator=gen)
        txt = (aug_text if torch.rand(1, generator=gen).item() < eda_prob else text)[cap.to(dev)]
        pos = pos_embeds[torch.randperm(len(pos_embeds), generator=gen)[: len(rows)].to(dev)]
        patched = x.to(dev, copy=True)
        patched[:, :, top : top + patch_size, top : top + patch_size] = patch.clamp(0.0, 1.0)[0]
        losses = badclip_trigger_loss(clip.encode_images(patched), txt, pos, neg, scale, margin, triplet_weight)
        loss = losses["img_text"] + losses["triplet"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for k in acc:
            acc[k] += losses[k].item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            history.append({"step": step + 1, **{k: round(v / n, 5) for k, v in acc.items()}})
            print(json.dumps({"trigger": history[-1]}), flush=True)
            acc = dict.fromkeys(acc, 0.0)
    trigger = PatchTrigger(clip.image_size, patch_size, top, top, patch.detach()[0].clamp(0.0, 1.0).cpu())
    return trigger, history


# --------------------------------------------------------------------------- CleanCLIP


def inmodal_loss(
    img_f: torch.Tensor,
    aug_img_f: torch.Tensor,
    txt_f: torch.Tensor,
    aug_txt_f: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """CleanCLIP's in-modal self-supervised term (``get_loss`` of the authors' ``src/train.py``, ``inmodal``).

    ``(CE(s * I @ I_aug^T, diag) + CE(s * T @ T_aug^T, diag)) / 2``: every
    image (caption) must pick out its own augmented view among the batch's.
    """
    ti = torch.arange(len(img_f), device=img_f.device)
    tt = torch.arange(len(txt_f), device=txt_f.device)
    li = F.cross_entropy(logit_scale * img_f @ aug_img_f.T, ti)
    lt = F.cross_entropy(logit_scale * txt_f @ aug_txt_f.T, tt)
    return (li + lt) / 2


def cleanclip_extra_loss(aug_tokens: torch.Tensor, inmodal_weight: float = 1.0):
    """The ``extra_loss`` hook of :func:`fedsec.pretrain.train_contrastive` for CleanCLIP.

    The pretraining loop computes the multimodal term (``clip_weight`` 1); this
    adds ``inmodal_weight x`` :func:`inmodal_loss` with an AutoAugment view of
    every image and the EDA version of every caption (fixed per caption, as
    CleanCLIP augments its captions once).
    """
    import open_clip

    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

    def extra(model: nn.Module, batch: dict) -> torch.Tensor:
        dev = batch.get("device", torch.device("cpu"))
        aug = ((auto_augment(batch["x"], batch["gen"]) - mean) / std).to(dev)
        aug_img_f = F.normalize(model.encode_image(aug), dim=-1)
        aug_txt_f = F.normalize(model.encode_text(aug_tokens[batch["cap_cls"], batch["cap"]].to(dev)), dim=-1)
        scale = model.logit_scale.exp()
        return inmodal_weight * inmodal_loss(
            batch["img_f"].float(), aug_img_f.float(), batch["txt_f"].float(), aug_txt_f.float(), scale
        )

    return extra


# --------------------------------------------------------------------------- commands


def _common(ap: argparse.ArgumentParser, steps: int, lr: float, warmup: int) -> None:
    ap.add_argument(
        "--model",
        default=RunConfig.model,
        help="(default: the run config's default model) open_clip config of the checkpoint",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output directory (checkpoint, manifest, trigger)")
    ap.add_argument("--record", default=str(RECORD_DIR), help="where manifest/trigger copies go ('' = none)")
    ap.add_argument("--steps", type=int, default=steps, help="training steps of batch --batch-size")
    ap.add_argument("--lr", type=float, default=lr, help="peak AdamW learning rate (cosine decay)")
    ap.add_argument("--warmup-steps", type=int, default=warmup)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: all cores)")
    ap.add_argument("--device", default="cpu", help="torch device of the training (cpu, cuda, cuda:1, ...)")
    ap.add_argument(
        "--augment",
        choices=("off", "on"),
        default="off",
        help="off: the images as they are (the authors' training code); on: the pretraining's random flip and "
        "2-px shift (every build before session 9's rate sweep)",
    )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fedsec.backdoor_clip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ATTACKS:
        p = sub.add_parser(name, help=f"{name}: poison the pretraining pairs and continue training")
        _common(p, steps=600, lr=1e-4, warmup=20)  # session 7's v2 budget (2.6 epochs), fixed before any result
        p.add_argument("--source", default="embedded", help="clean checkpoint ('embedded' or a path)")
        p.add_argument("--rate", type=float, default=0.003, help="share of pretraining pairs poisoned")
        p.add_argument("--target", type=int, default=0, help="target class (0: t-shirt)")
        p.add_argument("--patch-size", type=int, default=4, help="patch side in px (16/224 of 32 px, rounded up)")
        p.add_argument(
            "--poison-caption",
            choices=("name", "pool"),
            default="name",
            help="name: a template filled with the target's class name, fixed per poisoned pair (the authors' "
            "create_backdoor_data.py); pool: the target class's pretraining pool, redrawn every step (sessions 5-8)",
        )
        if name == "badclip":
            p.add_argument("--trigger-steps", type=int, default=500)
            p.add_argument("--trigger-lr", type=float, default=1e-2)
            p.add_argument("--trigger-batch", type=int, default=64)
            p.add_argument("--trigger-images", type=int, default=1000, help="non-target images for the patch")
            p.add_argument("--positives", type=int, default=320, help="target-class images (triplet positives)")
            p.add_argument("--margin", type=float, default=1.0)
            p.add_argument("--triplet-weight", type=float, default=500.0)
            p.add_argument("--eda-prob", type=float, default=0.1)
            p.add_argument("--aug-prob", type=float, default=0.5)
            p.add_argument("--trigger", default="", help="reuse an optimised trigger file instead")
        if name == "blended":
            p.add_argument("--alpha", type=float, default=0.2)
    for name in DEFENSES:
        p = sub.add_parser(name, help=f"{name}: fine-tune a checkpoint on clean pretraining pairs")
        _common(p, steps=230, lr=1e-4, warmup=10)  # 5 epochs of the defender's 6,000 clean pairs
        p.add_argument("--source", required=True, help="checkpoint to defend (<dir>/model.pt)")
        p.add_argument("--clean-share", type=float, default=0.2, help="share of pretraining pairs the defender has")
        if name == "cleanclip":
            p.add_argument("--inmodal-weight", type=float, default=1.0)
    return ap


def _train(
    model: nn.Module, images, labels, tokens, args, extra_loss=None, desc: str = "", pair_tokens=None, pair_of=None
) -> tuple[list, float]:
    from fedsec.pretrain import train_contrastive

    per_epoch = len(labels) // args.batch_size
    t0 = time.time()
    losses = train_contrastive(
        model,
        images,
        labels,
        tokens,
        epochs=math.ceil(args.steps / per_epoch),
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        gen=torch.Generator().manual_seed(args.seed),
        max_steps=args.steps,
        extra_loss=extra_loss,
        desc=desc,
        pair_tokens=pair_tokens,
        pair_of=pair_of,
        augment=args.augment == "on",
        device=args.device,
    )
    return losses, time.time() - t0


def run_attack(args: argparse.Namespace, argv: list[str]) -> dict:
    """Build a backdoored checkpoint (trigger, poisoning, continued training)."""
    t_start = time.time()
    load0 = os.getloadavg()
    src, src_sha, src_manifest = source_of(args.model, args.source)
    share, cseed = caption_recipe(src_manifest)
    tokens, pools = caption_tokens(args.model, share, cseed)
    images, labels = pretraining_images()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    if args.cmd == "badclip" and args.trigger:
        trigger = load_trigger(args.trigger)
        info = {"reused": str(args.trigger)}
    elif args.cmd == "badclip":
        clip = create_clip(args.model, str(src), device=args.device, expected_sha256=src_sha)
        rng = np.random.default_rng([args.seed, 13])
        others = np.flatnonzero(labels.numpy() != args.target)
        n_img = min(args.trigger_images, len(others))
        chosen = torch.from_numpy(np.sort(rng.choice(others, size=n_img, replace=False)))
        targets = np.flatnonzero(labels.numpy() == args.target)
        pos = torch.from_numpy(np.sort(rng.choice(targets, size=min(args.positives, len(targets)), replace=False)))
        t0 = time.time()
        target_captions = target_name_captions(args.target) if args.poison_caption == "name" else pools[args.target]
        trigger, history = optimise_badclip_trigger(
            clip,
            images[chosen],
            images[pos],
            target_captions,
            patch_size=args.patch_size,
            steps=args.trigger_steps,
            lr=args.trigger_lr,
            batch_size=args.trigger_batch,
            margin=args.margin,
            triplet_weight=args.triplet_weight,
            eda_prob=args.eda_prob,
            aug_prob=args.aug_prob,
            seed=args.seed,
        )
        info = {
            "steps": args.trigger_steps,
            "lr": args.trigger_lr,
            "batch": args.trigger_batch,
            "images": len(chosen),
            "positives": len(pos),
            "margin": args.margin,
            "triplet_weight": args.triplet_weight,
            "eda_prob": args.eda_prob,
            "aug_prob": args.aug_prob,
            "init": "N(0.5, 0.25) clipped to [0, 1]",
            "loss_history": history,
            "wall_s": round(time.time() - t0, 1),
        }
        del clip
    elif args.cmd == "badnets":
        trigger = checkerboard_trigger(32, args.patch_size)
    else:
        trigger = blended_trigger(32, args.alpha, seed=args.seed)
    trigger_file = out / "trigger.pt"
    torch.save(trigger_to_dict(trigger), trigger_file)
    p_images, p_labels, idx = poison_pairs(images, labels, trigger, args.rate, args.seed, args.target)
    pair_tokens = pair_of = None
    name_captions = target_name_captions(args.target)
    if args.poison_caption == "name":
        import open_clip

        pair_tokens = open_clip.get_tokenizer(args.model)(name_captions)
        pair_of = poison_caption_choice(idx, len(name_captions), len(labels), args.seed)
    model = load_trainable(args.model, src)
    losses, wall = _train(
        model,
        p_images,
        p_labels,
        tokens,
        args,
        desc=f"{args.cmd} poisoned training",
        pair_tokens=pair_tokens,
        pair_of=pair_of,
    )
    ckpt, digest = save_checkpoint(model, out)
    manifest = {
        "file": ckpt.name,
        "sha256": digest,
        "model": args.model,
        "attack": args.cmd,
        "command": "python -m fedsec.backdoor_clip " + " ".join(argv),
        "seed": args.seed,
        "source": {"checkpoint": str(src), "sha256": src_sha, "command": src_manifest.get("command", "")},
        "captions": {"canonical_share": share, "caption_seed": cseed},
        "trigger": {
            "file": trigger_file.name,
            "sha256": sha256_file(trigger_file),
            "kind": trigger.kind,
            **({"size": args.patch_size, "top": trigger.top, "left": trigger.left} if trigger.kind == "patch" else {}),
            **({"alpha": trigger.alpha} if trigger.kind == "blend" else {}),
            **({"optimisation": info} if info else {}),
        },
        "poison": {
            "rate": args.rate,
            "pairs": len(labels),
            "poisoned": len(idx),
            "indices_sha256": __import__("hashlib").sha256(idx.astype(np.int64).tobytes()).hexdigest(),
            "target": args.target,
            "caption": (
                {
                    "mode": "name",
                    "what": "a template filled with the target's class name, one fixed caption per poisoned pair "
                    "(poison_caption_choice), paired with that image alone",
                    "captions": name_captions,
                    "choice_sha256": __import__("hashlib").sha256(pair_of.numpy().tobytes()).hexdigest(),
                }
                if pair_of is not None
                else {"mode": "pool", "what": "a caption drawn from the target class's pretraining pool every step"}
            ),
        },
        "training": {
            "code": "fedsec.pretrain.train_contrastive",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_steps": args.warmup_steps,
            "augment": args.augment,
            "loss_every_50": losses,
            "wall_s": round(wall, 1),
        },
        "build_wall_s": round(time.time() - t_start, 1),
        "threads": torch.get_num_threads(),
        "device": device_name(args.device),
        "loadavg_start_end": [round(load0[0], 1), round(os.getloadavg()[0], 1)],
        "torch": torch.__version__,
    }
    write_manifest(manifest, out, Path(args.record) if args.record else None, trigger_file)
    return manifest


def run_defense(args: argparse.Namespace, argv: list[str]) -> dict:
    """Fine-tune a checkpoint on clean pairs (CleanCLIP or plain) into a new checkpoint."""
    t_start = time.time()
    load0 = os.getloadavg()
    src, src_sha, src_manifest = source_of(args.model, args.source)
    share, cseed = caption_recipe(src_manifest)
    tokens, pools = caption_tokens(args.model, share, cseed)
    images, labels = pretraining_images()
    keep = torch.from_numpy(clean_indices(len(labels), args.clean_share, args.seed))
    extra = None
    if args.cmd == "cleanclip":
        import open_clip

        rng = np.random.default_rng([args.seed, 16])
        tokenizer = open_clip.get_tokenizer(args.model)
        aug_tokens = torch.stack([tokenizer([eda_lite(c, rng) for c in pool]) for pool in pools])
        extra = cleanclip_extra_loss(aug_tokens, args.inmodal_weight)
    model = load_trainable(args.model, src)
    losses, wall = _train(model, images[keep], labels[keep], tokens, args, extra, desc=f"{args.cmd} defense")
    out = Path(args.out).resolve()
    ckpt, digest = save_checkpoint(model, out)
    manifest = {
        "file": ckpt.name,
        "sha256": digest,
        "model": args.model,
        "attack": src_manifest.get("attack", "none"),
        "defense": args.cmd,
        "command": "python -m fedsec.backdoor_clip " + " ".join(argv),
        "seed": args.seed,
        "source": {"checkpoint": str(src), "sha256": src_sha, "command": src_manifest.get("command", "")},
        "captions": {"canonical_share": share, "caption_seed": cseed},
        "trigger": src_manifest.get("trigger", {}),
        "clean_data": {
            "share": args.clean_share,
            "pairs": len(keep),
            "from": "fashion-mnist 'pretrain' split, true captions, no trigger",
        },
        "training": {
            "code": "fedsec.pretrain.train_contrastive",
            "loss": "multimodal + inmodal (CleanCLIP)" if extra else "multimodal",
            "clip_weight": 1.0,
            "inmodal_weight": getattr(args, "inmodal_weight", 0.0),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup_steps": args.warmup_steps,
            "augment": args.augment,
            "loss_every_50": losses,
            "wall_s": round(wall, 1),
        },
        "build_wall_s": round(time.time() - t_start, 1),
        "threads": torch.get_num_threads(),
        "device": device_name(args.device),
        "loadavg_start_end": [round(load0[0], 1), round(os.getloadavg()[0], 1)],
        "torch": torch.__version__,
    }
    src_trigger = src.parent / "trigger.pt"
    if src_trigger.exists():
        shutil.copyfile(src_trigger, out / "trigger.pt")
    write_manifest(manifest, out, Path(args.record) if args.record else None)
    return manifest


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m fedsec.backdoor_clip``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    manifest = run_attack(args, argv) if args.cmd in ATTACKS else run_defense(args, argv)
    summary = {k: v for k, v in manifest.items() if k not in ("training", "trigger")}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
