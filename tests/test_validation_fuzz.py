"""Reply validation: every malformed reply is rejected, the server never raises, the rest is FedAvg'd."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategies.detection import Detection
from strategies.registry import STRATEGIES, load_all
from strategies.validation import REJECTED_KEY, Validated, check_evaluate_reply, check_reply
from tests.strategy_helpers import (
    configure,
    ctx_arrays,
    ctx_of,
    make_sctx,
    npy_bytes,
    replies_to,
    run_round,
    snapshot,
    train_content,
)

load_all()

SHAPE = (4, 8)
MAX_BYTES = 4096
GLOBAL = np.zeros(SHAPE, dtype=np.float32)


def _values(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)


def _npz_bytes(value: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, ctx=value)
    return buf.getvalue()


def _with_value(value: np.ndarray, n: int = 10) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({"ctx": Array(value)}), "metrics": MetricRecord({"num-examples": n})})


def _with_array(arr: Array, n: int = 10) -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({"ctx": arr}), "metrics": MetricRecord({"num-examples": n})})


def _with_weight(seed: int, weight: object) -> RecordDict:
    return RecordDict({"arrays": ctx_arrays(_values(seed)), "metrics": MetricRecord({"num-examples": weight})})


def _nan(seed: int) -> RecordDict:
    v = _values(seed)
    v[1, 2] = np.nan
    return _with_value(v)


def _inf(seed: int) -> RecordDict:
    v = _values(seed)
    v[0, 0] = -np.inf
    return _with_value(v)


# kind -> builder of a malformed reply content (seed -> RecordDict), or "error" for an error reply
MALFORMED = {
    "nan": _nan,
    "inf": _inf,
    "missing-key": lambda s: RecordDict(
        {"arrays": ArrayRecord({"other": Array(_values(s))}), "metrics": MetricRecord({"num-examples": 5})}
    ),
    "extra-key": lambda s: RecordDict(
        {
            "arrays": ArrayRecord({"ctx": Array(_values(s)), "evil": Array(_values(s + 1))}),
            "metrics": MetricRecord({"num-examples": 5}),
        }
    ),
    "empty-arrays": lambda s: RecordDict({"arrays": ArrayRecord(), "metrics": MetricRecord({"num-examples": 5})}),
    "wrong-shape": lambda s: _with_value(np.ones((8, 4), dtype=np.float32)),
    "wrong-dtype": lambda s: _with_value(_values(s).astype(np.float64)),
    "int-dtype": lambda s: _with_value(np.ones(SHAPE, dtype=np.int32)),
    "oversized": lambda s: _with_value(np.ones((64, 64), dtype=np.float32)),
    "no-num-examples": lambda s: RecordDict(
        {"arrays": ctx_arrays(_values(s)), "metrics": MetricRecord({"train-loss": 0.5})}
    ),
    "zero-num-examples": lambda s: _with_weight(s, 0),
    "negative-num-examples": lambda s: _with_weight(s, -3),
    "nan-num-examples": lambda s: _with_weight(s, float("nan")),
    "inf-num-examples": lambda s: _with_weight(s, float("inf")),
    "huge-num-examples": lambda s: _with_weight(s, 1e300),
    "list-num-examples": lambda s: _with_weight(s, [1, 2]),
    "no-arrays": lambda s: RecordDict({"metrics": MetricRecord({"num-examples": 5})}),
    "no-metrics": lambda s: RecordDict({"arrays": ctx_arrays(_values(s))}),
    "empty-content": lambda s: RecordDict(),
    "arrays-as-config": lambda s: RecordDict(
        {"arrays": ConfigRecord({"ctx": 1.0}), "metrics": MetricRecord({"num-examples": 5})}
    ),
    "metrics-as-config": lambda s: RecordDict(
        {"arrays": ctx_arrays(_values(s)), "metrics": ConfigRecord({"num-examples": 5})}
    ),
    "two-array-records": lambda s: RecordDict(
        {
            "arrays": ctx_arrays(_values(s)),
            "more": ctx_arrays(_values(s)),
            "metrics": MetricRecord({"num-examples": 5}),
        }
    ),
    "two-metric-records": lambda s: RecordDict(
        {
            "arrays": ctx_arrays(_values(s)),
            "metrics": MetricRecord({"num-examples": 5}),
            "more": MetricRecord({"num-examples": 5}),
        }
    ),
    "garbage-bytes": lambda s: _with_array(
        Array(dtype="float32", shape=SHAPE, stype="numpy.ndarray", data=b"\x00garbage")
    ),
    "declared-shape-lie": lambda s: _with_array(
        Array(dtype="float32", shape=SHAPE, stype="numpy.ndarray", data=npy_bytes(np.ones((2, 16), np.float32)))
    ),
    "declared-dtype-lie": lambda s: _with_array(
        Array(dtype="float32", shape=SHAPE, stype="numpy.ndarray", data=npy_bytes(np.ones(SHAPE, np.float64)))
    ),
    "npz-data": lambda s: _with_array(
        Array(dtype="float32", shape=SHAPE, stype="numpy.ndarray", data=_npz_bytes(_values(s)))
    ),
    "torch-stype": lambda s: _with_array(
        Array(dtype="float32", shape=SHAPE, stype="torch.Tensor", data=npy_bytes(_values(s)))
    ),
    "error": "error",
}


def _malformed(kind: str, seed: int) -> RecordDict | Error:
    builder = MALFORMED[kind]
    if builder == "error":
        return Error(code=1, reason="client crashed")
    return builder(seed)  # type: ignore[operator]


@st.composite
def reply_specs(draw: st.DrawFn) -> list[tuple[str, int, float, int]]:
    """A round: (kind, seed, num-examples, extra-metrics variant) per node; kind "valid" or a malformed kind."""
    kinds = st.one_of(st.just("valid"), st.sampled_from(sorted(MALFORMED)))
    spec = st.tuples(
        kinds,
        st.integers(0, 2**31 - 1),
        st.one_of(st.integers(1, 500), st.floats(0.5, 500.0)),
        st.integers(0, 3),
    )
    return draw(st.lists(spec, min_size=1, max_size=9))


def _valid_content(seed: int, weight: float, variant: int) -> RecordDict:
    """Valid replies whose extra metrics differ (absent, scalar, lists of different lengths)."""
    extra: dict[str, object] = {}
    if variant == 1:
        extra["train-loss"] = 0.25
    elif variant == 2:
        extra["train-loss"] = 0.5
        extra["per-class"] = [0.1, 0.2]
    elif variant == 3:
        extra["per-class"] = [0.1, 0.2, 0.3]
    return train_content(_values(seed), weight, **extra)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=reply_specs())
def test_fuzz_malformed_replies_are_rejected_and_the_rest_is_fedavg(specs):
    # Prepare: one node per spec, node ids 1..n
    contents = {}
    valid_nodes, bad_nodes = [], []
    for node, (kind, seed, weight, variant) in enumerate(specs, start=1):
        if kind == "valid":
            contents[node] = _valid_content(seed, weight, variant)
            valid_nodes.append(node)
        else:
            contents[node] = _malformed(kind, seed)
            bad_nodes.append(node)
    strategy = Validated(FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1), max_bytes=MAX_BYTES)

    # Execute
    arrays, metrics, replies = run_round(strategy, GLOBAL, contents)
    before = snapshot(replies)
    arrays_again, _ = strategy.aggregate_train(1, replies)

    # Assert: exactly the malformed nodes are rejected and counted
    assert sorted(n for n, _ in strategy.last_rejected) == bad_nodes
    assert metrics is not None and metrics[REJECTED_KEY] == len(bad_nodes)
    # Assert: the aggregate is the FedAvg of the valid replies (None when there is none)
    if valid_nodes:
        weights = np.array([float(contents[n]["metrics"]["num-examples"]) for n in valid_nodes])
        stack = np.stack([contents[n]["arrays"]["ctx"].numpy().astype(np.float64) for n in valid_nodes])
        expected = np.tensordot(weights / weights.sum(), stack, axes=1)
        np.testing.assert_allclose(ctx_of(arrays), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ctx_of(arrays_again), expected, rtol=1e-5, atol=1e-5)
    else:
        assert arrays is None
    # Assert: the received replies were not modified
    assert snapshot(replies) == before


@pytest.mark.parametrize("kind", sorted(k for k in MALFORMED if k != "error"))
def test_check_reply_names_a_reason_for_each_malformed_kind(kind):
    # Prepare
    content = _malformed(kind, seed=3)

    # Execute
    reason = check_reply(content, ctx_arrays(GLOBAL), MAX_BYTES)

    # Assert
    assert isinstance(reason, str) and reason


def test_check_reply_accepts_a_valid_reply_and_reports_specific_reasons():
    # Prepare
    ref = ctx_arrays(GLOBAL)

    # Execute
    ok = check_reply(train_content(_values(1), 7, **{"train-loss": 0.1}), ref, MAX_BYTES)
    nan = check_reply(_nan(1), ref, MAX_BYTES)
    big = check_reply(train_content(_values(1)), ref, max_bytes=64)
    shape = check_reply(MALFORMED["wrong-shape"](1), ref, MAX_BYTES)
    extra = check_reply(MALFORMED["extra-key"](1), ref, MAX_BYTES)
    weight = check_reply(_with_weight(1, 0), ref, MAX_BYTES)

    # Assert
    assert ok is None
    assert "NaN" in nan
    assert "oversized" in big
    assert "shape" in shape
    assert "extra array keys" in extra
    assert "num-examples" in weight


def test_no_valid_reply_keeps_the_global_model_and_counts_rejections():
    # Prepare
    strategy = Validated(FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1))
    contents = {1: _nan(1), 2: Error(code=2, reason="timeout")}

    # Execute
    arrays, metrics, _ = run_round(strategy, GLOBAL, contents)

    # Assert
    assert arrays is None
    assert dict(metrics) == {REJECTED_KEY: 2}
    assert [n for n, _ in strategy.last_rejected] == [1, 2]


class _NoMetricsAvg(FedAvg):
    """A user's FedAvg subclass that reports no training metrics."""

    def aggregate_train(self, server_round, replies):
        arrays, _ = super().aggregate_train(server_round, replies)
        return arrays, None


