"""A Flower strategy wrapper that learns activation bounds after every aggregation and sends them out.

The activation-bound defense (Bi & Li, arXiv 2410.17573) clamps internal
activations of the global model at learned upper (optionally lower) bounds, so
a backdoor trigger's abnormally large activations cannot reach the output.
This wrapper is its Flower side only, generic over the model and the records:

* ``aggregate_train`` delegates to the wrapped strategy, then hands the new
  global arrays named by ``array_keys`` (numpy copies) to a ``learn`` callable
  that returns the bounds (layer name -> array) and scalar metrics, which are
  added to the round's training metrics;
* ``configure_train`` / ``configure_evaluate`` delegate, then add the newest
  bounds as an ``ArrayRecord`` under ``bounds_key`` to every instruction (the
  clients apply them, e.g. with :func:`fedsec.activation_bounds.bounded`, and
  reply with their model arrays only).

Replies are passed on as received (never modified); an aggregate or
instruction without one of ``array_keys`` raises one
:class:`~strategies.common.MissingKeyError` naming the key. The maths that
learns bounds on any ``torch.nn.Module`` is :mod:`fedsec.activation_bounds`;
fedsec's CLIP learner is :mod:`fedsec.bounds_clip`; the registered
``activation-bounds`` wrapper of fedsec's ServerApp is
:mod:`strategies.activation_bound`. ``experiments/examples/cnn_app`` uses this
wrapper around FLAME in a plain PyTorch CNN app. Importing this module loads
no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.common import StrategyWrapper, require_key, select_arrays

#: ``(arrays, server_round) -> (bounds, metrics)``: arrays and bounds map names to numpy arrays.
BoundsLearner = Callable[[dict[str, np.ndarray], int], tuple[dict[str, np.ndarray], Mapping[str, float]]]


def bounds_to_record(bounds: Mapping[str, np.ndarray]) -> ArrayRecord:
    """The ``ArrayRecord`` of ``bounds`` (one ``float32`` array per bounded layer, in order).

    Parameters
    ----------
    bounds : Mapping[str, np.ndarray]
        Layer name (or ``<layer>@lower``) -> bound.

    Returns
    -------
    ArrayRecord
        New arrays, ``float32``.
    """
    return ArrayRecord({name: Array(np.asarray(value, dtype=np.float32)) for name, value in bounds.items()})


class BoundsWrapper(StrategyWrapper):
    """Learn activation bounds after every aggregation of ``inner`` and send them with every instruction.

    Parameters
    ----------
    inner : Strategy
        Any Flower strategy.
    learn : callable
        ``(arrays, server_round) -> (bounds, metrics)``: ``arrays`` maps each
        of ``array_keys`` to a numpy copy of the new global array, ``bounds``
        maps a layer name to its bound, ``metrics`` are scalars added to the
        round's training metrics. If it has a ``load(bounds)`` method, a
        resumed run's bounds are handed to it (see :meth:`load_state_dict`);
        if it has ``state_dict()`` / ``load_state_dict(state)`` (name -> array),
        its own state is checkpointed with the bounds.
    array_keys : sequence of str
        The arrays of the model's ``ArrayRecord`` the learner needs (e.g. every
        key of a CNN's ``state_dict``, or fedsec's prompt array).
    bounds_key : str
        Record key of the bounds in the instructions to the clients (also the
        prefix ``<bounds_key>/`` of the bounds in :meth:`state_dict`).

    Attributes
    ----------
    bounds : dict[str, np.ndarray] or None
        The newest bounds (``None`` before the first aggregation).

    Raises
    ------
    ValueError
        When ``array_keys`` is empty or ``bounds_key`` is empty.
    """

    def __init__(self, inner: Strategy, learn: BoundsLearner, *, array_keys: Sequence[str], bounds_key: str) -> None:
        if isinstance(array_keys, str) or not array_keys:
            raise ValueError(f"BoundsWrapper needs a non-empty sequence of array keys; got {array_keys!r}")
        if not bounds_key:
            raise ValueError("BoundsWrapper needs a record key for the bounds (bounds_key)")
        self.inner = inner
        self.learn = learn
        self.array_keys = tuple(array_keys)
        self.bounds_key = bounds_key
        self.bounds: dict[str, np.ndarray] | None = None

    @property
    def broadcast_records(self) -> dict[str, ArrayRecord]:
        """Records sent beside the model: the bounds under ``bounds_key`` (empty before the first aggregation)."""
        return {} if self.bounds is None else {self.bounds_key: bounds_to_record(self.bounds)}

    @property
    def state_prefix(self) -> str:
        """Key prefix of the bounds in :meth:`state_dict`."""
        return self.bounds_key + "/"

    @property
    def learner_prefix(self) -> str:
        """Key prefix of the learner's own state (``learn.state_dict()``, if it has one) in :meth:`state_dict`."""
        return self.bounds_key + "-learner/"

    def state_dict(self) -> dict[str, np.ndarray]:
        """The newest bounds (``<bounds_key>/<layer>``) and the learner's state: a resumed run continues from them."""
        out = {} if self.bounds is None else {self.state_prefix + n: v for n, v in self.bounds.items()}
        learner_state = getattr(self.learn, "state_dict", None)
        if callable(learner_state):
            out.update({self.learner_prefix + k: np.asarray(v) for k, v in learner_state().items()})
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`: the bounds go to ``learn.load`` and its state to ``learn.load_state_dict``."""
        prefix = self.state_prefix
        bounds = {k[len(prefix) :]: np.asarray(v, np.float32) for k, v in state.items() if k.startswith(prefix)}
        self.bounds = bounds or None
        prefix = self.learner_prefix
        own = {k[len(prefix) :]: np.asarray(v) for k, v in state.items() if k.startswith(prefix)}
        load_own = getattr(self.learn, "load_state_dict", None)
        if own and callable(load_own):
            load_own(own)
        load = getattr(self.learn, "load", None)
        if bounds and callable(load):
            load(bounds)

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> Activation bounds learned on the server, sent as %r", self.bounds_key)
        self.inner.summary()

    def learn_bounds(self, arrays: dict[str, np.ndarray], server_round: int) -> tuple[dict, Mapping[str, float]]:
        """Call ``learn`` (a subclass may prepare the learner first)."""
        return self.learn(arrays, server_round)

    def _attach(self, messages: Iterable[Message]) -> list[Message]:
        """Add the newest bounds to the outgoing instructions ``inner`` just built."""
        messages = list(messages)
        if self.bounds is not None:
            for msg in messages:
                msg.content[self.bounds_key] = bounds_to_record(self.bounds)
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Check that the model holds ``array_keys``, delegate, then add the bounds to every message."""
        for key in self.array_keys:
            require_key(arrays, key, "activation bounds")
        return self._attach(self.inner.configure_train(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate with ``inner``, then learn the bounds of the new global arrays."""
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        self.bounds, stats = self.learn_bounds(
            select_arrays(arrays, self.array_keys, "activation bounds"), server_round
        )
        merged = MetricRecord(dict(metrics.items()) if metrics is not None else {})
        for key, value in stats.items():
            merged[key] = float(value)
        log(INFO, "activation bounds: %s", {k: round(float(v), 4) for k, v in stats.items()})
        return arrays, merged

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, then add the bounds to every message."""
        return self._attach(self.inner.configure_evaluate(server_round, arrays, config, grid))
