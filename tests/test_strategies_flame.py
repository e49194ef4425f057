"""FLAME: the clipping bound is the median norm and an outlier cluster is excluded."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.flame import cosine_distances, flame_aggregate, flame_filter
from strategies.registry import STRATEGIES, load_all
from tests.strategy_helpers import ctx_of, make_sctx, run_round, train_content

# Five honest updates pointing roughly along +x (different norms), two attackers along +y.
HONEST = np.array([[1.0, 0.1, 0.0], [2.0, 0.0, 0.1], [0.5, 0.05, 0.0], [4.0, -0.2, 0.1], [1.5, 0.0, -0.1]])
ATTACK = np.array([[0.0, 3.0, 0.1], [0.1, 3.5, 0.0]])


def test_cosine_distances_are_zero_for_parallel_and_two_for_opposite_updates():
    # Prepare
    u = np.array([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])

    # Execute
    d = cosine_distances(u)

    # Assert
    assert d[0, 1] == pytest.approx(0.0)
    assert d[0, 2] == pytest.approx(2.0)
    assert d[0, 3] == pytest.approx(1.0)


def test_flame_filter_excludes_the_outlier_cluster():
    # Prepare
    updates = np.vstack([HONEST, ATTACK])

    # Execute
    kept = flame_filter(updates)

    # Assert
    np.testing.assert_array_equal(kept, [True] * 5 + [False] * 2)


def test_flame_clips_to_the_median_norm_of_all_updates():
    # Prepare
    updates = np.vstack([HONEST, ATTACK])
    median_norm = float(np.median(np.linalg.norm(updates, axis=1)))

    # Execute
    result = flame_aggregate(updates, noise_lambda=0.0, rng=np.random.default_rng(0))

    # Assert
    assert result.clip_bound == pytest.approx(median_norm)
    kept = updates[result.kept]
    norms = np.linalg.norm(kept, axis=1, keepdims=True)
    expected = (kept * np.minimum(1.0, median_norm / norms)).mean(axis=0)
    np.testing.assert_allclose(result.update, expected)
    assert np.linalg.norm(result.update) <= median_norm + 1e-12


def test_flame_noise_has_the_requested_scale():
    # Prepare
    updates = np.tile(np.array([[1.0, 0.0]]), (5, 1)) + np.zeros((5, 2))
    rng = np.random.default_rng(1)

    # Execute
    noisy = np.stack([flame_aggregate(updates, 0.1, rng).update for _ in range(2000)])

    # Assert: median norm 1, sigma = 0.1
    assert noisy.std(axis=0) == pytest.approx([0.1, 0.1], rel=0.1)


def test_flame_strategy_reports_the_excluded_attackers():
    # Prepare
    load_all()
    strategy = STRATEGIES.get("flame")(make_sctx("flame", 7, **{"flame-noise-lambda": 0.0}))
    global_ctx = np.full((1, 3), 5.0, np.float32)
    rows = np.vstack([HONEST, ATTACK])
    contents = {n: train_content((global_ctx + r).astype(np.float32)) for n, r in enumerate(rows, start=1)}

    # Execute
    arrays, _, _ = run_round(strategy, global_ctx, contents)

    # Assert
    assert {6, 7} <= set(strategy.last_excluded)
    assert strategy.last_weights[6] == strategy.last_weights[7] == 0.0
    assert strategy.last_clip_bound == pytest.approx(np.median(np.linalg.norm(rows, axis=1)), rel=1e-6)
    assert np.linalg.norm(ctx_of(arrays) - global_ctx) <= strategy.last_clip_bound + 1e-5
