"""The honest local training path: FedProx's proximal term on hand-computable steps."""

from __future__ import annotations

import torch

from fedsec.models.prompt import PromptCLIP, PromptLearner
from fedsec.training import train_on_features


def _model(random_clip) -> PromptCLIP:
    learner = PromptLearner(random_clip.model, random_clip.tokenizer, ["cat", "dog", "bird"], 4, "", seed=1)
    return PromptCLIP(random_clip, learner)


def test_proximal_term_adds_mu_times_the_drift_to_the_gradient(random_clip):
    # Prepare: plain SGD (no momentum), the same batches; step 1 starts at the anchor (no proximal gradient),
    # so after step 2 the runs differ by exactly lr * mu * (ctx_1 - ctx_0)
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(
        torch.randn(12, random_clip.model.text_projection.shape[1], generator=g), dim=-1
    )
    labels = torch.tensor([0, 1, 2] * 4)
    lr, mu = 0.5, 3.0
    plain, prox, one = _model(random_clip), _model(random_clip), _model(random_clip)
    start = plain.prompt_learner.ctx.detach().clone()

    # Execute
    train_on_features(one, feats, labels, 1, 12, lr, momentum=0.0, seed=7)
    train_on_features(plain, feats, labels, 2, 12, lr, momentum=0.0, seed=7)
    train_on_features(prox, feats, labels, 2, 12, lr, momentum=0.0, seed=7, proximal_mu=mu)

    # Assert
    drift = one.prompt_learner.ctx.detach() - start
    expected = plain.prompt_learner.ctx.detach() - lr * mu * drift
    torch.testing.assert_close(prox.prompt_learner.ctx.detach(), expected, rtol=1e-5, atol=1e-6)
    assert drift.abs().max() > 1e-4  # the case is not trivial


def test_zero_mu_is_the_plain_path_bit_for_bit(random_clip):
    # Prepare
    feats = torch.nn.functional.normalize(torch.randn(9, random_clip.model.text_projection.shape[1]), dim=-1)
    labels = torch.tensor([0, 1, 2] * 3)
    a, b = _model(random_clip), _model(random_clip)
    # Execute
    train_on_features(a, feats, labels, 5, 4, 0.01, seed=3)
    train_on_features(b, feats, labels, 5, 4, 0.01, seed=3, proximal_mu=0.0)
    # Assert
    assert torch.equal(a.prompt_learner.ctx, b.prompt_learner.ctx)
