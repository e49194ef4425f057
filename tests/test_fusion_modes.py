"""Server fusion modes: ``kd`` (FedDF distillation), ``init`` (pre-trained initial prompt), ``tune`` unchanged.

FM-FL (Li et al., arXiv 2401.10375; Bi & Li, arXiv 2410.17573) fuses the global model with a foundation
model's synthetic data by initialisation and by distillation of the clients' ensemble (FedDF, Lin et al.,
NeurIPS 2020). A tiny linear stand-in for the prompt model (logits = features @ ctx.T) keeps every logit
computable by hand and the tests at a fraction of a second each.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Error
from flwr.serverapp.strategy import FedAvg

import strategies.fusion as fusion_mod
from fedsec.training import LocalData, train_on_features
from strategies.base import RoundUpdates, RuleOutput, UpdateRule
from strategies.fusion import (
    FUSIONS,
    ServerFusion,
    distillation_loss,
    ensemble_teacher,
    kd,
    server_fusion,
    tune,
)
from strategies.validation import Validated
from tests.strategy_helpers import configure, ctx_of, make_sctx, replies_to, run_round, snapshot, train_content

#: FedAvg sampling that accepts one node.
SMALL = {"fraction_evaluate": 0.0, "min_train_nodes": 1, "min_available_nodes": 1}
N_CLS, DIM, N_IMG = 3, 4, 24


class LinearPrompt(torch.nn.Module):
    """A stand-in prompt model: ``ctx`` is the ``C x E`` class-weight matrix, logits are ``features @ ctx.T``.

    Parameters
    ----------
    ctx : np.ndarray
        The initial ``C x E`` context.
    """

    def __init__(self, ctx: np.ndarray) -> None:
        super().__init__()
        self.prompt_learner = torch.nn.Module()
        self.prompt_learner.ctx = torch.nn.Parameter(torch.tensor(ctx, dtype=torch.float32))

    def logits_from_features(self, features: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``features`` under ``ctx`` (the model's own when ``None``)."""
        return features @ (self.prompt_learner.ctx if ctx is None else ctx).T

    def learned(self) -> dict[str, torch.nn.Parameter]:
        """The learned arrays (``PromptCLIP.learned``): ``ctx`` alone."""
        return {"ctx": self.prompt_learner.ctx}

    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        """No feature adapter (``PromptCLIP.adapt``)."""
        return features

    #: Its image path learns nothing (``PromptCLIP.needs_images``): the fusions use the cached features.
    needs_images = False


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic features ``N x E`` and labels (every class present)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N_IMG, DIM, generator=gen), torch.arange(N_IMG) % N_CLS


def _set(features: torch.Tensor, labels: torch.Tensor) -> LocalData:
    """The synthetic set as the fusions take it (the stand-in's "images" are its features)."""
    return LocalData(features, labels, features)


def _ctx(seed: int) -> np.ndarray:
    """A random ``C x E`` context."""
    return np.random.default_rng(seed).normal(size=(N_CLS, DIM)).astype(np.float32)


def _sctx(mode: str, **extra: object):
    """A strategy context for ``server-fusion = mode`` with batches of 8 and a stub synthetic set."""
    sctx = make_sctx("fedavg", 3, **{"server-fusion": mode, "fusion-steps": 5, "fusion-lr": 0.1, **extra})
    sctx = dataclasses.replace(sctx, cfg=dataclasses.replace(sctx.cfg, batch_size=8))
    features, labels = _data()
    calls: list[int] = []

    def synthetic():
        calls.append(1)
        return SimpleNamespace(images=features, labels=labels, classnames=["a", "b", "c"])

    sctx.synthetic_data = synthetic
    return sctx, calls


@pytest.fixture
def stand_in(monkeypatch):
    """The factory's server-side model is a :class:`LinearPrompt` whose image "encoder" is the identity."""
    clip = SimpleNamespace(encode_images_batched=lambda images: images.clone())
    monkeypatch.setattr(fusion_mod, "synthetic_prompt_model", lambda cfg, synthetic: (clip, LinearPrompt(_ctx(99))))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- (a) kd: the teacher and the student
_S = 1 + math.sqrt(2) + math.sqrt(3)  # softmax(log(x) / 2) = sqrt(x) / sum(sqrt(x)), the same sum for A and B


