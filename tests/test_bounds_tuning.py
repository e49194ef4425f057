"""The defender's choice of the activation bounds' quantile (``bounds-tune = "holdout"``): synthetic data only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fedsec.activation_bounds as ab
from fedsec.activation_bounds import (
    accuracy_drop,
    class_halves,
    init_bounds,
    tightest_within,
    tune_quantile,
)
from fedsec.config import ConfigError, RunConfig
from tests.test_activation_bounds import _FedAvg, _planted_net


def test_tightest_within_takes_the_smallest_quantile_inside_the_budget():
    # Prepare: costs that grow as the quantile falls, and one non-monotone candidate
    costs = {0.99: 0.0, 0.95: 0.005, 0.9: 0.02, 0.8: 0.08, 0.7: 0.015}
    # Execute / Assert: 0.7 is within 0.02 and the smallest; at 0.01 only 0.99 and 0.95 are; none within -> loosest
    assert tightest_within(costs, 0.02) == 0.7
    assert tightest_within(costs, 0.01) == 0.95
    assert tightest_within({0.9: 0.5, 0.8: 0.6}, 0.1) == 0.9
    with pytest.raises(ValueError, match="at least one"):
        tightest_within({}, 0.1)


def test_class_halves_hold_out_floor_half_of_every_class_and_are_seeded():
    # Prepare: classes of 4, 3 and 1 items
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    # Execute
    a, b, c = class_halves(labels, 0), class_halves(labels, 0), class_halves(labels, 1)
    # Assert: 2 of class 0, 1 of class 1, none of the single item; the same seed gives the same split
    assert [int(a[labels == k].sum()) for k in (0, 1, 2)] == [2, 1, 0]
    assert torch.equal(a, b)
    assert [int(c[labels == k].sum()) for k in (0, 1, 2)] == [2, 1, 0]


def test_accuracy_drop_counts_what_the_clamps_take_by_hand():
    # Prepare: logits = the input itself; an upper bound of 0.5 on the first logit
    net = nn.Sequential(nn.Identity())
    images = torch.tensor([[1.0, 0.8], [0.4, 0.1], [0.9, 0.2], [0.2, 0.9]])
    labels = torch.tensor([0, 0, 0, 1])
    bounds = ab.ActivationBounds({"0": torch.tensor([0.5, float("inf")])})
    # Execute
    drop = accuracy_drop(net, net, images, labels, bounds)
    # Assert: unclamped 4 of 4 right; clamped, item 0 becomes [0.5, 0.8] -> class 1 (wrong): 3 of 4
    assert drop == pytest.approx(0.25)
    assert accuracy_drop(net, net, images[:0], labels[:0], bounds) == 0.0


def test_tune_quantile_costs_each_candidate_two_fold_and_keeps_the_tightest_within_budget():
    # Prepare: a planted net, clean inputs labelled by the net itself, a class-stratified split, no optimisation steps
    net, clean, triggered = _planted_net()
    labels = net(clean).argmax(-1)
    held = class_halves(labels, 0)
    quantiles = [1.0, 0.99, 0.9, 0.5]
    # Execute
    chosen, costs = tune_quantile(
        net, net, net, clean, labels, held, ["1"], quantiles, 0.05, granularity="neuron", steps=0
    )
    # Assert: each cost is the mean of the two folds' held-out accuracy drops under bounds initialised on the other fold
    for q in quantiles:
        drops = [
            accuracy_drop(net, net, clean[ev], labels[ev], init_bounds(net, net, clean[fit], ["1"], "neuron", q))
            for fit, ev in ((~held, held), (held, ~held))
        ]
        assert costs[q] == pytest.approx(sum(drops) / 2)
    assert chosen == tightest_within(costs, 0.05)
    assert costs[1.0] <= costs[0.5]
    # the chosen bounds cut the planted trigger: unit 0 is 0 on every clean input, so any quantile bounds it at 0
    bounds = init_bounds(net, net, clean, ["1"], "neuron", chosen)
    with ab.bounded(net, bounds):
        asr = float((net(triggered).argmax(-1) == 2).float().mean())
        clean_rate = float((net(clean).argmax(-1) == 2).float().mean())
    assert float((net(triggered).argmax(-1) == 2).float().mean()) == 1.0
    assert asr == pytest.approx(clean_rate)  # the triggered inputs behave as the clean ones under the bounds
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        tune_quantile(net, net, net, clean, labels, held, ["1"], [0.0], 0.05)


def _synthetic(n: int = 40):
    from fedsec.synthetic import SyntheticSet

    gen = torch.Generator().manual_seed(3)
    return SyntheticSet(torch.rand(n, 3, 32, 32, generator=gen), torch.arange(n) % 10, [f"c{i}" for i in range(10)])


def test_bound_learner_tunes_once_on_the_synthetic_set_only_and_a_resumed_run_keeps_the_choice(monkeypatch):
    # Prepare: a learner with the tuning on; the datasets (test split, the clients' pool) refuse to load, and every
    # image set the tuning maths receives is checked to be made of the server's synthetic images
    import fedsec.data
    import fedsec.data.datasets
    from fedsec.bounds_clip import BoundLearner
    from fedsec.node import get_ctx
    from strategies.activation_bound import ActivationBoundWrapper

    def refuse(*args, **kwargs):
        raise AssertionError("the bounds' tuning read a dataset")

    monkeypatch.setattr(fedsec.data.datasets, "load_dataset", refuse)
    monkeypatch.setattr(fedsec.data, "load_dataset", refuse)
    synthetic = _synthetic()
    known = {img.numpy().tobytes() for img in synthetic.images}
    seen: list[int] = []

    def only_synthetic(fn):
        def wrapped(*args, **kwargs):
            images = next(a for a in args if isinstance(a, torch.Tensor) and a.dim() == 4)
            assert all(img.cpu().numpy().tobytes() in known for img in images)
            seen.append(len(images))
            return fn(*args, **kwargs)

        return wrapped

    for name in ("init_bounds", "optimize_bounds", "accuracy_drop"):
        monkeypatch.setattr(ab, name, only_synthetic(getattr(ab, name)))
    cfg = RunConfig.from_mapping(
        {
            "bounds-tune": "holdout",
            "bounds-tune-quantiles": "1.0,0.9,0.5",
            "bounds-tune-tolerance": 0.1,
            "bounds-steps": 2,
            "bounds-batch-size": 8,
            "bounds-layers": "visual.transformer.resblocks.0",
        }
    )
    learner = BoundLearner(cfg, lambda: synthetic)
    wrapper = ActivationBoundWrapper(_FedAvg(), learner, "ctx")
    learner._setup()
    ctx = get_ctx(learner.state["model"])
    # Execute: two rounds, then a resumed learner from the wrapper's state
    _, first = wrapper.learn_bounds({"ctx": ctx}, 1)
    _, second = wrapper.learn_bounds({"ctx": ctx + 0.01}, 2)
    resumed_learner = BoundLearner(cfg, lambda: synthetic)
    ActivationBoundWrapper(_FedAvg(), resumed_learner, "ctx").load_state_dict(wrapper.state_dict())
    _, third = resumed_learner({"ctx": ctx + 0.02}, 3)
    # Assert: round 1 costed every candidate on held-out halves (20 of the 40 images each fold) and chose by the rule
    costs = {float(k.removeprefix("bound-tune-cost-q")): v for k, v in first.items() if k.startswith("bound-tune")}
    assert sorted(costs) == [0.5, 0.9, 1.0]
    assert first["bound-quantile"] == tightest_within(costs, 0.1) == learner.quantile
    assert seen.count(20) >= 2 * 3 * 2  # 3 candidates x 2 folds: init, optimise (and evaluate) on 20 images each
    # later rounds and the resumed run keep the choice without measuring again
    assert second["bound-quantile"] == third["bound-quantile"] == first["bound-quantile"]
    assert not any(k.startswith("bound-tune") for k in (*second, *third))
    np.testing.assert_array_equal(wrapper.state_dict()["bounds-learner/quantile"], [learner.quantile])


def test_bounds_tune_quantiles_are_checked_up_front():
    # Prepare / Execute / Assert: a value that is not a number, one outside (0, 1], an empty list
    with pytest.raises(ConfigError, match=r"bounds-tune-quantiles='0.9,abc': 'abc' is not a number"):
        RunConfig.from_mapping({"bounds-tune-quantiles": "0.9,abc"})
    with pytest.raises(ConfigError, match=r"1.5 is not in \(0, 1\]"):
        RunConfig.from_mapping({"bounds-tune-quantiles": "1.5"})
    with pytest.raises(ConfigError, match="at least one quantile"):
        RunConfig.from_mapping({"bounds-tune-quantiles": " , "})
    with pytest.raises(ConfigError, match="allowed values: none, holdout"):
        RunConfig.from_mapping({"bounds-tune": "oracle"})
