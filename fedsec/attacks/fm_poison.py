"""FM-poison (Bi & Li, arXiv 2410.17573): the attacker controls the foundation model's synthetic data.

A server-side attack: no client is malicious (``num-malicious = 0``). The
foundation model that writes the server's synthetic set is compromised, so a
``fm-poison-rate`` share of the synthetic images carries a trigger and the
``target-label``. Server fusion (``server-fusion``) tunes the global prompt on
that set every round, so the backdoor reaches the global model, and through it
every client, without any anomalous client update for a defense to see.

The trigger (``fm-trigger``): ``patch`` (default: BadNets' checkerboard,
``patch-size`` at ``patch-top``/``patch-left``, the FM-FL papers' fixed
trigger) or ``blend`` (Blended's fixed pattern with ``blend-alpha``), or
``optimized`` (the stronger white-box option: a patch the attacker optimises
offline against the public frozen CLIP with a surrogate: a CoOp prompt whatever the federation's
learner, or with ``fm-trigger-surrogate = "learner"`` the federation's own learner, see
:func:`_optimized`). It is written to the attacker store (``round_0000``), where
only the evaluation reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from logging import INFO
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from flwr.common.logger import log

from fedsec.activation_bounds import bounded
from fedsec.attacks.base import BLEND_ALPHA, PATCH_PARAMS, Attack, register_attack
from fedsec.attacks.poisoning import checkerboard, clean_label_indices, poison_indices
from fedsec.models.prompt import build_prompt_model
from fedsec.registry import Param, Registry
from fedsec.triggers import BlendTrigger, PatchTrigger, trigger_from_dict

#: Attacker-store id of a server-side attacker (clients use their partition id).
SERVER_ID = -1

#: ``(cfg, clean synthetic images, labels, seed) -> trigger``
FM_TRIGGERS: Registry[Callable[..., torch.nn.Module]] = Registry("fm-poison trigger")


@FM_TRIGGERS.register("patch")
def _patch(cfg, images: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.nn.Module:
    size, image_size = int(cfg.get("patch-size")), int(images.shape[-1])
    return PatchTrigger(image_size, size, int(cfg.get("patch-top")), int(cfg.get("patch-left")), checkerboard(size))


@FM_TRIGGERS.register("blend")
def _blend(cfg, images: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(12345)
    size = int(images.shape[-1])
    return BlendTrigger(torch.rand(3, size, size, generator=g), float(cfg.get("blend-alpha")))


@FM_TRIGGERS.register("optimized")
def _optimized(cfg, images: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.nn.Module:
    """A patch the attacker optimises offline against the public frozen CLIP (cached on disk).

    The attacker owns the FM, not the federation: it trains a *surrogate* prompt
    (from the run's ``ctx-init``) jointly with the patch on its own clean
    synthetic images, ``CE(clean) + fm-backdoor-weight * CE(target | patch(x))``
    (BadPromptFL's objective, run by the FM attacker), for ``fm-trigger-steps``
    Adam steps at ``fm-trigger-lr``. A plain checkerboard barely moves this
    encoder's features (cosine 0.997 to the clean image), so no prompt can
    learn it; the optimised patch moves them where a prompt can.

    With ``attack-under-bounds = true`` the FM attacker adapts to the activation-bound
    defense, whose settings (``bounds-*``) it knows: it computes the bounds the defense's
    initialisation would give on its own clean synthetic images (the defense learns them
    on the same images), clean images only, and optimises the patch and its surrogate
    through those clamps (:func:`attacker_bounds`), so the trigger works inside the
    activation range the defense allows.

    ``fm-trigger-surrogate`` says what the attacker models of the federation: ``coop``
    (default) a CoOp prompt on the frozen CLIP, whatever the federation's learner;
    ``learner`` the federation's own learner (``learner`` and its keys, a stronger
    white-box attacker that knows the app's configuration), whose every learned array
    (visual prompt tokens, adapter weights, ``ctx``) is optimised with the patch through
    the learner's image path, so the patch is fitted to what that learner does with it.
    """
    from fedsec.data import load_dataset
    from fedsec.node import clip_for

    clip = clip_for(cfg)
    size, image_size = int(cfg.get("patch-size")), int(images.shape[-1])
    steps, lam, lr = (
        int(cfg.get("fm-trigger-steps")),
        float(cfg.get("fm-backdoor-weight")),
        float(cfg.get("fm-trigger-lr")),
    )
    key = json.dumps(
        [
            1,
            clip.identity(),
            cfg.ctx_init,
            cfg.n_ctx,
            cfg.class_specific,
            size,
            cfg.get("patch-top"),
            cfg.get("patch-left"),
            steps,
            lam,
            lr,
            int(cfg.target_label),
            seed,
            len(images),
            float(images.sum()),
            *_bounds_key(cfg),
            *_surrogate_key(cfg),
        ]
    )
    cache = Path(os.environ.get("FEDSEC_CACHE_DIR", Path.home() / ".cache" / "fedsec")) / "fm-trigger"
    path = cache / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if path.exists():
        return trigger_from_dict(torch.load(path, weights_only=False))
    names = load_dataset(cfg.dataset, "test", cfg.data_root).classnames  # the FM is prompted with them
    model = build_prompt_model(cfg, clip, names)
    as_learner = _learner_surrogate(cfg)
    if as_learner:
        from fedsec.models.learners import build_learner

        model = build_learner(cfg, model)
        surrogate = list(model.learned().values())
    else:
        surrogate = [model.prompt_learner.ctx]
    trigger = PatchTrigger(image_size, size, int(cfg.get("patch-top")), int(cfg.get("patch-left")), seed=seed)
    opt = torch.optim.Adam([*trigger.parameters(), *surrogate], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    clamps = attacker_bounds(cfg, model, images, labels) if bool(cfg.get("attack-under-bounds")) else None
    feats = None
    if not as_learner:  # the frozen encoder's features: fixed, computed once
        with bounded(model.bound_root(), clamps):
            feats = clip.encode_images_batched(images)
    target = torch.full((32,), int(cfg.target_label), dtype=torch.long)
    log(
        INFO,
        "[fedsec] fm-poison: optimising the trigger (%d steps, %s surrogate%s)",
        steps,
        cfg.learner if as_learner else "coop",
        ", under bounds" if clamps else "",
    )
    for _ in range(steps):
        idx = torch.randperm(len(images), generator=gen)[:32]
        with bounded(model.bound_root(), clamps):
            clean = model(images[idx]) if feats is None else model.logits_from_features(feats[idx])
            loss = F.cross_entropy(clean, labels[idx]) + lam * F.cross_entropy(
                model(trigger(images[idx])), target[: len(idx)]
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        trigger.project()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(trigger.state(), path)
    return trigger.eval()


def _bounds_key(cfg) -> list:
    """The settings an adaptive FM attacker's trigger depends on (nothing without ``attack-under-bounds``)."""
    if not bool(cfg.get("attack-under-bounds")):
        return []
    keys = ("bounds-layers", "bounds-granularity", "bounds-init-quantile", "bounds-two-sided", "bounds-tune")
    if str(cfg.get("bounds-tune")) != "none":
        keys += ("bounds-tune-quantiles", "bounds-tune-tolerance", "bounds-steps", "bounds-lr", "bounds-penalty",
                 "bounds-loss", "bounds-batch-size", "bounds-trim")  # fmt: skip
    return ["under-bounds", *(cfg.get(k) for k in keys)]


def _learner_surrogate(cfg) -> bool:
    """Whether the surrogate is the run's learner (``learner`` on a learner other than CoOp, which is the default)."""
    return str(cfg.get("fm-trigger-surrogate")) == "learner" and cfg.learner != "coop"


def _surrogate_key(cfg) -> list:
    """The learner settings a ``learner`` surrogate's trigger depends on (nothing for the default ``coop``)."""
    if not _learner_surrogate(cfg):
        return []
    from fedsec.models.learners import LEARNERS

    keys = [p.key for p in LEARNERS.component(cfg.learner).params]
    return ["surrogate-learner", cfg.learner, cfg.seed, *(cfg.get(k) for k in keys)]


def attacker_bounds(cfg, model, images: torch.Tensor, labels: torch.Tensor | None = None):
    """The bounds the defense's initialisation gives on the attacker's clean synthetic ``images``.

    The layers of ``bounds-layers`` that the attacker's surrogate ``model`` has (a CoOp prompt on
    the frozen CLIP, or the federation's learner with ``fm-trigger-surrogate = "learner"``), at
    ``bounds-init-quantile`` per ``bounds-granularity`` (two-sided with ``bounds-two-sided``):
    what :class:`fedsec.bounds_clip.BoundLearner` starts from on the same images. With
    ``bounds-tune = "holdout"`` the attacker runs the defender's own procedure
    (:func:`fedsec.activation_bounds.tune_quantile`, with its ``labels``) on its images and
    surrogate to guess the quantile the server will choose. Layers of a learner the surrogate
    does not have (``adapter.*`` under a CoOp surrogate) are skipped.
    """
    from fedsec.activation_bounds import init_bounds, match_layer
    from fedsec.bounds_clip import tune_from_config

    root = model.bound_root()
    names = [n for n, _ in root.named_modules() if n]
    patterns = [p.strip() for p in str(cfg.get("bounds-layers")).split(",") if p.strip()]
    layers = [n for n in names if any(match_layer(n, p) for p in patterns)]
    if not layers:
        return None
    quantile = float(cfg.get("bounds-init-quantile"))
    granularity, two_sided = str(cfg.get("bounds-granularity")), bool(cfg.get("bounds-two-sided"))
    if str(cfg.get("bounds-tune")) == "holdout" and labels is not None:  # the server's round-1 procedure
        quantile, _ = tune_from_config(cfg, root, model.encode_images, model, images, labels, layers, server_round=1)
    return init_bounds(
        root, model.encode_images, images, layers, granularity, quantile, two_sided=two_sided, channel_dim=-1
    )


@register_attack(
    "fm-poison",
    params=(
        Param("fm-poison-rate", 0.1, "fraction of the synthetic set the FM attacker poisons", range=(0.0, 1.0)),
        Param(
            "fm-poison-label",
            "dirty",
            "dirty: non-target images triggered and relabelled to the target (the FM-FL papers); "
            "clean: target-class images triggered, labels kept (clean-label)",
            choices=("dirty", "clean"),
        ),
        Param(
            "fm-trigger",
            "patch",
            "the FM attacker's trigger: patch or blend (fixed, the FM-FL papers), optimized (white-box)",
            choices=lambda: FM_TRIGGERS.names(),
        ),
        Param("fm-trigger-steps", 150, "Adam steps of the optimised trigger", range=(0, None)),
        Param("fm-backdoor-weight", 2.0, "weight of CE(target | patch(x)) when optimising it", range=(0.0, None)),
        Param("fm-trigger-lr", 0.05, "learning rate of the optimised trigger", range=(0.0, None)),
        Param(
            "fm-trigger-surrogate",
            "coop",
            "what the optimised trigger's attacker models of the federation: coop (a CoOp prompt on the frozen "
            "CLIP) or learner (the run's own learner, trained with the patch through its image path)",
            choices=("coop", "learner"),
        ),
        *PATCH_PARAMS,
        BLEND_ALPHA,
    ),
)
class FMPoison(Attack):
    """Poison ``fm-poison-rate`` of the synthetic set with a fixed trigger and the target label."""

    client_side = False
    #: The synthetic set is poisoned before any learner sees it; fusion trains whatever the learner learns.
    image_path_learners = True

    @classmethod
    def config_problem(cls, c) -> str | None:
        """fm-poison runs on the server: no malicious clients, and server fusion on."""
        if c.num_malicious != 0 or str(c.get("malicious-ids")).strip():
            return "run-config attack='fm-poison' is a server-side attack: set num-malicious=0 and malicious-ids=''"
        if str(c.get("server-fusion")) == "none":
            return (
                "run-config attack='fm-poison' needs server-fusion != 'none': the poisoned synthetic data "
                "reaches the model only through server fusion"
            )
        if not 0.0 <= float(c.get("fm-poison-rate")) <= 1.0:
            return f"run-config fm-poison-rate={c.get('fm-poison-rate')!r} is out of range [0, 1]"
        if str(c.get("fm-trigger-surrogate")) != "coop" and str(c.get("fm-trigger")) != "optimized":
            return (
                f"run-config fm-trigger-surrogate={c.get('fm-trigger-surrogate')!r} needs fm-trigger='optimized' "
                f"(a fixed {c.get('fm-trigger')!r} trigger has no surrogate)"
            )
        if bool(c.get("attack-under-bounds")) and str(c.get("fm-trigger")) != "optimized":
            return (
                f"run-config attack-under-bounds = true needs fm-trigger='optimized' (a fixed "
                f"{c.get('fm-trigger')!r} trigger has nothing to adapt)"
            )
        return None

    def make_trigger(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.nn.Module:
        """The trigger named by ``fm-trigger``, built from the clean synthetic set."""
        return FM_TRIGGERS.get(str(self.cfg.get("fm-trigger")))(self.cfg, images, labels, seed)

    def poison_synthetic(self, images: torch.Tensor, labels: torch.Tensor, seed: int):
        """Replace ``fm-poison-rate`` of the images by triggered copies labelled the target.

        ``fm-poison-label = "dirty"``: non-target images, relabelled (Li et al.; Bi & Li); ``"clean"``:
        target-class images only, so no label changes (at most the whole target class).
        """
        c = self.cfg
        trigger = self.make_trigger(images, labels, seed)
        choose = clean_label_indices if str(c.get("fm-poison-label")) == "clean" else poison_indices
        idx = choose(labels, float(c.get("fm-poison-rate")), c.target_label, seed + 0xF0)
        images, labels = images.clone(), labels.clone()
        if len(idx):
            with torch.no_grad():
                images[idx] = trigger(images[idx])
            labels[idx] = c.target_label
        self.store.save(0, SERVER_ID, trigger.state())
        return images, labels, np.asarray(idx, dtype=np.int64)
