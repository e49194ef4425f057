"""The CNN app's ServerApp: fedsec's FLAME inside activation bounds inside reply validation.

The strategy is built from fedsec's components exactly as they ship, told the
app's own record names::

    RoundLog(Validated(BoundsWrapper(Flame(...))))

* :class:`strategies.flame.Flame` (Nguyen et al., USENIX Security 2022)
  aggregates the CNN's weights under ``ARRAYS_KEY``, weighted by
  ``WEIGHT_KEY``, and reports which nodes it excluded;
* :class:`strategies.bounds_wrapper.BoundsWrapper` learns per-conv-channel
  activation bounds (Bi & Li, arXiv 2410.17573) of every new global CNN on the
  server's digits (:class:`~experiments.examples.cnn_app.task.CnnBoundLearner`)
  and sends them to the clients under ``BOUNDS_KEY``;
* :class:`strategies.validation.Validated` drops malformed replies first;
* :class:`RoundLog`, this app's own wrapper, writes down each round's facts.

:func:`make_server_app` returns the app; it writes ``result.json`` (rounds,
FLAME's exclusions and the rejected replies by partition, the bounds' shapes
and the metrics) and ``final.npz`` (the final weights and bounds) into
``out_dir`` when given.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from experiments.examples.cnn_app.task import (
    ARRAYS_KEY,
    BOUNDS_KEY,
    CLIENT_KEY,
    METRICS_KEY,
    WEIGHT_KEY,
    CnnBoundLearner,
    SmallCNN,
    evaluate,
    load_arrays,
    new_model,
    server_split,
    to_record,
)
from fedsec.activation_bounds import ActivationBounds
from strategies.base import detection_of
from strategies.bounds_wrapper import BoundsWrapper
from strategies.common import StrategyWrapper, node_id, reported_id
from strategies.flame import Flame
from strategies.validation import Validated


class RoundLog(StrategyWrapper):
    """Record, per round, which partitions the inner strategies excluded or rejected (replies are only read).

    Attributes
    ----------
    rounds : list[dict]
        One entry per ``aggregate_train``: ``excluded`` (partitions FLAME left
        out), ``rejected`` (partition, reason) from reply validation, and the
        training metrics.
    """

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.rounds: list[dict] = []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Delegate, then note the round's exclusions and rejections by partition."""
        replies = list(replies)
        partition = {node_id(m): reported_id(m, CLIENT_KEY) for m in replies}
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        detection = detection_of(self.inner)
        self.rounds.append(
            {
                "round": server_round,
                "replies": len(replies),
                "excluded": sorted(partition[n] for n in detection.excluded) if detection is not None else None,
                "rejected": [[partition[n], reason] for n, reason in self.inner.last_rejected],
                "train": dict(metrics.items()) if metrics is not None else {},
            }
        )
        log(INFO, "cnn-app round %d: %s", server_round, self.rounds[-1])
        return arrays, metrics


def build_strategy(num_nodes: int, learner: CnnBoundLearner) -> RoundLog:
    """fedsec's defenses, unchanged, configured with the CNN app's record names."""
    flame = Flame(
        noise_lambda=0.001,
        seed=0,
        arrayrecord_key=ARRAYS_KEY,
        weighted_by_key=WEIGHT_KEY,
        client_id_key=CLIENT_KEY,
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=num_nodes,
        min_evaluate_nodes=num_nodes,
        min_available_nodes=num_nodes,
    )
    keys = tuple(SmallCNN().state_dict())  # the bounds learner rebuilds the whole CNN
    bounded = BoundsWrapper(flame, learner, array_keys=keys, bounds_key=BOUNDS_KEY)
    return RoundLog(Validated(bounded, metricrecord_key=METRICS_KEY, client_id_key=CLIENT_KEY))


def make_server_app(out_dir: Path | None = None, num_rounds: int = 2, num_nodes: int = 4) -> ServerApp:
    """The CNN app's ServerApp (``out_dir``: where to write ``result.json`` and ``final.npz``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(1)
        images, labels = server_split()
        strategy = build_strategy(num_nodes, CnnBoundLearner(images))
        central: dict[int, dict] = {}

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model = load_arrays(SmallCNN(), {k: v.numpy() for k, v in arrays.items()})
            bounds = strategy.bounds
            plain, _ = evaluate(model, images, labels, None)
            acc, clipped = evaluate(model, images, labels, None if bounds is None else _bounds(bounds))
            central[server_round] = {"accuracy": plain, "bounded-accuracy": acc, "clipped-fraction": clipped}
            return MetricRecord(central[server_round])

        result = strategy.start(
            grid=grid, initial_arrays=to_record(new_model()), num_rounds=num_rounds, evaluate_fn=evaluate_fn
        )
        if out_dir is None:
            return
        final = {k: v.numpy() for k, v in result.arrays.items()}
        bounds = strategy.bounds or {}
        np.savez(Path(out_dir) / "final.npz", **final, **{f"{BOUNDS_KEY}/{k}": v for k, v in bounds.items()})
        summary = {
            "rounds": strategy.rounds,
            "bounds": {k: list(v.shape) for k, v in bounds.items()},
            "central": central,
            "clients": {r: dict(m.items()) for r, m in result.evaluate_metrics_clientapp.items()},
        }
        (Path(out_dir) / "result.json").write_text(json.dumps(summary, indent=1, default=float))

    return app


def _bounds(arrays: dict[str, np.ndarray]) -> ActivationBounds:
    return ActivationBounds.from_arrays(arrays)


#: The app with no output files (e.g. ``flwr run`` with this module as the ServerApp).
app = make_server_app()
