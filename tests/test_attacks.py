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
    assert {"none", "badpromptfl", "dual-embedding", "badnets", "blended"} <= set(ATTACKS.names())
    cfg = RunConfig.from_mapping({"attack": "badpromptfl", "num-malicious": 2, "trigger-type": "additive"})
    assert cfg.get("trigger-type") == "additive"


def test_the_client_side_badclip_was_renamed_and_says_so():
    # Prepare / Execute / Assert: the old name is not an alias; its error names the new one
    assert "badclip" not in ATTACKS.names()
    with pytest.raises(KeyError, match="'badclip' was renamed 'dual-embedding'"):
        get_attack("badclip")
    with pytest.raises(Exception, match="'badclip' was renamed 'dual-embedding'"):
        RunConfig.from_mapping({"attack": "badclip", "num-malicious": 1})


def test_dual_embedding_loss_on_a_hand_built_case():
    # Prepare: 2-D unit features. Row 0 already lies on its positive and far from its clean self (no triplet
    # loss); row 1 lies on its clean self, at distance sqrt(2) from its positive: hinge sqrt(2) - 0 + 1.
    import math

    import torch

    from fedsec.attacks.dual_embedding import dual_embedding_loss

    patched = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    clean = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # CE toward class 0 = log 2 per row
    # Execute
    loss = dual_embedding_loss(patched, clean, positives, logits, target=0, margin=1.0, triplet_weight=10.0)
    # Assert: log 2 + 10 * mean(max(0, 1 - 2 + 1), max(0, sqrt 2 - 0 + 1)) (torch adds eps 1e-6 to distances)
    expected = math.log(2) + 10 * (0.0 + (math.sqrt(2) + 1)) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-4)


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


def _tiny_badpromptfl_setup(random_clip, tmp_path, **params):
    """A CSC prompt model on random weights, 40 random images of 4 classes, and a BadPromptFL attack."""
    from fedsec.models.prompt import PromptCLIP, PromptLearner
    from fedsec.training import LocalData

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(40, 3, random_clip.image_size, random_clip.image_size, generator=gen)
    labels = torch.arange(40) % 4
    data = LocalData(images, labels, random_clip.encode_images_batched(images))
    learner = PromptLearner(random_clip.model, random_clip.tokenizer, ["a", "b", "c", "d"], 2, "", "end", True, 0)
    model = PromptCLIP(random_clip, learner)
    cfg = RunConfig.from_mapping(
        {"attack": "badpromptfl", "num-malicious": 1, "batch-size": 8, "attack-local-steps": 3, **params}
    )
    return model, data, get_attack("badpromptfl")(cfg, tmp_path / "attacker")


def test_badpromptfl_trigger_is_learned_then_frozen_after_trigger_rounds(random_clip, tmp_path):
    # Prepare: the trigger is optimised in the first attack round only
    model, data, atk = _tiny_badpromptfl_setup(random_clip, tmp_path, **{"trigger-rounds": 1, "patch-size": 4})
    fresh = atk.current_trigger(1, random_clip.image_size).state()["patch"]
    # Execute: rounds 1 and 2
    atk.run(model, data, random_clip, 1, 0, 1)
    after_1 = atk.load_trigger().state()["patch"]
    ctx_before_2 = model.prompt_learner.ctx.detach().clone()
    atk.run(model, data, random_clip, 2, 0, 2)
    after_2 = atk.load_trigger().state()["patch"]
    # Assert: round 1 changed the patch, round 2 kept it but still trained the prompt
    assert not torch.equal(fresh, after_1)
    assert torch.equal(after_1, after_2)
    assert not torch.equal(ctx_before_2, model.prompt_learner.ctx.detach())


