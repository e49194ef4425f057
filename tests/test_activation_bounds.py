"""Activation bounds: clamps, statistics init, optimisation, records and the strategy wrapper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from fedsec.activation_bounds import (
    ActivationBounds,
    bounded,
    init_bounds,
    optimize_bounds,
    resolve_layers,
    trimmed_mean,
    unbounded_like,
)
from fedsec.node import bounds_from_content
from strategies.activation_bound import BOUNDS_KEY, ActivationBoundWrapper, bounds_record
from strategies.validation import Validated
from tests.strategy_helpers import FakeGrid, configure, replies_to, snapshot, task_identity, train_content


def _planted_net() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """A 2-layer MLP whose hidden unit 0 fires only on a 'trigger' input feature (feature 7)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        net[0].weight[:, 7] = 0.0
        net[0].weight[0] = 0.0
        net[0].weight[0, 7] = 50.0  # the trigger's path: huge activation of unit 0
        net[0].bias[0] = 0.0
        net[2].weight[:, 0] = torch.tensor([0.0, 0.0, 1.0])  # unit 0 votes for class 2 (the "target")
    clean = torch.randn(256, 8)
    clean[:, 7] = 0.0
    triggered = clean.clone()
    triggered[:, 7] = 1.0
    for p in net.parameters():
        p.requires_grad_(False)
    return net, clean, triggered


def test_clamps_with_infinite_bounds_are_a_no_op(random_clip):
    # Prepare: bounds of every image block, all +inf
    images = torch.rand(6, 3, 32, 32)
    layers = resolve_layers(random_clip.model, ["visual.transformer.resblocks.*"])
    stats = init_bounds(random_clip.model, random_clip.encode_images, images, layers, channel_dim=-1)
    inf = unbounded_like(stats)
    # Execute
    with torch.no_grad():
        plain = random_clip.encode_images(images)
        with bounded(random_clip.model, inf):
            clamped = random_clip.encode_images(images)
        after = random_clip.encode_images(images)
    # Assert: identical outputs, and the hooks are gone afterwards
    assert len(layers) == 4 and all(torch.isinf(t).all() for _, t in inf.items())
    assert torch.equal(plain, clamped) and torch.equal(plain, after)


def test_max_init_is_a_no_op_on_its_data_and_tight_bounds_change_outputs(random_clip):
    # Prepare
    images = torch.rand(6, 3, 32, 32)
    layers = resolve_layers(random_clip.model, ["visual.transformer.resblocks.*"])
    bounds = init_bounds(random_clip.model, random_clip.encode_images, images, layers, "neuron", 1.0)
    tight = ActivationBounds({n: t.detach() - 1.0 for n, t in bounds.items()})
    # Execute
    with torch.no_grad():
        plain = random_clip.encode_images(images)
        with bounded(random_clip.model, bounds):
            same = random_clip.encode_images(images)
        with bounded(random_clip.model, tight):
            other = random_clip.encode_images(images)
    # Assert
    assert tuple(bounds.tau[0].shape) == (65, 128)  # per neuron: tokens x channels
    assert torch.allclose(plain, same, atol=1e-6)
    assert not torch.allclose(plain, other, atol=1e-3)


def test_unknown_layer_pattern_is_one_clear_error(random_clip):
    with pytest.raises(ValueError, match="matches no module"):
        resolve_layers(random_clip.model, ["visual.transformer.blocks.*"])


def test_optimisation_changes_only_the_bounds(random_clip):
    # Prepare
    images = torch.rand(16, 3, 32, 32)
    text = torch.nn.functional.normalize(torch.randn(5, 128), dim=-1)
    layers = resolve_layers(random_clip.model, ["visual.transformer.resblocks.*"])
    bounds = init_bounds(random_clip.model, random_clip.encode_images, images, layers, "channel", channel_dim=-1)
    before_bounds = bounds.to_arrays()
    before_params = {k: v.clone() for k, v in random_clip.model.state_dict().items()}
    # Execute
    stats = optimize_bounds(
        random_clip.model, lambda x: 10 * random_clip.encode_images(x) @ text.T, images, bounds, steps=5, batch_size=8
    )
    # Assert: every model tensor bit-identical; the bounds shrank
    after = random_clip.model.state_dict()
    assert all(torch.equal(before_params[k], after[k]) for k in before_params)
    assert stats["bound-shrink"] < 1.0
    assert any(not np.array_equal(before_bounds[k], v) for k, v in bounds.to_arrays().items())