@pytest.mark.parametrize(
    ("temperature", "expected"),
    [
        (1.0, [1 / 3, 1 / 3, 1 / 3]),  # mean of (1, 2, 3) / 6 and (3, 2, 1) / 6
        (2.0, [(1 + math.sqrt(3)) / 2 / _S, math.sqrt(2) / _S, (1 + math.sqrt(3)) / 2 / _S]),
    ],
)
def test_probs_teacher_is_the_mean_of_the_clients_softmaxes_at_temperature_t(temperature, expected):
    """``average="probs"``: mean over clients of ``softmax(z_k / T)``, computed by hand."""
    # Prepare: client A has logits log(1, 2, 3) (softmax 1/6, 2/6, 3/6), client B the reverse
    a = torch.log(torch.tensor([[1.0, 2.0, 3.0]]))
    b = torch.log(torch.tensor([[3.0, 2.0, 1.0]]))

    # Execute
    teacher = ensemble_teacher([a, b], temperature, average="probs")

    # Assert
    np.testing.assert_allclose(teacher.numpy(), [expected], rtol=1e-6)


def test_logits_teacher_is_the_softmax_of_the_clients_mean_logits():
    """``average="logits"`` (FedDF's AvgLogits, the default): ``softmax(mean_k z_k / T)``, computed by hand."""
    # Prepare: the mean logits are log(sqrt 3, 2, sqrt 3)
    a = torch.log(torch.tensor([[1.0, 2.0, 3.0]]))
    b = torch.log(torch.tensor([[3.0, 2.0, 1.0]]))
    s3 = math.sqrt(3)

    # Execute
    t1 = ensemble_teacher([a, b], 1.0)
    t2 = ensemble_teacher([a, b], 2.0, average="logits")

    # Assert: T = 1 gives (sqrt 3, 2, sqrt 3) / (2 sqrt 3 + 2); T = 2 takes the square roots first
    np.testing.assert_allclose(t1.numpy(), [[s3 / (2 * s3 + 2), 2 / (2 * s3 + 2), s3 / (2 * s3 + 2)]], rtol=1e-6)
    r = [3**0.25, math.sqrt(2), 3**0.25]
    np.testing.assert_allclose(t2.numpy(), [[v / sum(r) for v in r]], rtol=1e-6)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ensemble_teacher([a], 0.0)


def test_distillation_loss_is_t_squared_kl_from_teacher_to_student():
    """``T^2 KL(p || softmax(z / T))`` with the batch mean, against numpy."""
    # Prepare
    z = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, -1.0]])
    p = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    q = _softmax(z.numpy() / 2.0)

    # Execute
    loss = float(distillation_loss(z, p, 2.0))

    # Assert
    expected = 4.0 * np.mean(np.sum(p.numpy() * (np.log(p.numpy()) - np.log(q)), axis=-1))
    assert loss == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("teacher", ["logits", "probs"])
def test_kd_moves_the_student_towards_the_clients_ensemble(teacher):
    """After ``fusion-steps`` steps the student's KL to the hand-built teacher is lower than at the aggregate."""
    # Prepare: two client contexts and a student elsewhere (with this linear stand-in the clients' mean
    # context has exactly the mean logits; a real prompt's text encoder is not linear)
    sctx, _ = _sctx("kd", **{"fusion-steps": 30, "fusion-temperature": 2.0, "fusion-teacher": teacher})
    features, labels = _data()
    clients = [_ctx(1), _ctx(2)]
    student = LinearPrompt(_ctx(3))
    logits = [features.numpy() @ c.T for c in clients]
    if teacher == "logits":
        p = _softmax(np.mean(logits, axis=0) / 2.0)
    else:
        p = np.mean([_softmax(z / 2.0) for z in logits], axis=0)

    def kl_to_teacher(ctx: np.ndarray) -> float:
        q = _softmax(features.numpy() @ ctx.T / 2.0)
        return float(4.0 * np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))

    before = kl_to_teacher(student.prompt_learner.ctx.detach().numpy())

    # Execute
    stats = kd(student, _set(features, labels), sctx.cfg, seed=7, client_arrays=[{"ctx": c} for c in clients])

    # Assert: the stats report the same KL as computed by hand, and it fell
    after = kl_to_teacher(student.prompt_learner.ctx.detach().numpy())
    assert stats["fusion-kl-before"] == pytest.approx(before, rel=1e-4)
    assert stats["fusion-kl-after"] == pytest.approx(after, rel=1e-4)
    assert after < 0.5 * before and stats["fusion-teachers"] == 2.0


def test_kd_without_clients_keeps_the_aggregate():
    """No client prompt this round: nothing to distil, the student is unchanged."""
    # Prepare
    sctx, _ = _sctx("kd")
    features, labels = _data()
    student = LinearPrompt(_ctx(3))

    # Execute
    stats = kd(student, _set(features, labels), sctx.cfg, seed=0, client_arrays=[])

    # Assert
    assert stats == {}
    np.testing.assert_array_equal(student.prompt_learner.ctx.detach().numpy(), _ctx(3))


