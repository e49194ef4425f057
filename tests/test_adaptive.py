"""Adaptive attackers against the activation-bound defense (issue 15, item 5).

The bounds travel to every client, so a malicious client knows them; the FM attacker knows the
defense's settings and owns the images the defense learns its bounds on. ``attack-under-bounds``
makes each optimise through the clamps it can know.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsec.attacks import get_attack
from fedsec.attacks.fm_poison import attacker_bounds
from fedsec.config import ConfigError, RunConfig
from fedsec.synthetic import SyntheticSet
from strategies.activation_bound import BoundLearner
from strategies.fusion import synthetic_prompt_model

NAMES = [f"c{i}" for i in range(10)]


@pytest.mark.parametrize(
    ("attack", "adaptive", "expected"),
    [
        ("badpromptfl", False, "honest"),
        ("badpromptfl", True, "received"),
        ("badnets", True, "received"),
        ("none", True, "honest"),  # the benign clients (and the shadow) never adapt
    ],
)
def test_a_client_trains_under_the_received_bounds_only_when_it_attacks_adaptively(attack, adaptive, expected):
    # Prepare: an honest client would train without clamps (bounds-client-training = false)
    cfg = RunConfig.from_mapping(
        {"attack": attack, "num-malicious": 0 if attack == "none" else 2, "attack-under-bounds": adaptive}
    )
    received, honest = object(), None

    # Execute
    got = get_attack(attack)(cfg, Path("/tmp/unused")).training_bounds(received, honest)

    # Assert
    assert got is (received if expected == "received" else honest)


def test_the_adaptive_fm_attackers_bounds_are_the_defenses_initial_bounds_on_the_same_clean_images():
    # Prepare: the defense's settings (two-sided per-neuron at the 0.9 / 0.1 quantiles on ln_pre and the blocks),
    # and a synthetic set that is all clean (what the attacker holds before it poisons)
    cfg = RunConfig.from_mapping(
        {"attack": "fm-poison", "num-malicious": 0, "server-fusion": "tune", "fm-trigger": "optimized",
         "attack-under-bounds": True, "activation-bounds": True, "bounds-steps": 0, "bounds-two-sided": True,
         "bounds-init-quantile": 0.9, "bounds-layers": "visual.ln_pre,visual.transformer.resblocks.*"}
    )  # fmt: skip
    images = torch.rand(30, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    synthetic = SyntheticSet(images, torch.arange(30) % 10, NAMES)
    surrogate = synthetic_prompt_model(cfg, synthetic)[1]
    defender = BoundLearner(cfg, lambda: synthetic)

    # Execute
    ours = attacker_bounds(cfg, surrogate, images).to_arrays()
    theirs, _ = defender({"ctx": surrogate.prompt_learner.ctx.detach().numpy().copy()}, 1)

    # Assert: the same layers and values (10 entries: 5 layers, upper and lower)
    assert sorted(ours) == sorted(theirs) and len(ours) == 10
    assert all(np.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)


def test_the_adaptive_fm_attacker_needs_the_optimised_trigger():
    # Prepare / Execute / Assert: a fixed patch has nothing to adapt; one message says so
    with pytest.raises(ConfigError, match=re.escape("attack-under-bounds = true needs fm-trigger='optimized'")):
        RunConfig.from_mapping(
            {"attack": "fm-poison", "num-malicious": 0, "server-fusion": "tune", "attack-under-bounds": True}
        )
