"""Robust learning rate (Ozdayi et al., AAAI 2021, "Defending against backdoors in FL with robust learning rate").

Per coordinate, the server counts how many updates agree in sign. Where the
absolute sum of signs is below a threshold, the server learning rate of that
coordinate is ``-1`` (the aggregate moves *against* the average there);
elsewhere it is ``+1``. The new model is ``global + lr * mean update`` with the
mean weighted by ``num-examples`` (as in the paper's code).

Run-config parameter ``rlr-threshold`` (default ``0.4``): a value ``>= 1`` is
a count of agreeing clients (the paper's theta); a value in ``(0, 1)`` is a
fraction of the round's participants, ``theta = ceil(fraction * n)``. The
default gives theta = 4 with 10 clients, the paper's setting for 10 agents; it
should exceed the expected number of colluding clients.
"""

from __future__ import annotations

import math
from logging import INFO

import numpy as np
from flwr.common.logger import log

from fedsec.registry import Param
from strategies.base import RoundUpdates, RuleOutput, UpdateRule
from strategies.common import NDArray
from strategies.registry import StrategyContext, register_strategy


def rlr_threshold_count(threshold: float, num_updates: int) -> float:
    """The sign-agreement count theta for this round.

    Parameters
    ----------
    threshold : float
        ``>= 1``: a count; in ``(0, 1)``: a fraction of ``num_updates``.
    num_updates : int
        Number of updates aggregated this round.

    Returns
    -------
    float
        theta.
    """
    if threshold <= 0:
        raise ValueError("rlr threshold must be positive")
    if threshold < 1:
        return float(math.ceil(threshold * num_updates))
    return float(threshold)


def rlr_aggregate(updates: NDArray, weights: NDArray, theta: float) -> tuple[NDArray, NDArray]:
    """Aggregate updates with a per-coordinate robust learning rate.

    Parameters
    ----------
    updates : NDArray
        Shape ``(n, d)``, one update per row.
    weights : NDArray
        Shape ``(n,)``, positive averaging weights (``num-examples``).
    theta : float
        Coordinates with ``|sum_i sign(u_i)| < theta`` get learning rate -1.

    Returns
    -------
    tuple[NDArray, NDArray]
        The aggregated update ``lr * weighted mean`` (shape ``(d,)``) and the
        learning rate vector ``lr`` (entries +1 or -1).
    """
    sign_sum = np.sum(np.sign(updates), axis=0)
    lr = np.where(np.abs(sign_sum) < theta, -1.0, 1.0)
    mean = np.average(updates, axis=0, weights=weights)
    return lr * mean, lr


class RobustLR(UpdateRule):
    """FedAvg with the robust learning rate of Ozdayi et al. (2021).

    Parameters
    ----------
    threshold : float
        See :func:`rlr_threshold_count`.
    **kwargs
        Passed to :class:`strategies.base.UpdateRule` (and FedAvg).

    Attributes
    ----------
    last_flipped_fraction : float
        Fraction of coordinates whose learning rate was -1 in the last round.
    """

    def __init__(self, threshold: float = 0.4, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if threshold <= 0:
            raise ValueError("rlr threshold must be positive")
        self.threshold = threshold
        self.last_flipped_fraction = 0.0

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> Robust learning rate: threshold %s", self.threshold)
        super().summary()

    def aggregate_updates(self, round_updates: RoundUpdates) -> RuleOutput:
        """The weighted mean update with the robust learning rate (:func:`rlr_aggregate`)."""
        theta = rlr_threshold_count(self.threshold, round_updates.updates.shape[0])
        agg, lr = rlr_aggregate(round_updates.updates, round_updates.weights, theta)
        self.last_flipped_fraction = float(np.mean(lr < 0)) if lr.size else 0.0
        log(INFO, "rlr: theta=%s, %.3f of coordinates flipped", theta, self.last_flipped_fraction)
        return RuleOutput(agg)


@register_strategy(
    "rlr",
    params=(
        Param("rlr-threshold", 0.4, "sign agreement: a count if >= 1, else a fraction of clients", range=(1e-12, None)),
    ),
)
def rlr(sctx: StrategyContext) -> RobustLR:
    """FedAvg with a robust (sign-agreement) server learning rate."""
    return RobustLR(threshold=float(sctx.cfg.get("rlr-threshold")), **sctx.rule_kwargs())
