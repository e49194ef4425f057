"""Triggers: input transforms on ``[0, 1]`` images at the model's resolution.

Every trigger is an ``nn.Module`` mapping a batch ``N x 3 x H x W`` to a batch
of the same shape, with a :meth:`project` that restores its constraint after
an optimisation step, and round-trips through :func:`trigger_to_dict` /
:func:`trigger_from_dict` (plain tensors, so evaluation needs no attack code).
"""

from __future__ import annotations

import torch
from torch import nn


class AdditiveTrigger(nn.Module):
    """``clip(x + delta, 0, 1)`` with ``||delta||_inf <= eps``.

    Parameters
    ----------
    image_size : int
        Square image size.
    eps : float
        L-infinity budget in ``[0, 1]`` pixel space (e.g. ``8/255``).
    delta : torch.Tensor, optional
        Initial perturbation ``3 x H x W`` (default zeros).
    """

    kind = "additive"

    def __init__(self, image_size: int, eps: float, delta: torch.Tensor | None = None) -> None:
        super().__init__()
        self.eps = float(eps)
        init = torch.zeros(3, image_size, image_size) if delta is None else delta.detach().float().clone()
        self.delta = nn.Parameter(init)
        self.project()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.delta).clamp(0.0, 1.0)

    @torch.no_grad()
    def project(self) -> None:
        """Clamp ``delta`` into the L-infinity ball of radius ``eps``."""
        self.delta.clamp_(-self.eps, self.eps)

    def state(self) -> dict:
        return {"kind": self.kind, "eps": self.eps, "delta": self.delta.detach().cpu().clone()}


class PatchTrigger(nn.Module):
    """Paste a (learnable) ``3 x s x s`` patch at ``(top, left)``.

    Parameters
    ----------
    image_size : int
        Square image size.
    size : int
        Patch side in pixels.
    top, left : int
        Location; negative values count from the bottom/right edge.
    patch : torch.Tensor, optional
        Initial patch in ``[0, 1]`` (default: uniform noise from ``seed``).
    seed : int
        Seed of the default init.
    """

    kind = "patch"

    def __init__(
        self,
        image_size: int,
        size: int,
        top: int = -1,
        left: int = -1,
        patch: torch.Tensor | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < size <= image_size:
            raise ValueError(f"patch size {size} must be in (0, {image_size}]")
        self.image_size, self.size = image_size, size
        self.top = top if top >= 0 else image_size - size + top + 1
        self.left = left if left >= 0 else image_size - size + left + 1
        if not (0 <= self.top <= image_size - size and 0 <= self.left <= image_size - size):
            raise ValueError(f"patch at ({top}, {left}) of size {size} does not fit a {image_size}px image")
        if patch is None:
            patch = torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))
        self.patch = nn.Parameter(patch.detach().float().clone())
        mask = torch.zeros(1, image_size, image_size)
        mask[:, self.top : self.top + size, self.left : self.left + size] = 1.0
        self.register_buffer("mask", mask, persistent=False)
        self.project()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = (self.left, self.image_size - self.size - self.left, self.top, self.image_size - self.size - self.top)
        canvas = torch.nn.functional.pad(self.patch.to(x.dtype), pad)
        mask = self.mask.to(x.device, x.dtype)
        return x * (1 - mask) + canvas * mask

    @torch.no_grad()
    def project(self) -> None:
        """Keep the patch a valid image."""
        self.patch.clamp_(0.0, 1.0)

    def state(self) -> dict:
        return {
            "kind": self.kind,
            "image_size": self.image_size,
            "size": self.size,
            "top": self.top,
            "left": self.left,
            "patch": self.patch.detach().cpu().clone(),
        }


class BlendTrigger(nn.Module):
    """``(1 - alpha) x + alpha * pattern`` (the Blended attack).

    Parameters
    ----------
    pattern : torch.Tensor
        ``3 x H x W`` pattern in ``[0, 1]``.
    alpha : float
        Blend weight.
    """

    kind = "blend"

    def __init__(self, pattern: torch.Tensor, alpha: float) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.register_buffer("pattern", pattern.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - self.alpha) * x + self.alpha * self.pattern.to(x.device, x.dtype)

    def project(self) -> None:
        """Nothing to restore: the pattern is fixed."""

    def state(self) -> dict:
        return {"kind": self.kind, "alpha": self.alpha, "pattern": self.pattern.cpu().clone()}


def trigger_to_dict(trigger: nn.Module) -> dict:
    """Plain-tensor description of a trigger."""
    return trigger.state()


def trigger_from_dict(state: dict) -> nn.Module:
    """Rebuild a trigger from :func:`trigger_to_dict`'s output."""
    kind = state["kind"]
    if kind == "additive":
        d = state["delta"]
        return AdditiveTrigger(d.shape[-1], state["eps"], d)
    if kind == "patch":
        return PatchTrigger(state["image_size"], state["size"], state["top"], state["left"], state["patch"])
    if kind == "blend":
        return BlendTrigger(state["pattern"], state["alpha"])
    raise ValueError(f"unknown trigger kind {kind!r}")


def average_triggers(states: list[dict]) -> dict:
    """Average the tensors of same-kind trigger states (colluding attackers' round result)."""
    if not states:
        raise ValueError("no trigger states to average")
    out = dict(states[0])
    for key, value in states[0].items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            out[key] = torch.stack([s[key] for s in states]).mean(0)
    return out
