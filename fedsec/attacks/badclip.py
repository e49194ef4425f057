"""BadCLIP (Liang et al., CVPR 2024): a dual-embedding guided patch trigger, then data poisoning.

The patch is optimised so that patched images

* align with the target class's *text* embedding (contrastive term: CE of the
  patched images' logits toward the target under the current prompt), and
* move toward the target class's *image* embeddings and away from their own
  clean embeddings (triplet term with a margin, cosine distances).

Then a ``poison-rate`` share of the local data is patched and relabelled and
the prompt is trained on the honest path. The BadCLIP code's defaults are a
16x16 patch at the centre of a 224 px image and Adam at 1e-3; scaled by side
to our 32 px that is 2.3 px, which we round up to ``badclip-patch-size`` = 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedsec.attacks.base import register_attack
from fedsec.attacks.poisoning import POISON_PARAMS, PoisoningAttack, poison_indices
from fedsec.registry import Param
from fedsec.training import batches
from fedsec.triggers import PatchTrigger, trigger_from_dict

PARAMS: tuple[Param, ...] = (
    *POISON_PARAMS,
    Param("badclip-patch-size", 4, "side of BadCLIP's optimised patch", range=(1, None)),
    Param("badclip-lr", 0.001, "learning rate of the patch", range=(0.0, None)),
    Param("badclip-trigger-steps", 40, "patch optimisation steps", range=(0, None)),
    Param("badclip-margin", 0.2, "triplet margin", range=(0.0, None)),
    Param("badclip-triplet-weight", 1.0, "weight of the triplet term", range=(0.0, None)),
)


def dual_embedding_loss(
    patched: torch.Tensor,
    clean: torch.Tensor,
    target_images: torch.Tensor,
    logits: torch.Tensor,
    target: int,
    margin: float,
    triplet_weight: float,
) -> torch.Tensor:
    """BadCLIP's loss for the patch.

    Parameters
    ----------
    patched, clean : torch.Tensor
        L2-normalised features of patched and clean versions of the same images.
    target_images : torch.Tensor
        L2-normalised features of clean target-class images (their mean is the anchor).
    logits : torch.Tensor
        Logits of the patched images against the class text features.
    target : int
        Target class.
    margin, triplet_weight : float
        Triplet margin and weight.
    """
    contrastive = F.cross_entropy(logits, torch.full((len(logits),), target, device=logits.device))
    anchor = F.normalize(target_images.mean(0, keepdim=True), dim=-1)
    d_pos = 1 - (patched * anchor).sum(-1)
    d_neg = 1 - (patched * clean).sum(-1)
    triplet = F.relu(d_pos - d_neg + margin).mean()
    return contrastive + triplet_weight * triplet


@register_attack("badclip", params=PARAMS)
class BadCLIP(PoisoningAttack):
    """Dual-embedding guided patch (optimised every round, shared by the colluders) + poisoning."""

    def trigger_for(self, model, clip, data, server_round: int) -> torch.nn.Module:
        c = self.cfg
        state = self.store.load(before_round=server_round)
        size = int(c.get("badclip-patch-size"))
        top = (clip.image_size - size) // 2
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
        opt = torch.optim.Adam(trigger.parameters(), lr=float(c.get("badclip-lr")))
        gen = torch.Generator().manual_seed(c.seed * 7919 + server_round)
        with torch.no_grad():
            text = model.text_features().cpu()
        for idx in batches(len(others), c.batch_size, int(c.get("badclip-trigger-steps")), gen):
            rows = others[idx]
            patched = clip.encode_images(trigger(data.images[rows])).cpu()
            logits = clip.logit_scale * patched @ text.T
            loss = dual_embedding_loss(
                patched,
                data.features[rows],
                anchors,
                logits,
                target,
                float(c.get("badclip-margin")),
                float(c.get("badclip-triplet-weight")),
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            trigger.project()
        return trigger


__all__ = ["BadCLIP", "dual_embedding_loss", "poison_indices"]
