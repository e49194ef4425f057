"""Bulyan (Flower's class): clamping of f for small federations and detection info."""

from __future__ import annotations

import numpy as np

from strategies.builtin import DetectingBulyan, bulyan_max_byzantine
from tests.strategy_helpers import ctx_of, run_round, train_content

SHAPE = (2, 2)
GLOBAL = np.zeros(SHAPE, dtype=np.float32)


def test_bulyan_excludes_an_outlier_with_seven_replies():
    # Prepare: f = 1 needs 7 replies; six honest values around 1 and one attacker at 100
    strategy = DetectingBulyan(num_byzantine=1, fraction_evaluate=0.0)
    honest = [0.9, 0.95, 1.0, 1.0, 1.05, 1.1]
    contents = {n: train_content(np.full(SHAPE, v, np.float32)) for n, v in enumerate(honest, start=1)}
    contents[7] = train_content(np.full(SHAPE, 100.0, np.float32))

    # Execute
    arrays, _, _ = run_round(strategy, GLOBAL, contents)

    # Assert
    assert 7 in strategy.last_excluded
    assert len(strategy.last_excluded) == 2  # n - theta = 2f
    assert np.all((ctx_of(arrays) >= 0.9) & (ctx_of(arrays) <= 1.1))


def test_bulyan_clamps_f_instead_of_skipping_the_round():
    # Prepare: 5 replies allow f = 0 (4f + 3 <= 5), configured f = 2
    strategy = DetectingBulyan(num_byzantine=2, fraction_evaluate=0.0)
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    contents = {n: train_content(np.full(SHAPE, v, np.float32)) for n, v in enumerate(values, start=1)}

    # Execute
    arrays, _, _ = run_round(strategy, GLOBAL, contents)

    # Assert: with f = 0 Bulyan averages all updates
    assert bulyan_max_byzantine(5, 2) == 0
    assert bulyan_max_byzantine(11, 2) == 2
    assert strategy.num_malicious_nodes == 0
    np.testing.assert_allclose(ctx_of(arrays), np.full(SHAPE, 4.0))
    assert strategy.last_excluded == []


def test_bulyan_falls_back_to_fedavg_below_three_replies():
    # Prepare
    strategy = DetectingBulyan(num_byzantine=2, fraction_evaluate=0.0)
    contents = {
        1: train_content(np.full(SHAPE, 1.0, np.float32), 10),
        2: train_content(np.full(SHAPE, 4.0, np.float32), 30),
    }

    # Execute
    arrays, _, _ = run_round(strategy, GLOBAL, contents)

    # Assert
    np.testing.assert_allclose(ctx_of(arrays), np.full(SHAPE, 3.25))