# ----------------------------------------------------------------------------- (b) kd ignores the labels
def test_kd_ignores_the_synthetic_labels():
    """Permuted (or poisoned) labels change nothing: kd sees only the images."""
    # Prepare
    sctx, _ = _sctx("kd")
    features, labels = _data()
    clients = [_ctx(1), _ctx(2), _ctx(4)]
    permuted = labels[torch.randperm(N_IMG, generator=torch.Generator().manual_seed(5))]
    assert not torch.equal(permuted, labels)
    one, two = LinearPrompt(_ctx(3)), LinearPrompt(_ctx(3))

    # Execute
    teachers = [{"ctx": c} for c in clients]
    s1 = kd(one, _set(features, labels), sctx.cfg, seed=11, client_arrays=teachers)
    s2 = kd(two, _set(features, permuted), sctx.cfg, seed=11, client_arrays=teachers)

    # Assert: bit-identical prompts and statistics
    assert torch.equal(one.prompt_learner.ctx, two.prompt_learner.ctx)
    assert s1 == s2
    assert not np.array_equal(one.prompt_learner.ctx.detach().numpy(), _ctx(3))


# ----------------------------------------------------------------------------- (c) tune is unchanged
def test_tune_is_train_on_features_with_the_fusion_keys():
    """``tune`` makes exactly today's ``train_on_features`` call (same steps, lr, momentum, no decay, seed)."""
    # Prepare
    sctx, _ = _sctx("tune")
    cfg = sctx.cfg
    features, labels = _data()
    ours, reference = LinearPrompt(_ctx(3)), LinearPrompt(_ctx(3))

    # Execute
    stats = tune(ours, _set(features, labels), cfg, 123)
    ref = train_on_features(reference, features, labels, 5, 8, 0.1, cfg.momentum, 0.0, 123)

    # Assert
    assert torch.equal(ours.prompt_learner.ctx, reference.prompt_learner.ctx)
    assert stats == {"fusion-loss": ref["train-loss"], "fusion-acc": ref["train-acc"]}


def test_the_tune_wrapper_fuses_every_aggregate_with_the_round_seed(stand_in):
    """Through the factory: round ``r`` tunes with seed ``seed * 7919 + r``; the fusion gets no client arrays."""
    # Prepare
    sctx, _ = _sctx("tune")
    strategy = server_fusion(FedAvg(**SMALL), sctx)
    features, labels = _data()
    start = _ctx(3)
    reference = LinearPrompt(start)
    train_on_features(reference, features, labels, 5, 8, 0.1, sctx.cfg.momentum, 0.0, sctx.cfg.seed * 7_919 + 3)

    # Execute
    fused, stats = strategy.fuse({"ctx": start}, 3)

    # Assert
    assert isinstance(strategy, ServerFusion) and strategy.pass_clients is False and strategy.prepare is None
    np.testing.assert_array_equal(fused["ctx"], reference.prompt_learner.ctx.detach().numpy())
    assert set(stats) == {"fusion-loss", "fusion-acc"}


# ----------------------------------------------------------------------------- (d) init
def test_init_pretrains_the_initial_prompt_and_leaves_later_aggregates_alone(stand_in):
    """``init``: the initial ctx is CE-trained ``fusion-init-steps`` steps (seed ``seed * 7919``); aggregates pass."""
    # Prepare
    sctx, calls = _sctx("init", **{"fusion-init-steps": 12})
    strategy = Validated(server_fusion(FedAvg(**SMALL), sctx))  # a wrapper outside, as in the ServerApp
    start = _ctx(3)
    other = np.arange(3, dtype=np.float32)
    features, labels = _data()
    reference = LinearPrompt(start)
    train_on_features(reference, features, labels, 12, 8, 0.1, sctx.cfg.momentum, 0.0, sctx.cfg.seed * 7_919)
    contents = {1: train_content(_ctx(1)), 2: train_content(_ctx(2))}

    # Execute: the ServerApp's hook (found through the outer wrapper), then one round
    hook = getattr(strategy, "initial_arrays", None)
    initial = hook(ArrayRecord({"ctx": Array(start), "other": Array(other)}))
    n_calls = len(calls)
    arrays, metrics, _ = run_round(strategy, start, contents)
    plain, plain_metrics, _ = run_round(Validated(FedAvg(**SMALL)), start, contents)

    # Assert: a changed initial prompt (= the reference), other arrays kept; the aggregate is FedAvg's
    assert getattr(FedAvg(), "initial_arrays", None) is None  # Flower's strategies have no hook
    assert not np.array_equal(ctx_of(initial), start)
    np.testing.assert_array_equal(ctx_of(initial), reference.prompt_learner.ctx.detach().numpy())
    np.testing.assert_array_equal(initial["other"].numpy(), other)
    np.testing.assert_array_equal(ctx_of(arrays), ctx_of(plain))
    assert dict(metrics.items()) == dict(plain_metrics.items())
    assert n_calls == 1 and len(calls) == 1  # the synthetic data was used once, before round 1


