"""The rule template (strategies.base), the detection interface and the generic record keys."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg

from strategies.activation_bound import ActivationBoundWrapper
from strategies.base import RoundUpdates, RuleOutput, UpdateRule, check_replies
from strategies.common import MissingKeyError
from strategies.detection import Detection, detection_of
from strategies.fusion import ServerFusion
from strategies.recorder import Recorder
from strategies.validation import Validated
from tests.conftest import ROOT
from tests.strategy_helpers import configure, replies_to, run_round, train_content

#: FedAvg sampling that accepts one node (Flower waits for ``min_available_nodes``).
SMALL = {"fraction_evaluate": 0.0, "min_train_nodes": 1, "min_available_nodes": 1}


class DropNegativeMean(UpdateRule):
    """A test rule: weighted mean of the updates whose first coordinate is not negative."""

    detects = True
    metrics_of_excluded = False

    def aggregate_updates(self, round_updates: RoundUpdates) -> RuleOutput:
        keep = (round_updates.updates[:, 0] >= 0).astype(np.float64)
        w = keep * round_updates.weights
        if w.sum() == 0:
            return RuleOutput(None, keep)
        return RuleOutput((w[:, None] * round_updates.updates).sum(axis=0) / w.sum(), keep)


def _content(values: list[float], n: float, loss: float, arrays_key: str = "arrays", weight: str = "num-examples"):
    return RecordDict(
        {
            arrays_key: ArrayRecord({"ctx": Array(np.array(values, np.float32))}),
            "metrics": MetricRecord({weight: n, "train-loss": loss}),
        }
    )


def test_detection_from_weights_gives_shares_and_excluded_nodes():
    # Prepare / Execute
    detection = Detection.from_weights([4, 5, 6], np.array([3.0, 0.0, 1.0]))

    # Assert: shares 3/4, 0, 1/4; node 5 excluded; node 6 below half the top share is flagged too
    assert detection.excluded == (5,)
    assert detection.weights == {4: 0.75, 5: 0.0, 6: 0.25}
    assert detection.flagged() == [5, 6]
    assert Detection.from_weights([1], np.zeros(1)).weights == {1: 0.0}


def test_a_rule_supplies_only_its_maths_and_the_base_does_the_rest():
    # Prepare: global (0, 0); node 1 moves +(1, 2) with 1 example, node 2 +(3, 4) with 3, node 3 -(1, 1)
    rule = DropNegativeMean(**SMALL)
    contents = {1: _content([1, 2], 1, 0.4), 2: _content([3, 4], 3, 0.8), 3: _content([-1, -1], 6, 9.0)}

    # Execute
    arrays, metrics, _ = run_round(rule, np.zeros(2, np.float32), contents)

    # Assert: (1*(1,2) + 3*(3,4)) / 4 = (2.5, 3.5); node 3 is reported excluded and left out of the metrics
    np.testing.assert_allclose(arrays["ctx"].numpy(), [2.5, 3.5])
    assert arrays["ctx"].numpy().dtype == np.float32
    assert detection_of(rule) == Detection((3,), {1: 0.5, 2: 0.5, 3: 0.0})
    assert metrics["train-loss"] == pytest.approx((1 * 0.4 + 3 * 0.8) / 4)
    assert rule.last_excluded == [3]


def test_a_rule_that_admits_nothing_keeps_the_global_model():
    # Prepare
    rule = DropNegativeMean(**SMALL)

    # Execute
    arrays, metrics, _ = run_round(rule, np.zeros(2, np.float32), {1: _content([-1, 0], 1, 0.5)})

    # Assert
    assert arrays is None and metrics is not None
    assert detection_of(rule).excluded == (1,)


def test_the_rule_is_generic_over_the_record_keys():
    # Prepare: arrays under "weights", weights under "n"
    rule = DropNegativeMean(arrayrecord_key="weights", weighted_by_key="n", **SMALL)
    contents = {1: _content([1, 1], 1, 0.0, "weights", "n"), 2: _content([3, 3], 1, 0.0, "weights", "n")}

    # Execute
    arrays, _, _ = run_round(rule, np.zeros(2, np.float32), contents)

    # Assert
    np.testing.assert_allclose(arrays["ctx"].numpy(), [2.0, 2.0])


def test_check_replies_drops_errors_and_rejects_inconsistent_replies():
    # Prepare
    rule = DropNegativeMean(**SMALL)
    instructions = configure(rule, np.zeros(2, np.float32), [1, 2, 3])
    ok = replies_to(instructions, {1: _content([1, 1], 1, 0.0), 2: Error(code=1, reason="boom")})
    bad = replies_to(instructions, {1: _content([1, 1], 1, 0.0), 3: _content([1, 1], 1, 0.0, weight="other")})

    # Execute / Assert
    assert [m.metadata.src_node_id for m in check_replies(ok, "num-examples")] == [1]
    with pytest.raises(InconsistentMessageReplies):
        check_replies(bad, "num-examples")


def test_wrappers_report_the_inner_detection_and_the_recorder_flags_partitions():
    # Prepare: Recorder(Validated(rule)); partitions 10 + node
    seen: list[dict] = []
    rule = DropNegativeMean(**SMALL)
    strategy = Recorder(Validated(rule), seen.append, arrayrecord_key="arrays", client_id_key="partition-id")
    contents = {
        n: train_content(np.full((1, 2), v, np.float32), **{"partition-id": 10 + n}) for n, v in [(1, 1), (2, -1)]
    }

    # Execute
    run_round(strategy, np.zeros((1, 2), np.float32), contents)

    # Assert
    assert detection_of(strategy) == detection_of(rule) == Detection((2,), {1: 1.0, 2: 0.0})
    assert seen[0]["flagged"] == [12] and seen[0]["partitions"] == {1: 11, 2: 12}
    np.testing.assert_allclose(seen[0]["updates"][12], [-1.0, -1.0])


def test_a_plain_flower_strategy_reports_no_detection():
    assert detection_of(FedAvg()) is None
    assert detection_of(Validated(FedAvg())) is None


@pytest.mark.parametrize("wrapper", ["fusion", "bounds"])
def test_a_missing_array_raises_one_clear_error(wrapper):
    # Prepare: replies without the array the wrapper was told to act on
    inner = FedAvg(**SMALL)
    if wrapper == "fusion":
        strategy = ServerFusion(inner, lambda a, r: (a, {}), "tune", array_names="prompt")
        instructions = configure(strategy, np.zeros((1, 2), np.float32), [1])
        replies = replies_to(instructions, {1: train_content(np.ones((1, 2), np.float32))})
        call = lambda: strategy.aggregate_train(1, replies)  # noqa: E731
    else:
        strategy = ActivationBoundWrapper(inner, lambda a, r: ({}, {}), array_names="prompt")
        call = lambda: configure(strategy, np.zeros((1, 2), np.float32), [1])  # noqa: E731

    # Execute / Assert: the key and the keys present are named
    with pytest.raises(MissingKeyError, match=r"no 'prompt' in the record; keys present: \['ctx'\]"):
        call()


def test_strategies_name_no_record_key_outside_the_serverapp_glue():
    # Prepare: fedsec's own names of the prompt array and the client identity metric
    names = re.compile(r"""["'](ctx|partition-id)["']|\[["']metrics["']\]""")

    # Execute
    found = {
        p.name: names.findall(p.read_text())
        for p in sorted((ROOT / "strategies").glob("*.py"))
        if p.name != "server_app.py" and names.search(p.read_text())
    }

    # Assert
    assert found == {}
