"""Krum and MultiKrum (Flower's classes): known answers and detection info."""

from __future__ import annotations

import numpy as np

from strategies.builtin import DetectingKrum, DetectingMultiKrum, krum_max_byzantine
from strategies.registry import STRATEGIES, load_all
from tests.strategy_helpers import ctx_of, make_sctx, run_round, train_content

SHAPE = (2, 3)
GLOBAL = np.zeros(SHAPE, dtype=np.float32)


def _round_contents() -> tuple[dict, list[int], list[int]]:
    """Five honest updates around 1.0 and two attackers far apart (n = 7 >= 2f + 3 for f = 2)."""
    honest = {1: 1.0, 2: 1.1, 3: 0.9, 4: 1.0, 7: 1.2}
    contents = {n: train_content(np.full(SHAPE, v, np.float32), 10) for n, v in honest.items()}
    contents[5] = train_content(np.full(SHAPE, 50.0, np.float32), 10)
    contents[6] = train_content(np.full(SHAPE, -80.0, np.float32), 10)
    return contents, sorted(honest), [5, 6]


def test_krum_picks_an_update_of_the_honest_cluster():
    # Prepare
    load_all()
    strategy = STRATEGIES.get("krum")(make_sctx("krum", 7, **{"num-byzantine": 2}))
    contents, honest, attackers = _round_contents()

    # Execute
    arrays, _, _ = run_round(strategy, GLOBAL, contents)

    # Assert: 1.0 scores 0 + 0.01 + 0.01 (x6 coordinates) over its n - f - 2 = 3 closest; 1.1 scores 0.03
    assert strategy.num_malicious_nodes == 2
    np.testing.assert_array_equal(ctx_of(arrays), np.full(SHAPE, 1.0, np.float32))
    assert set(attackers) <= set(strategy.last_excluded)
    assert len(strategy.last_excluded) == 6
    kept = [n for n, w in strategy.last_weights.items() if w > 0]
    assert len(kept) == 1 and kept[0] in honest and strategy.last_weights[kept[0]] == 1.0


def test_multikrum_keeps_n_minus_f_and_excludes_exactly_the_attackers():
    # Prepare
    load_all()
    strategy = STRATEGIES.get("multikrum")(make_sctx("multikrum", 7, **{"num-byzantine": 2, "multikrum-keep": 0}))
    contents, honest, attackers = _round_contents()

    # Execute
    arrays, _, _ = run_round(strategy, GLOBAL, contents)

    # Assert
    assert sorted(strategy.last_excluded) == attackers
    np.testing.assert_allclose(ctx_of(arrays), np.full(SHAPE, np.mean([1.0, 1.1, 0.9, 1.0, 1.2])), rtol=1e-6)
    assert sum(strategy.last_weights.values()) == 1.0
    assert all(strategy.last_weights[n] == 0.2 for n in honest)


def test_multikrum_keep_parameter_is_honoured():
    # Prepare
    strategy = DetectingMultiKrum(num_byzantine=2, num_to_keep=2, fraction_evaluate=0.0)
    contents, _, _ = _round_contents()

    # Execute
    run_round(strategy, GLOBAL, contents)

    # Assert
    assert len(strategy.last_excluded) == 5


def test_krum_clamps_f_for_a_small_federation():
    # Prepare
    strategy = DetectingKrum(num_byzantine=3, fraction_evaluate=0.0)
    contents = {n: train_content(np.full(SHAPE, float(n), np.float32)) for n in (1, 2, 3, 4)}

    # Execute
    arrays, _, _ = run_round(strategy, GLOBAL, contents)

    # Assert: 4 replies allow f = 0; Krum still returns one of the updates
    assert krum_max_byzantine(4, 3) == 0
    assert krum_max_byzantine(10, 2) == 2
    assert strategy.num_malicious_nodes == 0
    assert float(ctx_of(arrays)[0, 0]) in (1.0, 2.0, 3.0, 4.0)