@pytest.mark.parametrize("mode", ["tune", "kd"])
def test_round_fusions_leave_the_initial_arrays_alone(stand_in, mode):
    """``tune`` and ``kd`` have no initial step: the hook returns its input and builds nothing."""
    # Prepare
    sctx, calls = _sctx(mode)
    arrays = ArrayRecord({"ctx": Array(_ctx(3))})

    # Execute
    out = server_fusion(FedAvg(**SMALL), sctx).initial_arrays(arrays)

    # Assert
    assert out is arrays and calls == []


# ----------------------------------------------------------------------------- (e) the client arrays
class DropNegative(UpdateRule):
    """A test rule: mean of the updates whose first coordinate is not negative (the others excluded)."""

    detects = True
    metrics_of_excluded = False

    def aggregate_updates(self, round_updates: RoundUpdates) -> RuleOutput:
        keep = (round_updates.updates[:, 0] >= 0).astype(np.float64)
        return RuleOutput((keep[:, None] * round_updates.updates).sum(axis=0) / keep.sum(), keep)


def test_the_wrapper_passes_every_accepted_replys_array_and_mutates_no_reply():
    """Every reply the rule aggregated reaches the fusion (errors and excluded nodes do not); replies unchanged."""
    # Prepare: node 3 is excluded by the rule (negative update), node 4 sent an error
    seen: dict = {}

    def fuse(arrays, server_round, client_arrays):
        seen.update(ctx=arrays["ctx"], round=server_round, clients=[c["ctx"] for c in client_arrays])
        for c in client_arrays:
            c["ctx"] += 100.0  # the fusion owns its copies
        return {"ctx": arrays["ctx"] + 1.0}, {"fusion-x": 1.0}

    rule = DropNegative(**SMALL)
    strategy = ServerFusion(rule, fuse, "kd", "ctx", arrayrecord_key="arrays", pass_clients=True)
    values = {1: np.full((2, 2), 1.0, np.float32), 2: np.full((2, 2), 3.0, np.float32)}
    values[3] = np.full((2, 2), -5.0, np.float32)
    contents = {n: train_content(v) for n, v in values.items()}
    contents[4] = Error(code=0, reason="boom")
    instructions = configure(strategy, np.zeros((2, 2), np.float32), sorted(contents))
    replies = replies_to(instructions, contents)
    before = snapshot(replies)

    # Execute: the replies arrive as a one-shot iterator (materialised once by the wrapper)
    arrays, metrics = strategy.aggregate_train(2, iter(replies))

    # Assert: the rule saw all replies (its detection names node 3), the fusion got nodes 1 and 2
    assert [int(n) for n in rule.detection.excluded] == [3]
    assert seen["round"] == 2 and len(seen["clients"]) == 2
    np.testing.assert_array_equal(seen["clients"][0], values[1] + 100.0)
    np.testing.assert_array_equal(seen["clients"][1], values[2] + 100.0)
    np.testing.assert_array_equal(seen["ctx"], np.full((2, 2), 2.0, np.float32))
    np.testing.assert_array_equal(ctx_of(arrays), np.full((2, 2), 3.0, np.float32))
    assert metrics["fusion-x"] == 1.0
    assert snapshot(replies) == before


def test_the_kd_wrapper_distils_the_accepted_clients_with_the_round_seed(stand_in):
    """Through the factory: ``kd`` gets the replies' arrays and distils them exactly as :func:`kd` does."""
    # Prepare
    sctx, _ = _sctx("kd", **{"fusion-temperature": 1.5})
    strategy = server_fusion(FedAvg(**SMALL), sctx)
    start = _ctx(3)
    contents = {1: train_content(_ctx(1)), 2: train_content(_ctx(2))}
    features, labels = _data()
    aggregate = np.mean([_ctx(1), _ctx(2)], axis=0)
    reference = LinearPrompt(aggregate)
    teachers = [{"ctx": _ctx(1)}, {"ctx": _ctx(2)}]
    ref_stats = kd(reference, _set(features, labels), sctx.cfg, sctx.cfg.seed * 7_919 + 1, client_arrays=teachers)

    # Execute
    arrays, metrics, _ = run_round(strategy, start, contents)

    # Assert
    assert strategy.pass_clients is True
    np.testing.assert_allclose(strategy.pre_fusion_arrays["ctx"], aggregate, rtol=1e-6)
    np.testing.assert_allclose(ctx_of(arrays), reference.prompt_learner.ctx.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert metrics["fusion-teachers"] == 2.0
    assert metrics["fusion-kl-after"] == pytest.approx(ref_stats["fusion-kl-after"], rel=1e-4)


def test_the_fusion_modes_are_registered():
    """``server-fusion`` offers none, init, kd and tune."""
    assert FUSIONS.names() == ["init", "kd", "tune"]