def test_bounds_reduce_a_planted_abnormal_activation():
    # Prepare: a net with a trigger path through hidden unit 0; bounds learned on clean data only
    net, clean, triggered = _planted_net()
    bounds = init_bounds(net, net, clean, ["1"], "channel", 1.0)  # after the ReLU
    hidden = {}
    hook = net[2].register_forward_pre_hook(lambda m, a: hidden.__setitem__("h", a[0].detach()))  # after clamps
    # Execute
    with torch.no_grad():
        net(triggered)
        free = hidden["h"][:, 0].clone()
        free_pred = net(triggered).argmax(-1)
        with bounded(net, bounds):
            net(triggered)
            capped = hidden["h"][:, 0].clone()
            capped_pred = net(triggered).argmax(-1)
            clean_pred_bounded = net(clean).argmax(-1)
        clean_pred = net(clean).argmax(-1)
    hook.remove()
    optimize_bounds(net, net, clean, bounds, steps=30, lr=0.05, penalty=0.5, batch_size=64)
    # Assert: the trigger's activation (50) is cut to the clean maximum (0), the backdoor's vote goes,
    # clean predictions stay
    assert float(free.min()) == pytest.approx(50.0)
    assert float(capped.max()) < 1.0
    assert float(bounds.tau[0][0].detach()) < 1.0  # still tight after optimisation on clean data
    assert (free_pred == 2).float().mean() == 1.0 and (capped_pred == 2).float().mean() < 0.6
    assert torch.equal(clean_pred, clean_pred_bounded)


def test_two_sided_bounds_cut_a_planted_abnormally_low_activation():
    # Prepare: a residual-style layer (no ReLU) where the trigger drives unit 0 far *below* its clean range
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Identity(), nn.Linear(16, 3))
    with torch.no_grad():
        net[0].weight[:, 7] = 0.0
        net[0].weight[0] = 0.0
        net[0].weight[0, 7] = -50.0
        net[0].bias[0] = 0.0
        net[2].weight[:, 0] = torch.tensor([0.0, 0.0, -1.0])  # a low unit 0 votes for class 2
    for p in net.parameters():
        p.requires_grad_(False)
    clean = torch.randn(256, 8)
    clean[:, 7] = 0.0
    triggered = clean.clone()
    triggered[:, 7] = 1.0
    upper = init_bounds(net, net, clean, ["1"], "channel", 1.0)
    both = init_bounds(net, net, clean, ["1"], "channel", 1.0, two_sided=True)
    free = unbounded_like(both)
    # Execute
    with torch.no_grad():
        plain = net(triggered).argmax(-1)
        with bounded(net, upper):
            upper_pred = net(triggered).argmax(-1)
        with bounded(net, both):
            both_pred = net(triggered).argmax(-1)
            clean_both = net(clean)
        with bounded(net, free):
            free_out = net(triggered)
    # Assert: the lower entry is the clean minimum; upper bounds alone miss the trigger, two-sided ones cut it;
    # clean outputs are unchanged, and -inf lower bounds are a no-op
    assert set(both.names) == {"1", "1@lower"} and float(both.to_arrays()["1@lower"][0]) == pytest.approx(0.0)
    assert np.isneginf(free.to_arrays()["1@lower"]).all()
    assert (plain == 2).all() and (upper_pred == 2).all()
    assert (both_pred == 2).float().mean() < 0.6
    assert torch.allclose(clean_both, net(clean))
    assert torch.equal(free_out, net(triggered))


