"""Helpers shared by the defense strategies.

Copies of reply messages (a strategy never mutates what it receives), the
flattening of an ``ArrayRecord`` into one vector and back, the stacking of
client updates relative to the global arrays, and the base of wrappers. The
base of aggregation rules is :class:`strategies.base.UpdateRule`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.detection import Detection, detection_of

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


def reported_id(msg: Message, metric_key: str) -> int | None:
    """The integer ``metric_key`` a reply reports in one of its metric records, ``None`` when absent."""
    if msg.has_content():
        for record in msg.content.metric_records.values():
            if metric_key in record:
                return int(record[metric_key])
    return None


def client_key(msg: Message, metric_key: str | None) -> int:
    """A client identity that survives restarts: the reported ``metric_key``, else the node id.

    Node ids are not stable: the simulation draws new ones for every run (so a
    resumed run has new ones) and a restarted SuperNode without node
    authentication registers under a new one. The fedsec ClientApp reports its
    partition (its ``--node-config``) in every training reply's metrics; the
    ServerApp names that metric (``client_id_key``).

    Parameters
    ----------
    msg : Message
        A training reply.
    metric_key : str or None
        Name of the reported identity in the reply's metric records (``None``: use node ids).

    Returns
    -------
    int
        The reported identity, or ``node_id(msg)`` when none is reported.
    """
    if metric_key is not None and msg.has_content():
        for record in msg.content.metric_records.values():
            if metric_key in record:
                return int(record[metric_key])
    return node_id(msg)


class MissingKeyError(KeyError):
    """A record lacks the key a strategy was told to use (the message names the key and the keys present)."""

    def __str__(self) -> str:
        return str(self.args[0])


def require_key(record: ArrayRecord | MetricRecord | RecordDict, key: str, user: str) -> object:
    """``record[key]``, or one clear :class:`MissingKeyError` naming ``key`` and the keys present.

    Parameters
    ----------
    record : ArrayRecord, MetricRecord or RecordDict
        Where ``key`` must be.
    key : str
        The key ``user`` was configured with.
    user : str
        Who needs it (the error message starts with it).
    """
    if key not in record:
        raise MissingKeyError(f"{user}: no {key!r} in the record; keys present: {sorted(record.keys())}")
    return record[key]


def select_arrays(arrays: ArrayRecord, keys: Sequence[str], user: str) -> dict[str, np.ndarray]:
    """Copies of the arrays of ``arrays`` named by ``keys``, in that order.

    Raises
    ------
    strategies.common.MissingKeyError
        When a key is absent (the message names it, ``user`` and the keys present).
    """
    return {key: np.array(require_key(arrays, key, user).numpy(), copy=True) for key in keys}  # type: ignore[union-attr]


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


@runtime_checkable
class BroadcastsRecords(Protocol):
    """A strategy that sends records beside the model (e.g. activation bounds) the evaluation also needs."""

    @property
    def broadcast_records(self) -> dict[str, ArrayRecord]:
        """Record name -> record sent to the clients with every instruction."""


class StrategyWrapper(Strategy):
    """Base of strategies that wrap another one (``Validated``, ``NormClipWrapper``).

    Attributes not found on the wrapper (``fraction_train``, user attributes...)
    are read from ``inner``; ``detection`` (see :mod:`strategies.base`) is
    ``inner``'s.
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
    def broadcast_records(self) -> dict[str, ArrayRecord]:
        """The records ``inner`` sends beside the model (empty when none)."""
        return self.inner.broadcast_records if isinstance(self.inner, BroadcastsRecords) else {}

    @property
    def detection(self) -> Detection | None:
        """The :class:`~strategies.base.Detection` of ``inner``'s last aggregation."""
        return detection_of(self.inner)

    @property
    def last_excluded(self) -> list[int]:
        """Node ids excluded by ``inner`` in its last aggregation."""
        d = self.detection
        return list(d.excluded) if d is not None else []

    @property
    def last_weights(self) -> dict[int, float]:
        """Per-node shares of ``inner``'s last aggregation."""
        d = self.detection
        return dict(d.weights) if d is not None else {}
