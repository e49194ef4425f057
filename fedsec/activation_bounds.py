"""Activation bounds (Bi & Li, arXiv 2410.17573): learned upper bounds on internal activations.

A backdoor trigger drives some internal activations of the network far above
what clean inputs produce. Clamping every bounded activation ``h`` to
``min(h, tau)`` with per-channel (or per-neuron) upper bounds ``tau`` keeps the
model's behaviour on clean inputs and cuts the trigger's path. The bounds are
initialised from activation statistics on (synthetic) data and optimised to
keep the clamped model's outputs close to the unclamped model's (KL or CE)
while a norm penalty shrinks them. Model parameters never change.

Pure torch, the maths only: the bounds are learned and applied with forward
hooks on named sub-modules of any ``nn.Module`` (fedsec's server learns them on
the open_clip ``CLIP``, see :mod:`fedsec.bounds_clip`; the Flower wrapper that
sends them is :mod:`strategies.bounds_wrapper`). Layer patterns match module
names segment by segment (``*`` matches one segment), e.g.
``visual.transformer.resblocks.*`` or ``transformer.resblocks.*`` (the text
encoder, which the prompt classifier reuses), or ``conv1`` in a CNN.

Activations are batch first. Per-neuron bounds have the shape of one sample's
activation; per-channel bounds need the channel dimension said explicitly
(``channel_dim``): ``-1`` for transformer tokens ``(batch, tokens, channels)``,
``1`` for conv maps ``(batch, channels, height, width)``. A per-channel bound
has shape ``(C,)`` on the last dimension and ``(C, 1, ..., 1)`` on an earlier
one, so it broadcasts against the layer's output and travels without the
dimension beside it.

Optionally the bounds are two-sided: an entry named ``<layer>@lower`` holds a
lower bound of the same shape, applied as ``max(h, lo)`` (``@`` cannot occur in a
module name). Residual-stream activations are signed, so an upper bound alone
lets a trigger's abnormally *low* activations through.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: The image encoder's transformer block outputs (open_clip ViT).
DEFAULT_LAYERS = ("visual.transformer.resblocks.*",)
GRANULARITIES = ("channel", "neuron")
#: Suffix of a lower-bound entry: ``"<layer>@lower"`` clamps ``<layer>``'s output from below.
LOWER = "@lower"


def split_name(name: str) -> tuple[str, bool]:
    """``(layer, is_lower)`` of a bound entry's name."""
    return (name[: -len(LOWER)], True) if name.endswith(LOWER) else (name, False)


def match_layer(name: str, pattern: str) -> bool:
    """Whether module ``name`` matches ``pattern`` segment by segment (``*`` = one segment)."""
    parts, pats = name.split("."), pattern.split(".")
    return len(parts) == len(pats) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pats, strict=True))


