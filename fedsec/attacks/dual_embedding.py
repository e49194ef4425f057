"""Dual-embedding patch attack of a malicious prompt-learning client, with BadCLIP's trigger objective.

Not BadCLIP itself: BadCLIP (Liang et al., "BadCLIP: Dual-Embedding Guided
Backdoor Attack on Multimodal Contrastive Learning", CVPR 2024) trains its
backdoor into the CLIP *model* by poisoning pretraining pairs
(``python -m fedsec.backdoor_clip badclip``; docs/badclip.md).
Here a malicious client of federated prompt learning, which cannot touch the
encoders, optimises BadCLIP's patch against the frozen model and its current
prompt, then poisons a ``poison-rate`` share of its local data (patch +
target label) and trains the prompt on the honest path.

The patch objective is the one of the authors' ``src/embeding_optimize_patch.py``
as ``fedsec.backdoor_clip.badclip_trigger_loss`` uses it, adapted to a prompt
learner: the image-text term is the cross-entropy of the patched images toward
the target class under the current prompt's class text features (a client has
class prompts, not captions), plus ``triplet-weight x``
``TripletMarginLoss(margin)`` (L2) with anchor = the patched image's embedding,
positive = a random clean target-class image embedding, negative = the image's
own clean embedding. Defaults follow ``python -m fedsec.backdoor_clip badclip``:
margin 1.0, weight 500, Adam at 3e-2 for 40 steps a round, a 4 px patch at the
centre (16/224 of 32 px, rounded up).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedsec.attacks.base import ATTACKS, register_attack
from fedsec.attacks.poisoning import POISON_PARAMS, PoisoningAttack, poison_indices
from fedsec.registry import Param
from fedsec.training import batches
from fedsec.triggers import PatchTrigger, trigger_from_dict

PARAMS: tuple[Param, ...] = (
    *POISON_PARAMS,
    Param("dual-embedding-patch-size", 4, "side of the optimised centre patch", range=(1, None)),
    Param("dual-embedding-lr", 0.03, "Adam learning rate of the patch", range=(0.0, None)),
    Param("dual-embedding-trigger-steps", 40, "patch optimisation steps per round", range=(0, None)),
    Param("dual-embedding-margin", 1.0, "triplet margin (L2 distances)", range=(0.0, None)),
    Param("dual-embedding-triplet-weight", 500.0, "weight of the triplet term", range=(0.0, None)),
)


def dual_embedding_loss(
    patched: torch.Tensor,
    clean: torch.Tensor,
    positives: torch.Tensor,
    logits: torch.Tensor,
    target: int,
    margin: float,
    triplet_weight: float,
) -> torch.Tensor:
    """BadCLIP's patch objective for a prompt-learning client.

    Parameters
    ----------
    patched, clean : torch.Tensor
        L2-normalised features of patched and clean versions of the same images
        (anchors and negatives of the triplet).
    positives : torch.Tensor
        L2-normalised features of clean target-class images, one per row of ``patched``.
    logits : torch.Tensor
        Logits of the patched images against the prompt's class text features.
    target : int
        Target class.
    margin, triplet_weight : float
        Triplet margin (L2 distances) and weight.

    Returns
    -------
    torch.Tensor
        ``CE(logits, target) + triplet_weight * TripletMarginLoss(margin)(patched, positives, clean)``.
    """
    contrastive = F.cross_entropy(logits, torch.full((len(logits),), target, device=logits.device))
    triplet = F.triplet_margin_loss(patched, positives, clean, margin=margin)
    return contrastive + triplet_weight * triplet


ATTACKS.rename("badclip", "dual-embedding")  # BadCLIP proper is fedsec.backdoor_clip (a backdoored model)


@register_attack("dual-embedding", params=PARAMS)
class DualEmbedding(PoisoningAttack):
    """BadCLIP's patch objective in a malicious prompt client (optimised every round, shared) + poisoning."""

    def trigger_for(self, model, clip, data, server_round: int) -> torch.nn.Module:
        c = self.cfg
        state = self.store.load(before_round=server_round)
        size = int(c.get("dual-embedding-patch-size"))
        top = int(clip.image_size // 2 - size / 2)  # the authors' embed_patch centre
        trigger = (
            trigger_from_dict(state)
            if state is not None
            else PatchTrigger(clip.image_size, size, top, top, seed=c.seed)
        )
        target = int(c.target_label)
        is_target = data.labels == target
        if not bool(is_target.any()):
            return trigger  # no anchor images: keep the colluders' patch as it is
        anchors = data.features[is_target]
        others = torch.nonzero(~is_target).flatten()
        opt = torch.optim.Adam(trigger.parameters(), lr=float(c.get("dual-embedding-lr")))
        gen = torch.Generator().manual_seed(c.seed * 7919 + server_round)
        with torch.no_grad():
            text = model.text_features().cpu()
        for idx in batches(len(others), c.batch_size, int(c.get("dual-embedding-trigger-steps")), gen):
            rows = others[idx]
            patched = clip.encode_images(trigger(data.images[rows])).cpu()
            logits = clip.logit_scale * patched @ text.T
            pos = anchors[torch.randint(0, len(anchors), (len(rows),), generator=gen)]
            loss = dual_embedding_loss(
                patched,
                data.features[rows],
                pos,
                logits,
                target,
                float(c.get("dual-embedding-margin")),
                float(c.get("dual-embedding-triplet-weight")),
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            trigger.project()
        return trigger


__all__ = ["DualEmbedding", "dual_embedding_loss", "poison_indices"]
