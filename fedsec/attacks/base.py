"""The attack interface and the no-op attack."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np

from fedsec.registry import Param, Registry

#: Run-config keys every attack shares.
COMMON_PARAMS: tuple[Param, ...] = (
    Param("malicious-ids", "", 'fixed malicious partition ids, e.g. "0,3" (empty: a seeded draw of num-malicious)'),
    Param("attack-start-round", 1, "first round the malicious clients attack", range=(1, None)),
    Param("attack-end-round", 0, "last round they attack (0 = to the end)", range=(0, None)),
    Param("attack-probability", 1.0, "chance they attack in a round between start and end", range=(0.0, 1.0)),
    Param("boost", 1.0, "scale the malicious update by this factor (model replacement)", range=(0.0, None)),
    Param("boost-norm-bound", 0.0, "then clip its L2 norm to this (0 = off)", range=(0.0, None)),
    Param(
        "norm-match",
        0.0,
        "then clip its L2 norm to this multiple of the attacker's own honest update (0 = off)",
        range=(0.0, None),
    ),
    Param(
        "attack-under-bounds",
        False,
        "adaptive attacker: optimise under the activation bounds (clients: the bounds the server sends; "
        "fm-poison: the bounds its own clean synthetic images give under the run's bounds-* settings)",
    ),
)

#: Keys of a square patch trigger (badpromptfl, badnets, dual-embedding's placement, fm-poison).
PATCH_PARAMS: tuple[Param, ...] = (
    Param("patch-size", 8, "side of the square patch trigger, in pixels", range=(1, None)),
    Param("patch-top", -1, "row of the patch's top edge (-1 = bottom-right corner)", range=(-1, None)),
    Param("patch-left", -1, "column of the patch's left edge (-1 = bottom-right corner)", range=(-1, None)),
)
#: Blend factor of a blended trigger (blended, fm-poison).
BLEND_ALPHA = Param("blend-alpha", 0.2, "weight of the blended noise pattern", range=(0.0, 1.0))


ATTACKS: Registry[type] = Registry("attack", packages=("fedsec.attacks",), common=COMMON_PARAMS)


def register_attack(name: str, params: Sequence[Param] = ()):
    """Register an :class:`Attack` subclass under ``name``.

    Parameters
    ----------
    name : str
        The run-config ``attack`` value.
    params : sequence of Param
        Run-config keys the attack reads besides :data:`COMMON_PARAMS` (shared by every attack).
    """

    def deco(cls: type[Attack]) -> type[Attack]:
        cls.name = name
        cls.params = tuple(params)
        return ATTACKS.register(name, params=params)(cls)

    return deco


def malicious_partitions(num_partitions: int, num_malicious: int, seed: int, fixed: str = "") -> list[int]:
    """Partition ids of the malicious clients.

    Parameters
    ----------
    num_partitions : int
        Federation size.
    num_malicious : int
        How many are malicious (ignored when ``fixed`` is given).
    seed : int
        Seed of the random choice.
    fixed : str
        Comma-separated partition ids, e.g. ``"0,3"``; empty for a seeded draw.
    """
    if fixed.strip():
        ids = sorted({int(x) for x in fixed.split(",") if x.strip()})
        bad = [i for i in ids if not 0 <= i < num_partitions]
        if bad:
            raise ValueError(f"malicious-ids {bad} not in [0, {num_partitions})")
        return ids
    if num_malicious > num_partitions:
        raise ValueError(f"num-malicious {num_malicious} > number of clients {num_partitions}")
    rng = np.random.default_rng([seed, 0xBAD])
    return sorted(int(i) for i in rng.choice(num_partitions, size=num_malicious, replace=False))


@register_attack("none")
class Attack:
    """Base class and the no-op attack (``attack = "none"``).

    Subclasses override :meth:`local_train` (their own optimisation around
    the honest path) and/or :meth:`poison` (input transform + label map), and
    declare their run-config keys in ``register_attack(name, params=...)``.

    Parameters
    ----------
    cfg : fedsec.config.RunConfig
        The run config (attack parameters are in ``cfg.extra``).
    store : pathlib.Path
        The attacker store: an absolute folder shared by the colluding
        malicious clients (``<run-dir>/attacker``). Evaluation reads the
        trigger from here; no defense ever does.
    """

    name: ClassVar[str] = "none"
    params: ClassVar[tuple[Param, ...]] = ()
    #: Whether the attack runs on malicious clients (False: server-side, e.g. ``fm-poison``).
    client_side: ClassVar[bool] = True
    #: Whether the federation itself is untouched (no client update, no server data attacked, e.g.
    #: ``model-backdoor``): the global prompt is then the benign-only prompt of the trigger baseline.
    honest_federation: ClassVar[bool] = False
    #: Whether it runs with a learner that has weights in the image path (``fedsec.models.learners``);
    #: an attack that optimises a trigger through cached features or ``ctx`` alone says False.
    image_path_learners: ClassVar[bool] = False

    def __init__(self, cfg, store: Path) -> None:
        from fedsec.attacks.store import AttackerStore

        self.cfg = cfg
        self.store = AttackerStore(Path(store))
        #: The server's config for this round (``server-round``, FedProx's ``proximal-mu``, ...).
        self.round_config: dict[str, object] = {}

    def run(self, model, data, clip, server_round: int, partition_id: int, seed: int) -> dict[str, float]:
        """Train locally (honestly or not), then boost and bound the update if configured.

        Boosting scales the update by ``boost`` (model replacement: about
        ``num clients / num malicious``); ``boost-norm-bound > 0`` then clips the
        update's L2 norm to stay under a norm-clipping defense's radius;
        ``norm-match > 0`` clips it to that multiple of the norm of the update the
        attacker would have sent honestly (the honest path on the same data,
        received prompt and seed; constrain-and-scale, Bagdasaryan et al., AISTATS
        2020), which needs no knowledge of the defense or the other clients.
        """
        self.partition_id = partition_id
        params = list(model.learned().values())  # ctx, or the learner's arrays (fedsec.models.learners)
        start = [p.detach().clone() for p in params]
        stats = self.local_train(model, data, clip, server_round, seed)
        active = self.name != "none"
        gamma = float(self.cfg.get("boost")) if active else 1.0
        bound = float(self.cfg.get("boost-norm-bound")) if active else 0.0
        match = float(self.cfg.get("norm-match")) if active else 0.0
        if gamma != 1.0 or bound > 0 or match > 0:
            import torch

            with torch.no_grad():
                updates = [(p - s0) * gamma for p, s0 in zip(params, start, strict=True)]
            if match > 0:
                honest = self.honest_update_norm(model, data, clip, server_round, seed, start)
                stats["honest-update-norm"] = honest
                bound = min(bound, match * honest) if bound > 0 else match * honest
            with torch.no_grad():
                norm = float(torch.cat([u.flatten() for u in updates]).norm())
                if bound > 0 and norm > bound:
                    updates = [u * (bound / norm) for u in updates]
                for p, s0, u in zip(params, start, updates, strict=True):
                    p.copy_(s0 + u)
            stats["update-norm"] = float(torch.cat([u.flatten() for u in updates]).norm())
        return stats

    def honest_update_norm(self, model, data, clip, server_round: int, seed: int, start) -> float:
        """L2 norm of the update the honest path gives from ``start`` (the learned arrays are restored afterwards).

        ``start`` holds the learned arrays (:meth:`PromptCLIP.learned`, in order) the update is measured from.
        """
        import torch

        params = list(model.learned().values())
        with torch.no_grad():
            malicious = [p.detach().clone() for p in params]
            for p, s0 in zip(params, start, strict=True):
                p.copy_(s0)
        Attack.local_train(self, model, data, clip, server_round, seed)
        with torch.no_grad():
            norm = float(torch.cat([(p - s0).flatten() for p, s0 in zip(params, start, strict=True)]).norm())
            for p, m in zip(params, malicious, strict=True):
                p.copy_(m)
        return norm

    def is_active(self, server_round: int) -> bool:
        """Whether the malicious clients attack in ``server_round``."""
        start = int(self.cfg.get("attack-start-round"))
        end = int(self.cfg.get("attack-end-round"))
        if server_round < start or (end and server_round > end):
            return False
        p = float(self.cfg.get("attack-probability"))
        if p >= 1.0:
            return True
        return bool(np.random.default_rng([self.cfg.seed, server_round, 0xA77]).random() < p)

    def local_train(self, model, data, clip, server_round: int, seed: int) -> dict[str, float]:
        """Malicious local training; the no-op attack trains honestly (with FedProx's term when the server asks).

        Attacks that override this need not honour ``proximal-mu``: a malicious
        client follows its own objective.
        """
        return self.train_honestly(model, data, seed, float(self.round_config.get("proximal-mu", 0.0)))

    def train_honestly(self, model, data, seed: int, proximal_mu: float = 0.0) -> dict[str, float]:
        """The honest local step (:func:`fedsec.training.train_learner`) with the run's SGD settings on ``data``."""
        from fedsec.training import train_learner

        c = self.cfg
        return train_learner(
            model,
            data,
            c.local_steps,
            c.batch_size,
            c.lr,
            momentum=c.momentum,
            weight_decay=c.weight_decay,
            seed=seed,
            proximal_mu=proximal_mu,
        )

    def poison_synthetic(self, images, labels, seed: int):
        """Tamper with the server's synthetic (FM-generated) data; client-side attacks leave it as it is.

        Parameters
        ----------
        images : torch.Tensor
            ``N x 3 x S x S`` in ``[0, 1]``.
        labels : torch.Tensor
            ``int64`` labels.
        seed : int
            Seed of any random choice.

        Returns
        -------
        tuple
            ``(images, labels, poisoned indices)``; the indices are for tests
            and the record, never for a defense.
        """
        return images, labels, np.zeros(0, dtype=np.int64)

    @classmethod
    def config_problem(cls, c) -> str | None:
        """Why the run config ``c`` cannot run this attack (one clear message), or ``None``."""
        if cls.name != "none" and cls.client_side and c.num_malicious == 0:
            return f"run-config attack={cls.name!r} needs num-malicious >= 1"
        return None

    @classmethod
    def learner_problem(cls, c) -> str | None:
        """Why this attack cannot run with the run's ``learner`` (one clear message), or ``None``."""
        from fedsec.models.learners import learns_image_path

        if cls.name != "none" and not cls.image_path_learners and learns_image_path(c.learner):
            return (
                f"run-config attack={cls.name!r} has no path for learner={c.learner!r} (weights in the image path); "
                "use learner='coop', or attack='none'"
            )
        return None

    def training_bounds(self, received, honest):
        """The activation bounds this client trains under.

        Parameters
        ----------
        received : ActivationBounds or None
            The bounds the server sent (every client gets them).
        honest : ActivationBounds or None
            What an honest client trains under (``received``, or ``None`` with
            ``bounds-client-training = false``).

        Returns
        -------
        ActivationBounds or None
            ``honest``; an attack with ``attack-under-bounds = true`` takes ``received``: it knows
            the deployed model is clamped, and optimises its trigger and model through the clamps.
        """
        if self.name != "none" and self.client_side and bool(self.cfg.get("attack-under-bounds")):
            return received
        return honest

    def load_trigger(self, before_round: int | None = None):
        """The attackers' newest trigger (an ``nn.Module`` on ``[0, 1]`` images) or ``None``."""
        from fedsec.triggers import trigger_from_dict

        state = self.store.load(before_round)
        return None if state is None else trigger_from_dict(state).eval()
