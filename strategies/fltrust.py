"""FLTrust (Cao et al., NDSS 2021, "FLTrust: Byzantine-robust FL via trust bootstrapping").

The server trains on its own small root set each round, giving a server update
``g0``. Each client update ``u_i`` gets trust ``ReLU(cos(u_i, g0))``, is rescaled
to the norm of ``g0``, and the new model is ``global + sum_i t_i u_i' / sum_i t_i``.
If every trust score is zero the global model is kept.

The server update comes from ``StrategyContext.server_update``: a callable
``ArrayRecord -> ArrayRecord`` returning the server's trained arrays for the
given global arrays (the update is the difference).
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord
from flwr.common.logger import log

from fedsec.registry import Param
from strategies.base import RoundUpdates, RuleOutput, UpdateRule
from strategies.common import NDArray, flatten_arrays
from strategies.registry import StrategyContext, register_strategy


def fltrust_aggregate(updates: NDArray, server_update: NDArray) -> tuple[NDArray, NDArray]:
    """Trust-weighted average of updates rescaled to the server update's norm.

    Parameters
    ----------
    updates : NDArray
        Shape ``(n, d)``, one client update per row.
    server_update : NDArray
        Shape ``(d,)``, the update of the server on its root set.

    Returns
    -------
    tuple[NDArray, NDArray]
        The aggregated update (shape ``(d,)``; zeros when all trust is zero or
        the server update is zero) and the trust scores (shape ``(n,)``).
    """
    tiny = np.finfo(np.float64).tiny
    g_norm = float(np.linalg.norm(server_update))
    norms = np.linalg.norm(updates, axis=1)
    if g_norm == 0.0:
        return np.zeros_like(server_update, dtype=np.float64), np.zeros(updates.shape[0])
    cos = (updates @ server_update) / (np.maximum(norms, tiny) * g_norm)
    trust = np.where(norms > 0, np.maximum(cos, 0.0), 0.0)
    total = float(trust.sum())
    if total <= 0.0:
        return np.zeros_like(server_update, dtype=np.float64), trust
    rescaled = updates * (g_norm / np.maximum(norms, tiny))[:, None]
    return (trust[:, None] * rescaled).sum(axis=0) / total, trust


class FLTrust(UpdateRule):
    """FLTrust with a server update computed on the server's root set.

    Parameters
    ----------
    server_update : callable
        ``ArrayRecord -> ArrayRecord``: the server's trained arrays starting
        from the given global arrays. If it has ``state_dict``/``load_state_dict``
        (the ServerApp's root-set trainer keeps a call counter that seeds it),
        they are part of this strategy's checkpointed state.
    **kwargs
        Passed to :class:`strategies.base.UpdateRule` (and FedAvg).

    Attributes
    ----------
    last_trust : dict[int, float]
        Node id -> raw trust score of the last round.
    """

    detects = True

    def __init__(self, server_update: Callable[[ArrayRecord], ArrayRecord], **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.server_update = server_update
        self.last_trust: dict[int, float] = {}

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> FLTrust: server update from the root set")
        super().summary()

    def state_dict(self) -> dict[str, np.ndarray]:
        """The server update's state (``server-update.<key>``), when it exposes a ``state_dict``."""
        fn = getattr(self.server_update, "state_dict", None)
        return {f"server-update.{k}": np.asarray(v) for k, v in fn().items()} if callable(fn) else {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Hand the ``server-update.*`` entries to the server update's ``load_state_dict``."""
        fn = getattr(self.server_update, "load_state_dict", None)
        own = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("server-update.")}
        if callable(fn) and own:
            fn(own)

    def aggregate_updates(self, round_updates: RoundUpdates) -> RuleOutput:
        """Trust-weighted mean of the rescaled updates (:func:`fltrust_aggregate`); none if nothing is trusted."""
        global_arrays = round_updates.global_arrays
        keys = list(global_arrays.keys())
        reference = flatten_arrays(self.server_update(global_arrays), keys) - flatten_arrays(global_arrays, keys)
        agg, trust = fltrust_aggregate(round_updates.updates, reference)
        self.last_trust = {i: float(t) for i, t in zip(round_updates.node_ids, trust, strict=True)}
        if float(trust.sum()) <= 0.0:
            return RuleOutput(None, trust)
        log(INFO, "fltrust: trust %s", {i: round(t, 4) for i, t in self.last_trust.items()})
        return RuleOutput(agg, trust)


@register_strategy(
    "fltrust", params=(Param("fltrust-root-shots", 10, "examples per class in the server's root set", range=(1, None)),)
)
def fltrust(sctx: StrategyContext) -> FLTrust:
    """FLTrust; needs ``StrategyContext.server_update`` (the server's root-set training)."""
    if sctx.server_update is None:
        raise ValueError("strategy 'fltrust' needs a server update function (StrategyContext.server_update)")
    return FLTrust(server_update=sctx.server_update, **sctx.rule_kwargs())
