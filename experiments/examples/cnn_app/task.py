"""The CNN app's model, data, training and bound learner: plain PyTorch, no CLIP, no fedsec prompt code.

A small CNN classifies scikit-learn's 8x8 handwritten digits (bundled with
scikit-learn, no download). The server holds out a seeded tenth of them (its
own clean data, used to learn activation bounds and to evaluate); the clients
split the rest IID by partition id. From fedsec it uses only the activation
bound maths (:mod:`fedsec.activation_bounds`, Bi & Li, arXiv 2410.17573) on
the CNN's conv channels (``channel_dim=1``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedsec.activation_bounds import ActivationBounds, bounded, init_bounds, optimize_bounds

#: The app's own record and metric names (the defenses are told them; none is fedsec's).
ARRAYS_KEY, METRICS_KEY, WEIGHT_KEY, CLIENT_KEY, BOUNDS_KEY = "cnn", "cnn-metrics", "n-examples", "client", "clamps"
#: The bounded layers: the outputs of the two conv blocks, (batch, channels, height, width).
BOUNDED_LAYERS = ("act1", "act2")
#: Partition that sends a boosted, sign-flipped update (FLAME should exclude it).
FLIPPER = 2
#: Partition that sends NaN weights from round 2 on (reply validation should reject it).
MALFORMED = 3


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (8 and 16 channels) and a linear head over 10 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of images ``(batch, 1, 8, 8)``."""
        h = self.act1(self.conv1(x))
        h = self.pool(self.act2(self.conv2(h)))
        return self.fc(h.flatten(1))


def new_model(seed: int = 0) -> SmallCNN:
    """A freshly initialised CNN (seeded)."""
    torch.manual_seed(seed)
    return SmallCNN()


def to_record(model: nn.Module) -> ArrayRecord:
    """The model's ``state_dict`` as an ``ArrayRecord`` (numpy copies, in ``state_dict`` order)."""
    return ArrayRecord({k: Array(v.detach().cpu().numpy().copy()) for k, v in model.state_dict().items()})


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> nn.Module:
    """Load numpy arrays (name -> array, the ``state_dict`` keys) into ``model``; return it."""
    model.load_state_dict({k: torch.from_numpy(np.asarray(v).copy()) for k, v in arrays.items()})
    return model


@lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(images (n, 1, 8, 8) in [0, 1], labels)``, in a seeded order."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    images = torch.from_numpy((data.images[order] / 16.0).astype(np.float32)).unsqueeze(1)
    return images, torch.from_numpy(data.target[order].astype(np.int64))


def server_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The server's held-out digits (the first 180 of the seeded order)."""
    images, labels = digits()
    return images[:180], labels[:180]


def client_split(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Partition ``partition_id`` of the other digits (IID, every ``num_partitions``-th one)."""
    images, labels = digits()
    return images[180 + partition_id :: num_partitions], labels[180 + partition_id :: num_partitions]


def train(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, bounds: ActivationBounds | None, seed: int
) -> float:
    """One epoch of SGD (batch 32, lr 0.1) under the clamps of ``bounds``; the mean loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    losses = []
    with bounded(model, bounds):
        for idx in torch.randperm(len(images), generator=gen).split(32):
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
    return float(np.mean(losses))


@torch.no_grad()
def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, bounds: ActivationBounds | None
) -> tuple[float, float]:
    """Accuracy under the clamps of ``bounds``, and the fraction of bounded activations they clipped.

    The fraction counts, over :data:`BOUNDED_LAYERS`, the activations above
    their channel's bound (what the clamps change); 0 without bounds.
    """
    model.eval()
    above, total = 0, 0
    handles = []
    if bounds is not None:
        taus = dict(bounds.items())
        modules = dict(model.named_modules())

        def count(name: str):
            def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
                nonlocal above, total
                above += int((out > taus[name]).sum())
                total += out.numel()

            return hook

        handles = [modules[n].register_forward_hook(count(n)) for n in taus]
    try:
        with bounded(model, bounds):  # registered after the counters: they see the unclamped outputs
            pred = model(images).argmax(1)
    finally:
        for handle in handles:
            handle.remove()
    return float((pred == labels).float().mean()), (above / total if total else 0.0)


class CnnBoundLearner:
    """``(arrays, round) -> (bounds, metrics)``: per-conv-channel bounds of the new global CNN.

    Every round: upper bounds at the ``quantile`` of each channel's activations
    on the server's clean digits (``channel_dim=1``: one bound per conv
    channel, shape ``(C, 1, 1)``), then ``steps`` optimisation steps that keep
    the clamped CNN's outputs close to the unclamped one's while shrinking the
    bounds (Bi & Li, arXiv 2410.17573). The CNN's weights never change.

    Parameters
    ----------
    images : torch.Tensor
        The server's clean data ``(n, 1, 8, 8)``.
    layers : sequence of str
        Module names of the CNN to bound.
    quantile, steps : float, int
        Initial quantile and optimisation steps per round.
    """

    def __init__(
        self, images: torch.Tensor, layers: Sequence[str] = BOUNDED_LAYERS, quantile: float = 0.99, steps: int = 5
    ) -> None:
        self.images = images
        self.layers = list(layers)
        self.quantile = quantile
        self.steps = steps

    def __call__(self, arrays: dict[str, np.ndarray], server_round: int) -> tuple[dict[str, np.ndarray], dict]:
        """Learn the bounds of the CNN whose weights are ``arrays``."""
        model = load_arrays(SmallCNN(), arrays).eval().requires_grad_(False)
        bounds = init_bounds(model, model, self.images, self.layers, "channel", self.quantile, channel_dim=1)
        stats = optimize_bounds(model, model, self.images, bounds, steps=self.steps, batch_size=64, seed=server_round)
        return bounds.to_arrays(), stats
