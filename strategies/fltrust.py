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

from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from strategies.common import (
    GlobalArraysFedAvg,
    NDArray,
    flatten_arrays,
    node_id,
    stack_updates,
    unflatten_arrays,
)
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


class FLTrust(GlobalArraysFedAvg):
    """FLTrust with a server update computed on the server's root set.

    Parameters
    ----------
    server_update : callable
        ``ArrayRecord -> ArrayRecord``: the server's trained arrays starting
        from the given global arrays. If it has ``state_dict``/``load_state_dict``
        (the ServerApp's root-set trainer keeps a call counter that seeds it),
        they are part of this strategy's checkpointed state.
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.

    Attributes
    ----------
    last_trust : dict[int, float]
        Node id -> raw trust score of the last round.
    """

    #: Excludes or down-weights clients: its choices are scored as detection (TPR/FPR).
    reports_detection = True

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

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Trust-weighted aggregation; keep the global model if no update is trusted."""
        self.reset_detection()
        self.last_trust = {}
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        global_arrays = self.require_global_arrays()
        keys = list(global_arrays.keys())
        base = flatten_arrays(global_arrays, keys)
        server_update = flatten_arrays(self.server_update(global_arrays), keys) - base
        contents = [m.content for m in valid]
        updates = stack_updates(contents, global_arrays, self.arrayrecord_key)
        agg, trust = fltrust_aggregate(updates, server_update)
        ids = [node_id(m) for m in valid]
        self.last_trust = {i: float(t) for i, t in zip(ids, trust, strict=True)}
        self.set_detection(ids, trust)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        if float(trust.sum()) <= 0.0:
            log(WARNING, "fltrust: no update is trusted, keeping the global model")
            return None, metrics
        log(INFO, "fltrust: trust %s", {i: round(t, 4) for i, t in self.last_trust.items()})
        return unflatten_arrays(base + agg, global_arrays), metrics


@register_strategy("fltrust", params={"fltrust-root-shots": 10})
def fltrust(sctx: StrategyContext) -> FLTrust:
    """FLTrust; needs ``StrategyContext.server_update`` (the server's root-set training)."""
    if sctx.server_update is None:
        raise ValueError("strategy 'fltrust' needs a server update function (StrategyContext.server_update)")
    return FLTrust(server_update=sctx.server_update, **sctx.fedavg_kwargs())
