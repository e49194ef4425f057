"""No registered strategy (bare or behind validation) modifies the replies it aggregates."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from strategies.registry import STRATEGIES, load_all
from strategies.validation import Validated
from tests.strategy_helpers import ctx_arrays, make_sctx, run_round, snapshot, train_content

load_all()
SHAPE = (4, 8)
G = np.zeros(SHAPE, np.float32)


def _server_update(arrays):
    return ctx_arrays(arrays["ctx"].numpy() + 0.1)


def _contents() -> dict:
    rng = np.random.default_rng(0)
    out = {n: train_content((0.1 + 0.05 * rng.normal(size=SHAPE)).astype(np.float32), 10 + n) for n in range(1, 8)}
    out[8] = train_content(np.full(SHAPE, -5.0, np.float32), 10, **{"train-loss": 1.0})
    return out


@pytest.mark.parametrize("validated", [False, True])
@pytest.mark.parametrize("name", STRATEGIES.names())
def test_strategy_leaves_replies_untouched_and_exposes_detection_info(name, validated):
    # Prepare
    strategy = STRATEGIES.get(name)(make_sctx(name, 8, server_update=_server_update))
    if validated:
        strategy = Validated(strategy)
    contents = _contents()
    if not validated:  # bare Flower rules need consistent metric keys
        contents[8] = train_content(np.full(SHAPE, -5.0, np.float32), 10)

    # Execute
    arrays, _, replies = run_round(strategy, G, contents)
    before = snapshot(replies)
    again, _ = strategy.aggregate_train(1, replies)

    # Assert
    assert snapshot(replies) == before
    assert arrays is not None and again is not None
    assert np.all(np.isfinite(arrays["ctx"].numpy())) and arrays["ctx"].numpy().shape == SHAPE
    assert isinstance(strategy.last_excluded, list)
    assert all(isinstance(n, int) for n in strategy.last_excluded)
    assert isinstance(strategy.last_weights, dict)
    assert set(strategy.last_weights) <= set(range(1, 9))


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_summary_runs_behind_validation(name, caplog, monkeypatch):
    # Prepare: caplog listens at the root logger; fedsec's model factory stops "flwr" propagating there
    # (open_clip configures the root logger), so a model built earlier in this worker would hide the lines
    monkeypatch.setattr(logging.getLogger("flwr"), "propagate", True)
    strategy = Validated(STRATEGIES.get(name)(make_sctx(name, 8, server_update=_server_update)))

    # Execute
    strategy.summary()

    # Assert
    assert "Reply validation" in caplog.text
