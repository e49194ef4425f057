"""CLIP-Adapter's visual adapter on the frozen image features (Gao et al., IJCV 2024, arXiv 2110.04544).

A bottleneck MLP without biases, ``A(f) = ReLU(ReLU(f W_down^T) W_up^T)``, blended with the
frozen feature by a residual ratio: ``f' = ratio * A(f) + (1 - ratio) * f`` (the authors'
``clip_adapter.py``: reduction 4, ratio 0.2, PyTorch's default Linear initialisation), then
L2-normalised for the cosine logits. The authors apply it to the unnormalised encoder output;
``A`` is positively homogeneous (no biases, ReLU), so ``f'`` scales with ``f`` and applying it to
the L2-normalised features (what fedsec caches) gives the same normalised ``f'``. The encoder
stays frozen and its features stay cacheable: only ``A``'s two matrices are learned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FeatureAdapter(nn.Module):
    """CLIP-Adapter's visual adapter.

    Parameters
    ----------
    width : int
        Image feature width (the CLIP embedding size).
    reduction : int
        Bottleneck reduction (the authors: 4).
    ratio : float
        Residual ratio of the adapted feature (the authors: 0.2).
    seed : int
        Seeds the initialisation (PyTorch's default for ``nn.Linear``: Kaiming-uniform, ``a = sqrt(5)``).

    Attributes
    ----------
    down, up : nn.Parameter
        ``width / reduction x width`` and ``width x width / reduction``: the learned arrays.
    hidden : nn.Identity
        Marks the bottleneck's hidden activations ``ReLU(f W_down^T)`` as a module (``adapter.hidden``
        under :meth:`~fedsec.models.prompt.PromptCLIP.bound_root`), so activation bounds can clamp them.
    """

    def __init__(self, width: int, reduction: int = 4, ratio: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        if reduction < 1 or width % reduction or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"FeatureAdapter needs reduction | width and ratio in [0, 1]; got {reduction}, {ratio}")
        gen = torch.Generator().manual_seed(seed)
        self.ratio = ratio
        self.down = nn.Parameter(torch.empty(width // reduction, width))
        self.up = nn.Parameter(torch.empty(width, width // reduction))
        for w in (self.down, self.up):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=gen)
        self.hidden = nn.Identity()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """L2-normalised adapted features of (normalised or not) image features ``n x width``."""
        x = F.relu(self.hidden(F.relu(features @ self.down.T)) @ self.up.T)
        return F.normalize(self.ratio * x + (1.0 - self.ratio) * features, dim=-1)


def with_feature_adapter(model, reduction: int = 4, ratio: float = 0.2, seed: int = 0):
    """A new :class:`~fedsec.models.prompt.PromptCLIP` with CLIP-Adapter on ``model``'s frozen CLIP.

    The text prompt is ``model``'s (copied), fixed at its initialisation, as CLIP-Adapter keeps
    the hand-written prompt; only the adapter learns.
    """
    import copy

    from fedsec.models.prompt import PromptCLIP

    width = int(model.clip.model.visual.output_dim)
    adapter = FeatureAdapter(width, reduction, ratio, seed).to(model.clip.device)
    return PromptCLIP(model.clip, copy.deepcopy(model.prompt_learner), learn_ctx=False, feature_adapter=adapter)
