"""Norm-difference clipping (Sun et al., 2019, "Can you really backdoor federated learning?").

Each update (client arrays minus global arrays) is scaled down to at most
``clip-norm`` in L2 norm before averaging, which bounds how far one round can
move the global model. Two forms are provided:

* :class:`NormClip`, registered as ``"norm-clip"``: FedAvg over clipped updates
  (the wrapper around Flower's FedAvg);
* :class:`NormClipWrapper`: clipping in front of *any* Flower strategy,
  including a user's own FedAvg subclass.

Examples
--------
Plug a user's own strategy behind norm clipping and register it (in a module
of ``strategies/``, or of a package with a ``fedsec.strategies`` entry point)::

    from flwr.serverapp.strategy import FedAvg

    from strategies.builtin import CLIP_NORM
    from strategies.norm_clip import NormClipWrapper
    from strategies.registry import StrategyContext, register_strategy

    class MyAvg(FedAvg):
        ...  # override aggregate_train as you like

    @register_strategy("my-avg-clipped", params=(CLIP_NORM,))
    def my_avg_clipped(sctx: StrategyContext) -> NormClipWrapper:
        inner = MyAvg(**sctx.fedavg_kwargs())
        return NormClipWrapper(inner, clip_norm=float(sctx.cfg.get("clip-norm")))

Then run with ``strategy = "my-avg-clipped"`` in the run config.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from strategies.builtin import CLIP_NORM
from strategies.common import (
    NDArray,
    StrategyWrapper,
    copy_arrays,
    copy_reply,
    flatten_arrays,
    stack_updates,
    unflatten_arrays,
    with_arrays,
)
from strategies.registry import StrategyContext, register_strategy


def clip_updates(updates: NDArray, clip_norm: float) -> NDArray:
    """Scale each row of ``updates`` to an L2 norm of at most ``clip_norm``.

    Parameters
    ----------
    updates : NDArray
        Shape ``(n, d)``, one update per row.
    clip_norm : float
        The norm bound (> 0).

    Returns
    -------
    NDArray
        New array: ``u * min(1, clip_norm / ||u||)`` per row.
    """
    if clip_norm <= 0:
        raise ValueError("clip_norm must be positive")
    norms = np.linalg.norm(updates, axis=1, keepdims=True)
    scale = np.minimum(1.0, clip_norm / np.maximum(norms, np.finfo(np.float64).tiny))
    return updates * scale


def clip_replies(
    replies: Iterable[Message], global_arrays: ArrayRecord, clip_norm: float, array_key: str
) -> tuple[list[Message], int]:
    """Copies of ``replies`` whose arrays are ``global + clipped update``.

    Parameters
    ----------
    replies : iterable of Message
        Replies as received (never modified); error replies are copied as they are.
    global_arrays : ArrayRecord
        The arrays sent this round.
    clip_norm : float
        The norm bound.
    array_key : str
        Record key of the arrays in the replies.

    Returns
    -------
    tuple[list[Message], int]
        The new replies and how many updates were actually scaled down.
    """
    out: list[Message] = []
    clipped = 0
    base = flatten_arrays(global_arrays, list(global_arrays.keys()))
    for msg in replies:
        if msg.has_error():
            out.append(copy_reply(msg))
            continue
        update = stack_updates([msg.content], global_arrays, array_key)
        if np.linalg.norm(update) > clip_norm:
            clipped += 1
        new = unflatten_arrays(base + clip_updates(update, clip_norm)[0], global_arrays)
        out.append(with_arrays(msg, new, array_key))
    return out, clipped


class NormClipWrapper(StrategyWrapper):
    """Clip updates to ``clip_norm`` in front of any strategy.

    ``configure_*`` and ``aggregate_evaluate`` are delegated to ``inner``;
    ``aggregate_train`` hands ``inner`` copies of the replies whose updates are
    clipped (the received replies are left untouched). Attributes not found
    here (``last_excluded``, ``fraction_train``...) are read from ``inner``.

    Parameters
    ----------
    inner : Strategy
        Any Flower strategy.
    clip_norm : float
        The norm bound of each update.
    array_key : str, optional
        Record key of the arrays; defaults to ``inner.arrayrecord_key`` or ``"arrays"``.
    """

    def __init__(self, inner: Strategy, clip_norm: float, array_key: str | None = None) -> None:
        if clip_norm <= 0:
            raise ValueError("clip_norm must be positive")
        self.inner = inner
        self.clip_norm = clip_norm
        self.array_key = array_key or getattr(inner, "arrayrecord_key", "arrays")
        self.global_arrays: ArrayRecord | None = None

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> Norm clipping wrapper: bound %s", self.clip_norm)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember ``arrays`` and delegate."""
        self.global_arrays = copy_arrays(arrays)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip copies of the replies, then delegate."""
        if self.global_arrays is None:
            raise RuntimeError("NormClipWrapper.aggregate_train needs configure_train to run first")
        clipped_replies, n_clipped = clip_replies(replies, self.global_arrays, self.clip_norm, self.array_key)
        log(INFO, "norm-clip: %d of %d updates clipped to %s", n_clipped, len(clipped_replies), self.clip_norm)
        return self.inner.aggregate_train(server_round, clipped_replies)


class NormClip(NormClipWrapper):
    """FedAvg over updates clipped to ``clip_norm`` (L2): :class:`NormClipWrapper` around Flower's FedAvg.

    Parameters
    ----------
    clip_norm : float
        The norm bound of each update.
    **kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(self, clip_norm: float = 1.0, **kwargs: object) -> None:
        super().__init__(FedAvg(**kwargs), clip_norm)  # type: ignore[arg-type]


@register_strategy("norm-clip", params=(CLIP_NORM,))
def norm_clip(sctx: StrategyContext) -> FedAvg:
    """FedAvg over updates clipped to ``clip-norm``."""
    return NormClip(clip_norm=float(sctx.cfg.get("clip-norm")), **sctx.fedavg_kwargs())
