"""FedMedian and FedTrimmedAvg (Flower's classes): known answers, replies untouched."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.registry import STRATEGIES, load_all
from tests.strategy_helpers import ctx_of, make_sctx, run_round, snapshot, train_content

SHAPE = (1, 3)
GLOBAL = np.zeros(SHAPE, dtype=np.float32)
VALUES = [1.0, 2.0, 3.0, 100.0, 5.0]


@pytest.mark.parametrize(("name", "expected"), [("median", 3.0), ("trimmed-mean", (2.0 + 3.0 + 5.0) / 3)])
def test_coordinate_wise_rules_give_the_known_answer_and_leave_replies_intact(name, expected):
    # Prepare
    load_all()
    strategy = STRATEGIES.get(name)(make_sctx(name, 5, **{"trim-beta": 0.2}))
    contents = {n: train_content(np.full(SHAPE, v, np.float32)) for n, v in enumerate(VALUES, start=1)}

    # Execute
    arrays, _, replies = run_round(strategy, GLOBAL, contents)
    before = snapshot(replies)
    again, _ = strategy.aggregate_train(1, replies)

    # Assert
    np.testing.assert_allclose(ctx_of(arrays), np.full(SHAPE, expected), rtol=1e-6)
    np.testing.assert_allclose(ctx_of(again), np.full(SHAPE, expected), rtol=1e-6)
    assert snapshot(replies) == before
    assert strategy.last_excluded == [] and strategy.last_weights == {}