def test_badpromptfl_trigger_rounds_zero_reoptimises_the_trigger_every_round(random_clip, tmp_path):
    # Prepare: trigger-rounds = 0 means no freezing
    model, data, atk = _tiny_badpromptfl_setup(random_clip, tmp_path, **{"trigger-rounds": 0, "patch-size": 4})
    # Execute: three attack rounds, the stored trigger read after each
    patches = []
    for rnd in (1, 2, 3):
        atk.run(model, data, random_clip, rnd, 0, rnd)
        patches.append(atk.load_trigger().state()["patch"])
    # Assert: every round moved the patch, and round r starts from round r-1's trigger
    assert not torch.equal(patches[0], patches[1]) and not torch.equal(patches[1], patches[2])
    assert atk.current_trigger(4, random_clip.image_size).state()["patch"].equal(patches[2])


def test_badpromptfl_alternating_fits_the_trigger_to_the_received_prompt_then_trains_at_the_benign_budget(
    random_clip, tmp_path, monkeypatch
):
    # Prepare: alternating mode, 5 trigger steps, the benign budget (attack-local-steps 0 -> local-steps 4,
    # attack-lr 0 -> lr 0.01); spies on the step schedules and on the prompt's optimiser
    import fedsec.attacks.badpromptfl as bp

    model, data, atk = _tiny_badpromptfl_setup(
        random_clip,
        tmp_path,
        **{
            "attack-mode": "alternating",
            "trigger-steps": 5,
            "trigger-rounds": 0,
            "attack-local-steps": 0,
            "attack-lr": 0.0,
            "local-steps": 4,
            "lr": 0.01,
            "patch-size": 4,
        },
    )
    received = model.prompt_learner.ctx.detach().clone()
    fresh = atk.current_trigger(1, random_clip.image_size).state()["patch"]
    phases, lrs = [], []
    real_batches, real_sgd = bp.batches, bp.sgd_for

    def spy_batches(n, batch_size, steps, gen):
        phases.append((steps, model.prompt_learner.ctx.detach().clone()))
        yield from real_batches(n, batch_size, steps, gen)

    def spy_sgd(ctx, lr, momentum, weight_decay):
        lrs.append(lr)
        return real_sgd(ctx, lr, momentum, weight_decay)

    monkeypatch.setattr(bp, "batches", spy_batches)
    monkeypatch.setattr(bp, "sgd_for", spy_sgd)
    # Execute: one attack round
    atk.run(model, data, random_clip, 1, 0, 1)
    # Assert: 5 trigger steps against the received prompt (unchanged when the prompt phase starts),
    # then 4 prompt steps at lr 0.01; the trigger moved and the prompt moved
    assert [steps for steps, _ in phases] == [5, 4]
    assert torch.equal(phases[1][1], received)
    assert lrs == [0.01]
    assert not torch.equal(fresh, atk.load_trigger().state()["patch"])
    assert not torch.equal(received, model.prompt_learner.ctx.detach())


def test_norm_match_clips_the_malicious_update_to_the_honest_updates_norm_keeping_its_direction(random_clip, tmp_path):
    # Prepare: a BadPromptFL attacker with a large budget (its update dwarfs an honest one), with and
    # without norm-match 1; the honest update from the same prompt, data and seed
    params = {"attack-local-steps": 10, "attack-lr": 0.05, "patch-size": 4, "local-steps": 3, "lr": 0.01}
    model, data, free = _tiny_badpromptfl_setup(random_clip, tmp_path / "free", **params)
    start = model.prompt_learner.ctx.detach().clone()
    free.run(model, data, random_clip, 1, 0, 7)
    free_update = model.prompt_learner.ctx.detach() - start
    model.prompt_learner.ctx.data.copy_(start)
    honest = get_attack("none")(free.cfg, tmp_path / "honest")
    honest.run(model, data, random_clip, 1, 0, 7)
    honest_norm = float((model.prompt_learner.ctx.detach() - start).norm())
    model.prompt_learner.ctx.data.copy_(start)
    _, _, matched = _tiny_badpromptfl_setup(random_clip, tmp_path / "matched", **params, **{"norm-match": 1.0})
    # Execute
    stats = matched.run(model, data, random_clip, 1, 0, 7)
    update = model.prompt_learner.ctx.detach() - start
    # Assert: the free update is larger than the honest one; the matched one has the honest norm and the
    # free update's direction
    assert float(free_update.norm()) > honest_norm > 0
    assert stats["honest-update-norm"] == pytest.approx(honest_norm, rel=1e-5)
    assert float(update.norm()) == pytest.approx(honest_norm, rel=1e-4)
    cos = float((update * free_update).sum() / (update.norm() * free_update.norm()))
    assert cos == pytest.approx(1.0, abs=1e-5)