def resolve_layers(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the sub-modules of ``model`` matching any of ``patterns``, in module order.

    Raises
    ------
    ValueError
        When a pattern matches no module.
    """
    names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if match_layer(n, pattern)]
        if not hits:
            raise ValueError(f"activation-bound layer pattern {pattern!r} matches no module of {type(model).__name__}")
        out += [n for n in hits if n not in out]
    order = {n: i for i, n in enumerate(names)}
    return sorted(out, key=order.__getitem__)


class ActivationBounds(nn.Module):
    """Upper bounds ``tau``, one tensor per bounded layer.

    A bound's shape is the trailing shape of the layer's output it clamps:
    ``(D,)`` per channel, ``(L, D)`` per neuron (token x channel); ``+inf``
    entries leave an activation free. An entry named ``<layer>@lower`` (see
    :data:`LOWER`) is a lower bound on ``<layer>`` (``-inf`` leaves it free).

    Parameters
    ----------
    taus : Mapping[str, torch.Tensor]
        Layer name (or ``<layer>@lower``) -> bound tensor.
    """

    def __init__(self, taus: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.names = list(taus)
        self.tau = nn.ParameterList(
            [nn.Parameter(torch.as_tensor(t, dtype=torch.float32).clone()) for t in taus.values()]
        )

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(layer name, tau)`` pairs."""
        return zip(self.names, self.tau, strict=True)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Layer name -> ``float32`` numpy copy (what travels in an ``ArrayRecord``)."""
        return {n: t.detach().cpu().numpy().astype(np.float32).copy() for n, t in self.items()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ActivationBounds:
        """Rebuild from :meth:`to_arrays` output."""
        return cls({n: torch.from_numpy(np.asarray(a, dtype=np.float32).copy()) for n, a in arrays.items()})

    def digest(self) -> str:
        """SHA-256 of names and values (a cache key for features computed under these bounds)."""
        h = hashlib.sha256()
        for name, arr in self.to_arrays().items():
            h.update(name.encode())
            h.update(str(arr.shape).encode())
            h.update(arr.tobytes())
        return h.hexdigest()


def channel_axis(ndim: int, channel_dim: int | None, name: str = "") -> int:
    """The non-negative channel axis of an activation with ``ndim`` dimensions (batch first).

    Parameters
    ----------
    ndim : int
        Dimensions of the activation, batch included.
    channel_dim : int or None
        The channel dimension as given (negative counts from the end). ``None``
        is accepted only for ``(batch, features)`` activations, where it is 1.
    name : str
        The layer (error messages).

    Returns
    -------
    int
        The axis, in ``[1, ndim)``.

    Raises
    ------
    ValueError
        When ``channel_dim`` is ``None`` for an activation of more than 2
        dimensions (ambiguous: tokens or conv channels?), out of range, or the
        batch dimension.
    """
    if channel_dim is None:
        if ndim == 2:
            return 1
        raise ValueError(
            f"layer {name!r}: per-channel bounds on {ndim}-d activations are ambiguous; pass channel_dim "
            "(-1 for transformer tokens (batch, tokens, channels), 1 for conv maps (batch, channels, height, width))"
        )
    if not -ndim <= channel_dim < ndim:
        raise ValueError(f"layer {name!r}: channel_dim {channel_dim} is out of range for {ndim}-d activations")
    axis = channel_dim % ndim
    if axis == 0:
        raise ValueError(f"layer {name!r}: channel_dim {channel_dim} is the batch dimension")
    return axis


def unit_rows(
    acts: torch.Tensor, granularity: str, channel_dim: int | None = None, name: str = ""
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Activations as ``(observations, units)`` rows, and the shape of the bound of one layer.

    Parameters
    ----------
    acts : torch.Tensor
        One layer's activations, batch first.
    granularity : str
        ``"neuron"``: one unit per entry of a sample's activation (bound shape
        ``acts.shape[1:]``); ``"channel"``: one unit per channel along
        ``channel_dim``, shared by every other position (bound shape ``(C,)``
        on the last dimension, ``(C, 1, ..., 1)`` on an earlier one).
    channel_dim : int or None
        See :func:`channel_axis` (``"channel"`` only).
    name : str
        The layer (error messages).

    Returns
    -------
    tuple
        ``rows`` of shape ``(observations, units)`` and the bound's shape.

    Examples
    --------
    >>> rows, shape = unit_rows(torch.zeros(2, 3, 4, 5), "channel", channel_dim=1)
    >>> tuple(rows.shape), shape
    ((40, 3), (3, 1, 1))
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}")
    if granularity == "neuron":
        return acts.reshape(acts.shape[0], -1), tuple(acts.shape[1:])
    axis = channel_axis(acts.dim(), channel_dim, name)
    channels = acts.shape[axis]
    rows = acts.movedim(axis, -1).reshape(-1, channels)
    return rows, (channels, *([1] * (acts.dim() - 1 - axis)))


def bound_fits(tau_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> bool:
    """Whether a bound of ``tau_shape`` applies to a layer output of ``out_shape``.

    It does when it equals the output's trailing shape (per neuron, or per
    channel on the last dimension), or when it is ``(C, 1, ..., 1)`` with ``C``
    the size of the output's dimension it lines up with (per channel on an
    earlier dimension, e.g. conv channels).
    """
    k = len(tau_shape)
    if k > len(out_shape):
        return False
    tail = tuple(out_shape[len(out_shape) - k :])
    if tuple(tau_shape) == tail:
        return True
    return k > 1 and tau_shape[0] == tail[0] and all(s == 1 for s in tau_shape[1:])


def clamp(h: torch.Tensor, tau: torch.Tensor, lower: bool = False) -> torch.Tensor:
    """``min(h, tau)`` (``max(h, tau)`` when ``lower``), ``tau`` broadcast over the leading (batch) dimensions."""
    tau = tau.to(h.device, h.dtype)
    return torch.maximum(h, tau) if lower else torch.minimum(h, tau)


@contextlib.contextmanager
def bounded(model: nn.Module, bounds: ActivationBounds | Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """Apply ``bounds`` to ``model`` (forward hooks) inside the ``with`` block; ``None`` does nothing.

    ``bounds`` is an :class:`ActivationBounds` or a mapping layer name -> tensor
    (``<layer>@lower`` entries clamp from below).

    Gradients flow to ``tau`` where an activation is clamped, and to the input
    where it is not. The hooks are removed on exit, even after an exception.
    """
    if bounds is None:
        yield
        return
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, tau in bounds.items():
            layer, lower = split_name(name)
            if layer not in modules:
                raise ValueError(f"bounded layer {layer!r} is not a module of {type(model).__name__}")
            handles.append(modules[layer].register_forward_hook(_clamp_hook(name, tau, lower)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _clamp_hook(name: str, tau: torch.Tensor, lower: bool = False) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"layer {name!r} returns {type(output).__name__}; only tensor outputs can be bounded")
        if not bound_fits(tuple(tau.shape), tuple(output.shape)):
            raise ValueError(f"bound of {name!r} has shape {tuple(tau.shape)}; output shape {tuple(output.shape)}")
        return clamp(output, tau, lower)

    return hook


@torch.no_grad()
def collect_activations(
    model: nn.Module,
    forward: Callable[[torch.Tensor], object],
    images: torch.Tensor,
    layers: Sequence[str],
    batch_size: int = 128,
) -> dict[str, torch.Tensor]:
    """Outputs of ``layers`` while ``forward`` runs over ``images`` (batched), concatenated on dim 0 (CPU)."""
    modules = dict(model.named_modules())
    store: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = [
        modules[n].register_forward_hook(lambda m, a, out, n=n: store[n].append(out.detach().float().cpu()))
        for n in layers
    ]
    try:
        for i in range(0, len(images), batch_size):
            forward(images[i : i + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    return {n: torch.cat(v) for n, v in store.items()}


def init_bounds(
    model: nn.Module,
    forward: Callable[[torch.Tensor], object],
    images: torch.Tensor,
    layers: Sequence[str],
    granularity: str = "channel",
    quantile: float = 1.0,
    margin: float = 0.0,
    two_sided: bool = False,
    channel_dim: int | None = None,
) -> ActivationBounds:
    """Bounds from activation statistics: the ``quantile`` of each channel (or neuron) on ``images``.

    Bi & Li (arXiv 2410.17573) initialise the bounds of each unit from the
    activations the model produces on (synthetic) data.

    Parameters
    ----------
    model : nn.Module
        Owns the ``layers``.
    forward : callable
        Runs the model on a batch of images (e.g. ``clip.encode_images``).
    images : torch.Tensor
        The (synthetic) data.
    layers : sequence of str
        Module names (see :func:`resolve_layers`).
    granularity : str
        ``"channel"`` (one bound per channel along ``channel_dim``, shared by the
        other positions) or ``"neuron"`` (one per position and channel); see
        :func:`unit_rows`.
    quantile : float
        1.0 = the maximum (the clamps are then a no-op on ``images``).
    margin : float
        Added to every bound, in units of the layer's activation standard deviation.
    two_sided : bool
        Also add lower bounds ``<layer>@lower`` at the ``1 - quantile`` (the
        minimum for 1.0), minus the margin.
    channel_dim : int, optional
        The channel dimension of the activations for ``"channel"``: ``-1`` for
        transformer tokens, ``1`` for conv maps. Required when an activation
        has more than 2 dimensions (see :func:`channel_axis`).

    Raises
    ------
    ValueError
        For an unknown granularity, or per-channel bounds on activations of
        more than 2 dimensions without ``channel_dim``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}")
    acts = collect_activations(model, forward, images, layers)
    taus: dict[str, torch.Tensor] = {}
    for name, a in acts.items():
        flat, shape = unit_rows(a, granularity, channel_dim, name)
        if quantile >= 1.0:
            upper, low = flat.amax(0), (flat.amin(0) if two_sided else None)
        else:  # torch.quantile takes at most 2^24 elements: a seeded subsample of rows
            rows = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))[:200_000]]
            upper = torch.quantile(rows, quantile, dim=0)
            low = torch.quantile(rows, 1.0 - quantile, dim=0) if two_sided else None
        taus[name] = (upper + margin * a.std()).reshape(shape)
        if low is not None:
            taus[name + LOWER] = (low - margin * a.std()).reshape(shape)
    return ActivationBounds(taus)


