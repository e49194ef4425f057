"""Server fusion on foundation-model synthetic data, around any aggregation rule.

After the wrapped rule aggregates the clients' prompts, the server tunes the
global prompt (the array named ``array_name`` of the aggregate; the ServerApp
names fedsec's ``ctx``) on its labeled synthetic set (``server-fusion = "tune"``:
``fusion-steps`` SGD steps at ``fusion-lr``, cross-entropy on the frozen image
features of the synthetic images). That is how an FM-FL server brings the
foundation model's knowledge into the global model every round, and how a
poisoned foundation model (``attack = "fm-poison"``) reaches every client.
Fusion modes live in the ``FUSIONS`` registry (one function each).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from fedsec.registry import Param, Registry
from strategies.common import StrategyWrapper, require_key
from strategies.registry import StrategyContext, register_wrapper

#: ``(prompt model, synthetic features, labels, cfg, seed) -> stats``; tunes ``model.prompt_learner.ctx`` in place.
FUSIONS: Registry[Callable[..., dict[str, float]]] = Registry("server fusion")


def _fusion_names() -> list[str]:
    return ["none", *FUSIONS.names()]


@FUSIONS.register("tune")
def tune(model, features, labels, cfg, seed: int) -> dict[str, float]:
    """Cross-entropy tuning of ``ctx`` on the labeled synthetic features."""
    from fedsec.training import train_on_features

    stats = train_on_features(
        model,
        features,
        labels,
        int(cfg.get("fusion-steps")),
        cfg.batch_size,
        float(cfg.get("fusion-lr")),
        cfg.momentum,
        0.0,
        seed,
    )
    return {"fusion-loss": stats["train-loss"], "fusion-acc": stats["train-acc"]}


class ServerFusion(StrategyWrapper):
    """Fuse the aggregate of ``inner`` with the server's synthetic data every round.

    Parameters
    ----------
    inner : Strategy
        Any strategy whose aggregate holds the array ``array_name``.
    fuse : callable
        ``(array, server_round) -> (new array, metrics)``.
    mode : str
        Name of the fusion (logs).
    array_name : str
        The array of the aggregate to fuse (a missing one raises :class:`~strategies.common.MissingKeyError`).

    Attributes
    ----------
    pre_fusion_ctx : np.ndarray or None
        The newest aggregate before fusion (the clients' model without the
        synthetic data's influence; the activation-bound defense can filter
        the synthetic set with it, ``bounds-data = "filtered"``).
    """

    def __init__(
        self, inner: Strategy, fuse: Callable[[np.ndarray, int], tuple[np.ndarray, dict]], mode: str, array_name: str
    ) -> None:
        self.inner = inner
        self.fuse = fuse
        self.mode = mode
        self.array_name = array_name
        self.pre_fusion_ctx: np.ndarray | None = None

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> Server fusion on synthetic data: %s", self.mode)
        self.inner.summary()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate with ``inner``, then fuse the global ``array_name`` on the synthetic data."""
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        self.pre_fusion_ctx = require_key(arrays, self.array_name, "server fusion").numpy().copy()
        ctx, stats = self.fuse(self.pre_fusion_ctx, server_round)
        out = ArrayRecord({k: (Array(ctx) if k == self.array_name else v) for k, v in arrays.items()})
        merged = MetricRecord(dict(metrics.items()) if metrics is not None else {})
        for key, value in stats.items():
            merged[key] = float(value)
        log(INFO, "server fusion (%s): %s", self.mode, {k: round(float(v), 4) for k, v in stats.items()})
        return out, merged


def synthetic_prompt_model(cfg, synthetic) -> tuple:
    """A server-side prompt classifier over the synthetic set's classes and the set's frozen features."""
    from fedsec.caches import clip_for
    from fedsec.models.prompt import build_prompt_model

    clip = clip_for(cfg)
    return clip, build_prompt_model(cfg, clip, synthetic.classnames)


@register_wrapper(
    "server-fusion",
    params=(
        Param("server-fusion", "none", "tune the aggregate on the synthetic data every round", choices=_fusion_names),
        Param("fusion-steps", 50, "SGD steps of server fusion per round", range=(0, None)),
        Param("fusion-lr", 0.002, "learning rate of server fusion", range=(0.0, None)),
    ),
    order=10,
)
def server_fusion(inner: Strategy, sctx: StrategyContext) -> Strategy:
    """``ServerFusion`` around ``inner`` unless ``server-fusion = "none"``."""
    cfg = sctx.cfg
    mode = str(cfg.get("server-fusion"))
    if mode == "none":
        return inner
    if sctx.synthetic_data is None:
        raise ValueError("server-fusion needs the server's synthetic data (StrategyContext.synthetic_data)")
    if sctx.array_name is None:
        raise ValueError("server-fusion needs the name of the prompt array (StrategyContext.array_name)")
    fusion = FUSIONS.get(mode)
    state: dict = {}

    def fuse(ctx: np.ndarray, server_round: int) -> tuple[np.ndarray, dict]:
        from fedsec.node import get_ctx, set_ctx

        if not state:
            synthetic = sctx.synthetic_data()
            clip, model = synthetic_prompt_model(cfg, synthetic)
            state.update(model=model, features=clip.encode_images_batched(synthetic.images), labels=synthetic.labels)
        set_ctx(state["model"], ctx)
        stats = fusion(state["model"], state["features"], state["labels"], cfg, cfg.seed * 7_919 + server_round)
        return get_ctx(state["model"]), stats

    return ServerFusion(inner, fuse, mode, sctx.array_name)
