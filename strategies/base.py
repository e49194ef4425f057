"""The template of a robust aggregation rule, and the one detection interface.

A rule derives from :class:`UpdateRule` and supplies only its maths,
:meth:`UpdateRule.aggregate_updates`: the round's flattened updates (client
arrays minus the global arrays) and reported weights in, the aggregated update
and, if the rule excludes or down-weights nodes, a weight per node out. The
base does the rest once for every rule: it remembers the arrays it sent,
checks the replies with Flower's public consistency check, flattens them,
aggregates the metrics, turns the per-node weights into a :class:`Detection`
and unflattens the new global arrays. Like Flower's own strategies it is
generic over the records: ``arrayrecord_key`` and ``weighted_by_key`` (FedAvg's
arguments) name them, ``client_id_key`` names the metric holding a stable
client identity (the node id when ``None``).

Every strategy that excludes or down-weights nodes reports it the same way: a
``detection`` attribute holding a :class:`Detection` (``None`` when the rule
does not detect). :func:`detection_of` reads it from any strategy, wrapped or
not (wrappers delegate, see :class:`strategies.common.StrategyWrapper`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from strategies.common import NDArray, client_key, copy_arrays, flatten_arrays, node_id, unflatten_arrays
from strategies.detection import Detection, DetectionAttributes, ReportsDetection, detection_of

__all__ = [
    "Detection",
    "DetectionAttributes",
    "ReportsDetection",
    "RoundUpdates",
    "RuleOutput",
    "UpdateRule",
    "check_replies",
    "detection_of",
]


def check_replies(replies: Iterable[Message], weighted_by_key: str, *, is_train: bool = True) -> list[Message]:
    """The replies without errors, after Flower's public consistency check.

    Parameters
    ----------
    replies : iterable of Message
        The round's replies (never modified).
    weighted_by_key : str
        Metric every reply must carry as its weight.
    is_train : bool
        Training replies must also hold exactly one ``ArrayRecord`` with the same keys.

    Returns
    -------
    list[Message]
        The replies that carry content.

    Raises
    ------
    flwr.serverapp.exception.InconsistentMessageReplies
        When the replies' records differ (see ``validate_message_reply_consistency``).
    """
    replies = list(replies)
    valid = [m for m in replies if not m.has_error()]
    for msg in replies:
        if msg.has_error():
            log(INFO, "\t> Received error in reply from node %d: %s", node_id(msg), msg.error.reason)
    if valid:
        validate_message_reply_consistency([m.content for m in valid], weighted_by_key, check_arrayrecord=is_train)
    return valid


@dataclass(frozen=True)
class RoundUpdates:
    """What a rule's maths sees of one round.

    Attributes
    ----------
    updates : NDArray
        Shape ``(n, d)``, float64: each reply's arrays minus the global arrays, flattened.
    weights : NDArray
        Shape ``(n,)``, float64: each reply's ``weighted_by_key`` metric.
    node_ids : tuple[int, ...]
        Node id of each reply.
    client_ids : tuple[int, ...]
        Stable client identity of each reply (``client_id_key`` metric, else the node id).
    global_arrays : ArrayRecord
        The arrays sent this round (rules with a server-side reference, e.g. FLTrust).
    """

    updates: NDArray
    weights: NDArray
    node_ids: tuple[int, ...]
    client_ids: tuple[int, ...]
    global_arrays: ArrayRecord


@dataclass(frozen=True)
class RuleOutput:
    """What a rule's maths returns.

    Attributes
    ----------
    update : NDArray or None
        Shape ``(d,)``, the aggregated update; ``None`` keeps the global model.
    node_weights : NDArray or None
        Shape ``(n,)``, the non-negative weight of each node in the aggregate
        (0 = excluded), reported as :class:`Detection`; ``None`` for rules that
        neither exclude nor down-weight nodes.
    """

    update: NDArray | None
    node_weights: NDArray | None = None


class UpdateRule(DetectionAttributes, FedAvg, ABC):
    """FedAvg's sampling and configuration around a rule that aggregates updates.

    A subclass implements :meth:`aggregate_updates` (its maths) and, if it
    wants, ``summary``; it never overrides ``aggregate_train``.

    Parameters
    ----------
    client_id_key : str, optional
        Metric naming a client identity that survives restarts (``None``: node ids).
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (``arrayrecord_key``,
        ``weighted_by_key``, sampling fractions...).

    Attributes
    ----------
    global_arrays : ArrayRecord or None
        A copy of the arrays sent in the last ``configure_train``.
    detection : Detection or None
        The last aggregation's :class:`Detection` (``None`` for rules that do not detect).
    """

    #: Whether the rule excludes or down-weights nodes (its choices are scored as detection).
    detects: ClassVar[bool] = False
    #: Whether the training metrics average the excluded nodes' metrics too.
    metrics_of_excluded: ClassVar[bool] = True

    def __init__(self, *, client_id_key: str | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.client_id_key = client_id_key
        self.global_arrays: ArrayRecord | None = None
        self.detection: Detection | None = None

    @abstractmethod
    def aggregate_updates(self, round_updates: RoundUpdates) -> RuleOutput:
        """The rule's maths: the aggregated update (and per-node weights) of one round."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember ``arrays`` and configure training like FedAvg."""
        self.global_arrays = copy_arrays(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def require_global_arrays(self) -> ArrayRecord:
        """The remembered global arrays; raise if ``configure_train`` was never called."""
        if self.global_arrays is None:
            raise RuntimeError(f"{type(self).__name__}.aggregate_train needs configure_train to run first")
        return self.global_arrays

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check and flatten the replies, apply :meth:`aggregate_updates`, report detection."""
        self.detection = Detection() if self.detects else None
        valid = check_replies(replies, self.weighted_by_key)
        if not valid:
            return None, None
        global_arrays = self.require_global_arrays()
        keys = list(global_arrays.keys())
        base = flatten_arrays(global_arrays, keys)
        contents = [m.content for m in valid]
        updates = np.stack([flatten_arrays(c[self.arrayrecord_key], keys) - base for c in contents])
        weights = np.array(
            [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents], dtype=np.float64
        )
        ids = tuple(node_id(m) for m in valid)
        clients = tuple(client_key(m, self.client_id_key) for m in valid)
        out = self.aggregate_updates(RoundUpdates(updates, weights, ids, clients, global_arrays))
        if out.node_weights is not None:
            self.detection = Detection.from_weights(ids, out.node_weights)
            if self.detection.excluded:
                log(INFO, "%s: excluded nodes %s", type(self).__name__, list(self.detection.excluded))
        if not self.metrics_of_excluded and out.node_weights is not None:
            contents = [c for c, w in zip(contents, out.node_weights, strict=True) if w > 0]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        if out.update is None:
            log(
                WARNING,
                "%s: no update admitted in round %d, keeping the global model",
                type(self).__name__,
                server_round,
            )
            return None, metrics
        return unflatten_arrays(base + out.update, global_arrays), metrics
