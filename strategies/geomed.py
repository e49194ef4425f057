"""Geometric median (RFA; Pillutla, Kakade, Harchaoui, IEEE TSP 2022, "Robust aggregation for federated learning").

The aggregate is the point ``z`` minimising ``sum_i a_i ||z - u_i||`` over the
updates ``u_i`` (``a_i``: reported weights, normalised), found with the
smoothed Weiszfeld algorithm of the paper: from the weighted mean, repeat
``z <- sum_i b_i u_i / sum_i b_i`` with ``b_i = a_i / max(nu, ||z - u_i||)``
until the objective improves by less than ``ftol`` of itself, at most
``max_iter`` times. It has breakdown point 1/2 and excludes no node.
"""

from __future__ import annotations

import numpy as np

from strategies.base import RoundUpdates, RuleOutput, UpdateRule
from strategies.registry import StrategyContext, register_strategy


def geometric_median(
    points: np.ndarray, weights: np.ndarray, max_iter: int = 10, nu: float = 1e-6, ftol: float = 1e-6
) -> np.ndarray:
    """Smoothed Weiszfeld estimate of the weighted geometric median of the rows of ``points`` (``(n, d)``)."""
    alphas = weights / weights.sum()
    z = alphas @ points
    objective = alphas @ np.linalg.norm(points - z, axis=1)
    for _ in range(max_iter):
        betas = alphas / np.maximum(nu, np.linalg.norm(points - z, axis=1))
        z = betas @ points / betas.sum()
        new = alphas @ np.linalg.norm(points - z, axis=1)
        if objective - new <= ftol * new:
            break
        objective = new
    return z


class GeometricMedian(UpdateRule):
    """RFA: the weighted geometric median of the updates (smoothed Weiszfeld, ``max_iter`` steps)."""

    def __init__(self, max_iter: int = 10, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.max_iter = max_iter

    def aggregate_updates(self, round_updates: RoundUpdates) -> RuleOutput:
        """The geometric median of the round's updates."""
        return RuleOutput(geometric_median(round_updates.updates, round_updates.weights, self.max_iter))


@register_strategy("geomed")
def geomed(sctx: StrategyContext) -> GeometricMedian:
    """RFA's geometric median of the updates (Pillutla et al., 2022)."""
    return GeometricMedian(**sctx.rule_kwargs())
