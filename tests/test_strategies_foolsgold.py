"""FoolsGold: sybils sending identical updates are down-weighted, diverse honest nodes are not."""

from __future__ import annotations

import numpy as np

from strategies.foolsgold import foolsgold_aggregate, foolsgold_weights
from strategies.registry import STRATEGIES, load_all
from tests.strategy_helpers import ctx_of, make_sctx, run_round, train_content

D = 6
SYBIL = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 0.0])
HONEST = {1: np.eye(D)[0], 2: np.eye(D)[1], 3: np.eye(D)[2] - 0.5 * np.eye(D)[5]}


def test_identical_sybils_get_zero_weight_and_diverse_honest_nodes_full_weight():
    # Prepare
    histories = np.stack([HONEST[1], HONEST[2], HONEST[3], SYBIL, SYBIL, SYBIL])

    # Execute
    weights = foolsgold_weights(histories)

    # Assert
    np.testing.assert_array_equal(weights[3:], 0.0)
    np.testing.assert_array_equal(weights[:3], 1.0)


def test_weighted_mean_of_updates():
    # Prepare
    updates = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])

    # Execute
    agg = foolsgold_aggregate(updates, np.array([1.0, 1.0, 0.0]))
    none = foolsgold_aggregate(updates, np.zeros(3))

    # Assert
    np.testing.assert_allclose(agg, [0.5, 0.5])
    np.testing.assert_array_equal(none, [0.0, 0.0])


def test_strategy_keeps_per_node_histories_and_excludes_the_sybils_over_rounds():
    # Prepare
    load_all()
    strategy = STRATEGIES.get("foolsgold")(make_sctx("foolsgold", 6, **{"foolsgold-norm-cap": 0.0}))
    global_ctx = np.zeros((1, D), np.float32)
    contents = {n: train_content(v.reshape(1, D).astype(np.float32)) for n, v in HONEST.items()}
    contents.update({n: train_content(SYBIL.reshape(1, D).astype(np.float32)) for n in (4, 5, 6)})

    # Execute: two identical rounds
    run_round(strategy, global_ctx, contents, server_round=1)
    arrays, _, _ = run_round(strategy, global_ctx, contents, server_round=2)

    # Assert
    assert sorted(strategy.last_excluded) == [4, 5, 6]
    np.testing.assert_allclose(strategy.histories[4], 2 * SYBIL)
    np.testing.assert_allclose(strategy.histories[1], 2 * HONEST[1])
    expected = np.mean([HONEST[1], HONEST[2], HONEST[3]], axis=0)
    np.testing.assert_allclose(ctx_of(arrays)[0], expected, rtol=1e-6, atol=1e-7)
    assert strategy.last_weights[1] == strategy.last_weights[2] == 1 / 3
