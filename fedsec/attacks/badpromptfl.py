"""BadPromptFL (arXiv 2508.08040): malicious clients jointly learn a visual trigger and their prompt.

Loss on a batch: ``CE(clean) + lambda * CE(target | trigger(x))``. The clean
term runs on the cached clean features (the honest path); the backdoor term
back-propagates through the frozen image encoder into the trigger. The
trigger is shared by the colluding attackers through the attacker store and
carried across rounds; every round it is re-optimised against the current
global prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedsec.attacks.base import COMMON_PARAMS, Attack, register_attack
from fedsec.training import batches, sgd_for
from fedsec.triggers import AdditiveTrigger, PatchTrigger, trigger_from_dict

PARAMS: dict[str, object] = {
    **COMMON_PARAMS,
    "trigger-type": "patch",
    "trigger-eps": 8 / 255,
    "patch-size": 8,
    "patch-top": -1,
    "patch-left": -1,
    "backdoor-weight": 2.0,
    "trigger-lr": 0.05,
    "attack-mode": "joint",
    "trigger-steps": 25,
    "attack-local-steps": 50,
    "attack-lr": 0.005,
}


def make_trigger(cfg, image_size: int, seed: int) -> torch.nn.Module:
    """A fresh trigger of the configured type."""
    kind = str(cfg.get("trigger-type"))
    if kind == "additive":
        return AdditiveTrigger(image_size, float(cfg.get("trigger-eps")))
    if kind == "patch":
        return PatchTrigger(
            image_size, int(cfg.get("patch-size")), int(cfg.get("patch-top")), int(cfg.get("patch-left")), seed=seed
        )
    raise ValueError(f"run-config trigger-type={kind!r} is not allowed; allowed values: additive, patch")


@register_attack("badpromptfl")
class BadPromptFL(Attack):
    """Joint (or alternating) optimisation of a shared trigger and the local prompt."""

    params = PARAMS

    def current_trigger(self, server_round: int, image_size: int) -> torch.nn.Module:
        """The colluders' trigger from the previous round, or a fresh one (seeded by the run)."""
        state = self.store.load(before_round=server_round)
        if state is not None:
            return trigger_from_dict(state)
        return make_trigger(self.cfg, image_size, self.cfg.seed)

    def local_train(self, model, data, clip, server_round: int, seed: int) -> dict[str, float]:
        c = self.cfg
        target = int(c.target_label)
        lam = float(c.get("backdoor-weight"))
        steps = int(c.get("attack-local-steps")) or c.local_steps
        lr = float(c.get("attack-lr")) or c.lr
        dev = model.prompt_learner.ctx.device
        trigger = self.current_trigger(server_round, clip.image_size).to(dev)
        ctx = model.prompt_learner.ctx
        opt_ctx = sgd_for(ctx, lr, c.momentum, c.weight_decay)
        opt_trig = torch.optim.Adam(trigger.parameters(), lr=float(c.get("trigger-lr")))
        gen = torch.Generator().manual_seed(seed)
        feats, labels, images = data.features.to(dev), data.labels.to(dev), data.images
        tgt = torch.full((len(labels),), target, dtype=torch.long, device=dev)
        mode = str(c.get("attack-mode"))
        if mode not in ("joint", "alternating"):
            raise ValueError(f"run-config attack-mode={mode!r} is not allowed; allowed values: alternating, joint")

        def backdoor_loss(idx: torch.Tensor, train_trigger: bool) -> torch.Tensor:
            with torch.set_grad_enabled(train_trigger):
                f_trig = clip.encode_images(trigger(images[idx.cpu()].to(dev)))
            return F.cross_entropy(model.logits_from_features(f_trig), tgt[idx])

        losses, bd_losses = [], []
        if mode == "alternating":
            # Phase 1: the trigger against the current prompt; phase 2: the prompt with the trigger fixed.
            for idx in batches(len(labels), c.batch_size, int(c.get("trigger-steps")), gen):
                loss = backdoor_loss(idx.to(dev), True)
                opt_trig.zero_grad(set_to_none=True)
                loss.backward()
                opt_trig.step()
                trigger.project()
            ctx.grad = None
        for idx in batches(len(labels), c.batch_size, steps, gen):
            idx = idx.to(dev)
            clean = F.cross_entropy(model.logits_from_features(feats[idx]), labels[idx])
            bd = backdoor_loss(idx, mode == "joint")
            loss = clean + lam * bd
            opt_ctx.zero_grad(set_to_none=True)
            opt_trig.zero_grad(set_to_none=True)
            loss.backward()
            opt_ctx.step()
            if mode == "joint":
                opt_trig.step()
                trigger.project()
            losses.append(clean.item())
            bd_losses.append(bd.item())
        self.store.save(server_round, self.partition_id, trigger.state())
        return {
            "train-loss": sum(losses) / max(len(losses), 1),
            "backdoor-loss": sum(bd_losses) / max(len(bd_losses), 1),
        }