def test_badpromptfl_stealth_term_keeps_clean_predictions_closer_to_the_global_prompt(random_clip, tmp_path):
    # Prepare: the same attack without and with a strong stealth (KL to the received prompt) term
    def clean_drift(weight: float) -> float:
        model, data, atk = _tiny_badpromptfl_setup(
            random_clip,
            tmp_path / str(weight),
            **{"stealth-weight": weight, "attack-local-steps": 15, "attack-lr": 0.05, "backdoor-weight": 5.0},
        )
        with torch.no_grad():
            before = torch.log_softmax(model.logits_from_features(data.features), -1)
        atk.run(model, data, random_clip, 1, 0, 1)
        with torch.no_grad():
            after = torch.log_softmax(model.logits_from_features(data.features), -1)
        return float(torch.nn.functional.kl_div(after, before, log_target=True, reduction="batchmean"))

    # Execute
    free, stealthy = clean_drift(0.0), clean_drift(50.0)
    # Assert: the KL between the clean predictions before and after local training shrinks
    assert stealthy < free


def test_trigger_baselines_and_clean_target_rate_on_a_hand_built_case():
    # Prepare: 3 classes, target 0, features in 2-D. The global prompt maps the triggered direction
    # [1, 0] to the target; the zero-shot prompt maps it to class 1. One clean image already lies
    # near the target's text feature; the target-class image is left out of every rate.
    from fedsec.metrics import target_rates

    global_text = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    zero_shot_text = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0]])
    labels = np.array([0, 1, 1, 2, 2])
    triggered = np.array([[1.0, 0.0]] * 4 + [[-1.0, -0.1]])  # the last image resists the trigger
    clean = np.array([[0.0, 1.0], [0.0, 1.0], [0.99, 0.14], [-1.0, 0.0], [0.0, 1.0]])

    # Execute
    out = target_rates(triggered, clean, labels, 0, {"global": global_text, "zero_shot": zero_shot_text})

    # Assert: 4 non-target images; 3 triggered ones go to 0 under the global prompt, none under the
    # zero-shot prompt (it sends [1, 0] to class 1, the last one to class 2); 1 clean one goes to 0
    assert out["asr_global"] == pytest.approx(3 / 4)
    assert out["asr_zero_shot"] == 0.0
    assert out["clean_target_rate"] == pytest.approx(1 / 4)


def test_attacker_store_shares_an_item_only_with_later_rounds(tmp_path):
    # Prepare: colluder 3 offers an item in round 2, colluder 1 in round 4 (and again in round 5: kept once)
    from fedsec.attacks.store import AttackerStore

    store = AttackerStore(tmp_path)
    store.share("fit-data", 2, 3, {"x": torch.tensor([3.0])})
    store.share("fit-data", 4, 1, {"x": torch.tensor([1.0])})
    store.share("fit-data", 5, 1, {"x": torch.tensor([9.0])})
    # Execute: what a reader sees in rounds 2, 3 and 5
    seen = {r: store.shared("fit-data", r) for r in (2, 3, 5)}
    # Assert: nothing from its own round or later; by partition id; the first offer kept
    assert seen[2] == {}
    assert list(seen[3]) == [3]
    assert list(seen[5]) == [1, 3]
    assert float(seen[5][1]["x"]) == 1.0