def test_inner_without_metrics_still_gets_the_rejection_count_and_passthrough():
    # Prepare
    inner = _NoMetricsAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    inner.detection = Detection(excluded=(9,))
    strategy = Validated(inner)
    contents = {1: train_content(np.ones(SHAPE, np.float32)), 2: _inf(2)}

    # Execute
    arrays, metrics, _ = run_round(strategy, GLOBAL, contents)

    # Assert
    np.testing.assert_allclose(ctx_of(arrays), np.ones(SHAPE))
    assert dict(metrics) == {REJECTED_KEY: 1}
    assert strategy.last_excluded == [9]
    assert strategy.last_weights == {}
    assert strategy.fraction_train == 1.0  # other attributes come from the inner strategy


def test_aggregate_evaluate_drops_errors_and_replies_without_metrics():
    # Prepare
    from tests.strategy_helpers import configure, replies_to

    inner = FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    strategy = Validated(inner)
    instructions = configure(strategy, GLOBAL, [1, 2, 3, 4, 5])
    contents = {
        1: RecordDict({"metrics": MetricRecord({"num-examples": 10, "eval-acc": 0.5})}),
        2: RecordDict({"metrics": MetricRecord({"num-examples": 30, "eval-acc": 0.9, "extra": 1.0})}),
        3: Error(code=1, reason="boom"),
        4: RecordDict({"metrics": MetricRecord({"eval-acc": 0.1})}),
        5: RecordDict({"other": ConfigRecord({"x": 1})}),
    }
    replies = replies_to(instructions, contents)

    # Execute
    metrics = strategy.aggregate_evaluate(1, replies)

    # Assert
    assert metrics is not None and metrics["eval-acc"] == pytest.approx(0.8)
    assert sorted(n for n, _ in strategy.last_rejected_evaluate) == [3, 4, 5]
    assert check_evaluate_reply(contents[1]) is None


