"""A pass-through strategy wrapper that hands each round's facts to the evaluation.

It records, for the evaluation only, which partition each replying node holds,
each reply's update (for stealth metrics) and which nodes the defense
excluded or down-weighted (for detection metrics). It changes nothing in the
aggregation.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.common import StrategyWrapper


class Recorder(StrategyWrapper):
    """Wrap ``inner`` and report each round to ``sink(info: dict)``.

    Parameters
    ----------
    inner : Strategy
        The strategy doing the work (e.g. ``Validated(defense)``).
    round_offset : int
        Rounds already done before this ``start`` (a resumed run): the inner
        strategy and the clients see the run's true round numbers.
    sink : callable
        Receives a dict with ``partitions`` (node id -> partition id),
        ``updates`` (partition id -> flattened update), ``flagged`` (partition
        ids excluded or down-weighted, or ``None`` when the rule reports
        nothing), ``train_loss``, ``rejected``, ``num_replies``.
    """

    def __init__(self, inner: Strategy, sink, round_offset: int = 0) -> None:
        self.inner = inner
        self.sink = sink
        self.round_offset = round_offset
        self._sent: dict[str, np.ndarray] = {}

    def summary(self) -> None:
        """Delegate."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global arrays sent, then delegate."""
        self._sent = {k: v.numpy().copy() for k, v in arrays.items()}
        return self.inner.configure_train(server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Record what the evaluation needs, then delegate."""
        replies = list(replies)
        partitions: dict[int, int] = {}
        updates: dict[int, np.ndarray] = {}
        for msg in replies:
            try:
                if msg.has_error():
                    continue
                pid = int(msg.content["metrics"]["partition-id"])
                node = int(msg.metadata.src_node_id)
                partitions[node] = pid
                ctx = msg.content["arrays"]["ctx"].numpy()
                if ctx.shape == self._sent["ctx"].shape and np.all(np.isfinite(ctx)):
                    updates[pid] = (ctx - self._sent["ctx"]).astype(np.float64).ravel()
            except Exception:  # malformed replies are the validator's business
                continue
        arrays, metrics = self.inner.aggregate_train(server_round + self.round_offset, replies)
        flagged = None
        if getattr(self.inner, "reports_detection", False):
            excluded = set(getattr(self.inner, "last_excluded", []) or [])
            weights = getattr(self.inner, "last_weights", {}) or {}
            if weights:
                top = max(weights.values())
                excluded |= {n for n, w in weights.items() if top > 0 and w < 0.5 * top}
            flagged = sorted(partitions[n] for n in excluded if n in partitions)
        info = {
            "partitions": partitions,
            "updates": updates,
            "flagged": flagged,
            "num_replies": len(replies),
        }
        if metrics is not None:
            for key in ("train-loss", "train-acc", "rejected-replies"):
                if key in metrics:
                    info[key.replace("-", "_")] = float(metrics[key])
        self.sink(info)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.inner.configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegate."""
        return self.inner.aggregate_evaluate(server_round + self.round_offset, replies)