def unbounded_like(bounds: ActivationBounds) -> ActivationBounds:
    """Bounds of the same layers and shapes, all ``+inf`` (``-inf`` for lower bounds): the clamps are a no-op."""
    return ActivationBounds(
        {n: torch.full_like(t.detach(), -float("inf") if split_name(n)[1] else float("inf")) for n, t in bounds.items()}
    )


def trimmed_mean(values: torch.Tensor, trim: float) -> torch.Tensor:
    """Mean of ``values`` without its ``trim`` fraction of largest entries (at least one entry is kept).

    Raises
    ------
    ValueError
        When ``trim`` is outside ``[0, 1)``.
    """
    if not 0.0 <= trim < 1.0:
        raise ValueError(f"trim must be in [0, 1); got {trim}")
    keep = max(1, len(values) - int(trim * len(values)))
    return torch.sort(values).values[:keep].mean()


def _param_versions(model: nn.Module) -> dict[str, int]:
    return {n: p._version for n, p in model.named_parameters()}


def optimize_bounds(
    model: nn.Module,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    bounds: ActivationBounds,
    steps: int = 50,
    lr: float = 0.05,
    penalty: float = 0.5,
    loss: str = "kl",
    batch_size: int = 64,
    seed: int = 0,
    trim: float = 0.0,
) -> dict[str, float]:
    """Shrink ``bounds`` while the clamped model's outputs stay close to the unclamped model's.

    Minimises ``D(f(x), f_tau(x)) + penalty * mean_l ||tau_l||_2 / ||tau0_l||_2``
    over ``tau`` with Adam (step ``lr`` in units of each layer's initial mean
    ``|tau0|``), where ``D`` is the KL divergence from the unclamped softmax
    (``loss="kl"``) or the cross-entropy to the unclamped prediction
    (``loss="ce"``). Only ``tau`` changes: the model's parameters are checked
    to be untouched (``RuntimeError`` otherwise). Infinite entries stay free.
    Lower bounds (``<layer>@lower``) take the same norm penalty: they sit below
    zero on signed activations, so shrinking their norm raises (tightens) them.
    With ``trim > 0`` the output distance is a trimmed mean: the ``trim``
    fraction of each batch with the largest distance is left out, so a few
    triggered images in the data cannot make the optimisation loosen the bounds
    that cut their trigger (their outputs change most under the clamps).

    Parameters
    ----------
    model : nn.Module
        The bounded model (parameters frozen).
    logits_fn : callable
        ``images -> logits`` through ``model`` (hooks of :func:`bounded` apply inside it).
    images : torch.Tensor
        The (synthetic) optimisation data.
    bounds : ActivationBounds
        Optimised in place.
    steps, lr, penalty, loss, batch_size, seed, trim
        See above.

    Returns
    -------
    dict
        ``bound-loss`` (mean output distance over the last steps), ``bound-shrink``
        (mean ``||tau||/||tau0||``), ``bound-steps``.
    """
    if loss not in ("kl", "ce"):
        raise ValueError(f"bound loss must be 'kl' or 'ce'; got {loss!r}")
    versions = _param_versions(model)
    finite = [torch.isfinite(t.detach()) for _, t in bounds.items()]
    scale = [
        t.detach()[f].abs().mean().clamp_min(1e-6) if f.any() else torch.tensor(1.0)
        for (_, t), f in zip(bounds.items(), finite, strict=True)
    ]
    # optimise u with tau = tau0 + scale * u: one learning rate fits layers of any magnitude
    tau0 = [
        torch.where(f, t.detach(), torch.zeros_like(t)).clone()
        for (_, t), f in zip(bounds.items(), finite, strict=True)
    ]
    norms0 = [t0.norm().clamp_min(1e-6) for t0 in tau0]
    frees = [  # what a non-finite entry stays: +inf for an upper bound, -inf for a lower one
        torch.full_like(t0, -float("inf") if split_name(n)[1] else float("inf"))
        for n, t0 in zip(bounds.names, tau0, strict=True)
    ]
    u = [torch.zeros_like(t0, requires_grad=True) for t0 in tau0]
    opt = torch.optim.Adam(u, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        targets = torch.cat([logits_fn(images[i : i + 256]).float().cpu() for i in range(0, len(images), 256)])
    dist_hist: list[float] = []
    for _ in range(steps):
        idx = torch.randperm(len(images), generator=gen)[: min(batch_size, len(images))]
        taus = [
            torch.where(f, t0 + s * v, free) for t0, s, v, f, free in zip(tau0, scale, u, finite, frees, strict=True)
        ]
        with bounded(model, dict(zip(bounds.names, taus, strict=True))):  # plain tensors: gradients reach u
            out = logits_fn(images[idx]).float()
        target = targets[idx].to(out.device)
        if loss == "kl":
            per = F.kl_div(F.log_softmax(out, -1), F.log_softmax(target, -1), log_target=True, reduction="none").sum(-1)
        else:
            per = F.cross_entropy(out, target.argmax(-1), reduction="none")
        dist = trimmed_mean(per, trim)
        shrink = torch.stack(
            [torch.where(f, t, torch.zeros_like(t)).norm() / n0 for t, f, n0 in zip(taus, finite, norms0, strict=True)]
        ).mean()
        total = dist + penalty * shrink
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        dist_hist.append(float(dist.detach()))
    with torch.no_grad():
        for (_, t), t0, s, v, f in zip(bounds.items(), tau0, scale, u, finite, strict=True):
            t.copy_(torch.where(f, t0 + s * v, t).to(t.device))
        current = dict(bounds.items())
        for name, t in bounds.items():  # a lower bound never ends above its upper bound
            layer, lower = split_name(name)
            if lower and layer in current:
                t.copy_(torch.minimum(t, current[layer].to(t.device)))
    if _param_versions(model) != versions:
        raise RuntimeError("optimize_bounds changed the model's parameters; only the bounds may change")
    ratios = [
        float(torch.where(f, t.detach(), torch.zeros_like(t)).norm() / n0)
        for (_, t), f, n0 in zip(bounds.items(), finite, norms0, strict=True)
    ]
    tail = dist_hist[-max(1, steps // 5) :] if dist_hist else [0.0]
    return {
        "bound-loss": float(np.mean(tail)),
        "bound-shrink": float(np.mean(ratios)) if ratios else 1.0,
        "bound-steps": float(steps),
    }


def bounds_from_content(content, bounds_key: str) -> ActivationBounds | None:
    """The bounds a server message carries, or ``None``: the client's side of the wrapper's ``bounds_key``.

    Parameters
    ----------
    content : flwr.app.RecordDict
        The received message's content.
    bounds_key : str
        Name of the bounds' ``ArrayRecord`` (``strategies.bounds_wrapper.BoundsWrapper``'s ``bounds_key``).

    Returns
    -------
    ActivationBounds or None
        The bounds (on the CPU), ``None`` when the message has none.
    """
    if bounds_key not in content:
        return None
    return ActivationBounds.from_arrays({k: v.numpy() for k, v in content[bounds_key].items()})


# ----------------------------------------------------------------------------- choosing the quantile, defender-side
def tightest_within(costs: Mapping[float, float], tolerance: float) -> float:
    """The smallest quantile whose cost is at most ``tolerance``; the largest quantile when none is.

    The selection rule of :func:`tune_quantile`: a lower quantile clamps more of every unit's range
    (tighter bounds, more of an unknown trigger's abnormal activations cut), at a cost to clean
    predictions; the defender takes the tightest bounds its clean-cost budget allows, as
    fine-pruning (Liu et al., RAID 2018) prunes until the clean validation accuracy has dropped by a
    set amount.

    Parameters
    ----------
    costs : Mapping[float, float]
        Candidate quantile -> its measured cost (e.g. the share of held-out clean predictions the
        clamps change).
    tolerance : float
        The largest cost accepted.

    Returns
    -------
    float
        The chosen quantile.

    Raises
    ------
    ValueError
        When ``costs`` is empty.

    Examples
    --------
    >>> tightest_within({0.99: 0.0, 0.9: 0.01, 0.8: 0.05}, 0.02)
    0.9
    """
    if not costs:
        raise ValueError("tightest_within needs at least one candidate quantile")
    within = [q for q, c in costs.items() if c <= tolerance]
    return min(within) if within else max(costs)


def class_halves(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded, class-stratified split: ``True`` for the held-out half of every class (``floor(n_c / 2)`` items).

    Parameters
    ----------
    labels : torch.Tensor
        ``N`` integer labels.
    seed : int
        Seeds the permutation within each class.

    Returns
    -------
    torch.Tensor
        ``N`` booleans; a class of one item keeps it on the fitting side.
    """
    gen = torch.Generator().manual_seed(seed)
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        order = idx[torch.randperm(len(idx), generator=gen)]
        held[order[: len(idx) // 2]] = True
    return held


@torch.no_grad()
def accuracy_drop(
    model: nn.Module,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    bounds: ActivationBounds,
    batch_size: int = 256,
) -> float:
    """Accuracy on ``(images, labels)`` without the clamps of ``bounds`` minus with them (0.0 for no images)."""
    if len(images) == 0:
        return 0.0
    free = clamped = 0
    for i in range(0, len(images), batch_size):
        x, y = images[i : i + batch_size], labels[i : i + batch_size].to(images.device)
        free += int((logits_fn(x).argmax(-1).to(y.device) == y).sum())
        with bounded(model, bounds):
            clamped += int((logits_fn(x).argmax(-1).to(y.device) == y).sum())
    return (free - clamped) / len(images)


def tune_quantile(
    model: nn.Module,
    forward: Callable[[torch.Tensor], object],
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    held_out: torch.Tensor,
    layers: Sequence[str],
    quantiles: Sequence[float],
    tolerance: float,
    *,
    granularity: str = "neuron",
    two_sided: bool = False,
    channel_dim: int | None = None,
    **optimize: object,
) -> tuple[float, dict[float, float]]:
    """Choose the bounds' initial quantile with the defender's own data: the tightest within a clean-cost budget.

    Two-fold: for every candidate quantile the bounds are initialised on one half of ``images``
    (:func:`init_bounds`) and optimised on it as the run would (:func:`optimize_bounds` with
    ``optimize``); their cost is the accuracy they take from the model on the other half
    (:func:`accuracy_drop`), averaged over the two ways round (``held_out`` and its complement).
    The chosen quantile is :func:`tightest_within` the ``tolerance``. Nothing but ``images`` and
    ``labels`` is read: on the server these are the synthetic set and its labels (Bi & Li's
    defender holds nothing else), never the clients' or the test images, and the trigger is
    never known.

    Parameters
    ----------
    model, forward, logits_fn
        As for :func:`init_bounds` and :func:`optimize_bounds`.
    images, labels : torch.Tensor
        The defender's labelled images.
    held_out : torch.Tensor
        Booleans: the first fold's held-out images (e.g. :func:`class_halves`); the second fold
        holds out the rest.
    layers : sequence of str
        Module names to bound.
    quantiles : sequence of float
        Candidates, each in ``(0, 1]``.
    tolerance : float
        Largest accepted accuracy drop (a share, 0.02 = 2 points).
    granularity, two_sided, channel_dim
        As for :func:`init_bounds`.
    **optimize
        Keyword arguments of :func:`optimize_bounds` (``steps``, ``lr``, ``penalty``, ...).

    Returns
    -------
    tuple
        The chosen quantile and every candidate's cost.

    Raises
    ------
    ValueError
        For no candidates, or a candidate outside ``(0, 1]``.
    """
    if not quantiles:
        raise ValueError("tune_quantile needs at least one candidate quantile")
    bad = [q for q in quantiles if not 0.0 < q <= 1.0]
    if bad:
        raise ValueError(f"candidate quantiles must be in (0, 1]; got {bad}")
    held_out = held_out.to(images.device)
    folds = [(~held_out, held_out), (held_out, ~held_out)]
    costs: dict[float, float] = {}
    for q in quantiles:
        drops = []
        for fit, evaluate in folds:
            bounds = init_bounds(
                model, forward, images[fit], layers, granularity, q, two_sided=two_sided, channel_dim=channel_dim
            ).to(images.device)
            optimize_bounds(model, logits_fn, images[fit], bounds, **optimize)  # type: ignore[arg-type]
            drops.append(accuracy_drop(model, logits_fn, images[evaluate], labels[evaluate.cpu()], bounds))
        costs[float(q)] = float(np.mean(drops))
    return tightest_within(costs, tolerance), costs