def test_optimisation_keeps_infinite_lower_bounds_free(random_clip):
    # Prepare: two-sided bounds, the lower ones of the first layer left free (-inf)
    images = torch.rand(16, 3, 32, 32)
    text = torch.nn.functional.normalize(torch.randn(5, 128), dim=-1)
    layers = resolve_layers(random_clip.model, ["visual.transformer.resblocks.*"])
    bounds = init_bounds(
        random_clip.model, random_clip.encode_images, images, layers, "channel", 0.9, two_sided=True, channel_dim=-1
    )
    arrays = bounds.to_arrays()
    arrays[layers[0] + "@lower"][:] = -np.inf
    bounds = ActivationBounds.from_arrays(arrays)
    # Execute
    optimize_bounds(
        random_clip.model, lambda x: 10 * random_clip.encode_images(x) @ text.T, images, bounds, steps=3, batch_size=8
    )
    out = bounds.to_arrays()
    # Assert: the free entries stay -inf, the others stay finite and below their upper bounds
    assert np.isneginf(out[layers[0] + "@lower"]).all()
    for layer in layers[1:]:
        assert np.isfinite(out[layer + "@lower"]).all() and (out[layer + "@lower"] < out[layer]).all()


def test_bounds_round_trip_through_records_and_messages():
    # Prepare: bounds as the wrapper sends them; reply validation behind it
    bounds = ActivationBounds(
        {
            "visual.transformer.resblocks.0": torch.randn(65, 128),
            "visual.transformer.resblocks.0@lower": torch.randn(65, 128),
            "transformer.x": torch.randn(4),
        }
    )
    inner = Validated(_FedAvg())
    wrapper = ActivationBoundWrapper(inner, lambda ctx, rnd: (bounds.to_arrays(), {"bound-loss": 0.0}), "ctx")
    ctx = np.zeros((2, 3), dtype=np.float32)
    # Execute: round 1 (no bounds yet), aggregation learns bounds, round 2 carries them
    first = configure(wrapper, ctx, [1, 2])
    arrays, metrics = wrapper.aggregate_train(1, replies_to(first, {1: train_content(ctx + 1), 2: train_content(ctx)}))
    second = configure(wrapper, ctx, [1, 2], server_round=2)
    received = bounds_from_content(second[0].content)
    # Assert: the bounds travel beside ctx in their own record and come back identical
    assert BOUNDS_KEY not in first[0].content and bounds_from_content(first[0].content) is None
    assert isinstance(second[0].content[BOUNDS_KEY], ArrayRecord) and "ctx" in second[0].content["arrays"]
    assert received.digest() == bounds.digest()
    assert all(np.array_equal(received.to_arrays()[k], v) for k, v in bounds.to_arrays().items())
    np.testing.assert_allclose(arrays["ctx"].numpy(), ctx + 0.5)
    assert "bound-loss" in metrics and set(wrapper.broadcast_records) == {BOUNDS_KEY}


def test_validation_still_checks_ctx_when_bounds_are_sent():
    # Prepare: Validated outside the wrapper (as in the ServerApp); one reply with a wrongly shaped ctx
    bounds = {"l": np.ones(3, dtype=np.float32)}
    wrapper = Validated(ActivationBoundWrapper(_FedAvg(), lambda ctx, rnd: (bounds, {}), "ctx"))
    ctx = np.zeros((2, 3), dtype=np.float32)
    configure(wrapper, ctx, [1, 2])
    wrapper.aggregate_train(1, [])  # nothing to learn from
    wrapper.inner.bounds = bounds
    instructions = configure(wrapper, ctx, [1, 2], server_round=2)
    bad = RecordDict(
        {"arrays": ArrayRecord({"ctx": Array(np.zeros(1, dtype=np.float32))}), "metrics": train_content(ctx)["metrics"]}
    )
    # Execute
    arrays, _ = wrapper.aggregate_train(2, replies_to(instructions, {1: train_content(ctx + 2), 2: bad}))
    # Assert: the bad reply is rejected; the good one's ctx is the aggregate
    assert [nid for nid, _ in wrapper.last_rejected] == [2]
    np.testing.assert_allclose(arrays["ctx"].numpy(), ctx + 2)


