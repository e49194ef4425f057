"""The one detection interface: which nodes a strategy excluded or down-weighted.

Every strategy that excludes or down-weights nodes (FLAME, FoolsGold, FLTrust,
Krum, MultiKrum, Bulyan...) exposes a ``detection`` attribute holding a
:class:`Detection` after each ``aggregate_train``; one that does not detect has
none, or ``None``. Wrappers delegate it to the strategy they wrap. The
evaluation reads it only through :func:`detection_of` and scores
:meth:`Detection.flagged` against the malicious clients it knows (TPR/FPR).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

NDArray = np.ndarray


@dataclass(frozen=True)
class Detection:
    """Which nodes a rule left out or down-weighted in its last aggregation.

    Attributes
    ----------
    excluded : tuple[int, ...]
        Node ids whose update did not enter the aggregate.
    weights : Mapping[int, float]
        Node id -> share of its update in the aggregate (the shares sum to 1;
        empty when the rule does not weight nodes).
    """

    excluded: tuple[int, ...] = ()
    weights: Mapping[int, float] = field(default_factory=dict)

    @classmethod
    def from_weights(cls, ids: Sequence[int], weights: NDArray) -> Detection:
        """Detection from non-negative per-node weights; a node of weight 0 is excluded.

        Parameters
        ----------
        ids : sequence of int
            Node ids, in the order of ``weights``.
        weights : NDArray
            Shape ``(n,)``, the weight of each node in the aggregate.

        Returns
        -------
        Detection
            The excluded nodes and each node's share (all 0 when every weight is 0).
        """
        total = float(np.sum(weights))
        shares = weights / total if total > 0 else np.zeros_like(weights)
        return cls(
            excluded=tuple(int(i) for i, w in zip(ids, weights, strict=True) if w <= 0),
            weights={int(i): float(s) for i, s in zip(ids, shares, strict=True)},
        )

    def flagged(self, down_weight_ratio: float = 0.5) -> list[int]:
        """Node ids excluded or weighted below ``down_weight_ratio`` x the largest share (sorted)."""
        out = set(self.excluded)
        top = max(self.weights.values(), default=0.0)
        if top > 0:
            out |= {n for n, w in self.weights.items() if w < down_weight_ratio * top}
        return sorted(out)


@runtime_checkable
class ReportsDetection(Protocol):
    """A strategy that reports which nodes it excluded or down-weighted."""

    @property
    def detection(self) -> Detection | None:
        """The last aggregation's :class:`Detection`; ``None`` when the rule does not detect."""


def detection_of(strategy: object) -> Detection | None:
    """The :class:`Detection` of ``strategy``'s last aggregation, ``None`` when it reports none."""
    return strategy.detection if isinstance(strategy, ReportsDetection) else None


class DetectionAttributes:
    """``detection`` plus its two views ``last_excluded`` / ``last_weights`` (read-only)."""

    detection: Detection | None = None

    @property
    def last_excluded(self) -> list[int]:
        """Node ids excluded in the last aggregation."""
        return list(self.detection.excluded) if self.detection is not None else []

    @property
    def last_weights(self) -> dict[int, float]:
        """Node id -> share in the last aggregate (empty when the rule does not weight nodes)."""
        return dict(self.detection.weights) if self.detection is not None else {}
