"""RFA's geometric median: hand-computable medians, and the registered rule against one outlier."""

from __future__ import annotations

import numpy as np

from strategies.geomed import geometric_median
from strategies.registry import STRATEGIES
from tests.strategy_helpers import ctx_of, make_sctx, run_round, train_content


def test_geometric_median_of_hand_computable_point_sets():
    # Prepare: a square around the origin; three points on a line (the median is the middle one)
    square = np.array([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])
    line = np.array([[0.0], [1.0], [100.0]])

    # Execute
    centre = geometric_median(square, np.ones(4))
    middle = geometric_median(line, np.ones(3), max_iter=200)
    heavy = geometric_median(line, np.array([1.0, 1.0, 3.0]), max_iter=200)

    # Assert: the centre; the middle point, not the mean 33.7; a point holding over half the weight
    np.testing.assert_allclose(centre, [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(middle, [1.0], atol=1e-3)
    np.testing.assert_allclose(heavy, [100.0], atol=1e-3)


def test_registered_rule_ignores_one_boosted_update():
    # Prepare: four honest updates around (1, 1), one boosted attacker; found by name, no registration edit
    strategy = STRATEGIES.get("geomed")(make_sctx("geomed", 5))
    g = np.zeros((1, 2), np.float32)
    honest = [[1.0, 1.1], [0.9, 1.0], [1.1, 0.9], [1.0, 1.0]]
    contents = {n + 1: train_content(np.array([u], np.float32)) for n, u in enumerate(honest)}
    contents[5] = train_content(np.array([[100.0, -100.0]], np.float32))

    # Execute
    arrays, _, _ = run_round(strategy, g, contents)

    # Assert: within the honest cluster, far from the mean (20.8, -19.2); nobody is reported excluded
    assert np.linalg.norm(ctx_of(arrays)[0] - [1.0, 1.0]) < 0.2
    assert strategy.detection is None