def _FedAvg():  # noqa: N802 - a factory named like the class it builds
    from flwr.serverapp.strategy import FedAvg

    return FedAvg(min_train_nodes=1, min_available_nodes=1, min_evaluate_nodes=0, fraction_evaluate=0.0)


def test_resumed_bound_learner_continues_from_the_checkpointed_bounds(tmp_path):
    # Prepare: the server's learner on a small synthetic set; one global prompt per round
    from fedsec.config import RunConfig
    from fedsec.node import get_ctx
    from fedsec.synthetic import SyntheticSet
    from strategies.activation_bound import BoundLearner
    from strategies.state import collect_state, restore_state

    cfg = RunConfig.from_mapping({"bounds-steps": 3, "bounds-batch-size": 16, "bounds-init-quantile": 0.9})
    gen = torch.Generator().manual_seed(0)
    synthetic = SyntheticSet(
        torch.rand(40, 3, 32, 32, generator=gen), torch.arange(40) % 10, [f"c{i}" for i in range(10)]
    )
    ref = BoundLearner(cfg, lambda: synthetic)
    ref._setup()
    ctx0 = get_ctx(ref.state["model"])
    ctxs = {
        r: ctx0 + 0.05 * r * np.random.default_rng(r).normal(size=ctx0.shape).astype(np.float32) for r in range(1, 5)
    }
    expected = {r: ref({"ctx": ctxs[r]}, r)[0] for r in range(1, 5)}
    # Execute: 2 rounds, the strategy state through an npz file, a new learner resumes rounds 3-4
    first = ActivationBoundWrapper(_FedAvg(), BoundLearner(cfg, lambda: synthetic), "ctx")
    for r in (1, 2):
        first.bounds, _ = first.learn({"ctx": ctxs[r]}, r)
    np.savez(tmp_path / "state.npz", **collect_state(first, include_rng=False))
    resumed = ActivationBoundWrapper(_FedAvg(), BoundLearner(cfg, lambda: synthetic), "ctx")
    with np.load(tmp_path / "state.npz") as saved:
        restore_state(resumed, dict(saved))
    broadcast = bounds_from_content(RecordDict(resumed.broadcast_records)).to_arrays()
    got = {r: resumed.learn({"ctx": ctxs[r]}, r)[0] for r in (3, 4)}
    fresh = BoundLearner(cfg, lambda: synthetic)({"ctx": ctxs[3]}, 3)[0]
    # Assert: the resumed run sends round 2's bounds and then learns exactly what the uninterrupted one did
    assert all(np.array_equal(broadcast[k], v) for k, v in expected[2].items())
    for r in (3, 4):
        assert all(np.array_equal(got[r][k], v) for k, v in expected[r].items())
    assert any(not np.array_equal(fresh[k], v) for k, v in expected[3].items())  # the state is what makes it so


def test_filtered_bounds_are_learned_only_on_images_the_reference_prompt_agrees_with():
    # Prepare: synthetic labels that agree with the reference prompt's prediction on the first 20 images only
    from fedsec.activation_bounds import init_bounds
    from fedsec.config import RunConfig
    from fedsec.metrics import predict
    from fedsec.node import get_ctx
    from fedsec.synthetic import SyntheticSet
    from strategies.activation_bound import BoundLearner

    cfg = RunConfig.from_mapping({"bounds-steps": 0, "bounds-data": "filtered", "bounds-init-quantile": 1.0})
    images = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    names = [f"c{i}" for i in range(10)]
    probe = BoundLearner(cfg, lambda: SyntheticSet(images, torch.zeros(40, dtype=torch.long), names))
    probe._setup()
    reference = get_ctx(probe.state["model"])
    with torch.no_grad():
        pred = predict(probe.state["model"], probe.state["clip"].encode_images_batched(images))
    labels = pred.clone()
    labels[20:] = (pred[20:] + 1) % 10  # "poisoned": a label the reference never predicts
    learner = BoundLearner(cfg, lambda: SyntheticSet(images, labels, names))
    learner.reference = {"ctx": reference}
    # Execute
    bounds, stats = learner({"ctx": reference}, 1)
    expected = init_bounds(
        learner.state["clip"].model, learner.state["clip"].encode_images, images[:20], learner.state["layers"], "neuron"
    ).to_arrays()
    # Assert: the bounds are the statistics of the agreeing half; the kept fraction is reported
    assert stats["bound-kept"] == pytest.approx(0.5)
    assert all(np.allclose(bounds[k], v) for k, v in expected.items())


