"""The central frontier (experiments/ceiling_frontier.py): one context trained on CE + lam x backdoor CE."""

from __future__ import annotations

import torch

from experiments.ceiling_frontier import train_point
from fedsec.config import RunConfig


class _Linear(torch.nn.Module):
    """A stand-in prompt model: the context is a class-by-feature matrix, logits = 10 x features @ ctx^T."""

    def __init__(self) -> None:
        super().__init__()
        self.prompt_learner = torch.nn.Module()
        self.prompt_learner.ctx = torch.nn.Parameter(torch.eye(2))

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return 10 * features @ self.prompt_learner.ctx.T


def test_backdoor_weight_moves_triggered_features_to_the_target_and_zero_leaves_them():
    # Prepare: class-1 images on [0, 1]; their triggered features on [0.6, 0.8] (predicted 1 at the start)
    cfg = RunConfig.from_mapping({"lr": 0.05, "batch-size": 4})
    clean = torch.tensor([[0.0, 1.0]] * 8)
    triggered = torch.tensor([[0.6, 0.8]] * 8)
    labels = torch.ones(8, dtype=torch.long)

    def triggered_to_target(lam: float) -> float:
        model = _Linear()
        train_point(model, clean, triggered, labels, 0, lam, cfg, steps=200)
        with torch.no_grad():
            return float((model.logits_from_features(triggered).argmax(-1) == 0).float().mean())

    # Execute
    benign, backdoored = triggered_to_target(0.0), triggered_to_target(5.0)
    # Assert: only the backdoor term sends the triggered images to class 0
    assert benign == 0.0 and backdoored == 1.0
