"""experiments/learners.py: the validation split comes from the clients' side and holds no client's shots."""

from __future__ import annotations

import numpy as np

from experiments.learners import validation_split
from fedsec.caches import client_shots, train_pool
from fedsec.config import RunConfig


def test_the_validation_split_is_the_clients_pool_minus_every_clients_shots():
    # Prepare: the default run config, 10 clients
    cfg = RunConfig.from_mapping({})
    pool = train_pool(cfg.dataset, cfg.data_root)
    # Execute
    val = validation_split(cfg, 10, 500)
    held = [
        client_shots(pool.labels, p, 10, cfg.partitioner, cfg.seed, cfg.dirichlet_alpha, cfg.classes_per_client, 16)
        for p in range(10)
    ]
    # Assert: 500 distinct pool indices, seeded, none of them a client's training image
    assert len(np.unique(val)) == 500 and val.max() < len(pool)
    assert np.array_equal(val, validation_split(cfg, 10, 500))
    assert not np.intersect1d(val, np.concatenate(held)).size
    assert sum(len(h) for h in held) == 10 * 16 * len(pool.classnames)
