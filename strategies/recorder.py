"""A pass-through strategy wrapper that hands each round's facts to the evaluation.

It records, for the evaluation only, which partition each replying node holds,
each reply's update (for stealth metrics) and which nodes the defense
excluded or down-weighted (for detection metrics). It changes nothing in the
aggregation.

It also accounts for faults: instructions whose reply is a Flower error (a
SuperNode that died: ``Node Unavailable`` once its heartbeat lapses; a crashed
ClientApp) and instructions without any reply within the round timeout are
logged with their node ids and counted in the round's row
(``failed_replies``, ``missing_replies``, ``failed_nodes``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.common import BroadcastsRecords, StrategyWrapper, node_id, reported_id
from strategies.detection import detection_of


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
        ids excluded or down-weighted, from the inner strategy's
        :class:`~strategies.detection.Detection`, or ``None`` when it reports
        none), ``num_replies``, each of ``metric_keys`` found in the aggregated
        metrics (dashes as underscores), and the fault counts ``num_sent``,
        ``failed_replies`` (error replies), ``missing_replies`` (no reply in
        time) and ``failed_nodes`` (their node ids).
    arrayrecord_key : str
        Record key of the arrays in the replies (the update is every array of
        it minus the array of the same name sent).
    client_id_key : str
        Metric a reply reports its partition (client identity) under; replies
        without it are left out of ``partitions`` and ``updates``.
    metric_keys : sequence of str
        Aggregated training metrics handed to ``sink``; a key ending in ``*`` is a
        prefix (``"bound-*"``: every metric the server's bound learner reports).
    """

    def __init__(
        self,
        inner: Strategy,
        sink,
        round_offset: int = 0,
        *,
        arrayrecord_key: str,
        client_id_key: str,
        metric_keys: Sequence[str] = (),
    ) -> None:
        self.inner = inner
        self.sink = sink
        self.round_offset = round_offset
        self.arrayrecord_key = arrayrecord_key
        self.client_id_key = client_id_key
        self.metric_keys = tuple(metric_keys)
        self._sent: dict[str, np.ndarray] = {}
        self._instructions: list[Message] = []  # this round's (Flower sets their message ids when pushing)

    def summary(self) -> None:
        """Delegate."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global arrays sent, then delegate."""
        self._sent = {k: v.numpy().copy() for k, v in arrays.items()}
        self._instructions = list(self.inner.configure_train(server_round + self.round_offset, arrays, config, grid))
        return self._instructions

    def train_content(self) -> RecordDict | None:
        """The content of this round's first train instruction (records and config the clients got), or ``None``.

        For measurement beside the round (e.g. :mod:`fedsec.shadow`), which must not modify it.
        """
        return self._instructions[0].content if self._instructions else None

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
                pid = reported_id(msg, self.client_id_key)
                if pid is None:
                    continue
                partitions[node_id(msg)] = pid
                update = self._update(msg.content[self.arrayrecord_key])
                if update is not None:
                    updates[pid] = update
            except Exception:  # malformed replies are the validator's business
                continue
        sent_to = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in self._instructions}
        faults = round_faults(sent_to, replies)
        if faults["failed_nodes"]:
            log(
                WARNING,
                "round %d: %d of %d nodes failed (error replies %d, no reply in time %d): nodes %s",
                server_round + self.round_offset,
                len(faults["failed_nodes"]),
                faults["num_sent"],
                faults["failed_replies"],
                faults["missing_replies"],
                faults["failed_nodes"],
            )
        arrays, metrics = self.inner.aggregate_train(server_round + self.round_offset, replies)
        detection = detection_of(self.inner)
        flagged = None
        if detection is not None:
            flagged = sorted(partitions[n] for n in detection.flagged() if n in partitions)
        info = {
            "partitions": partitions,
            "updates": updates,
            "flagged": flagged,
            "num_replies": len(replies),
            **faults,
        }
        records = self.inner.broadcast_records if isinstance(self.inner, BroadcastsRecords) else None
        if records:  # e.g. activation bounds sent beside the model
            info["records"] = {name: {k: v.numpy() for k, v in rec.items()} for name, rec in records.items()}
        if metrics is not None:
            for key in metrics.keys():
                if any(key == k or (k.endswith("*") and key.startswith(k[:-1])) for k in self.metric_keys):
                    info[key.replace("-", "_")] = float(metrics[key])
        self.sink(info)
        return arrays, metrics

    def _update(self, arrays: ArrayRecord) -> np.ndarray | None:
        """The reply's arrays minus those sent, flattened (float64); ``None`` if they do not match or are not finite."""
        if set(arrays.keys()) != set(self._sent):
            return None
        parts = []
        for key, sent in self._sent.items():
            value = arrays[key].numpy()
            if value.shape != sent.shape or not np.all(np.isfinite(value)):
                return None
            parts.append((value - sent).astype(np.float64).ravel())
        return np.concatenate(parts) if parts else None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate."""
        return self.inner.configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegate."""
        return self.inner.aggregate_evaluate(server_round + self.round_offset, replies)


def round_faults(sent_to: dict[str, int], replies: list[Message]) -> dict:
    """Which instructions of a round failed: an error reply, or no reply at all.

    Parameters
    ----------
    sent_to : dict[str, int]
        Instruction message id -> destination node id (what was sent).
    replies : list[Message]
        What ``grid.send_and_receive`` returned (replies and Flower's error replies).

    Returns
    -------
    dict
        ``num_sent``, ``failed_replies`` (error replies), ``missing_replies``
        (instructions without a reply) and ``failed_nodes`` (sorted node ids of both).
    """
    failed: set[int] = set()
    answered: set[str] = set()
    errors = 0
    for msg in replies:
        ref = msg.metadata.reply_to_message_id
        answered.add(ref)
        if msg.has_error():
            errors += 1
            # Flower's own error replies (node unavailable) come from the SuperLink's id: use the instruction's.
            failed.add(sent_to.get(ref, int(msg.metadata.src_node_id)))
    missing = [node for mid, node in sent_to.items() if mid not in answered]
    failed.update(missing)
    return {
        "num_sent": len(sent_to),
        "failed_replies": errors,
        "missing_replies": len(missing),
        "failed_nodes": sorted(failed),
    }
