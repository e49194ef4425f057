"""FedProx (Flower's class): the proximal weight reaches the clients; aggregation is FedAvg's."""

from __future__ import annotations

import numpy as np

from strategies.registry import STRATEGIES, load_all
from tests.strategy_helpers import configure, ctx_of, make_sctx, run_round, train_content

SHAPE = (1, 2)
GLOBAL = np.zeros(SHAPE, dtype=np.float32)


def test_fedprox_sends_proximal_mu_and_averages_like_fedavg():
    # Prepare
    load_all()
    strategy = STRATEGIES.get("fedprox")(make_sctx("fedprox", 2, **{"proximal-mu": 0.25}))
    contents = {
        1: train_content(np.full(SHAPE, 1.0, np.float32), 10),
        2: train_content(np.full(SHAPE, 4.0, np.float32), 30),
    }

    # Execute
    instructions = configure(strategy, GLOBAL, [1, 2])
    arrays, _, _ = run_round(strategy, GLOBAL, contents)

    # Assert: every instruction carries mu; the aggregate is the num-examples-weighted mean (1*10 + 4*30) / 40
    assert [float(m.content["config"]["proximal-mu"]) for m in instructions] == [0.25, 0.25]
    np.testing.assert_allclose(ctx_of(arrays), np.full(SHAPE, 3.25), rtol=1e-6)
