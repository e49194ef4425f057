"""Norm-difference clipping: the output moves at most clip-norm; the wrapper composes with any strategy."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg, FedMedian

from strategies.norm_clip import NormClipWrapper, clip_updates
from strategies.registry import STRATEGIES, load_all
from strategies.validation import Validated
from tests.strategy_helpers import ctx_of, make_sctx, run_round, snapshot, train_content

G = np.full((1, 2), 1.0, np.float32)
UPDATES = {1: [0.3, 0.4], 2: [3.0, 4.0], 3: [-60.0, 80.0]}  # norms 0.5, 5, 100


def _contents() -> dict:
    return {n: train_content(G + np.array([u], np.float32), num_examples=10 * n) for n, u in UPDATES.items()}


def _clipped_mean(clip: float) -> np.ndarray:
    rows = clip_updates(np.array(list(UPDATES.values())), clip)
    w = np.array([10.0, 20.0, 30.0])
    return (w[:, None] * rows).sum(axis=0) / w.sum()


def test_clip_updates_scales_only_the_long_updates():
    # Prepare
    updates = np.array([[0.3, 0.4], [3.0, 4.0], [0.0, 0.0]])

    # Execute
    clipped = clip_updates(updates, 1.0)

    # Assert
    np.testing.assert_allclose(clipped, [[0.3, 0.4], [0.6, 0.8], [0.0, 0.0]])
    with pytest.raises(ValueError):
        clip_updates(updates, 0.0)


def test_norm_clip_output_is_within_the_bound_of_the_global_model():
    # Prepare
    load_all()
    strategy = STRATEGIES.get("norm-clip")(make_sctx("norm-clip", 3, **{"clip-norm": 1.0}))

    # Execute
    arrays, _, replies = run_round(strategy, G, _contents())

    # Assert
    delta = ctx_of(arrays) - G
    assert np.linalg.norm(delta) <= 1.0 + 1e-6
    np.testing.assert_allclose(delta[0], _clipped_mean(1.0), rtol=1e-5)
    np.testing.assert_allclose(replies[2].content["arrays"]["ctx"].numpy(), G + np.array([[-60.0, 80.0]]))


class MyAvg(FedAvg):
    """A user's own FedAvg subclass (counts its calls)."""

    calls = 0

    def aggregate_train(self, server_round, replies):
        MyAvg.calls += 1
        return super().aggregate_train(server_round, replies)


def test_wrapper_clips_in_front_of_a_users_fedavg_subclass_without_touching_replies():
    # Prepare
    strategy = Validated(NormClipWrapper(MyAvg(fraction_evaluate=0.0), clip_norm=1.0))
    calls = MyAvg.calls

    # Execute
    arrays, _, replies = run_round(strategy, G, _contents())
    before = snapshot(replies)
    strategy.aggregate_train(1, replies)

    # Assert
    assert MyAvg.calls == calls + 2
    np.testing.assert_allclose((ctx_of(arrays) - G)[0], _clipped_mean(1.0), rtol=1e-5)
    assert snapshot(replies) == before
    assert strategy.last_excluded == [] and strategy.fraction_evaluate == 0.0


def test_wrapper_composes_with_flower_fedmedian():
    # Prepare
    strategy = NormClipWrapper(FedMedian(fraction_evaluate=0.0), clip_norm=1.0)

    # Execute
    arrays, _, replies = run_round(strategy, G, _contents())

    # Assert: median of the clipped updates (0.3, 0.6, -0.6) and (0.4, 0.8, 0.8)
    np.testing.assert_allclose((ctx_of(arrays) - G)[0], [0.3, 0.8], rtol=1e-5)
    assert len(replies[0].content["arrays"]) == 1  # FedMedian popped arrays of the copies only