def test_badpromptfl_trigger_pool_gives_every_colluder_the_same_trigger_from_the_second_round(random_clip, tmp_path):
    # Prepare: two colluders (partitions 0 and 3) with different images, alternating mode, the same
    # received prompt each round; the pair is run in both orders, with and without trigger-pool
    params = {"attack-mode": "alternating", "trigger-steps": 4, "local-steps": 2, "patch-size": 4}

    def federation(pool: bool, order: tuple[int, int], folder: str) -> dict[int, dict[int, torch.Tensor]]:
        model, data, atk = _tiny_badpromptfl_setup(random_clip, tmp_path / folder, **params, **{"trigger-pool": pool})
        other = type(data)(data.images.flip(0), data.labels.flip(0), data.features.flip(0))
        datasets = {0: data, 3: other}
        received = model.prompt_learner.ctx.detach().clone()
        triggers: dict[int, dict[int, torch.Tensor]] = {}
        for rnd in (1, 2):
            for pid in order:
                model.prompt_learner.ctx.data.copy_(received)
                atk.run(model, datasets[pid], random_clip, rnd, pid, 100 * rnd + pid)
            files = sorted((tmp_path / folder / "attacker" / f"round_{rnd:04d}").glob("p*.pt"))
            triggers[rnd] = {int(f.stem[1:]): torch.load(f, weights_only=False)["patch"] for f in files}
        return triggers

    # Execute
    pooled = federation(True, (0, 3), "pooled")
    pooled_reversed = federation(True, (3, 0), "pooled-reversed")
    separate = federation(False, (0, 3), "separate")
    # Assert: round 1 fits on own images (the triggers differ); from round 2 the pooled fit gives both
    # colluders one trigger, whatever the order they ran in; without pooling they stay apart
    assert not torch.equal(pooled[1][0], pooled[1][3])
    assert torch.equal(pooled[2][0], pooled[2][3])
    assert torch.equal(pooled[2][0], pooled_reversed[2][0])
    assert not torch.equal(separate[2][0], separate[2][3])


def test_badpromptfl_lookahead_fits_the_trigger_to_the_received_prompt_plus_the_honest_step(
    random_clip, tmp_path, monkeypatch
):
    # Prepare: alternating mode with trigger-lookahead; the honest update from the same prompt, data and
    # seed; a spy on the prompt each phase starts from
    import fedsec.attacks.badpromptfl as bp

    params = {"attack-mode": "alternating", "trigger-steps": 3, "local-steps": 4, "lr": 0.05, "patch-size": 4}
    model, data, atk = _tiny_badpromptfl_setup(random_clip, tmp_path, **params, **{"trigger-lookahead": True})
    received = model.prompt_learner.ctx.detach().clone()
    honest = get_attack("none")(atk.cfg, tmp_path / "honest")
    honest.run(model, data, random_clip, 1, 0, 5)
    lookahead = model.prompt_learner.ctx.detach().clone()
    model.prompt_learner.ctx.data.copy_(received)
    starts = []
    real_batches = bp.batches

    def spy_batches(n, batch_size, steps, gen):
        starts.append(model.prompt_learner.ctx.detach().clone())
        yield from real_batches(n, batch_size, steps, gen)

    monkeypatch.setattr(bp, "batches", spy_batches)
    # Execute: one attack round with the same seed
    atk.run(model, data, random_clip, 1, 0, 5)
    # Assert: the trigger phase saw the received prompt moved by the honest step; the prompt phase starts
    # again from the received prompt
    assert not torch.equal(lookahead, received)
    assert torch.allclose(starts[0], lookahead) and torch.equal(starts[1], received)


def test_badpromptfl_pooled_and_lookahead_fits_refuse_joint_mode():
    # Prepare / Execute / Assert: one clear error naming the keys and the mode they need
    from fedsec.config import ConfigError

    with pytest.raises(ConfigError, match="trigger-pool/trigger-lookahead = true needs attack-mode='alternating'"):
        RunConfig.from_mapping(
            {
                "attack": "badpromptfl",
                "num-malicious": 1,
                "attack-mode": "joint",
                "trigger-pool": True,
                "trigger-lookahead": True,
            }
        )
