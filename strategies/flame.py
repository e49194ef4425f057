"""FLAME (Nguyen et al., USENIX Security 2022, "FLAME: Taming backdoors in federated learning").

1. Cluster the updates (client arrays minus global arrays) with HDBSCAN on
   their pairwise cosine distances, ``min_cluster_size = n // 2 + 1``, and keep
   the largest cluster (if HDBSCAN labels everything noise, keep all).
2. Clip each kept update to the median L2 norm of *all* updates.
3. Average the kept, clipped updates (unweighted) and add Gaussian noise with
   standard deviation ``lambda * median_norm`` per coordinate
   (run-config ``flame-noise-lambda``, default ``0.001``).
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO

import numpy as np
from flwr.common.logger import log

from fedsec.registry import Param
from strategies.base import RoundUpdates, RuleOutput, UpdateRule
from strategies.common import NDArray
from strategies.norm_clip import clip_updates
from strategies.registry import StrategyContext, register_strategy
from strategies.state import from_json_array, json_array


def cosine_distances(updates: NDArray) -> NDArray:
    """Pairwise cosine distances ``1 - cos(u_i, u_j)`` in ``[0, 2]`` (float64, zero diagonal).

    A zero update has distance 1 to every other update.
    """
    norms = np.linalg.norm(updates, axis=1, keepdims=True)
    unit = updates / np.maximum(norms, np.finfo(np.float64).tiny)
    dist = np.clip(1.0 - unit @ unit.T, 0.0, 2.0).astype(np.float64)
    np.fill_diagonal(dist, 0.0)
    return dist


def flame_filter(updates: NDArray) -> NDArray:
    """Boolean mask of the updates in the majority HDBSCAN cluster.

    Parameters
    ----------
    updates : NDArray
        Shape ``(n, d)``.

    Returns
    -------
    NDArray
        Shape ``(n,)``, True for kept updates. With fewer than 3 updates no
        majority can be told apart and all are kept.
    """
    from sklearn.cluster import HDBSCAN  # imported here: every ClientApp process loads the strategy registry

    n = updates.shape[0]
    if n < 3:
        return np.ones(n, dtype=bool)
    labels = (
        HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed", allow_single_cluster=True, copy=True)
        .fit(cosine_distances(updates))
        .labels_
    )
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        return np.ones(n, dtype=bool)
    majority = np.bincount(clustered).argmax()
    return labels == majority


@dataclass
class FlameResult:
    """Outcome of :func:`flame_aggregate`.

    Attributes
    ----------
    update : NDArray
        The aggregated, noised update, shape ``(d,)``.
    kept : NDArray
        Boolean mask of the admitted updates, shape ``(n,)``.
    clip_bound : float
        The median L2 norm of all updates (the clipping bound).
    """

    update: NDArray
    kept: NDArray
    clip_bound: float


def flame_aggregate(updates: NDArray, noise_lambda: float, rng: np.random.Generator) -> FlameResult:
    """FLAME's filtering, clipping, averaging and noising of client updates.

    Parameters
    ----------
    updates : NDArray
        Shape ``(n, d)``, ``n >= 1``.
    noise_lambda : float
        Noise level: the standard deviation is ``noise_lambda * median_norm``.
    rng : numpy.random.Generator
        Source of the Gaussian noise.

    Returns
    -------
    FlameResult
        The aggregated update, the kept mask and the clipping bound.
    """
    kept = flame_filter(updates)
    clip_bound = float(np.median(np.linalg.norm(updates, axis=1)))
    admitted = updates[kept]
    if clip_bound > 0:
        admitted = clip_updates(admitted, clip_bound)
    mean = admitted.mean(axis=0)
    sigma = noise_lambda * clip_bound
    noise = rng.normal(0.0, sigma, size=mean.shape) if sigma > 0 else np.zeros_like(mean)
    return FlameResult(update=mean + noise, kept=kept, clip_bound=clip_bound)


class Flame(UpdateRule):
    """FLAME: cluster, clip to the median norm, average, add noise.

    Parameters
    ----------
    noise_lambda : float
        Noise level relative to the median update norm.
    seed : int
        Seed of the noise generator.
    **kwargs
        Passed to :class:`strategies.base.UpdateRule` (and FedAvg).

    Attributes
    ----------
    last_clip_bound : float
        The median norm used as clipping bound in the last round.
    """

    detects = True
    metrics_of_excluded = False

    def __init__(self, noise_lambda: float = 0.001, seed: int = 0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if noise_lambda < 0:
            raise ValueError("flame noise lambda must be non-negative")
        self.noise_lambda = noise_lambda
        self.rng = np.random.default_rng(seed)
        self.last_clip_bound = 0.0

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> FLAME: noise lambda %s", self.noise_lambda)
        super().summary()

    def state_dict(self) -> dict[str, NDArray]:
        """The noise generator's state (``rng``, JSON in a 0-d array)."""
        return {"rng": json_array(self.rng.bit_generator.state)}

    def load_state_dict(self, state: dict[str, NDArray]) -> None:
        """Continue the noise generator from :meth:`state_dict`."""
        if "rng" in state:
            self.rng.bit_generator.state = from_json_array(state["rng"])

    def aggregate_updates(self, round_updates: RoundUpdates) -> RuleOutput:
        """The majority cluster's clipped updates, averaged, plus noise (:func:`flame_aggregate`)."""
        result = flame_aggregate(round_updates.updates, self.noise_lambda, self.rng)
        self.last_clip_bound = result.clip_bound
        log(INFO, "flame: kept %d of %d, clip bound %.6g", int(result.kept.sum()), result.kept.size, result.clip_bound)
        return RuleOutput(result.update, result.kept.astype(np.float64))


@register_strategy(
    "flame", params=(Param("flame-noise-lambda", 0.001, "noise std / median update norm", range=(0.0, None)),)
)
def flame(sctx: StrategyContext) -> Flame:
    """FLAME with HDBSCAN filtering, median-norm clipping and weak noise."""
    return Flame(noise_lambda=float(sctx.cfg.get("flame-noise-lambda")), seed=int(sctx.cfg.seed), **sctx.rule_kwargs())