def test_unfused_shadow_adds_the_clients_updates_without_the_fusion_step():
    # Prepare: a wrapper whose inner exposes the pre-fusion aggregate, as ServerFusion does
    class _Fused:
        pre_fusion_arrays = None

    inner = _Fused()
    wrapper = ActivationBoundWrapper(inner, lambda ctx, rnd: ({}, {}), "ctx")  # type: ignore[arg-type]
    g0, p1, fused1, p2 = (np.full((1, 2), v, np.float32) for v in (0.0, 1.0, 5.0, 7.0))
    # Execute: round 1 sends g0, clients move it to p1, fusion makes fused1; round 2 sends fused1, clients reach p2
    wrapper._sent, inner.pre_fusion_arrays = {"ctx": g0}, {"ctx": p1}
    first = wrapper._advance_shadow({"ctx": fused1})["ctx"].copy()
    wrapper._sent, inner.pre_fusion_arrays = {"ctx": fused1}, {"ctx": p2}
    second = wrapper._advance_shadow({"ctx": np.zeros((1, 2), np.float32)})["ctx"].copy()
    restored = ActivationBoundWrapper(_Fused(), lambda ctx, rnd: ({}, {}), "ctx")  # type: ignore[arg-type]
    restored.load_state_dict(wrapper.state_dict())
    # Assert: shadow = g0 + (p1 - g0) = 1, then + (p2 - fused1) = 1 + 2 = 3; it survives a checkpoint
    np.testing.assert_allclose(first, [[1.0, 1.0]])
    np.testing.assert_allclose(second, [[3.0, 3.0]])
    np.testing.assert_allclose(restored.shadow["ctx"], second)


def test_learner_with_two_sided_bounds_sends_lower_entries_below_the_upper_ones():
    # Prepare: the server's learner with bounds-two-sided on ln_pre and the blocks
    from fedsec.config import RunConfig
    from fedsec.node import get_ctx
    from fedsec.synthetic import SyntheticSet
    from strategies.activation_bound import BoundLearner

    cfg = RunConfig.from_mapping(
        {
            "bounds-steps": 2,
            "bounds-batch-size": 16,
            "bounds-init-quantile": 0.9,
            "bounds-two-sided": True,
            "bounds-layers": "visual.ln_pre,visual.transformer.resblocks.*",
        }
    )
    images = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    synthetic = SyntheticSet(images, torch.arange(32) % 10, [f"c{i}" for i in range(10)])
    learner = BoundLearner(cfg, lambda: synthetic)
    learner._setup()
    # Execute
    bounds, _ = learner({"ctx": get_ctx(learner.state["model"])}, 1)
    # Assert: one upper and one lower entry per layer, lower below upper (equal where an activation is constant,
    # e.g. the class token at ln_pre), and the record round trip keeps both
    layers = learner.state["layers"]
    assert layers[0] == "visual.ln_pre" and len(layers) == 5
    assert sorted(bounds) == sorted([*layers, *(n + "@lower" for n in layers)])
    assert all((bounds[n + "@lower"] <= bounds[n]).all() and (bounds[n + "@lower"] < bounds[n]).any() for n in layers)
    received = bounds_from_content(RecordDict({BOUNDS_KEY: bounds_record(bounds)})).to_arrays()
    assert all(np.array_equal(received[k], v) for k, v in bounds.items())


