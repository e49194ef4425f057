"""BadPromptFL (arXiv 2508.08040): malicious clients jointly learn a visual trigger and their prompt.

Loss on a batch: ``CE(clean) + mu * KL(global || local on clean) + lambda *
CE(target | trigger(x)) + nu * mean(relu(cos(f(trigger(x)), f(x))))``. The clean terms run on the cached clean features
(the honest path); the backdoor term back-propagates through the frozen image
encoder into the trigger. The stealth term ``mu`` keeps the prompt's clean
predictions where the received global prompt had them (Bagdasaryan et al.'s
constrain-and-scale), so a boosted update changes the triggered behaviour
only and the benign majority has no reason to undo it. The separation term
``nu`` (``trigger-separation``) acts on the trigger only: it pushes triggered
embeddings away from the image's own clean embedding (BadCLIP's "away from
clean" idea), so the prompt can map a region that no clean image occupies to
the target class. That costs the benign clients little clean accuracy, so
their updates do little to remove it: the backdoor survives averaging. The trigger is shared
by the colluding attackers through the attacker store and carried across
rounds; it is re-optimised against the current global prompt in the first
``trigger-rounds`` attack rounds (0: every round) and then frozen, so the
prompt's backdoor accumulates for one fixed trigger.

Default design ("global fit", chosen by the ceiling analysis, docs/ceiling.md):
``alternating`` mode, the trigger fitted every round (``trigger-rounds`` 0) for
``trigger-steps`` Adam steps to the global prompt the attacker received, then
the prompt trained with the trigger fixed at the benign clients' budget
(``attack-local-steps`` and ``attack-lr`` 0 = ``local-steps`` and ``lr``). The
``joint`` design of earlier sessions (``attack-mode="joint" trigger-rounds=3
attack-local-steps=50 attack-lr=0.005 backdoor-weight=2``) stays selectable:
``experiments/conf/badpromptfl_joint.toml``.

``trigger-pool`` (alternating mode): the colluders fit one trigger together
instead of one each. Every attacker offers its images once through the
attacker store; from the next round on each fits the trigger on the pooled
images of all colluders, in partition-id order, with a generator seeded by the
run and the round only, so every attacker computes the same trigger and trains
its prompt with the trigger the evaluation uses (without pooling the
evaluation averages the attackers' separately fitted patches).

``trigger-lookahead`` (alternating mode): the trigger is fitted not to the
received prompt but to where the benign clients are about to move it, estimated
by the attacker's own honest update from it (its data, its seed): the trigger
the evaluation reads after aggregation was fitted to a prompt one step stale
otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedsec.attacks.base import PATCH_PARAMS, Attack, register_attack
from fedsec.registry import Param
from fedsec.training import batches, sgd_for
from fedsec.triggers import AdditiveTrigger, PatchTrigger, trigger_from_dict

PARAMS: tuple[Param, ...] = (
    Param(
        "trigger-type",
        "patch",
        "a learnable patch, or an additive L-inf-bounded perturbation",
        choices=("patch", "additive"),
    ),
    Param("trigger-eps", 8 / 255, "L-inf bound of the additive trigger", range=(0.0, 1.0)),
    *PATCH_PARAMS,
    Param("backdoor-weight", 0.5, "lambda: weight of CE(target | trigger(x))", range=(0.0, None)),
    Param("trigger-lr", 0.05, "learning rate of the trigger", range=(0.0, None)),
    Param(
        "attack-mode",
        "alternating",
        "optimise trigger and prompt jointly, or alternate",
        choices=("joint", "alternating"),
    ),
    Param("trigger-steps", 100, "trigger steps before the prompt steps (alternating mode)", range=(0, None)),
    Param("attack-local-steps", 0, "malicious local steps (0 = local-steps)", range=(0, None)),
    Param("attack-lr", 0.0, "malicious prompt learning rate (0 = lr)", range=(0.0, None)),
    Param("stealth-weight", 5.0, "mu: weight of KL(global || local) on clean data", range=(0.0, None)),
    Param("trigger-separation", 2.0, "nu: weight pushing triggered features from the clean ones", range=(0.0, None)),
    Param(
        "trigger-lookahead",
        False,
        "fit the trigger to the received prompt plus the attacker's own honest update (alternating mode)",
    ),
    Param(
        "trigger-pool",
        False,
        "colluders fit one trigger on their pooled images with a shared seed (alternating mode)",
    ),
    Param(
        "trigger-rounds",
        0,
        "attack rounds in which the trigger is optimised, then frozen (0 = every round)",
        range=(0, None),
    ),
)


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


@register_attack("badpromptfl", params=PARAMS)
class BadPromptFL(Attack):
    """Joint (or alternating) optimisation of a shared trigger and the local prompt (or any learner's arrays).

    With a learner that has weights in the image path (``vpt-*``, ``clip-adapter``) the same
    objective runs through the learner's image path: the trigger is fitted through the prompted
    encoder (or the adapter), and every learned array is trained on the clean and triggered terms.
    """

    #: The trigger is fitted, and the arrays trained, through the learner's own image path.
    image_path_learners = True

    @classmethod
    def config_problem(cls, c) -> str | None:
        """The pooled and look-ahead fits exist in alternating mode only."""
        problem = super().config_problem(c)
        if problem is None and str(c.get("attack-mode")) == "joint":
            on = [k for k in ("trigger-pool", "trigger-lookahead") if bool(c.get(k))]
            if on:
                return f"run-config {'/'.join(on)} = true needs attack-mode='alternating' (joint has no trigger fit)"
        return problem

    def current_trigger(self, server_round: int, image_size: int) -> torch.nn.Module:
        """The colluders' trigger from the previous round, or a fresh one (seeded by the run)."""
        state = self.store.load(before_round=server_round)
        if state is not None:
            return trigger_from_dict(state)
        return make_trigger(self.cfg, image_size, self.cfg.seed)

    def pooled_fit_data(
        self, server_round: int, images: torch.Tensor, model
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """Images, clean features and batch generator of the colluders' common trigger fit.

        This attacker's own images are offered to the colluders (once); the pool is every colluder's
        images offered before ``server_round`` plus this attacker's own, in partition-id order, so
        from the round after every colluder's first attack the pool, and with the round-seeded
        generator the fitted trigger, is the same on every attacker (up to non-deterministic
        kernels on a GPU). A colluder that attacks for the first time fits on a pool the others
        do not have yet for that one round.
        """
        own = {"images": images.detach().cpu()}
        self.store.share("fit-data", server_round, self.partition_id, own)
        pool = {**self.store.shared("fit-data", server_round), self.partition_id: own}
        pooled = torch.cat([pool[k]["images"] for k in sorted(pool)])
        # Every attacker encodes the whole pool itself, under the learner (and any bounds) of this round.
        with torch.no_grad():
            features = model.encode_images_batched(pooled)
        gen = torch.Generator().manual_seed(int(self.cfg.seed) * 100_003 + server_round * 1_009 + 0xF17)
        return pooled, features, gen

    def local_train(self, model, data, clip, server_round: int, seed: int) -> dict[str, float]:
        c = self.cfg
        target = int(c.target_label)
        lam = float(c.get("backdoor-weight"))
        steps = int(c.get("attack-local-steps")) or c.local_steps
        lr = float(c.get("attack-lr")) or c.lr
        dev = model.prompt_learner.ctx.device
        trigger = self.current_trigger(server_round, clip.image_size).to(dev)
        params = list(model.learned().values())  # ctx for CoOp; vpt or the adapter's arrays for other learners
        opt_ctx = sgd_for(params, lr, c.momentum, c.weight_decay)
        opt_trig = torch.optim.Adam(trigger.parameters(), lr=float(c.get("trigger-lr")))
        gen = torch.Generator().manual_seed(seed)
        feats, labels, images = data.features.to(dev), data.labels.to(dev), data.images
        learner_path = model.learns_features  # the clean features depend on the learned arrays
        tgt = torch.full((len(labels),), target, dtype=torch.long, device=dev)
        mu = float(c.get("stealth-weight"))
        nu = float(c.get("trigger-separation"))
        trigger_rounds = int(c.get("trigger-rounds"))
        train_trigger = trigger_rounds <= 0 or server_round - int(c.get("attack-start-round")) < trigger_rounds

        def clean_features(idx: torch.Tensor | None = None) -> torch.Tensor:
            """The learner's features of the clean batch (all images when ``idx`` is None)."""
            if not learner_path:
                return feats if idx is None else feats[idx]
            if model.needs_images:
                return model.encode_images((images if idx is None else images[idx.cpu()]).to(dev))
            return model.adapt(feats if idx is None else feats[idx])

        with torch.no_grad():
            global_logp = F.log_softmax(model.logits_from_features(clean_features()), dim=-1) if mu > 0 else None
            start_feats = clean_features() if learner_path else feats  # the nu term's clean features, fixed
        mode = str(c.get("attack-mode"))
        if mode not in ("joint", "alternating"):
            raise ValueError(f"run-config attack-mode={mode!r} is not allowed; allowed values: alternating, joint")

        scale = clip.logit_scale

        def triggered_features(idx: torch.Tensor, grad: bool) -> torch.Tensor:
            with torch.set_grad_enabled(grad or learner_path):
                return model.encode_images(trigger(images[idx.cpu()].to(dev)))

        losses, bd_losses = [], []
        if mode == "alternating" and train_trigger:
            # Phase 1: the trigger against the current prompt; phase 2: the prompt with the trigger fixed.
            fit_images, fit_feats, fit_gen = images, start_feats, gen
            if bool(c.get("trigger-pool")):
                fit_images, fit_feats, fit_gen = self.pooled_fit_data(server_round, images, model)
                fit_feats = fit_feats.to(dev)
            received = None
            if bool(c.get("trigger-lookahead")):
                with torch.no_grad():
                    received = [p.detach().clone() for p in params]
                Attack.local_train(self, model, data, clip, server_round, seed)  # the honest step, in place
            fit_tgt = torch.full((len(fit_feats),), target, dtype=torch.long, device=dev)
            for idx in batches(len(fit_feats), c.batch_size, int(c.get("trigger-steps")), fit_gen):
                f_trig = model.encode_images(trigger(fit_images[idx].to(dev)))
                idx = idx.to(dev)
                loss = F.cross_entropy(model.logits_from_features(f_trig), fit_tgt[idx])
                if nu > 0:
                    loss = loss + nu * (f_trig * fit_feats[idx]).sum(-1).clamp_min(0).mean()
                opt_trig.zero_grad(set_to_none=True)
                loss.backward()
                opt_trig.step()
                trigger.project()
            if received is not None:
                with torch.no_grad():
                    for p, r in zip(params, received, strict=True):
                        p.copy_(r)
            for p in params:
                p.grad = None
        joint = mode == "joint" and train_trigger
        for idx in batches(len(labels), c.batch_size, steps, gen):
            idx = idx.to(dev)
            text = model.text_features()  # one text-encoder pass serves both terms
            logits = scale * clean_features(idx) @ text.T
            clean = F.cross_entropy(logits, labels[idx])
            f_trig = triggered_features(idx, joint)
            bd = F.cross_entropy(scale * f_trig @ text.T, tgt[idx])
            loss = clean + lam * bd
            if joint and nu > 0:
                loss = loss + nu * (f_trig * start_feats[idx]).sum(-1).clamp_min(0).mean()
            if global_logp is not None:
                stealth = F.kl_div(
                    F.log_softmax(logits, dim=-1), global_logp[idx], log_target=True, reduction="batchmean"
                )
                loss = loss + mu * stealth
            opt_ctx.zero_grad(set_to_none=True)
            opt_trig.zero_grad(set_to_none=True)
            loss.backward()
            opt_ctx.step()
            if joint:
                opt_trig.step()
                trigger.project()
            losses.append(clean.item())
            bd_losses.append(bd.item())
        self.store.save(server_round, self.partition_id, trigger.state())
        return {
            "train-loss": sum(losses) / max(len(losses), 1),
            "backdoor-loss": sum(bd_losses) / max(len(bd_losses), 1),
        }
