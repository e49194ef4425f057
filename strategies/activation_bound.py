"""The activation-bound defense (Bi & Li, arXiv 2410.17573) around any aggregation rule.

After the wrapped rule (and server fusion, if on) produced the new global
model (its learned arrays: ``ctx``, ``vpt``, an adapter's), the server learns
per-channel (or per-neuron) upper bounds ``tau`` on internal activations of
the global model on its synthetic data
(:mod:`fedsec.activation_bounds`): initialised from activation statistics in
the first round, then ``bounds-steps`` optimisation steps every round (warm
start) that keep the clamped model's outputs close to the unclamped model's
while a norm penalty shrinks the bounds. Model parameters never change. The
bounds travel to the clients beside the model as a separate ``"bounds"``
``ArrayRecord`` in every train/evaluate message (clients reply with their
learned arrays only, which reply validation checks as before); clients and
the evaluation apply them as clamps ``min(h, tau)`` in every forward pass (with
``bounds-two-sided = true`` also ``max(h, lo)``, lower bounds at the
``1 - bounds-init-quantile`` of the same statistics).

Switch it on with ``activation-bounds = true`` (with any ``strategy`` and any
``learner``). Layers are named in the learner's
:meth:`~fedsec.models.prompt.PromptCLIP.bound_root`: the frozen encoder's
(``visual.transformer.resblocks.*``; with visual prompts their outputs include
the prompt tokens) and CLIP-Adapter's hidden layer (``adapter.hidden``), the
paper's form on weights that learn.

The defense in three parts, one job each:

* :mod:`fedsec.activation_bounds`: the maths on any ``torch.nn.Module``
  (statistics, clamp hooks, optimisation);
* :mod:`fedsec.bounds_clip`: :class:`BoundLearner`, fedsec's learner on the
  CLIP prompt classifier and the synthetic data;
* :mod:`strategies.bounds_wrapper`: :class:`~strategies.bounds_wrapper.BoundsWrapper`,
  the generic Flower wrapper.

This module is the glue for fedsec's ServerApp: the run-config keys, the
registered ``activation-bounds`` wrapper, and :class:`ActivationBoundWrapper`
(the generic wrapper on the learned arrays, plus the unfused reference model the
``bounds-data = "filtered"`` learner needs). Its public names stay importable
from here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsec.bounds_clip import BoundLearner, quantile_list_problem
from fedsec.registry import Param
from strategies.bounds_wrapper import BoundsWrapper, bounds_to_record
from strategies.common import select_arrays
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
#: Key prefix of the initial global arrays (``reference = "initial"``) in a checkpointed strategy state.
INITIAL_STATE = "bounds-initial"

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
        "learn on all synthetic images; those the unfused shadow model agrees with (filtered); or, in every "
        "class, the bounds-keep share it gives the highest probability of their label (ranked)",
        choices=("all", "filtered", "ranked"),
    ),
    Param(
        "bounds-reference",
        "shadow",
        "filtered/ranked: the model that filters, the unfused shadow (the clients' updates without fusion) or "
        "the initial global model (never fused, never drifts)",
        choices=("shadow", "initial"),
    ),
    Param(
        "bounds-keep",
        0.5,
        "ranked: share of each class's synthetic images kept",
        range=(0.0, 1.0),
    ),
    Param("bounds-two-sided", False, "also lower bounds (at 1 - bounds-init-quantile)"),
    Param("bounds-trim", 0.0, "fraction of the largest per-image losses ignored", range=(0.0, 0.99)),
    Param("bounds-client-training", True, "clients also train under the clamps"),
    Param(
        "bounds-tune",
        "none",
        "choose bounds-init-quantile on the synthetic set in the first round: the tightest of bounds-tune-quantiles "
        "whose bounds take at most bounds-tune-tolerance of accuracy on held-out synthetic images (holdout, 2-fold)",
        choices=("none", "holdout"),
    ),
    Param(
        "bounds-tune-quantiles",
        "0.99,0.98,0.95,0.9,0.85,0.8,0.7",
        "holdout: candidate quantiles, comma-separated, each in (0, 1]",
        check=quantile_list_problem,
    ),
    Param(
        "bounds-tune-tolerance",
        0.02,
        "holdout: largest accuracy drop (a share) the bounds may cause on held-out synthetic images",
        range=(0.0, 1.0),
    ),
)


def bounds_record(bounds: dict[str, np.ndarray]) -> ArrayRecord:
    """The ``ArrayRecord`` of bounds sent beside ``ctx`` (one array per bounded layer)."""
    return bounds_to_record(bounds)


class ActivationBoundWrapper(BoundsWrapper):
    """Learn activation bounds of the model's learned arrays after every aggregation and send them to the clients.

    :class:`~strategies.bounds_wrapper.BoundsWrapper` on the arrays ``array_names``, with the
    bounds under :data:`BOUNDS_KEY`, plus an unfused reference of those arrays
    (:meth:`_advance_shadow`) handed to a learner that has a ``reference`` attribute before
    every call.

    Parameters
    ----------
    inner : Strategy
        Any strategy whose aggregate holds the arrays ``array_names``.
    learn : callable
        ``(arrays, server_round) -> (bounds as name -> array, metrics)``, ``arrays`` a dict of the
        ``array_names`` arrays.
    array_names : str or sequence of str
        The model arrays the bounds are learned for (the ServerApp names the learner's arrays); an
        aggregate or instruction without one raises :class:`~strategies.common.MissingKeyError`.
    reference : {"shadow", "initial"}
        What the learner's ``reference`` is: the unfused shadow (:meth:`_advance_shadow`), or the
        global arrays sent in the first round (the initial model: never fused, so it never learns
        the poisoned synthetic data, and never drifts; with ``server-fusion = "init"`` it has seen
        the synthetic set, and the shadow is the reference to use).

    Attributes
    ----------
    bounds : dict[str, np.ndarray] or None
        The newest bounds (None before the first aggregation).
    shadow : dict[str, np.ndarray] or None
        The unfused reference arrays (checkpointed under ``SHADOW_STATE/<name>``).
    """

    def __init__(
        self,
        inner: Strategy,
        learn: Callable[[dict[str, np.ndarray], int], tuple[dict[str, np.ndarray], dict]],
        array_names: str | Sequence[str],
        reference: str = "shadow",
    ) -> None:
        if reference not in ("shadow", "initial"):
            raise ValueError(f"reference must be 'shadow' or 'initial', got {reference!r}")
        names = (array_names,) if isinstance(array_names, str) else tuple(array_names)
        super().__init__(inner, learn, array_keys=names, bounds_key=BOUNDS_KEY)  # type: ignore[arg-type]
        self.reference = reference
        self.initial: dict[str, np.ndarray] | None = None  # the arrays sent in the first round
        self.shadow: dict[str, np.ndarray] | None = None  # the unfused reference arrays (see _advance_shadow)
        self._sent: dict[str, np.ndarray] | None = None  # the global arrays sent to the clients this round

    def state_dict(self) -> dict[str, np.ndarray]:
        """The newest bounds (``bounds/<layer>``) and the shadow: a resumed run continues from them."""
        out = super().state_dict()
        for name, value in (self.shadow or {}).items():
            out[f"{SHADOW_STATE}/{name}"] = value
        for name, value in (self.initial or {}).items():
            out[f"{INITIAL_STATE}/{name}"] = value
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore the bounds and the shadow of :meth:`state_dict`; the learner warm-starts from the bounds.

        A checkpoint of the single-array form (key ``SHADOW_STATE`` alone) restores the first array's shadow.
        """
        prefix = SHADOW_STATE + "/"
        shadow = {k[len(prefix) :]: np.asarray(v, np.float32).copy() for k, v in state.items() if k.startswith(prefix)}
        if SHADOW_STATE in state:
            shadow.setdefault(self.array_keys[0], np.asarray(state[SHADOW_STATE], dtype=np.float32).copy())
        if shadow:
            self.shadow = shadow
        prefix = INITIAL_STATE + "/"
        initial = {k[len(prefix) :]: np.asarray(v, np.float32).copy() for k, v in state.items() if k.startswith(prefix)}
        if initial:
            self.initial = initial
        super().load_state_dict(state)

    def _advance_shadow(self, aggregate: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Move the unfused reference arrays by this round's client update; return them.

        The clients' update is the aggregate before server fusion (``pre_fusion_arrays`` of a
        :class:`~strategies.fusion.ServerFusion` inside, else the aggregate) minus the global
        arrays they received. Added to arrays that never went through fusion, it gives the
        model the clients alone would have: a poisoned FM's backdoor enters through fusion and
        reaches the clients' own models, but not their updates on clean data.
        """
        pre = getattr(self.inner, "pre_fusion_arrays", None)
        pre = aggregate if pre is None else {k: pre.get(k, v) for k, v in aggregate.items()}
        sent = self._sent
        if sent is None or any(k not in sent or sent[k].shape != v.shape for k, v in pre.items()):
            return pre
        if self.shadow is None:
            self.shadow = {k: sent[k].copy() for k in pre}
        self.shadow = {k: (self.shadow[k] + (pre[k] - sent[k])).astype(np.float32) for k in pre}
        return self.shadow

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the arrays sent, delegate, then add the bounds record to every message."""
        self._sent = select_arrays(arrays, self.array_keys, "activation bounds")
        if self.initial is None:
            self.initial = {k: v.copy() for k, v in self._sent.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def learn_bounds(self, arrays: dict[str, np.ndarray], server_round: int) -> tuple[dict, Mapping[str, float]]:
        """Advance the shadow and hand a learner with a ``reference`` its reference, then learn on the arrays."""
        shadow = self._advance_shadow(arrays)
        if hasattr(self.learn, "reference"):
            self.learn.reference = self.initial if self.reference == "initial" and self.initial else shadow
        return self.learn(arrays, server_round)  # type: ignore[arg-type]


@register_wrapper("activation-bounds", params=PARAMS, order=20)
def activation_bounds(inner: Strategy, sctx: StrategyContext) -> Strategy:
    """``ActivationBoundWrapper`` around ``inner`` when ``activation-bounds = true`` (on every learned array)."""
    if not bool(sctx.cfg.get("activation-bounds")):
        return inner
    if sctx.synthetic_data is None:
        raise ValueError("activation-bounds needs the server's synthetic data (StrategyContext.synthetic_data)")
    names = sctx.learned_names()
    if not names:
        raise ValueError("activation-bounds needs the names of the learned arrays (StrategyContext.array_names)")
    reference = str(sctx.cfg.get("bounds-reference"))
    return ActivationBoundWrapper(inner, BoundLearner(sctx.cfg, sctx.synthetic_data), names, reference)