def test_trimmed_mean_drops_the_largest_fraction():
    # Prepare
    values = torch.tensor([3.0, 10.0, 1.0, 2.0])
    # Execute / Assert: hand-computed
    assert float(trimmed_mean(values, 0.0)) == pytest.approx(4.0)
    assert float(trimmed_mean(values, 0.25)) == pytest.approx(2.0)
    assert float(trimmed_mean(values, 0.9)) == pytest.approx(1.0)  # at least one value is kept
    with pytest.raises(ValueError, match="trim"):
        trimmed_mean(values, 1.0)


def test_trimmed_optimisation_keeps_the_bound_on_a_few_triggered_images_tight():
    # Prepare: bounds from 64 clean inputs; the optimisation data adds 10 triggered ones (13%)
    net, clean, triggered = _planted_net()
    data = torch.cat([clean[:64], triggered[:10]])
    plain = init_bounds(net, net, clean[:64], ["1"], "channel", 1.0)
    trimmed = init_bounds(net, net, clean[:64], ["1"], "channel", 1.0)
    # Execute: full-batch steps, without and with a 20% trim
    optimize_bounds(net, net, data, plain, steps=30, lr=0.05, penalty=0.5, batch_size=len(data))
    optimize_bounds(net, net, data, trimmed, steps=30, lr=0.05, penalty=0.5, batch_size=len(data), trim=0.2)
    # Assert: the untrimmed loss loosens the trigger unit's bound (from 0) to keep the triggered outputs; the
    # trimmed one leaves those inputs out and keeps it near the clean maximum
    assert float(plain.tau[0][0].detach()) > 0.5
    assert float(trimmed.tau[0][0].detach()) < 0.2


def test_clients_train_under_the_bounds_only_when_configured():
    # Prepare
    from fedsec.config import RunConfig
    from fedsec.node import training_bounds

    bounds = ActivationBounds({"visual.transformer.resblocks.0": torch.zeros(4)})
    on = RunConfig.from_mapping({"activation-bounds": True})
    off = RunConfig.from_mapping({"activation-bounds": True, "bounds-client-training": False})
    # Execute / Assert: the default trains under the received bounds; false trains unclamped; no bounds stay none
    assert training_bounds(on, bounds) is bounds
    assert training_bounds(off, bounds) is None
    assert training_bounds(on, None) is None and training_bounds(off, None) is None


# -- any torch module: an explicit channel dimension ------------------------------------------


