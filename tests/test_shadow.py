"""The benign-only shadow federation (fedsec.shadow): FedAvg's step and one shadow round over a grid."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Error, Message

from fedsec.shadow import SHADOW_FLAG, shadow_round, weighted_mean_update
from tests.strategy_helpers import replies_to, task_identity, train_content


def test_weighted_mean_update_is_fedavgs_step_on_a_hand_computed_case():
    # Prepare: two updates, weights 1 and 3
    updates = [np.array([1.0, 1.0]), np.array([3.0, 5.0])]
    # Execute
    step = weighted_mean_update(updates, [1, 3])
    # Assert: (1*[1, 1] + 3*[3, 5]) / 4 = [2.5, 4]; bad weights are refused with the reason
    np.testing.assert_allclose(step, [2.5, 4.0])
    with pytest.raises(ValueError, match="as many weights"):
        weighted_mean_update(updates, [1])
    with pytest.raises(ValueError, match="positive sum"):
        weighted_mean_update(updates, [0, 0])


class _Grid:
    """Answers each train message with the array sent plus a node-specific step (node 13 fails)."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        self.sent = list(messages)
        steps = {11: (1.0, 1), 12: (3.0, 3)}
        contents = {}
        for msg in self.sent:
            node = msg.metadata.dst_node_id
            if node in steps:
                contents[node] = train_content(msg.content["arrays"]["ctx"].numpy() + steps[node][0], steps[node][1])
            else:
                contents[node] = Error(code=0, reason="node unavailable")
        return replies_to(self.sent, contents)


def test_shadow_round_trains_the_shadow_on_the_benign_nodes_and_averages_their_updates():
    # Prepare: a 2x2 shadow prompt, three benign nodes of which one fails
    grid, shadow = _Grid(), np.zeros((2, 2), dtype=np.float32)
    # Execute
    with task_identity():
        new, used = shadow_round(
            grid, 7, shadow, [11, 12, 13], array_name="ctx", arrayrecord_key="arrays", weighted_by_key="num-examples"
        )
    # Assert: one flagged train message per node carrying the shadow and the round; FedAvg of the two
    # usable updates (+1 weighted 1, +3 weighted 3 -> +2.5); the failed node is left out
    assert [m.metadata.dst_node_id for m in grid.sent] == [11, 12, 13]
    assert all(m.metadata.message_type == "train" for m in grid.sent)
    assert all(m.content["config"][SHADOW_FLAG] and m.content["config"]["server-round"] == 7 for m in grid.sent)
    np.testing.assert_array_equal(grid.sent[0].content["arrays"]["ctx"].numpy(), shadow)
    np.testing.assert_allclose(new, np.full((2, 2), 2.5))
    assert used == 2 and new.dtype == np.float32


def test_shadow_round_without_usable_replies_keeps_the_shadow():
    # Prepare / Execute: only the failing node
    shadow = np.ones(3, dtype=np.float32)
    with task_identity():
        new, used = shadow_round(
            _Grid(), 1, shadow, [13], array_name="ctx", arrayrecord_key="arrays", weighted_by_key="num-examples"
        )
    # Assert
    np.testing.assert_array_equal(new, shadow)
    assert used == 0


def test_shadow_round_sends_the_real_rounds_config_and_records_with_the_shadow_array():
    # Prepare: the real round's train content: FedProx's term in the config, a bounds record, the global array
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from tests.strategy_helpers import ctx_arrays

    template = RecordDict(
        {
            "arrays": ctx_arrays(np.full((2, 2), 9.0, dtype=np.float32)),
            "config": ConfigRecord({"server-round": 3, "proximal-mu": 0.1}),
            "bounds": ArrayRecord({"ln_pre": ctx_arrays(np.ones(4, dtype=np.float32))["ctx"]}),
        }
    )
    grid, shadow = _Grid(), np.zeros((2, 2), dtype=np.float32)
    # Execute
    with task_identity():
        shadow_round(
            grid,
            3,
            shadow,
            [11],
            array_name="ctx",
            arrayrecord_key="arrays",
            weighted_by_key="num-examples",
            template=template,
        )
    # Assert: the config and the bounds travel, the array is the shadow's; the template is untouched
    sent = grid.sent[0].content
    assert sent["config"]["proximal-mu"] == 0.1 and sent["config"][SHADOW_FLAG]
    np.testing.assert_array_equal(sent["bounds"]["ln_pre"].numpy(), np.ones(4))
    np.testing.assert_array_equal(sent["arrays"]["ctx"].numpy(), shadow)
    assert SHADOW_FLAG not in template["config"]
    np.testing.assert_array_equal(template["arrays"]["ctx"].numpy(), np.full((2, 2), 9.0))


class _NamedGrid:
    """Answers with every array sent plus a node-specific step (node 12's vpt is the wrong shape)."""

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

        contents = {}
        for msg in messages:
            node, sent = msg.metadata.dst_node_id, msg.content["arrays"]
            arrays = {k: a.numpy() + (node - 10) for k, a in sent.items()}
            if node == 12:
                arrays["vpt"] = np.zeros(5, dtype=np.float32)
            record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
            contents[node] = RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 4})})
        return replies_to(list(messages), contents)


def test_shadow_round_carries_every_learned_array_by_name():
    # Prepare: a learner with two arrays (a text context and visual prompt tokens), three benign nodes
    shadow = {"ctx": np.zeros((2, 2), dtype=np.float32), "vpt": np.ones((1, 3), dtype=np.float32)}
    # Execute
    with task_identity():
        new, used = shadow_round(
            _NamedGrid(), 3, shadow, [11, 12, 13], arrayrecord_key="arrays", weighted_by_key="num-examples"
        )
    # Assert: the result keeps the names; node 12's reply (a vpt of another shape) is dropped whole; the others
    # (+1 and +3, equal weights) move both arrays by +2
    assert set(new) == {"ctx", "vpt"} and used == 2
    np.testing.assert_allclose(new["ctx"], np.full((2, 2), 2.0))
    np.testing.assert_allclose(new["vpt"], np.full((1, 3), 3.0))
    assert all(v.dtype == np.float32 for v in new.values())
