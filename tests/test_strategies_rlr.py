"""Robust learning rate: exactly the coordinates without enough sign agreement are flipped."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.registry import STRATEGIES, load_all
from strategies.rlr import rlr_aggregate, rlr_threshold_count
from tests.strategy_helpers import ctx_of, make_sctx, run_round, train_content

# Five updates, three coordinates: signs agree 5/5, 3/5 (sum 1) and 4/5 (sum 3).
UPDATES = np.array(
    [
        [1.0, 1.0, 1.0],
        [2.0, 1.0, 1.0],
        [1.0, 1.0, 1.0],
        [1.0, -1.0, 1.0],
        [1.0, -2.0, -1.0],
    ]
)


def test_threshold_count_from_fraction_or_count():
    # Prepare / Execute / Assert
    assert rlr_threshold_count(0.4, 10) == 4
    assert rlr_threshold_count(0.4, 5) == 2
    assert rlr_threshold_count(3, 5) == 3
    with pytest.raises(ValueError):
        rlr_threshold_count(0.0, 5)


def test_rlr_flips_exactly_the_coordinates_without_sign_agreement():
    # Prepare
    weights = np.ones(5)

    # Execute
    agg, lr = rlr_aggregate(UPDATES, weights, theta=2)

    # Assert: |sign sums| = 5, 1, 3 -> only the middle coordinate is below theta = 2
    np.testing.assert_array_equal(lr, [1.0, -1.0, 1.0])
    np.testing.assert_allclose(agg, [1.2, -0.0, 0.6])


def test_rlr_strategy_applies_the_learning_rate_to_the_weighted_mean():
    # Prepare
    load_all()
    strategy = STRATEGIES.get("rlr")(make_sctx("rlr", 5, **{"rlr-threshold": 4.0}))
    global_ctx = np.full((1, 3), 10.0, np.float32)
    contents = {
        n: train_content((global_ctx + row).astype(np.float32), num_examples=n) for n, row in enumerate(UPDATES, 1)
    }

    # Execute
    arrays, _, _ = run_round(strategy, global_ctx, contents)

    # Assert: theta = 4 flips the coordinates with |sign sum| 1 and 3, keeps the one with 5
    weights = np.arange(1, 6, dtype=float)
    mean = (weights[:, None] * UPDATES).sum(axis=0) / weights.sum()
    np.testing.assert_allclose(ctx_of(arrays)[0], 10.0 + mean * np.array([1.0, -1.0, -1.0]), rtol=1e-6)
    assert strategy.last_flipped_fraction == pytest.approx(2 / 3)
    assert strategy.last_excluded == [] and strategy.last_weights == {}