class _Conv(nn.Module):
    """One conv layer whose output (batch, 2 channels, 1, 3) is hand-set by its input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=1, bias=False)
        with torch.no_grad():
            self.conv.weight[:] = torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1)  # channel 1 = -channel 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_channel_bounds_of_a_conv_use_the_given_channel_dim():
    # Prepare: two images of one row of 3 pixels; channel 0 sees the pixels, channel 1 their negatives
    net = _Conv()
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, -5.0]]).reshape(2, 1, 1, 3)
    # Execute
    bounds = init_bounds(net, net, x, ["conv"], "channel", 1.0, channel_dim=1, two_sided=True).to_arrays()
    # Assert: one bound per channel (max over batch and pixels), shaped to broadcast over (H, W)
    assert bounds["conv"].shape == (2, 1, 1)
    np.testing.assert_array_equal(bounds["conv"].ravel(), [4.0, 5.0])
    np.testing.assert_array_equal(bounds["conv@lower"].ravel(), [-5.0, -4.0])


def test_channel_bounds_on_an_ambiguous_shape_are_refused():
    # Prepare: a 4-d conv output and no channel dimension (or the batch one)
    net = _Conv()
    x = torch.ones(2, 1, 1, 3)
    # Execute / Assert: a clear error instead of bounding the width
    with pytest.raises(ValueError, match="ambiguous; pass channel_dim"):
        init_bounds(net, net, x, ["conv"], "channel")
    with pytest.raises(ValueError, match="is the batch dimension"):
        init_bounds(net, net, x, ["conv"], "channel", channel_dim=0)
    with pytest.raises(ValueError, match="out of range"):
        init_bounds(net, net, x, ["conv"], "channel", channel_dim=4)


def test_conv_channel_clamps_apply_per_channel_and_neuron_bounds_keep_the_sample_shape():
    # Prepare: channel bound 2 on channel 0, free on channel 1; a per-neuron bound of shape (2, 1, 3)
    net = _Conv()
    x = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 1, 1, 3)
    per_channel = ActivationBounds({"conv": torch.tensor([2.0, float("inf")]).reshape(2, 1, 1)})
    per_neuron = init_bounds(net, net, x, ["conv"], "neuron")
    # Execute
    with torch.no_grad(), bounded(net, per_channel):
        out = net(x)
    # Assert: channel 0 clipped at 2, channel 1 untouched
    assert tuple(per_neuron.tau[0].shape) == (2, 1, 3)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([1.0, 2.0, 2.0]))
    torch.testing.assert_close(out[0, 1, 0], torch.tensor([-1.0, -2.0, -3.0]))


def test_a_bound_that_fits_neither_the_tail_nor_a_channel_is_refused():
    # Prepare: 3 values for a conv of 2 channels
    net = _Conv()
    wrong = ActivationBounds({"conv": torch.zeros(3, 1, 1)})
    # Execute / Assert
    with pytest.raises(ValueError, match=r"bound of 'conv' has shape \(3, 1, 1\)"), bounded(net, wrong):
        net(torch.ones(1, 1, 1, 3))


# -- the generic Flower wrapper ------------------------------------------------------------------


def test_bounds_wrapper_learns_on_its_array_keys_and_sends_bounds_under_its_key():
    # Prepare: a two-array model under Flower's record, the bounds under a user-chosen key
    from strategies.bounds_wrapper import BoundsWrapper

    seen: list[dict] = []

    def learn(arrays, rnd):
        seen.append(arrays)
        return {"conv": arrays["w"].sum(keepdims=True)}, {"bound-rounds": rnd}

    wrapper = BoundsWrapper(_FedAvg(), learn, array_keys=("w", "b"), bounds_key="clip-at")
    model = ArrayRecord({"w": Array(np.zeros(2, np.float32)), "b": Array(np.zeros(1, np.float32))})

    def reply(w: float) -> RecordDict:
        arrays = ArrayRecord({"w": Array(np.full(2, w, np.float32)), "b": Array(np.zeros(1, np.float32))})
        return RecordDict({"arrays": arrays, "metrics": train_content(np.zeros(1))["metrics"]})

    # Execute
    with task_identity():
        first = list(wrapper.configure_train(1, model, ConfigRecord(), FakeGrid([1, 2])))
    replies = replies_to(first, {1: reply(1.0), 2: reply(3.0)})
    before = snapshot(replies)
    arrays, metrics = wrapper.aggregate_train(1, replies)
    with task_identity():
        second = list(wrapper.configure_train(2, arrays, ConfigRecord(), FakeGrid([1, 2])))
    # Assert: the learner saw both arrays of the mean model (w = 2); bounds travel under "clip-at"; replies untouched
    assert sorted(seen[0]) == ["b", "w"] and np.array_equal(seen[0]["w"], [2.0, 2.0])
    assert "clip-at" not in first[0].content and second[0].content["clip-at"]["conv"].numpy().tolist() == [4.0]
    assert metrics["bound-rounds"] == 1.0 and snapshot(replies) == before
    assert set(wrapper.state_dict()) == {"clip-at/conv"}


def test_bounds_wrapper_without_its_array_raises_one_clear_error():
    # Prepare
    from strategies.bounds_wrapper import BoundsWrapper
    from strategies.common import MissingKeyError

    wrapper = BoundsWrapper(_FedAvg(), lambda a, r: ({}, {}), array_keys=("conv1.weight",), bounds_key="bounds")
    # Execute / Assert: the key and the keys present are named
    with pytest.raises(MissingKeyError, match=r"no 'conv1.weight' in the record; keys present: \['ctx'\]"):
        configure(wrapper, np.zeros(2, np.float32), [1])
    with pytest.raises(ValueError, match="non-empty sequence of array keys"):
        BoundsWrapper(_FedAvg(), lambda a, r: ({}, {}), array_keys="ctx", bounds_key="bounds")


def test_bounds_travel_in_a_record_under_any_key_and_come_back():
    # Prepare
    import numpy as np
    from flwr.app import RecordDict

    from fedsec.activation_bounds import bounds_from_content
    from strategies.bounds_wrapper import bounds_to_record

    sent = {"conv1": np.array([[[1.0]], [[2.0]]], dtype=np.float32)}
    content = RecordDict({"clamps": bounds_to_record(sent)})
    # Execute
    got = bounds_from_content(content, "clamps")
    missing = bounds_from_content(content, "bounds")
    # Assert
    assert missing is None
    assert {k: v.tolist() for k, v in got.to_arrays().items()} == {"conv1": [[[1.0]], [[2.0]]]}


def test_ranked_keep_keeps_the_same_share_of_every_class_dropping_the_least_supported():
    # Prepare: class 0 holds 4 genuine items (label probability 0.9, 0.8, 0.7, 0.6) and 4 poisoned ones the
    # reference model gives its label little probability (0.05-0.2); class 1 holds 3 items it mostly gets wrong
    from fedsec.bounds_clip import ranked_keep

    prob = torch.tensor([0.9, 0.05, 0.8, 0.1, 0.7, 0.2, 0.6, 0.15, 0.3, 0.1, 0.2])
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    # Execute
    half = ranked_keep(prob, labels, 0.5)
    third = ranked_keep(prob, labels, 0.3)
    # Assert: ceil(0.5 * 8) = 4 of class 0 (the genuine ones), ceil(0.5 * 3) = 2 of class 1 (the two most supported,
    # although the reference predicts neither); 0.3: ceil(2.4) = 3 and ceil(0.9) = 1
    assert half.tolist() == [True, False, True, False, True, False, True, False, True, False, True]
    assert third.tolist() == [True, False, True, False, True, False, False, False, True, False, False]
    with pytest.raises(ValueError, match="bounds-keep"):
        ranked_keep(prob, labels, 0.0)


def test_the_initial_reference_is_the_first_rounds_arrays_and_survives_a_checkpoint():
    # Prepare: a learner that records its reference; two rounds sent from different global arrays
    class _Learner:
        reference = None
        seen: list = []

        def __call__(self, arrays, server_round):
            self.seen.append({k: v.copy() for k, v in self.reference.items()})
            return {}, {}

    from types import SimpleNamespace

    from tests.strategy_helpers import configure

    learner = _Learner()
    wrapper = ActivationBoundWrapper(_FedAvg(), learner, "ctx", reference="initial")
    g0, g1 = np.zeros((1, 2), np.float32), np.ones((1, 2), np.float32)
    # Execute: round 1 sends g0, round 2 sends g1, learning after each
    configure(wrapper, g0, [1], server_round=1)
    wrapper.learn_bounds({"ctx": g1}, 1)
    configure(wrapper, g1, [1], server_round=2)
    wrapper.learn_bounds({"ctx": g1 * 2}, 2)
    restored = ActivationBoundWrapper(_FedAvg(), _Learner(), "ctx", reference="initial")
    restored.load_state_dict(wrapper.state_dict())
    # Assert: both rounds filtered with the initial arrays, never the moving shadow; the checkpoint keeps them
    assert all(np.array_equal(s["ctx"], g0) for s in learner.seen) and len(learner.seen) == 2
    np.testing.assert_array_equal(restored.initial["ctx"], g0)
    with pytest.raises(ValueError, match="reference must be"):
        ActivationBoundWrapper(SimpleNamespace(), learner, "ctx", reference="oracle")
