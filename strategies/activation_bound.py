"""The activation-bound defense (Bi & Li, arXiv 2410.17573) around any aggregation rule.

After the wrapped rule (and server fusion, if on) produced the new global
``ctx``, the server learns per-channel (or per-neuron) upper bounds ``tau`` on
internal activations of the global model on its synthetic data
(:mod:`fedsec.activation_bounds`): initialised from activation statistics in
the first round, then ``bounds-steps`` optimisation steps every round (warm
start) that keep the clamped model's outputs close to the unclamped model's
while a norm penalty shrinks the bounds. Model parameters never change. The
bounds travel to the clients beside ``ctx`` as a separate ``"bounds"``
``ArrayRecord`` in every train/evaluate message (clients reply with ``ctx``
only, which reply validation checks as before); clients and the evaluation
apply them as clamps ``min(h, tau)`` in every forward pass (with
``bounds-two-sided = true`` also ``max(h, lo)``, lower bounds at the
``1 - bounds-init-quantile`` of the same statistics).

Switch it on with ``activation-bounds = true`` (with any ``strategy``).

The defense in three parts, one job each:

* :mod:`fedsec.activation_bounds`: the maths on any ``torch.nn.Module``
  (statistics, clamp hooks, optimisation);
* :mod:`fedsec.bounds_clip`: :class:`BoundLearner`, fedsec's learner on the
  CLIP prompt classifier and the synthetic data;
* :mod:`strategies.bounds_wrapper`: :class:`~strategies.bounds_wrapper.BoundsWrapper`,
  the generic Flower wrapper.

This module is the glue for fedsec's ServerApp: the run-config keys, the
registered ``activation-bounds`` wrapper, and :class:`ActivationBoundWrapper`
(the generic wrapper on one model array, plus the unfused reference prompt the
``bounds-data = "filtered"`` learner needs). Its public names stay importable
from here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsec.bounds_clip import BoundLearner
from fedsec.registry import Param
from strategies.bounds_wrapper import BoundsWrapper, bounds_to_record
from strategies.common import require_key
from strategies.registry import StrategyContext, register_wrapper

__all__ = [
    "BOUNDS_KEY",
    "BOUND_STATE",
    "PARAMS",
    "SHADOW_STATE",
    "ActivationBoundWrapper",
    "BoundLearner",
    "activation_bounds",
    "bounds_record",
]

#: Record key of the bounds in the messages to the clients.
BOUNDS_KEY = "bounds"
#: Key prefix of the bounds in a checkpointed strategy state.
BOUND_STATE = BOUNDS_KEY + "/"
#: Key of the unfused reference prompt in a checkpointed strategy state.
SHADOW_STATE = "bounds-shadow"

PARAMS: tuple[Param, ...] = (
    Param("activation-bounds", False, "learn activation bounds on the synthetic data and send them to the clients"),
    Param("bounds-layers", "visual.transformer.resblocks.*", "comma-separated module name patterns to bound"),
    Param("bounds-granularity", "neuron", "one bound per neuron, or per channel", choices=("channel", "neuron")),
    Param("bounds-init-quantile", 1.0, "initial bound: this quantile of the activations", range=(0.0, 1.0)),
    Param("bounds-steps", 20, "optimisation steps per round", range=(0, None)),
    Param("bounds-lr", 0.05, "learning rate of the bounds", range=(0.0, None)),
    Param("bounds-penalty", 0.5, "weight of the norm penalty that shrinks the bounds", range=(0.0, None)),
    Param(
        "bounds-loss", "kl", "clamped vs unclamped outputs: KL, or CE to the unclamped prediction", choices=("kl", "ce")
    ),
    Param("bounds-batch-size", 64, "synthetic images per optimisation step", range=(1, None)),
    Param(
        "bounds-data",
        "all",
        "learn on all synthetic images, or those the unfused prompt agrees with",
        choices=("all", "filtered"),
    ),
    Param("bounds-two-sided", False, "also lower bounds (at 1 - bounds-init-quantile)"),
    Param("bounds-trim", 0.0, "fraction of the largest per-image losses ignored", range=(0.0, 0.99)),
    Param("bounds-client-training", True, "clients also train under the clamps"),
)


def bounds_record(bounds: dict[str, np.ndarray]) -> ArrayRecord:
    """The ``ArrayRecord`` of bounds sent beside ``ctx`` (one array per bounded layer)."""
    return bounds_to_record(bounds)


class ActivationBoundWrapper(BoundsWrapper):
    """Learn activation bounds of one model array after every aggregation and send them to the clients.

    :class:`~strategies.bounds_wrapper.BoundsWrapper` on the single array
    ``array_name``, with the bounds under :data:`BOUNDS_KEY`, plus an unfused
    reference of that array (:meth:`_advance_shadow`) handed to a learner that
    has a ``reference`` attribute before every call.

    Parameters
    ----------
    inner : Strategy
        Any strategy whose aggregate holds the array ``array_name``.
    learn : callable
        ``(array, server_round) -> (bounds as name -> array, metrics)``.
    array_name : str
        The model array the bounds are learned for (the ServerApp names fedsec's
        prompt array); an aggregate or instruction without it raises
        :class:`~strategies.common.MissingKeyError`.

    Attributes
    ----------
    bounds : dict[str, np.ndarray] or None
        The newest bounds (None before the first aggregation).
    shadow : np.ndarray or None
        The unfused reference array (checkpointed under :data:`SHADOW_STATE`).
    """

    def __init__(
        self,
        inner: Strategy,
        learn: Callable[[np.ndarray, int], tuple[dict[str, np.ndarray], dict]],
        array_name: str,
    ) -> None:
        super().__init__(inner, learn, array_keys=(array_name,), bounds_key=BOUNDS_KEY)  # type: ignore[arg-type]
        self.array_name = array_name
        self.shadow: np.ndarray | None = None  # the unfused reference prompt (see _advance_shadow)
        self._sent: np.ndarray | None = None  # the global array sent to the clients this round

    def state_dict(self) -> dict[str, np.ndarray]:
        """The newest bounds (``bounds/<layer>``) and the shadow: a resumed run continues from them."""
        out = super().state_dict()
        if self.shadow is not None:
            out[SHADOW_STATE] = self.shadow
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore the bounds and the shadow of :meth:`state_dict`; the learner warm-starts from the bounds."""
        if SHADOW_STATE in state:
            self.shadow = np.asarray(state[SHADOW_STATE], dtype=np.float32).copy()
        super().load_state_dict(state)

    def _advance_shadow(self, aggregate: np.ndarray) -> np.ndarray:
        """Move the unfused reference prompt by this round's client update; return it.

        The clients' update is the aggregate before server fusion (``pre_fusion_ctx`` of a
        :class:`~strategies.fusion.ServerFusion` inside, else the aggregate) minus the global
        array they received. Added to a prompt that never went through fusion, it gives
        the model the clients alone would have: a poisoned FM's backdoor enters through
        fusion and reaches the clients' own prompts, but not their updates on clean data.
        """
        pre = getattr(self.inner, "pre_fusion_ctx", None)
        pre = aggregate if pre is None else pre
        if self._sent is None or self._sent.shape != pre.shape:
            return pre
        if self.shadow is None:
            self.shadow = self._sent.copy()
        self.shadow = (self.shadow + (pre - self._sent)).astype(np.float32)
        return self.shadow

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the array sent, delegate, then add the bounds record to every message."""
        self._sent = require_key(arrays, self.array_name, "activation bounds").numpy().copy()
        return super().configure_train(server_round, arrays, config, grid)

    def learn_bounds(self, arrays: dict[str, np.ndarray], server_round: int) -> tuple[dict, Mapping[str, float]]:
        """Advance the shadow for a learner with a ``reference``, then learn on the one array."""
        aggregate = arrays[self.array_name]
        if hasattr(self.learn, "reference"):
            self.learn.reference = self._advance_shadow(aggregate)
        return self.learn(aggregate, server_round)  # type: ignore[arg-type]


def _learner_problem(cfg) -> str | None:
    """The bounds are learned on the frozen encoder's activations and clamp a ``ctx``-only prompt."""
    if not bool(cfg.get("activation-bounds")):
        return None
    return (
        f"run-config activation-bounds = true has no path for learner={cfg.learner!r} (weights in the image path: "
        "the bounds are learned on the frozen encoder and trained with ctx alone); use learner='coop'"
    )


@register_wrapper("activation-bounds", params=PARAMS, order=20)
def activation_bounds(inner: Strategy, sctx: StrategyContext) -> Strategy:
    """``ActivationBoundWrapper`` around ``inner`` when ``activation-bounds = true``."""
    if not bool(sctx.cfg.get("activation-bounds")):
        return inner
    if sctx.synthetic_data is None:
        raise ValueError("activation-bounds needs the server's synthetic data (StrategyContext.synthetic_data)")
    if sctx.array_name is None:
        raise ValueError("activation-bounds needs the name of the prompt array (StrategyContext.array_name)")
    return ActivationBoundWrapper(inner, BoundLearner(sctx.cfg, sctx.synthetic_data), sctx.array_name)


activation_bounds.learner_problem = _learner_problem  # type: ignore[attr-defined]
