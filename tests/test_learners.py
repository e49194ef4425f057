"""Learners: the registry, the up-front refusals, and experiments/learners.py's clients'-side validation split."""

from __future__ import annotations

import re

import numpy as np
import pytest

from experiments.learners import validation_split
from fedsec.caches import client_shots, train_pool
from fedsec.config import ConfigError, RunConfig
from fedsec.models.learners import LEARNERS, learns_image_path


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


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"attack": "dual-embedding", "num-malicious": 2},
            "attack='dual-embedding' has no path for learner='vpt-shallow'",
        ),
    ],
)
def test_attacks_without_an_image_path_refuse_such_a_learner_up_front(values, message):
    # Prepare / Execute / Assert: one clear error from the config check, before anything runs
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_mapping({"learner": "vpt-shallow", **values})


@pytest.mark.parametrize("learner", ["vpt-shallow", "vpt-deep", "clip-adapter"])
@pytest.mark.parametrize("fusion", ["tune", "kd", "init"])
def test_fm_poison_fusion_and_bounds_accept_every_image_path_learner(learner, fusion):
    # Prepare / Execute: the FM-FL setting with the defense, on an image-path learner
    cfg = RunConfig.from_mapping(
        {"learner": learner, "attack": "fm-poison", "num-malicious": 0, "server-fusion": fusion,
         "activation-bounds": True}
    )  # fmt: skip
    # Assert: accepted as given; the FM's trigger defaults to the papers' fixed patch
    assert (cfg.learner, cfg.attack, cfg.get("server-fusion"), cfg.get("activation-bounds")) == (
        learner, "fm-poison", fusion, True
    )  # fmt: skip
    assert cfg.get("fm-trigger") == "patch"


def test_the_learners_are_registered_with_their_keys_and_image_path_flag():
    # Prepare / Execute
    names = LEARNERS.names()
    # Assert: CoOp is text-only; both VPT forms and CLIP-Adapter learn in the image path, each with its keys; coop
    # stays the default
    assert {"coop", "vpt-shallow", "vpt-deep", "clip-adapter"} <= set(names)
    assert not learns_image_path("coop") and all(
        learns_image_path(n) for n in ("vpt-shallow", "vpt-deep", "clip-adapter")
    )
    assert [p.key for p in LEARNERS.component("vpt-deep").params] == ["vpt-tokens"]
    assert [p.key for p in LEARNERS.component("clip-adapter").params] == ["adapter-reduction", "adapter-ratio"]
    assert RunConfig.from_mapping({}).learner == "coop"
