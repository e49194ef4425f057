"""Triggers, label maps, the attacker store (collusion across rounds), boosting and ASR."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsec.attacks import ATTACKS, get_attack, malicious_partitions
from fedsec.attacks.poisoning import checkerboard, poison_indices
from fedsec.attacks.store import AttackerStore
from fedsec.config import RunConfig
from fedsec.metrics import attack_success_rate
from fedsec.triggers import AdditiveTrigger, BlendTrigger, PatchTrigger, trigger_from_dict, trigger_to_dict


def test_additive_trigger_is_projected_into_the_eps_ball():
    # Prepare
    trig = AdditiveTrigger(8, eps=8 / 255)
    opt = torch.optim.SGD(trig.parameters(), lr=10.0)
    x = torch.rand(4, 3, 8, 8)
    # Execute: a huge step, then projection
    (-trig(x).sum()).backward()
    opt.step()
    trig.project()
    # Assert
    assert trig.delta.abs().max() <= 8 / 255 + 1e-7
    assert torch.isclose(trig.delta.abs().max(), torch.tensor(8 / 255))
    y = trig(x)
    assert y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().max() <= 8 / 255 + 1e-6


def test_patch_trigger_pastes_only_its_square():
    # Prepare
    patch = torch.full((3, 2, 2), 0.5)
    trig = PatchTrigger(6, 2, top=-1, left=-1, patch=patch)
    x = torch.zeros(1, 3, 6, 6)
    # Execute
    y = trig(x)
    # Assert: bottom-right 2x2 is the patch, the rest untouched
    assert torch.all(y[:, :, 4:, 4:] == 0.5)
    assert float(y.sum()) == pytest.approx(0.5 * 3 * 4)
    with torch.no_grad():
        trig.patch.fill_(3.0)
    trig.project()
    assert trig.patch.max() == 1.0


def test_patch_that_does_not_fit_is_rejected():
    with pytest.raises(ValueError, match="does not fit"):
        PatchTrigger(8, 4, top=6, left=0)


def test_blend_trigger_formula():
    trig = BlendTrigger(torch.ones(3, 4, 4), alpha=0.25)
    x = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(trig(x), torch.full_like(x, 0.25))


@pytest.mark.parametrize(
    "trigger",
    [
        AdditiveTrigger(4, 0.1, torch.full((3, 4, 4), 0.05)),
        PatchTrigger(4, 2, 1, 1, seed=3),
        BlendTrigger(torch.rand(3, 4, 4), 0.3),
    ],
)
def test_triggers_round_trip_through_plain_tensors(trigger):
    x = torch.rand(2, 3, 4, 4)
    again = trigger_from_dict(trigger_to_dict(trigger))
    assert torch.allclose(again(x), trigger(x))


def test_label_map_poisons_only_non_target_examples_at_the_rate():
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 5])
    idx = poison_indices(labels, 0.5, target=0, seed=1)
    assert len(idx) == 5 and np.all(labels.numpy()[idx] != 0)
    np.testing.assert_array_equal(idx, poison_indices(labels, 0.5, target=0, seed=1))


def test_checkerboard_is_binary():
    b = checkerboard(4)
    assert b.shape == (3, 4, 4) and set(b.unique().tolist()) == {0.0, 1.0}


def test_store_shares_the_average_trigger_across_rounds(tmp_path):
    # Prepare: two colluders write their round-1 triggers in either order
    store = AttackerStore(tmp_path)
    a = AdditiveTrigger(2, 1.0, torch.full((3, 2, 2), 0.2)).state()
    b = AdditiveTrigger(2, 1.0, torch.full((3, 2, 2), 0.4)).state()
    store.save(1, 7, b)
    store.save(1, 2, a)
    # Execute
    for_round_2 = store.load(before_round=2)
    for_round_1 = store.load(before_round=1)
    # Assert: round 2 starts from their average; round 1 had nothing before it
    assert for_round_1 is None
    assert torch.allclose(for_round_2["delta"], torch.full((3, 2, 2), 0.3))
    store.save(2, 2, b)
    assert torch.allclose(store.load()["delta"], torch.full((3, 2, 2), 0.4))
    assert store.rounds() == [1, 2]


def test_malicious_partitions_seeded_or_fixed():
    a = malicious_partitions(10, 2, seed=0)
    assert a == malicious_partitions(10, 2, seed=0) and len(set(a)) == 2
    assert malicious_partitions(10, 2, seed=0, fixed="3, 1") == [1, 3]
    with pytest.raises(ValueError, match="not in"):
        malicious_partitions(4, 1, 0, fixed="9")


def test_asr_on_a_hand_built_case():
    # 5 non-target examples; 3 of them predicted as the target under the trigger; target examples ignored
    labels = np.array([0, 1, 2, 3, 4, 5, 0])
    pred = np.array([0, 0, 0, 0, 4, 5, 1])
    assert attack_success_rate(pred, labels, target=0) == pytest.approx(3 / 5)


def test_attack_registry_and_params_are_declared():
    assert {"none", "badpromptfl", "badclip", "badnets", "blended"} <= set(ATTACKS.names())
    cfg = RunConfig.from_mapping({"attack": "badpromptfl", "num-malicious": 2, "trigger-type": "additive"})
    assert cfg.get("trigger-type") == "additive"


def test_active_rounds_window_and_probability(tmp_path):
    cfg = RunConfig.from_mapping(
        {"attack": "badnets", "num-malicious": 1, "attack-start-round": 2, "attack-end-round": 3}
    )
    atk = get_attack("badnets")(cfg, tmp_path)
    assert [atk.is_active(r) for r in range(1, 5)] == [False, True, True, False]
    never = get_attack("badnets")(
        cfg.with_updates(extra={**cfg.extra, "attack-probability": 0.0, "attack-end-round": 0}), tmp_path
    )
    assert not any(never.is_active(r) for r in range(2, 10))
