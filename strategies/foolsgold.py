"""FoolsGold (Fung et al., RAID 2020, "The limitations of federated learning in sybil settings").

The server keeps, per node id, the sum of all updates that node has sent
(its history). Each round it computes the pairwise cosine similarity of the
participants' histories, pardons honest nodes (similarities are rescaled by
the ratio of maximum similarities), turns ``1 - max similarity`` into weights,
rescales them to a maximum of 1 and passes them through the logit function,
exactly as in the reference code (github.com/DistributedML/FoolsGold). Sybils
that push the same direction end up with weight 0.

Histories are keyed by the client identity a reply reports under
``client_id_key`` (the ServerApp passes ``partition-id``; node id when absent,
see :func:`strategies.common.client_key`), so they survive a restarted
SuperNode and a resumed run, whose node ids are new. ``state_dict`` /
``load_state_dict`` checkpoint them (:mod:`strategies.state`).

The reference applies the weights to a gradient sum; for model updates we use
the weighted mean ``sum_i w_i u_i / sum_i w_i`` (equal to FedAvg's unweighted
mean when every weight is 1). If every weight is 0 the global model is kept.

As in the public reference implementations (the authors' code, FLPoison,
BackFed), each update's L2 norm is capped at ``foolsgold-norm-cap`` (default
1.0; 0 = off) before it enters the history and the aggregate, so a boosted
update cannot outweigh the others by its size. Similarities within
:data:`SIMILARITY_TOL` of each other count as equal: identical histories give
the same (zero) weights whatever the float rounding of their cosines.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.common.logger import log

from fedsec.registry import Param
from strategies.base import RoundUpdates, RuleOutput, UpdateRule
from strategies.common import NDArray
from strategies.registry import StrategyContext, register_strategy

_EPS = 1e-5
#: Cosine similarities closer than this count as equal (pardoning, ``1 - max similarity``).
SIMILARITY_TOL = 1e-9


def cap_norms(updates: NDArray, cap: float) -> NDArray:
    """Scale every row of ``updates`` with an L2 norm above ``cap`` down to ``cap`` (``cap <= 0``: unchanged).

    Parameters
    ----------
    updates : NDArray
        Shape ``(n, d)``.
    cap : float
        Largest L2 norm kept.

    Returns
    -------
    NDArray
        A new array of the same shape.
    """
    if cap <= 0:
        return np.array(updates, dtype=np.float64)
    norms = np.linalg.norm(updates, axis=1, keepdims=True)
    return updates * np.minimum(1.0, cap / np.maximum(norms, np.finfo(np.float64).tiny))


def foolsgold_weights(histories: NDArray) -> NDArray:
    """FoolsGold weights from the participants' historical (summed) updates.

    Parameters
    ----------
    histories : NDArray
        Shape ``(n, d)``, the summed updates of each participant.

    Returns
    -------
    NDArray
        Shape ``(n,)``, weights in ``[0, 1]``.
    """
    n = histories.shape[0]
    norms = np.linalg.norm(histories, axis=1, keepdims=True)
    unit = histories / np.maximum(norms, np.finfo(np.float64).tiny)
    cs = unit @ unit.T - np.eye(n)
    # Snap similarities to the tolerance grid: identical histories get identical cosines.
    cs = np.round(cs / SIMILARITY_TOL) * SIMILARITY_TOL
    maxcs = np.max(cs, axis=1) + _EPS
    # Pardoning: lower the similarity of i to j when j is more similar to someone else.
    for i in range(n):
        for j in range(n):
            if i != j and maxcs[i] < maxcs[j] - SIMILARITY_TOL:
                cs[i, j] = cs[i, j] * maxcs[i] / maxcs[j]
    wv = 1.0 - np.max(cs, axis=1)
    wv[wv < SIMILARITY_TOL] = 0.0  # a history (nearly) identical to another's
    wv = np.clip(wv, 0.0, 1.0)
    top = float(np.max(wv))
    if top <= 0.0:
        return np.zeros(n)
    # Rescale so that the largest weight is 1, then the logit function.
    wv = wv / top
    wv[wv == 1.0] = 0.99
    with np.errstate(divide="ignore"):
        wv = np.log(wv / (1.0 - wv) + _EPS) + 0.5
    wv[np.isinf(wv) | (wv > 1.0)] = 1.0
    wv[wv < 0.0] = 0.0
    return wv


def foolsgold_aggregate(updates: NDArray, weights: NDArray) -> NDArray:
    """Weighted mean of ``updates`` with FoolsGold ``weights`` (zeros if all weights are 0).

    Parameters
    ----------
    updates : NDArray
        Shape ``(n, d)``.
    weights : NDArray
        Shape ``(n,)``, non-negative.

    Returns
    -------
    NDArray
        Shape ``(d,)``.
    """
    total = float(np.sum(weights))
    if total <= 0.0:
        return np.zeros(updates.shape[1])
    return (weights[:, None] * updates).sum(axis=0) / total


class FoolsGold(UpdateRule):
    """FoolsGold with per-client update histories.

    Parameters
    ----------
    norm_cap : float
        Largest L2 norm of an update entering history and aggregate (0 = off).
    **kwargs
        Passed to :class:`strategies.base.UpdateRule` (``client_id_key`` keys
        the histories) and FedAvg.

    Attributes
    ----------
    histories : dict[int, NDArray]
        Client key (reported ``client_id_key``, else node id) -> sum of all updates received from it.
    """

    detects = True

    def __init__(self, norm_cap: float = 1.0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.norm_cap = float(norm_cap)
        self.histories: dict[int, NDArray] = {}

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(
            INFO,
            "\t├──> FoolsGold: per-client update histories, pardoning, logit weights, norm cap %s",
            self.norm_cap or "off",
        )
        super().summary()

    def state_dict(self) -> dict[str, NDArray]:
        """The update histories, ``history.<client key>`` -> summed update (copies)."""
        return {f"history.{k}": v.copy() for k, v in sorted(self.histories.items())}

    def load_state_dict(self, state: dict[str, NDArray]) -> None:
        """Replace the histories with those of :meth:`state_dict`."""
        self.histories = {
            int(k.split(".", 1)[1]): np.array(v, dtype=np.float64) for k, v in state.items() if k.startswith("history.")
        }

    def aggregate_updates(self, round_updates: RoundUpdates) -> RuleOutput:
        """Add the capped updates to the histories; weighted mean with FoolsGold weights (none if all are 0)."""
        updates = cap_norms(round_updates.updates, self.norm_cap)  # as the reference code: before history and mean
        keys = round_updates.client_ids
        for k, u in zip(keys, updates, strict=True):
            prev = self.histories.get(k)
            self.histories[k] = u.copy() if prev is None or prev.shape != u.shape else prev + u
        weights = foolsgold_weights(np.stack([self.histories[k] for k in keys]))
        if float(weights.sum()) <= 0.0:
            return RuleOutput(None, weights)
        ids = round_updates.node_ids
        log(INFO, "foolsgold: weights %s", {i: round(float(w), 4) for i, w in zip(ids, weights, strict=True)})
        return RuleOutput(foolsgold_aggregate(updates, weights), weights)


@register_strategy(
    "foolsgold",
    params=(
        Param("foolsgold-norm-cap", 1.0, "L2 cap of each update before history and mean (0 = off)", range=(0.0, None)),
    ),
)
def foolsgold(sctx: StrategyContext) -> FoolsGold:
    """FoolsGold against sybils (similar update histories); updates capped at ``foolsgold-norm-cap`` (0 = off)."""
    return FoolsGold(norm_cap=float(sctx.cfg.get("foolsgold-norm-cap")), **sctx.rule_kwargs())
