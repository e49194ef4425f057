"""The activation-bound defense (Bi & Li, arXiv 2410.17573) around any aggregation rule.

After the wrapped rule (and server fusion, if on) produced the new global
``ctx``, the server learns per-channel (or per-neuron) upper bounds ``tau`` on
internal activations of the global model on its synthetic data
(:mod:`fedsec.activation_bounds`): initialised from activation statistics in
the first round, then ``bounds-steps`` optimisation steps every round (warm
start) that keep the clamped model's outputs close to the unclamped model's
while a norm penalty shrinks the bounds. Model parameters never change. The
bounds travel to the clients beside ``ctx`` as a separate ``"bounds"``
``ArrayRecord`` in every train/evaluate message (clients reply with ``ctx``
only, which reply validation checks as before); clients and the evaluation
apply them as clamps ``min(h, tau)`` in every forward pass (with
``bounds-two-sided = true`` also ``max(h, lo)``, lower bounds at the
``1 - bounds-init-quantile`` of the same statistics).

Switch it on with ``activation-bounds = true`` (with any ``strategy``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsec.registry import Param
from strategies.common import StrategyWrapper, require_key
from strategies.registry import StrategyContext, register_wrapper

#: Record key of the bounds in the messages to the clients.
BOUNDS_KEY = "bounds"
#: Key prefix of the bounds in a checkpointed strategy state.
BOUND_STATE = "bounds/"
#: Key of the unfused reference prompt in a checkpointed strategy state.
SHADOW_STATE = "bounds-shadow"

PARAMS: tuple[Param, ...] = (
    Param("activation-bounds", False, "learn activation bounds on the synthetic data and send them to the clients"),
    Param("bounds-layers", "visual.transformer.resblocks.*", "comma-separated module name patterns to bound"),
    Param("bounds-granularity", "neuron", "one bound per neuron, or per channel", choices=("channel", "neuron")),
    Param("bounds-init-quantile", 1.0, "initial bound: this quantile of the activations", range=(0.0, 1.0)),
    Param("bounds-steps", 20, "optimisation steps per round", range=(0, None)),
    Param("bounds-lr", 0.05, "learning rate of the bounds", range=(0.0, None)),
    Param("bounds-penalty", 0.5, "weight of the norm penalty that shrinks the bounds", range=(0.0, None)),
    Param(
        "bounds-loss", "kl", "clamped vs unclamped outputs: KL, or CE to the unclamped prediction", choices=("kl", "ce")
    ),
    Param("bounds-batch-size", 64, "synthetic images per optimisation step", range=(1, None)),
    Param(
        "bounds-data",
        "all",
        "learn on all synthetic images, or those the unfused prompt agrees with",
        choices=("all", "filtered"),
    ),
    Param("bounds-two-sided", False, "also lower bounds (at 1 - bounds-init-quantile)"),
    Param("bounds-trim", 0.0, "fraction of the largest per-image losses ignored", range=(0.0, 0.99)),
    Param("bounds-client-training", True, "clients also train under the clamps"),
)


def bounds_record(bounds: dict[str, np.ndarray]) -> ArrayRecord:
    """The ``ArrayRecord`` of bounds sent beside ``ctx`` (one array per bounded layer)."""
    return ArrayRecord({name: Array(np.asarray(value, dtype=np.float32)) for name, value in bounds.items()})


class ActivationBoundWrapper(StrategyWrapper):
    """Learn activation bounds after every aggregation and send them to the clients.

    Parameters
    ----------
    inner : Strategy
        Any strategy whose aggregate holds the array ``array_name``.
    learn : callable
        ``(array, server_round) -> (bounds as name -> array, metrics)``.
    array_name : str
        The model array the bounds are learned for (the ServerApp names fedsec's
        ``ctx``); an aggregate or instruction without it raises
        :class:`~strategies.common.MissingKeyError`.

    Attributes
    ----------
    bounds : dict[str, np.ndarray] or None
        The newest bounds (None before the first aggregation).
    """

    def __init__(
        self,
        inner: Strategy,
        learn: Callable[[np.ndarray, int], tuple[dict[str, np.ndarray], dict]],
        array_name: str,
    ) -> None:
        self.inner = inner
        self.learn = learn
        self.array_name = array_name
        self.bounds: dict[str, np.ndarray] | None = None
        self.shadow: np.ndarray | None = None  # the unfused reference prompt (see aggregate_train)
        self._sent: np.ndarray | None = None  # the global ctx sent to the clients this round

    @property
    def broadcast_records(self) -> dict[str, ArrayRecord]:
        """Records sent to the clients beside ``ctx`` (read by the recorder for the evaluation)."""
        return {} if self.bounds is None else {BOUNDS_KEY: bounds_record(self.bounds)}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The newest bounds (``bounds/<layer>``): a resumed run continues from them (see strategies.state)."""
        out = {} if self.bounds is None else {BOUND_STATE + n: v for n, v in self.bounds.items()}
        if self.shadow is not None:
            out[SHADOW_STATE] = self.shadow
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore the bounds of :meth:`state_dict`; the learner warm-starts from them in the next round."""
        bounds = {
            k[len(BOUND_STATE) :]: np.asarray(v, np.float32) for k, v in state.items() if k.startswith(BOUND_STATE)
        }
        self.bounds = bounds or None
        if SHADOW_STATE in state:
            self.shadow = np.asarray(state[SHADOW_STATE], dtype=np.float32).copy()
        load = getattr(self.learn, "load", None)
        if bounds and callable(load):
            load(bounds)

    def _advance_shadow(self, aggregate: np.ndarray) -> np.ndarray:
        """Move the unfused reference prompt by this round's client update; return it.

        The clients' update is the aggregate before server fusion (``pre_fusion_ctx`` of a
        :class:`~strategies.fusion.ServerFusion` inside, else the aggregate) minus the global
        ``ctx`` they received. Added to a prompt that never went through fusion, it gives
        the model the clients alone would have: a poisoned FM's backdoor enters through
        fusion and reaches the clients' own prompts, but not their updates on clean data.
        """
        pre = getattr(self.inner, "pre_fusion_ctx", None)
        pre = aggregate if pre is None else pre
        if self._sent is None or self._sent.shape != pre.shape:
            return pre
        if self.shadow is None:
            self.shadow = self._sent.copy()
        self.shadow = (self.shadow + (pre - self._sent)).astype(np.float32)
        return self.shadow

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> Activation bounds learned on synthetic data")
        self.inner.summary()

    def _attach(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        if self.bounds is not None:
            for msg in messages:
                msg.content[BOUNDS_KEY] = bounds_record(self.bounds)
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, then add the bounds record to every message."""
        self._sent = require_key(arrays, self.array_name, "activation bounds").numpy().copy()
        return self._attach(self.inner.configure_train(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate with ``inner``, then learn the bounds of the new global model."""
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        aggregate = require_key(arrays, self.array_name, "activation bounds").numpy()
        if hasattr(self.learn, "reference"):
            self.learn.reference = self._advance_shadow(aggregate)
        self.bounds, stats = self.learn(aggregate, server_round)
        merged = MetricRecord(dict(metrics.items()) if metrics is not None else {})
        for key, value in stats.items():
            merged[key] = float(value)
        log(INFO, "activation bounds: %s", {k: round(float(v), 4) for k, v in stats.items()})
        return arrays, merged

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, then add the bounds record to every message."""
        return self._attach(self.inner.configure_evaluate(server_round, arrays, config, grid))


class BoundLearner:
    """``(ctx, round) -> (bounds, metrics)`` on the synthetic data, warm-started across rounds.

    The first call initialises the bounds from activation statistics (or from
    bounds handed to :meth:`load` by a resumed run); every call then runs
    ``bounds-steps`` optimisation steps against the new global prompt.

    With ``bounds-data = "filtered"`` the bounds are learned only on the
    synthetic images whose label the ``reference`` prompt predicts (the
    wrapper sets it to an unfused shadow of the global prompt: the clients'
    updates without server fusion, see ``ActivationBoundWrapper._advance_shadow``):
    a poisoned FM's triggered images carry the target label, which a model
    that never saw them does not predict, so the filter drops them. The subset
    changes every round, so the bounds are then re-initialised from its
    statistics every round (no warm start) before the optimisation steps.

    Parameters
    ----------
    cfg : RunConfig
        Reads the ``bounds-*`` keys.
    synthetic_data : callable
        ``() -> SyntheticSet`` (built lazily, on the first call).
    """

    def __init__(self, cfg, synthetic_data: Callable) -> None:
        self.cfg = cfg
        self.synthetic_data = synthetic_data
        self.state: dict = {}
        self.loaded: dict[str, np.ndarray] | None = None
        self.reference: np.ndarray | None = None

    def load(self, bounds: dict[str, np.ndarray]) -> None:
        """Start from these bounds (a resumed run's checkpoint) instead of activation statistics."""
        self.loaded = {k: np.asarray(v, dtype=np.float32).copy() for k, v in bounds.items()}
        if "bounds" in self.state:
            self._set(self.loaded)

    def _set(self, arrays: dict[str, np.ndarray]) -> None:
        from fedsec.activation_bounds import ActivationBounds

        old = self.state["bounds"]
        if sorted(arrays) != sorted(old.names):
            raise ValueError(f"checkpointed bounds cover layers {sorted(arrays)}, the run bounds {sorted(old.names)}")
        device = self.state["images"].device
        self.state["bounds"] = ActivationBounds.from_arrays({n: arrays[n] for n in old.names}).to(device)

    def _setup(self) -> None:
        from fedsec.activation_bounds import resolve_layers
        from strategies.fusion import synthetic_prompt_model

        cfg = self.cfg
        synthetic = self.synthetic_data()
        clip, model = synthetic_prompt_model(cfg, synthetic)
        patterns = [p.strip() for p in str(cfg.get("bounds-layers")).split(",") if p.strip()]
        layers = resolve_layers(clip.model, patterns)
        images = synthetic.images.to(clip.device)
        text = any(not n.startswith("visual.") for n in layers)
        self.state.update(clip=clip, model=model, images=images, labels=synthetic.labels, layers=layers, text=text)
        self.state["bounds"] = self._init(images)
        if self.loaded is not None:
            self._set(self.loaded)
        log(INFO, "[fedsec] activation bounds on %d layers: %s", len(layers), layers)

    def _init(self, images) -> object:
        from fedsec.activation_bounds import init_bounds

        clip = self.state["clip"]
        return init_bounds(
            clip.model,
            clip.encode_images,
            images,
            self.state["layers"],
            str(self.cfg.get("bounds-granularity")),
            float(self.cfg.get("bounds-init-quantile")),
            two_sided=bool(self.cfg.get("bounds-two-sided")),
        ).to(clip.device)

    def _filtered(self) -> tuple[object, dict]:
        """The synthetic images whose label the reference prompt predicts (all of them without a reference)."""
        import torch

        from fedsec.metrics import predict
        from fedsec.node import set_ctx

        state = self.state
        if self.reference is None:
            return state["images"], {}
        if "features" not in state:  # the encoder is frozen and unclamped here: encode the set once per run
            state["features"] = state["clip"].encode_images_batched(state["images"])
        set_ctx(state["model"], self.reference)
        with torch.no_grad():
            pred = predict(state["model"], state["features"])
        keep = (pred == state["labels"]).to(state["images"].device)
        if int(keep.sum()) == 0:
            return state["images"], {"bound-kept": 1.0}
        return state["images"][keep], {"bound-kept": float(keep.float().mean())}

    def __call__(self, ctx: np.ndarray, server_round: int) -> tuple[dict[str, np.ndarray], dict]:
        import torch

        from fedsec.activation_bounds import optimize_bounds
        from fedsec.node import set_ctx

        if not self.state:
            self._setup()
        cfg, state = self.cfg, self.state
        clip, model = state["clip"], state["model"]
        images, extra = state["images"], {}
        if str(cfg.get("bounds-data")) == "filtered":
            images, extra = self._filtered()
            state["bounds"] = self._init(images)
        set_ctx(model, ctx)
        if state["text"]:

            def logits_fn(x: torch.Tensor) -> torch.Tensor:
                return model.logits_from_features(clip.encode_images(x))

        else:
            with torch.no_grad():
                text = model.text_features()
            scale = clip.logit_scale

            def logits_fn(x: torch.Tensor) -> torch.Tensor:
                return scale * clip.encode_images(x) @ text.T

        stats = optimize_bounds(
            clip.model,
            logits_fn,
            images,
            state["bounds"],
            steps=int(cfg.get("bounds-steps")),
            lr=float(cfg.get("bounds-lr")),
            penalty=float(cfg.get("bounds-penalty")),
            loss=str(cfg.get("bounds-loss")),
            batch_size=int(cfg.get("bounds-batch-size")),
            seed=cfg.seed * 104_729 + server_round,
            trim=float(cfg.get("bounds-trim")),
        )
        return state["bounds"].to_arrays(), {**stats, **extra}


@register_wrapper("activation-bounds", params=PARAMS, order=20)
def activation_bounds(inner: Strategy, sctx: StrategyContext) -> Strategy:
    """``ActivationBoundWrapper`` around ``inner`` when ``activation-bounds = true``."""
    if not bool(sctx.cfg.get("activation-bounds")):
        return inner
    if sctx.synthetic_data is None:
        raise ValueError("activation-bounds needs the server's synthetic data (StrategyContext.synthetic_data)")
    if sctx.array_name is None:
        raise ValueError("activation-bounds needs the name of the prompt array (StrategyContext.array_name)")
    return ActivationBoundWrapper(inner, BoundLearner(sctx.cfg, sctx.synthetic_data), sctx.array_name)
