"""The honest local training path of a client, on cached image features (or images).

The image encoder is frozen, so a benign CoOp client encodes its images once and
each step only runs the text encoder over the class prompts; a learner with
weights in the image path (visual prompts) trains on the images
(:func:`train_on_images`, :func:`train_learner` picks). Attacks wrap
this path (see :mod:`fedsec.attacks`) instead of forking it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedsec.models.prompt import PromptCLIP


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators."""
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class LocalData:
    """A client's local data, prepared once per process.

    Attributes
    ----------
    images : torch.Tensor
        ``float32`` images in ``[0, 1]`` at the model's resolution.
    labels : torch.Tensor
        ``int64`` labels.
    features : torch.Tensor
        L2-normalised frozen image features of ``images``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    features: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def sgd_for(
    params: torch.nn.Parameter | list[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The local optimiser of ``ctx``, or of a learner's list of learned arrays (a fresh one every round)."""
    group = params if isinstance(params, list) else [params]
    return torch.optim.SGD(group, lr=lr, momentum=momentum, weight_decay=weight_decay)


def batches(n: int, batch_size: int, steps: int, gen: torch.Generator):
    """Yield ``steps`` index batches, reshuffling at every pass over ``n`` items."""
    perm = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm = torch.randperm(n, generator=gen)
            pos = 0
        yield perm[pos : pos + min(batch_size, n)]
        pos += batch_size


def _sgd(model: PromptCLIP, logits_of, labels: torch.Tensor, steps: int, batch_size: int, lr: float,
         momentum: float, weight_decay: float, seed: int, proximal_mu: float) -> dict[str, float]:  # fmt: skip
    """The local SGD loop of every learner: ``logits_of(batch indices)`` gives the batch's logits."""
    params = list(model.learned().values())
    opt = sgd_for(params, lr, momentum, weight_decay)
    gen = torch.Generator().manual_seed(seed)
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    labels = labels.to(model.prompt_learner.ctx.device)
    losses, correct, seen = [], 0, 0
    for idx in batches(len(labels), batch_size, steps, gen):
        logits = logits_of(idx)
        y = labels[idx.to(labels.device)]
        loss = F.cross_entropy(logits, y)
        if anchors is not None:
            loss = loss + 0.5 * proximal_mu * sum((p - a).pow(2).sum() for p, a in zip(params, anchors, strict=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        correct += int((logits.argmax(-1) == y).sum())
        seen += len(idx)
    return {"train-loss": float(np.mean(losses)) if losses else 0.0, "train-acc": correct / max(seen, 1)}


def train_on_features(
    model: PromptCLIP,
    features: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    proximal_mu: float = 0.0,
) -> dict[str, float]:
    """Train the learned arrays (``ctx``; a feature adapter's) with cross-entropy on cached features.

    ``proximal_mu > 0`` adds FedProx's proximal term ``mu / 2 * ||w - w_0||^2``
    (Li et al., MLSys 2020), ``w_0`` the received global arrays; the server's
    ``FedProx`` sends ``mu`` in the round's config as ``proximal-mu``. The
    features are the frozen encoder's; a feature adapter (CLIP-Adapter) maps
    them first (:meth:`PromptCLIP.adapt`).

    Returns
    -------
    dict
        ``train-loss`` (mean over steps) and ``train-acc`` (on seen batches).
    """
    dev = model.prompt_learner.ctx.device
    features = features.to(dev)

    def logits_of(idx: torch.Tensor) -> torch.Tensor:
        return model.logits_from_features(model.adapt(features[idx.to(dev)]))

    return _sgd(model, logits_of, labels, steps, batch_size, lr, momentum, weight_decay, seed, proximal_mu)


def train_on_images(
    model: PromptCLIP,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    proximal_mu: float = 0.0,
) -> dict[str, float]:
    """Train every learned array of ``model`` (:meth:`PromptCLIP.learned`) with cross-entropy on images.

    The path of a learner with weights in the image path (visual prompts): every
    step encodes its batch through the prompted image encoder, so nothing is
    cached. Same batches, optimiser and FedProx term (over all learned arrays) as
    :func:`train_on_features`.

    Returns
    -------
    dict
        ``train-loss`` (mean over steps) and ``train-acc`` (on seen batches).
    """
    return _sgd(model, lambda idx: model(images[idx]), labels, steps, batch_size, lr, momentum, weight_decay, seed,
                proximal_mu)  # fmt: skip


def train_learner(model: PromptCLIP, data: LocalData, steps: int, batch_size: int, lr: float, **kw) -> dict[str, float]:
    """The honest local step of any learner: :func:`train_on_features` for a text-only learner (cached
    features), :func:`train_on_images` when the image path learns (``model.needs_images``)."""
    if model.needs_images:
        return train_on_images(model, data.images, data.labels, steps, batch_size, lr, **kw)
    return train_on_features(model, data.features, data.labels, steps, batch_size, lr, **kw)


@torch.no_grad()
def accuracy_on_features(model: PromptCLIP, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of the current prompt on the learner's features (:meth:`PromptCLIP.features`)."""
    if len(labels) == 0:
        return 0.0
    pred = model.logits_from_features(features.to(model.prompt_learner.ctx.device)).argmax(-1).cpu()
    return float((pred == labels.cpu()).float().mean())