def _server_update(arrays: ArrayRecord) -> ArrayRecord:
    return ctx_arrays(arrays["ctx"].numpy() + 0.1)


@st.composite
def mixed_rounds(draw: st.DrawFn) -> list[tuple[str, int]]:
    """A round of 10 replies: ``n_bad`` malformed ones (any kinds) among valid ones, in any order."""
    n_bad = draw(st.integers(1, 10))
    bad = draw(st.lists(st.sampled_from(sorted(MALFORMED)), min_size=n_bad, max_size=n_bad))
    kinds = draw(st.permutations(["valid"] * (10 - n_bad) + bad))
    return [(kind, draw(st.integers(0, 2**31 - 1))) for kind in kinds]


@pytest.mark.parametrize("name", sorted(STRATEGIES.names()))
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=mixed_rounds())
def test_fuzz_every_registered_strategy_behind_validation_rejects_malformed_replies(name, specs):
    # Prepare: the registered rule as the ServerApp builds it (behind validation), 10 nodes
    strategy = Validated(STRATEGIES.get(name)(make_sctx(name, 10, server_update=_server_update)), max_bytes=MAX_BYTES)
    contents = {
        node: train_content(_values(seed), 10) if kind == "valid" else _malformed(kind, seed)
        for node, (kind, seed) in enumerate(specs, start=1)
    }
    bad_nodes = [node for node, (kind, _) in enumerate(specs, start=1) if kind != "valid"]
    # Execute
    arrays, metrics, replies = run_round(strategy, GLOBAL, contents)
    before = snapshot(replies)
    strategy.aggregate_train(1, replies)
    # Assert: exactly the malformed replies are rejected and counted; whatever is aggregated is finite
    # (a rule may also keep the global model, e.g. FLTrust when it trusts no update: arrays is None)
    assert sorted(n for n, _ in strategy.last_rejected) == bad_nodes
    assert metrics is not None and metrics[REJECTED_KEY] == len(bad_nodes)
    if arrays is not None:
        assert ctx_of(arrays).shape == SHAPE and np.all(np.isfinite(ctx_of(arrays)))
    if len(bad_nodes) == len(specs):
        assert arrays is None
    assert snapshot(replies) == before


@pytest.mark.parametrize("name", ["fedavg", "trimmed-mean", "flame"])
def test_aggregate_does_not_depend_on_the_order_replies_arrive_in(name):
    # Prepare: float32 values whose sum depends on the order; replies in two different arrival orders
    rng = np.random.default_rng(3)
    contents = {
        10 + p: train_content(
            (rng.normal(size=SHAPE) * 10.0 ** rng.integers(-3, 4)).astype(np.float32), 7 + p, **{"partition-id": p}
        )
        for p in range(8)
    }
    results = []
    for order in (list(range(8)), [5, 2, 7, 0, 3, 6, 1, 4]):
        strategy = Validated(STRATEGIES.get(name)(make_sctx(name, 8, **{"flame-noise-lambda": 0.0})))
        instructions = configure(strategy, GLOBAL, sorted(contents))
        replies = replies_to(instructions, contents)
        # Execute
        arrays, _ = strategy.aggregate_train(1, [replies[i] for i in order])
        results.append(ctx_of(arrays))
    # Assert: bit-identical aggregates
    assert np.array_equal(results[0], results[1])
