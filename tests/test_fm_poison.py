"""FM-poison: exact poisoning of the synthetic set, the trigger in the attacker store, config checks."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from fedsec.attacks import get_attack
from fedsec.config import ConfigError, RunConfig

BASE = {"attack": "fm-poison", "num-malicious": 0, "server-fusion": "tune", "fm-trigger": "patch", "target-label": 2}


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25])
def test_poisons_exactly_the_configured_fraction_with_the_target_label(tmp_path, rate):
    # Prepare: 10 classes x 20 images
    cfg = RunConfig.from_mapping({**BASE, "fm-poison-rate": rate, "patch-size": 4})
    images = torch.rand(200, 3, 32, 32)
    labels = torch.arange(10).repeat_interleave(20)
    attack = get_attack("fm-poison")(cfg, tmp_path / "attacker")
    # Execute
    out_images, out_labels, idx = attack.poison_synthetic(images, labels, seed=0)
    # Assert: round(rate * N) non-target samples, relabelled to the target, with the patch; the rest untouched
    assert len(idx) == round(rate * 200) and len(set(idx.tolist())) == len(idx)
    assert (labels[idx] != 2).all() and (out_labels[idx] == 2).all()
    rest = np.setdiff1d(np.arange(200), idx)
    assert torch.equal(out_labels[rest], labels[rest]) and torch.equal(out_images[rest], images[rest])
    trigger = attack.load_trigger()
    assert trigger is not None
    if len(idx):
        assert torch.allclose(out_images[idx], trigger(images[idx]))
        assert not torch.allclose(out_images[idx], images[idx])
    assert torch.equal(images, images.clone())  # the input is not modified in place


def test_clean_label_poisoning_triggers_target_class_images_only_and_keeps_every_label(tmp_path):
    # Prepare: 10 classes x 20 images; 5% of 200 = 10 poisoned, all from the target class 2; then a rate above
    # the target class's share (20%: 40 > 20 images)
    images = torch.rand(200, 3, 32, 32)
    labels = torch.arange(10).repeat_interleave(20)
    cfg = RunConfig.from_mapping({**BASE, "fm-poison-rate": 0.05, "patch-size": 4, "fm-poison-label": "clean"})
    over = RunConfig.from_mapping({**BASE, "fm-poison-rate": 0.2, "patch-size": 4, "fm-poison-label": "clean"})
    # Execute
    out_images, out_labels, idx = get_attack("fm-poison")(cfg, tmp_path / "a").poison_synthetic(images, labels, 0)
    _, _, idx_over = get_attack("fm-poison")(over, tmp_path / "b").poison_synthetic(images, labels, 0)
    # Assert: 10 target-class images triggered, no label changed; the whole class when the rate asks for more
    assert len(idx) == 10 and (labels[idx] == 2).all()
    assert torch.equal(out_labels, labels)
    assert not torch.allclose(out_images[idx], images[idx])
    assert sorted(idx_over.tolist()) == list(range(40, 60))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num-malicious": 2}, r"server-side attack: set num-malicious=0"),
        ({"server-fusion": "none"}, r"needs server-fusion != 'none'"),
        ({"fm-poison-rate": 1.5}, r"fm-poison-rate=1.5 is out of range"),
        ({"fm-trigger": "sticker"}, r"fm-trigger='sticker' is not allowed; allowed values: blend, optimized, patch"),
    ],
)
def test_bad_fm_poison_configs_give_one_clear_error(values, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping({**BASE, **values})


def test_client_side_attacks_still_need_malicious_clients():
    with pytest.raises(ConfigError, match=r"attack='badnets' needs num-malicious >= 1"):
        RunConfig.from_mapping({"attack": "badnets", "num-malicious": 0})


@pytest.mark.parametrize("learner", ["vpt-deep", "clip-adapter"])
def test_the_learner_surrogate_fits_the_patch_through_the_federations_own_learner(tmp_path, monkeypatch, learner):
    # Prepare: the white-box FM attacker that models the run's learner; record the surrogate it builds and
    # its learned arrays before the optimisation
    import fedsec.models.learners as learners
    from fedsec.attacks.fm_poison import FM_TRIGGERS, _surrogate_key

    monkeypatch.setenv("FEDSEC_CACHE_DIR", str(tmp_path / "cache"))
    built, build = [], learners.build_learner

    def recording(cfg, model):
        out = build(cfg, model)
        built.append((out, {k: v.detach().clone() for k, v in out.learned().items()}))
        return out

    monkeypatch.setattr(learners, "build_learner", recording)
    common = {**BASE, "fm-trigger": "optimized", "fm-trigger-steps": 3, "patch-size": 4, "learner": learner}
    images = torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(10).repeat(2)

    learner_cfg = RunConfig.from_mapping({**common, "fm-trigger-surrogate": "learner"})

    # Execute: the learner surrogate, the default one, then the learner surrogate again (from the cache)
    theirs = FM_TRIGGERS.get("optimized")(learner_cfg, images, labels, 0)
    coop = FM_TRIGGERS.get("optimized")(RunConfig.from_mapping(common), images, labels, 0)
    again = FM_TRIGGERS.get("optimized")(learner_cfg, images, labels, 0)

    # Assert: one surrogate, the run's learner, whose every learned array (the image path's included) moved;
    # the default surrogate builds no learner and fits a different patch (two cache entries)
    assert len(built) == 1
    model, before = built[0]
    image_path = {"vpt-deep": "vpt", "clip-adapter": "adapter-down"}[learner]
    assert image_path in before
    assert all(not torch.equal(before[k], v.detach()) for k, v in model.learned().items())
    assert not torch.allclose(torch.as_tensor(theirs.state()["patch"]), torch.as_tensor(coop.state()["patch"]))
    assert len(list((tmp_path / "cache" / "fm-trigger").glob("*.pt"))) == 2
    assert torch.equal(torch.as_tensor(again.state()["patch"]), torch.as_tensor(theirs.state()["patch"]))
    if learner == "vpt-deep":  # VPT keeps the hand-written text prompt: ctx is not learned, so it does not move
        assert "ctx" not in before
    # the default surrogate's cache key is the one of every trigger made before the key existed
    assert _surrogate_key(RunConfig.from_mapping(common)) == []
    assert (
        _surrogate_key(RunConfig.from_mapping({**common, "learner": "coop", "fm-trigger-surrogate": "learner"})) == []
    )


def test_a_surrogate_needs_the_optimised_trigger():
    # Prepare / Execute / Assert: a fixed patch has no surrogate; one message says so
    with pytest.raises(ConfigError, match=re.escape("fm-trigger-surrogate='learner' needs fm-trigger='optimized'")):
        RunConfig.from_mapping({**BASE, "fm-trigger-surrogate": "learner"})
