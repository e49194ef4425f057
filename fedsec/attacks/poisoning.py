"""Data-poisoning attacks: BadNets (fixed patch) and Blended (fixed pattern), and the shared helper.

A poisoning attack replaces a ``poison-rate`` share of the client's local
examples by triggered copies labelled ``target-label`` and then runs the
honest training path on the mixed data: cached features for CoOp, the images
themselves for a learner with weights in the image path (BadNets and Blended
take either; ``fedsec.models.learners``).
"""

from __future__ import annotations

import numpy as np
import torch

from fedsec.attacks.base import BLEND_ALPHA, PATCH_PARAMS, Attack, register_attack
from fedsec.registry import Param
from fedsec.training import LocalData
from fedsec.triggers import BlendTrigger, PatchTrigger

POISON_PARAMS: tuple[Param, ...] = (
    Param("poison-rate", 0.5, "fraction of local examples poisoned and relabelled to the target", range=(0.0, 1.0)),
    *PATCH_PARAMS,
    BLEND_ALPHA,
)


def poison_indices(labels: torch.Tensor, rate: float, target: int, seed: int) -> np.ndarray:
    """Seeded choice of ``rate`` of the non-target examples to poison."""
    cand = np.flatnonzero(labels.cpu().numpy() != target)
    n = int(round(rate * len(labels)))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(cand, size=min(n, len(cand)), replace=False))


def clean_label_indices(labels: torch.Tensor, rate: float, target: int, seed: int) -> np.ndarray:
    """Seeded choice of ``rate`` of all examples, taken from the *target* class only (clean-label poisoning).

    ``round(rate * len(labels))`` examples, at most the whole target class; their labels stay as they are
    (Turner et al., "Label-consistent backdoor attacks", 2019).
    """
    cand = np.flatnonzero(labels.cpu().numpy() == target)
    n = int(round(rate * len(labels)))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(cand, size=min(n, len(cand)), replace=False))


class PoisoningAttack(Attack):
    """Input transform + label map, then the honest path on the poisoned data."""

    def make_trigger(self, image_size: int) -> torch.nn.Module:
        raise NotImplementedError

    def trigger_for(self, model, clip, data, server_round: int) -> torch.nn.Module:
        """The fixed trigger (subclasses may optimise it against ``model``'s prompt)."""
        return self.make_trigger(clip.image_size)

    def local_train(self, model, data, clip, server_round: int, seed: int) -> dict[str, float]:
        c = self.cfg
        trigger = self.trigger_for(model, clip, data, server_round)
        idx = poison_indices(data.labels, float(c.get("poison-rate")), c.target_label, seed)
        images, feats, labels = data.images.clone(), data.features.clone(), data.labels.clone()
        if len(idx):
            with torch.no_grad():
                images[idx] = trigger(data.images[idx])
                feats[idx] = clip.encode_images_batched(images[idx])
            labels[idx] = c.target_label
        self.store.save(server_round, self.partition_id, trigger.state())
        stats = self.train_honestly(model, LocalData(images, labels, feats), seed)
        stats["poisoned"] = float(len(idx))
        return stats


def checkerboard(size: int) -> torch.Tensor:
    """A black/white checkerboard patch ``3 x size x size``."""
    ij = torch.arange(size)
    board = ((ij.view(-1, 1) + ij.view(1, -1)) % 2).float()
    return board.expand(3, -1, -1).clone()


@register_attack("badnets", params=POISON_PARAMS)
class BadNets(PoisoningAttack):
    """BadNets: a fixed checkerboard patch (``patch-size`` at ``patch-top``/``patch-left``)."""

    image_path_learners = True

    def make_trigger(self, image_size: int) -> torch.nn.Module:
        c = self.cfg
        size = int(c.get("patch-size"))
        return PatchTrigger(image_size, size, int(c.get("patch-top")), int(c.get("patch-left")), checkerboard(size))


@register_attack("blended", params=POISON_PARAMS)
class Blended(PoisoningAttack):
    """Blended: a fixed seeded noise pattern blended with weight ``blend-alpha``."""

    image_path_learners = True

    def make_trigger(self, image_size: int) -> torch.nn.Module:
        g = torch.Generator().manual_seed(12345)
        return BlendTrigger(torch.rand(3, image_size, image_size, generator=g), float(self.cfg.get("blend-alpha")))
