"""FLTrust: zero trust for an update opposite the server update; rescaling to the server norm."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.fltrust import fltrust_aggregate
from strategies.registry import STRATEGIES, load_all
from tests.strategy_helpers import ctx_arrays, ctx_of, make_sctx, run_round, train_content

SERVER = np.array([1.0, 0.0])


def test_opposite_update_gets_zero_trust_and_others_are_rescaled():
    # Prepare
    updates = np.array([[-1.0, 0.0], [2.0, 0.0], [1.0, 1.0]])

    # Execute
    agg, trust = fltrust_aggregate(updates, SERVER)

    # Assert
    c = 1 / np.sqrt(2)
    np.testing.assert_allclose(trust, [0.0, 1.0, c])
    np.testing.assert_allclose(agg, (np.array([1.0, 0.0]) + c * np.array([c, c])) / (1.0 + c))


def test_all_untrusted_gives_a_zero_update():
    # Prepare / Execute
    agg, trust = fltrust_aggregate(np.array([[-1.0, 0.0], [0.0, 0.0]]), SERVER)

    # Assert
    np.testing.assert_array_equal(trust, [0.0, 0.0])
    np.testing.assert_array_equal(agg, [0.0, 0.0])


def _server_update(arrays):
    return ctx_arrays(arrays["ctx"].numpy() + SERVER.reshape(1, 2).astype(np.float32))


def test_fltrust_strategy_uses_the_server_update_and_reports_trust():
    # Prepare
    load_all()
    strategy = STRATEGIES.get("fltrust")(make_sctx("fltrust", 3, server_update=_server_update))
    g = np.full((1, 2), 3.0, np.float32)
    contents = {
        1: train_content(g + np.array([[-1.0, 0.0]], np.float32)),
        2: train_content(g + np.array([[4.0, 0.0]], np.float32)),
        3: train_content(g + np.array([[0.5, 0.0]], np.float32)),
    }

    # Execute
    arrays, _, _ = run_round(strategy, g, contents)

    # Assert: node 1 is opposite (trust 0); 2 and 3 rescaled to norm 1 along +x
    assert strategy.last_excluded == [1]
    assert strategy.last_trust == {1: 0.0, 2: pytest.approx(1.0), 3: pytest.approx(1.0)}
    np.testing.assert_allclose(ctx_of(arrays), g + np.array([[1.0, 0.0]]), rtol=1e-6)


def test_fltrust_keeps_the_global_model_when_nothing_is_trusted():
    # Prepare
    load_all()
    strategy = STRATEGIES.get("fltrust")(make_sctx("fltrust", 2, server_update=_server_update))
    g = np.zeros((1, 2), np.float32)
    contents = {
        1: train_content(np.array([[-1.0, 0.0]], np.float32)),
        2: train_content(np.array([[0.0, -2.0]], np.float32)),
    }

    # Execute
    arrays, metrics, _ = run_round(strategy, g, contents)

    # Assert
    assert arrays is None
    assert metrics is not None
    assert sorted(strategy.last_excluded) == [1, 2]


def test_fltrust_needs_a_server_update():
    # Prepare
    load_all()

    # Execute / Assert
    with pytest.raises(ValueError, match="server update"):
        STRATEGIES.get("fltrust")(make_sctx("fltrust", 2))
