"""Helpers shared by the defense strategies.

Copies of reply messages (a strategy never mutates what it receives), the
flattening of an ``ArrayRecord`` into one vector and back, the stacking of
client updates relative to the global arrays, and a FedAvg base class that
remembers the arrays it sent so that a rule can work on updates.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

NDArray = np.ndarray


def copy_reply(msg: Message, content: RecordDict | None = None) -> Message:
    """A new reply with the same metadata (node id included) and copied content.

    Parameters
    ----------
    msg : Message
        The reply received from a node.
    content : RecordDict, optional
        Content of the new message; a deep copy of ``msg.content`` when omitted.

    Returns
    -------
    Message
        A message that shares no mutable object with ``msg``.
    """
    metadata = copy.deepcopy(msg.metadata)
    if msg.has_error():
        return Message(metadata=metadata, error=copy.deepcopy(msg.error))
    return Message(metadata=metadata, content=copy.deepcopy(msg.content) if content is None else content)


def copy_replies(replies: Iterable[Message]) -> list[Message]:
    """Copies of every reply (see :func:`copy_reply`)."""
    return [copy_reply(msg) for msg in replies]


def with_arrays(msg: Message, arrays: ArrayRecord, array_key: str) -> Message:
    """A copy of ``msg`` whose ``array_key`` record is replaced by ``arrays``."""
    content = RecordDict({k: (arrays if k == array_key else copy.deepcopy(v)) for k, v in msg.content.items()})
    return copy_reply(msg, content)


def node_id(msg: Message) -> int:
    """The id of the node that sent ``msg``."""
    return int(msg.metadata.src_node_id)


def client_key(msg: Message, metric_key: str = "partition-id") -> int:
    """A client identity that survives restarts: the reported ``partition-id``, else the node id.

    Node ids are not stable: the simulation draws new ones for every run (so a
    resumed run has new ones) and a restarted SuperNode without node
    authentication registers under a new one. The fedsec ClientApp reports its
    partition (its ``--node-config``) in every training reply's metrics.

    Parameters
    ----------
    msg : Message
        A training reply.
    metric_key : str
        Name of the reported identity in the reply's metric records.

    Returns
    -------
    int
        The reported partition id, or ``node_id(msg)`` when none is reported.
    """
    if msg.has_content():
        for record in msg.content.metric_records.values():
            if metric_key in record:
                return int(record[metric_key])
    return node_id(msg)


def copy_arrays(arrays: ArrayRecord) -> ArrayRecord:
    """A deep copy of an ``ArrayRecord``."""
    return ArrayRecord({k: Array(np.array(v.numpy(), copy=True)) for k, v in arrays.items()})


def flatten_arrays(record: ArrayRecord, keys: Sequence[str]) -> NDArray:
    """Concatenate the arrays of ``record`` named by ``keys`` into one float64 vector.

    Parameters
    ----------
    record : ArrayRecord
        The arrays to flatten.
    keys : sequence of str
        The order of the arrays (the reference record's keys).

    Returns
    -------
    NDArray
        A 1-D float64 vector.
    """
    if not keys:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(record[k].numpy(), dtype=np.float64).ravel() for k in keys])


def unflatten_arrays(vector: NDArray, reference: ArrayRecord) -> ArrayRecord:
    """Split ``vector`` into arrays shaped and typed like those of ``reference``.

    Parameters
    ----------
    vector : NDArray
        A 1-D vector as built by :func:`flatten_arrays` with ``reference.keys()``.
    reference : ArrayRecord
        Gives the keys, shapes and dtypes.

    Returns
    -------
    ArrayRecord
        New arrays, one per key of ``reference``.
    """
    out: dict[str, Array] = {}
    offset = 0
    for key, arr in reference.items():
        ref = arr.numpy()
        size = ref.size
        out[key] = Array(np.asarray(vector[offset : offset + size].reshape(ref.shape), dtype=ref.dtype))
        offset += size
    if offset != vector.size:
        raise ValueError(f"vector has {vector.size} values, reference needs {offset}")
    return ArrayRecord(out)


def stack_updates(contents: Sequence[RecordDict], global_arrays: ArrayRecord, array_key: str) -> NDArray:
    """Client updates (client arrays minus global arrays), one flattened row per reply.

    Parameters
    ----------
    contents : sequence of RecordDict
        Reply contents, each with an ``ArrayRecord`` under ``array_key``.
    global_arrays : ArrayRecord
        The arrays the server sent this round.
    array_key : str
        Record key of the arrays in the replies.

    Returns
    -------
    NDArray
        Shape ``(len(contents), d)``, float64.
    """
    keys = list(global_arrays.keys())
    base = flatten_arrays(global_arrays, keys)
    rows = [flatten_arrays(c[array_key], keys) - base for c in contents]
    return np.stack(rows) if rows else np.zeros((0, base.size))


def example_weights(contents: Sequence[RecordDict], weight_key: str) -> NDArray:
    """The ``weight_key`` value (usually ``num-examples``) of each reply's metrics."""
    return np.array([float(next(iter(c.metric_records.values()))[weight_key]) for c in contents], dtype=np.float64)


class GlobalArraysFedAvg(FedAvg):
    """FedAvg that remembers the arrays it sent in ``configure_train``.

    Rules that aggregate updates (client arrays minus global arrays) derive from
    this class and override only ``aggregate_train`` and ``summary``. Every
    subclass exposes detection information of its last ``aggregate_train``:

    Attributes
    ----------
    global_arrays : ArrayRecord or None
        A copy of the arrays sent in the last ``configure_train``.
    last_excluded : list[int]
        Node ids whose update did not enter the last aggregate.
    last_weights : dict[int, float]
        Node id -> share of its update in the last aggregate (empty when the
        rule does not weight nodes).
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.global_arrays: ArrayRecord | None = None
        self.last_excluded: list[int] = []
        self.last_weights: dict[int, float] = {}

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

    def start_aggregation(self, replies: Iterable[Message]) -> tuple[list[Message], NDArray] | None:
        """Reset detection, keep the replies without errors and stack their updates.

        Returns
        -------
        tuple or None
            ``(valid replies, updates)`` with one flattened update (client arrays
            minus the global arrays) per row, or ``None`` when no reply is valid.
        """
        self.reset_detection()
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None
        updates = stack_updates([m.content for m in valid], self.require_global_arrays(), self.arrayrecord_key)
        return valid, updates

    def reset_detection(self) -> None:
        """Clear the detection information before a new aggregation."""
        self.last_excluded = []
        self.last_weights = {}

    def set_detection(self, ids: Sequence[int], weights: NDArray) -> None:
        """Record detection information from per-node aggregation weights.

        Parameters
        ----------
        ids : sequence of int
            Node ids, in the order of ``weights``.
        weights : NDArray
            Non-negative weight of each node in the aggregate; a node with
            weight 0 is reported as excluded.
        """
        total = float(np.sum(weights))
        shares = weights / total if total > 0 else np.zeros_like(weights)
        self.last_weights = {int(i): float(s) for i, s in zip(ids, shares, strict=True)}
        self.last_excluded = [int(i) for i, w in zip(ids, weights, strict=True) if w <= 0]
        if self.last_excluded:
            log(INFO, "%s: excluded nodes %s", type(self).__name__, self.last_excluded)


class StrategyWrapper(Strategy):
    """Base of strategies that wrap another one (``Validated``, ``NormClipWrapper``).

    Attributes not found on the wrapper (``fraction_train``, ``reports_detection``,
    user attributes...) are read from ``inner``, and so is the detection
    information of its last aggregation.
    """

    inner: Strategy

    def __getattr__(self, name: str) -> object:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # Every step delegates to ``inner``: a wrapper overrides only the steps it changes.
    def summary(self) -> None:
        """Log ``inner``'s summary."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to ``inner``."""
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate to ``inner``."""
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate to ``inner``."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Delegate to ``inner``."""
        return self.inner.aggregate_evaluate(server_round, replies)

    @property
    def last_excluded(self) -> list[int]:
        """Node ids excluded by ``inner`` in its last aggregation."""
        return list(getattr(self.inner, "last_excluded", []))

    @property
    def last_weights(self) -> dict[int, float]:
        """Per-node weights of ``inner``'s last aggregation."""
        return dict(getattr(self.inner, "last_weights", {}))
