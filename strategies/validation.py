"""Validation of client replies before any aggregation rule sees them.

A malformed reply (NaN/Inf, wrong or missing arrays, oversized payload, a bad
``num-examples``...) would either poison the aggregate or make Flower's
``validate_message_reply_consistency`` raise and stop the server. The pure
function :func:`check_reply` tells why a reply is unusable; the wrapper
:class:`Validated` drops such replies (logging each with its node id),
harmonises the metric keys of the others and hands copies of the valid
replies to the wrapped strategy. The ServerApp wraps every strategy in it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from logging import ERROR, INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import Strategy

from strategies.common import StrategyWrapper, copy_arrays, copy_reply, node_id

#: Default bound on the serialized size of the arrays of one reply.
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
#: Default bound on ``num-examples`` (keeps weighted sums finite).
DEFAULT_MAX_NUM_EXAMPLES = 1e12
#: Metric key added to the training metrics: replies dropped this round.
REJECTED_KEY = "rejected-replies"


def cap_weights(weights: list[float], ratio: float) -> list[float]:
    """Bound client-reported weights at ``ratio`` times their median (``ratio <= 0``: unchanged).

    The server cannot verify a client's ``num-examples``; an attacker who
    reports a huge one takes over a FedAvg-weighted aggregate. Capping at a
    multiple of the round's median keeps honest variation (up to ``ratio``
    times a typical client) and bounds what a minority of liars can claim: with
    fewer than half of the replies lying, the median is an honest client's.

    Parameters
    ----------
    weights : list of float
        The accepted replies' weights.
    ratio : float
        Multiple of the median kept (run-config ``max-weight-ratio``).

    Returns
    -------
    list of float
        The bounded weights, in the same order.
    """
    if ratio <= 0 or not weights:
        return list(weights)
    cap = ratio * float(np.median(weights))
    return [min(float(w), cap) for w in weights]


def check_weight(metrics: MetricRecord, weight_key: str, max_value: float = DEFAULT_MAX_NUM_EXAMPLES) -> str | None:
    """Why ``metrics[weight_key]`` is not a usable weight, or None if it is.

    Parameters
    ----------
    metrics : MetricRecord
        The reply's metrics.
    weight_key : str
        Usually ``"num-examples"``.
    max_value : float
        Largest accepted weight.

    Returns
    -------
    str or None
        The rejection reason.
    """
    if weight_key not in metrics:
        return f"metric {weight_key!r} is missing"
    value = metrics[weight_key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"metric {weight_key!r} is not a number: {type(value).__name__}"
    if not math.isfinite(value) or value <= 0:
        return f"metric {weight_key!r} must be positive and finite, got {value!r}"
    if value > max_value:
        return f"metric {weight_key!r}={value!r} exceeds {max_value:g}"
    return None


def check_reply(
    content: RecordDict,
    reference: ArrayRecord | None,
    max_bytes: int,
    *,
    array_key: str = "arrays",
    metric_key: str = "metrics",
    weight_key: str = "num-examples",
    max_num_examples: float = DEFAULT_MAX_NUM_EXAMPLES,
) -> str | None:
    """Why a training reply must be rejected, or None if it is valid.

    Parameters
    ----------
    content : RecordDict
        The reply content.
    reference : ArrayRecord or None
        The arrays sent this round: the reply must carry exactly these keys with
        the same shapes and dtypes. None skips the comparison.
    max_bytes : int
        Largest accepted serialized size of all arrays of the reply together.
    array_key, metric_key : str
        Names of the one ``ArrayRecord`` and the one ``MetricRecord`` a reply carries.
    weight_key : str
        Metric used as aggregation weight (positive and finite).
    max_num_examples : float
        Largest accepted weight.

    Returns
    -------
    str or None
        A human-readable reason (NaN/Inf, missing or extra keys, shape, dtype,
        size, weight, record structure, unreadable data), or None.
    """
    try:
        return _check_reply(content, reference, max_bytes, array_key, metric_key, weight_key, max_num_examples)
    except Exception as exc:  # noqa: BLE001 - anything unreadable is a rejection
        return f"unreadable reply: {type(exc).__name__}: {exc}"


def _check_records(content: RecordDict, array_key: str | None, metric_key: str) -> str | None:
    if not isinstance(content, RecordDict):
        return f"content is not a RecordDict: {type(content).__name__}"
    if array_key is not None:  # None: evaluation replies, arrays are not looked at
        if array_key not in content:
            return f"record {array_key!r} is missing"
        if not isinstance(content[array_key], ArrayRecord):
            return f"record {array_key!r} is not an ArrayRecord"
        if len(content.array_records) != 1:
            return f"expected exactly one ArrayRecord, found {sorted(content.array_records)}"
    if metric_key not in content:
        return f"record {metric_key!r} is missing"
    if not isinstance(content[metric_key], MetricRecord):
        return f"record {metric_key!r} is not a MetricRecord"
    if len(content.metric_records) != 1:
        return f"expected exactly one MetricRecord, found {sorted(content.metric_records)}"
    return None


def _check_reply(
    content: RecordDict,
    reference: ArrayRecord | None,
    max_bytes: int,
    array_key: str,
    metric_key: str,
    weight_key: str,
    max_num_examples: float,
) -> str | None:
    if (reason := _check_records(content, array_key, metric_key)) is not None:
        return reason
    if (reason := check_weight(content[metric_key], weight_key, max_num_examples)) is not None:
        return reason
    arrays = content[array_key]
    size = sum(len(a.data) for a in arrays.values())
    if size > max_bytes:
        return f"arrays are oversized: {size} bytes > {max_bytes}"
    if reference is not None:
        got, want = set(arrays.keys()), set(reference.keys())
        if got - want:
            return f"extra array keys {sorted(got - want)}"
        if want - got:
            return f"missing array keys {sorted(want - got)}"
    if not arrays:
        return "no arrays"
    for key, arr in arrays.items():
        value = arr.numpy()
        if not isinstance(value, np.ndarray):
            return f"array {key!r} does not decode to an ndarray"
        if tuple(value.shape) != tuple(arr.shape) or np.dtype(value.dtype).str != np.dtype(arr.dtype).str:
            return f"array {key!r}: declared {arr.dtype}{tuple(arr.shape)} but data is {value.dtype}{value.shape}"
        if value.dtype.kind not in "biufc":
            return f"array {key!r} has non-numeric dtype {value.dtype}"
        if reference is not None:
            ref = reference[key]
            if tuple(value.shape) != tuple(ref.shape):
                return f"array {key!r} has shape {value.shape}, expected {tuple(ref.shape)}"
            if np.dtype(value.dtype).str != np.dtype(ref.dtype).str:
                return f"array {key!r} has dtype {value.dtype}, expected {ref.dtype}"
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            return f"array {key!r} contains NaN or Inf"
    return None


def check_evaluate_reply(
    content: RecordDict, *, metric_key: str = "metrics", weight_key: str = "num-examples"
) -> str | None:
    """Why an evaluation reply must be rejected (no metrics, bad weight, extra records), or None."""
    try:
        if (reason := _check_records(content, None, metric_key)) is not None:
            return reason
        return check_weight(content[metric_key], weight_key)
    except Exception as exc:  # noqa: BLE001
        return f"unreadable reply: {type(exc).__name__}: {exc}"


def common_metric_keys(records: list[MetricRecord]) -> list[str]:
    """Metric keys present in every record with a compatible value (all scalars, or lists of one length).

    Parameters
    ----------
    records : list[MetricRecord]
        The metrics of the accepted replies.

    Returns
    -------
    list[str]
        Keys Flower can aggregate across all records, in the first record's order.
    """
    if not records:
        return []
    keys = [k for k in records[0].keys() if all(k in r for r in records[1:])]

    def shape(value: object) -> int:
        return len(value) if isinstance(value, list) else -1

    return [k for k in keys if len({shape(r[k]) for r in records}) == 1]


def _reply_order(msg: Message, metricrecord_key: str, client_id_key: str | None) -> tuple[float, int]:
    """Sort key of a valid reply: its ``client_id_key`` metric when it reports one, then its node id."""
    try:
        pid = float(msg.content[metricrecord_key][client_id_key])  # type: ignore[arg-type,index]
    except (KeyError, TypeError, ValueError):
        pid = float("inf")
    return (pid if np.isfinite(pid) else float("inf"), node_id(msg))


class Validated(StrategyWrapper):
    """Drop invalid replies before ``inner`` aggregates.

    ``configure_train`` remembers the arrays sent; ``aggregate_train`` rejects
    replies that fail :func:`check_reply` (and error replies), logs each with
    its node id, keeps in every accepted reply only the metric keys all of them
    share (on copies), and calls ``inner.aggregate_train`` on copies of the
    accepted replies. The returned metrics get ``"rejected-replies"``; with no
    valid reply left it returns ``(None, MetricRecord)`` and the global model
    stays. Other attributes are read from ``inner``.

    Parameters
    ----------
    inner : Strategy
        Any Flower strategy.
    max_bytes : int
        Largest accepted serialized size of a reply's arrays.
    max_num_examples : float
        Largest accepted ``num-examples``.
    max_weight_ratio : float
        Weights above this multiple of the round's median weight are lowered to it
        (:func:`cap_weights`; 0 = off). The ServerApp passes run-config ``max-weight-ratio``.
    metricrecord_key : str
        Name of the one ``MetricRecord`` of a reply (Flower's convention ``"metrics"``).
    client_id_key : str, optional
        Metric holding a stable client identity: accepted replies are ordered by it,
        then by node id (``None``: node id only). The ServerApp passes ``partition-id``.

    Attributes
    ----------
    last_rejected : list[tuple[int, str]]
        (node id, reason) of the replies rejected in the last ``aggregate_train``.
    last_rejected_evaluate : list[tuple[int, str]]
        Same for the last ``aggregate_evaluate``.
    """

    def __init__(
        self,
        inner: Strategy,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_num_examples: float = DEFAULT_MAX_NUM_EXAMPLES,
        max_weight_ratio: float = 0.0,
        *,
        metricrecord_key: str = "metrics",
        client_id_key: str | None = None,
    ) -> None:
        self.inner = inner
        self.metricrecord_key = metricrecord_key
        self.client_id_key = client_id_key
        self.max_bytes = max_bytes
        self.max_num_examples = max_num_examples
        self.max_weight_ratio = float(max_weight_ratio)
        self.reference: ArrayRecord | None = None
        self.last_rejected: list[tuple[int, str]] = []
        self.last_rejected_evaluate: list[tuple[int, str]] = []

    # -- keys of the wrapped strategy ---------------------------------------
    @property
    def array_key(self) -> str:
        """Record key of the arrays (``inner.arrayrecord_key`` or ``"arrays"``)."""
        return str(_find_attr(self.inner, "arrayrecord_key", "arrays"))

    @property
    def weight_key(self) -> str:
        """Metric used as weight (``inner.weighted_by_key`` or ``"num-examples"``)."""
        return str(_find_attr(self.inner, "weighted_by_key", "num-examples"))

    # -- Strategy ---------------------------------------------------------------
    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> Reply validation: max %d bytes, max num-examples %g", self.max_bytes, self.max_num_examples)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the arrays sent and delegate."""
        self.reference = copy_arrays(arrays)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Reject invalid replies, then let ``inner`` aggregate copies of the valid ones."""
        accepted: list[Message] = []
        rejected: list[tuple[int, str]] = []
        reference = self.reference
        for msg in replies:
            if msg.has_error() or not msg.has_content():
                rejected.append((node_id(msg), f"error reply: {_error_reason(msg)}"))
                continue
            reason = check_reply(
                msg.content,
                reference,
                self.max_bytes,
                array_key=self.array_key,
                metric_key=self.metricrecord_key,
                weight_key=self.weight_key,
                max_num_examples=self.max_num_examples,
            )
            if reason is None and reference is None:
                # Without configure_train, the first valid reply is the reference for the others.
                reference = copy_arrays(msg.content[self.array_key])
            if reason is None:
                accepted.append(msg)
            else:
                rejected.append((node_id(msg), reason))
        self.last_rejected = rejected
        for nid, reason in rejected:
            log(WARNING, "validation: rejected reply from node %d: %s", nid, reason)
        metrics = MetricRecord({REJECTED_KEY: len(rejected)})
        if not accepted:
            if rejected:
                log(WARNING, "validation: no valid reply in round %d, keeping the global model", server_round)
            return None, metrics
        # A fixed order (partition id, then node id): replies arrive in whatever order the clients finish,
        # and float sums in another order differ in the last bits, which training amplifies over rounds.
        accepted.sort(key=lambda m: _reply_order(m, self.metricrecord_key, self.client_id_key))
        clean = self._harmonised_copies(accepted, reference)
        self._bound_weights(clean)
        try:
            arrays, inner_metrics = self.inner.aggregate_train(server_round, clean)
        except (InconsistentMessageReplies, AggregationError) as exc:
            log(ERROR, "validation: %s failed to aggregate round %d: %s", type(self.inner).__name__, server_round, exc)
            return None, metrics
        if inner_metrics is not None:
            merged = MetricRecord(dict(inner_metrics.items()))
            merged[REJECTED_KEY] = len(rejected)
            metrics = merged
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Drop error replies and replies without valid metrics, then delegate."""
        accepted: list[Message] = []
        rejected: list[tuple[int, str]] = []
        for msg in replies:
            if msg.has_error() or not msg.has_content():
                rejected.append((node_id(msg), f"error reply: {_error_reason(msg)}"))
                continue
            reason = check_evaluate_reply(msg.content, metric_key=self.metricrecord_key, weight_key=self.weight_key)
            if reason is None:
                accepted.append(msg)
            else:
                rejected.append((node_id(msg), reason))
        self.last_rejected_evaluate = rejected
        for nid, reason in rejected:
            log(WARNING, "validation: rejected evaluate reply from node %d: %s", nid, reason)
        if not accepted:
            return None
        try:
            return self.inner.aggregate_evaluate(server_round, self._harmonised_copies(accepted, None))
        except (InconsistentMessageReplies, AggregationError) as exc:
            log(ERROR, "validation: %s failed to aggregate evaluation: %s", type(self.inner).__name__, exc)
            return None

    # -- helpers ------------------------------------------------------------------
    def _bound_weights(self, clean: list[Message]) -> None:
        """Lower reported weights above ``max_weight_ratio`` x the median, in the copies ``clean``."""
        key = self.metricrecord_key
        if self.max_weight_ratio <= 0 or self.weight_key not in clean[0].content[key]:
            return
        weights = [float(m.content[key][self.weight_key]) for m in clean]  # type: ignore[arg-type]
        bounded = cap_weights(weights, self.max_weight_ratio)
        for msg, before, after in zip(clean, weights, bounded, strict=True):
            if after < before:
                log(
                    WARNING,
                    "validation: node %d reported %s=%g, above %g x the median: counted as %g",
                    node_id(msg),
                    self.weight_key,
                    before,
                    self.max_weight_ratio,
                    after,
                )
                old = msg.content[key][self.weight_key]
                msg.content[key][self.weight_key] = int(after) if isinstance(old, int) else after

    def _harmonised_copies(self, accepted: list[Message], reference: ArrayRecord | None) -> list[Message]:
        """Copies of ``accepted`` with only the shared metric keys and arrays in reference order."""
        keys = common_metric_keys([m.content[self.metricrecord_key] for m in accepted])
        dropped = {k for m in accepted for k in m.content[self.metricrecord_key].keys()} - set(keys)
        if dropped:
            log(INFO, "validation: metric keys not shared by all replies are ignored: %s", sorted(dropped))
        out: list[Message] = []
        for msg in accepted:
            records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {}
            for name, record in msg.content.items():
                if name == self.metricrecord_key:
                    records[name] = MetricRecord({k: copy.deepcopy(record[k]) for k in keys})
                elif name == self.array_key and reference is not None:
                    records[name] = ArrayRecord({k: copy.deepcopy(record[k]) for k in reference.keys()})
                else:
                    records[name] = copy.deepcopy(record)
            out.append(copy_reply(msg, RecordDict(records)))
        return out


def _find_attr(strategy: object, name: str, default: object) -> object:
    """``strategy.name``, looking through wrappers (``.strategy``/``.inner``) when absent."""
    seen = 0
    while strategy is not None and seen < 10:
        if name in vars(strategy) or hasattr(type(strategy), name):
            return getattr(strategy, name)
        strategy = vars(strategy).get("strategy") or vars(strategy).get("inner")
        seen += 1
    return default


def _error_reason(msg: Message) -> str:
    if not msg.has_error():
        return "no content"
    try:
        return str(msg.error.reason)
    except Exception:  # noqa: BLE001
        return "unknown"
