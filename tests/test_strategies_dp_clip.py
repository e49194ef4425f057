"""Flower's server-side fixed-clipping DP wrapper, as registered ("dp-clip")."""

from __future__ import annotations

import numpy as np

from strategies.registry import STRATEGIES, load_all
from strategies.validation import Validated
from tests.strategy_helpers import ctx_of, make_sctx, run_round, snapshot, train_content

G = np.zeros((1, 2), np.float32)
CONTENTS = {1: ([0.3, 0.4], 10), 2: ([6.0, 8.0], 10), 3: ([0.0, -0.5], 20)}


def _contents() -> dict:
    return {n: train_content(G + np.array([u], np.float32), num_examples=w) for n, (u, w) in CONTENTS.items()}


def test_dp_clip_without_noise_is_fedavg_of_clipped_updates():
    # Prepare
    load_all()
    strategy = STRATEGIES.get("dp-clip")(make_sctx("dp-clip", 3, **{"clip-norm": 1.0, "dp-noise-multiplier": 0.0}))

    # Execute
    arrays, _, replies = run_round(strategy, G, _contents())

    # Assert: node 2's update (norm 10) is clipped to (0.6, 0.8)
    expected = (10 * np.array([0.3, 0.4]) + 10 * np.array([0.6, 0.8]) + 20 * np.array([0.0, -0.5])) / 40
    np.testing.assert_allclose(ctx_of(arrays)[0], expected, rtol=1e-5)
    np.testing.assert_allclose(replies[1].content["arrays"]["ctx"].numpy(), [[6.0, 8.0]])


def test_dp_clip_runs_with_weak_noise_behind_validation_and_leaves_replies_intact():
    # Prepare
    load_all()
    strategy = Validated(STRATEGIES.get("dp-clip")(make_sctx("dp-clip", 3)))

    # Execute
    arrays, metrics, replies = run_round(strategy, G, _contents())
    before = snapshot(replies)
    strategy.aggregate_train(1, replies)

    # Assert: default clip 1.0, noise std 0.01 * 1.0 / 3
    assert np.linalg.norm(ctx_of(arrays) - G) <= 1.0 + 0.1
    assert metrics["rejected-replies"] == 0
    assert snapshot(replies) == before
    assert strategy.last_excluded == [] and strategy.last_weights == {}
