"""fedsec's bound learner: activation bounds (Bi & Li, arXiv 2410.17573) of the CLIP prompt classifier.

The CLIP- and prompt-specific part of the activation-bound defense: the server
learns per-channel (or per-neuron) upper bounds on internal activations of the
global model (the frozen open_clip encoder under the learner's arrays, and the
learner's own image-path layers, :meth:`~fedsec.models.prompt.PromptCLIP.bound_root`),
on the foundation model's synthetic data. The maths (statistics, clamps, the
optimisation) is :mod:`fedsec.activation_bounds` and works on any
``torch.nn.Module``; the Flower wrapper that calls a learner after every
aggregation and sends its bounds is :mod:`strategies.bounds_wrapper`
(:mod:`strategies.activation_bound` puts the three together for fedsec's
ServerApp). The client's side is here too: the bounds a server message carries
(:func:`bounds_from_content`), whether a client trains under them
(:func:`training_bounds`) and its frozen features re-encoded under them
(:func:`local_data_under_bounds`).

Importing this module loads neither torch nor open_clip: they are imported on
the first call.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO
from typing import TYPE_CHECKING

import numpy as np
from flwr.common.logger import log

if TYPE_CHECKING:
    from flwr.app import RecordDict

    from fedsec.activation_bounds import ActivationBounds
    from fedsec.config import RunConfig
    from fedsec.models.prompt import PromptCLIP
    from fedsec.training import LocalData


class BoundLearner:
    """``(arrays, round) -> (bounds, metrics)`` on the synthetic data, warm-started across rounds.

    The first call initialises the bounds from activation statistics (or from
    bounds handed to :meth:`load` by a resumed run); every call then runs
    ``bounds-steps`` optimisation steps against the new global model (the
    run's learner holding ``arrays``).

    With ``bounds-data = "filtered"`` (or ``"ranked"``, :func:`ranked_keep`) the bounds are learned only on the
    synthetic images whose label the ``reference`` model predicts (the
    wrapper sets it to an unfused shadow of the global arrays: the clients'
    updates without server fusion, see
    ``strategies.activation_bound.ActivationBoundWrapper._advance_shadow``):
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

    def __init__(self, cfg: RunConfig, synthetic_data: Callable) -> None:
        self.cfg = cfg
        self.synthetic_data = synthetic_data
        self.state: dict = {}
        self.loaded: dict[str, np.ndarray] | None = None
        self.reference: dict[str, np.ndarray] | None = None
        self.quantile: float | None = None  # chosen by bounds-tune in the first round

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

    def _setup(self, arrays: dict[str, np.ndarray] | None = None) -> None:
        """Build the server's model of the run's learner; initialise the bounds on it holding ``arrays``.

        The first round's global arrays: with weights in the image path the activations depend on them.
        """
        from fedsec.activation_bounds import resolve_layers
        from fedsec.models.prompt import set_arrays
        from strategies.fusion import synthetic_prompt_model

        cfg = self.cfg
        synthetic = self.synthetic_data()
        clip, model = synthetic_prompt_model(cfg, synthetic)  # the run's learner (CoOp, VPT, CLIP-Adapter, ...)
        if arrays is not None:
            set_arrays(model, arrays)
        root = model.bound_root()
        patterns = [p.strip() for p in str(cfg.get("bounds-layers")).split(",") if p.strip()]
        layers = resolve_layers(root, patterns)
        images = synthetic.images.to(clip.device)
        text = any(not (n.startswith("visual.") or n.startswith("adapter")) for n in layers)
        self.state.update(
            clip=clip, model=model, root=root, images=images, labels=synthetic.labels, layers=layers, text=text
        )
        log(INFO, "[fedsec] activation bounds on %d layers: %s", len(layers), layers)

    @property
    def init_quantile(self) -> float:
        """The bounds' initial quantile: the tuned one (``bounds-tune``), else ``bounds-init-quantile``."""
        return float(self.cfg.get("bounds-init-quantile")) if self.quantile is None else self.quantile

    def state_dict(self) -> dict[str, np.ndarray]:
        """What a resumed run needs besides the bounds: the tuned quantile, once chosen."""
        return {} if self.quantile is None else {"quantile": np.array([self.quantile], dtype=np.float64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict` (a resumed run keeps the quantile its first round chose)."""
        if "quantile" in state:
            self.quantile = float(np.asarray(state["quantile"]).ravel()[0])

    def _init(self, images) -> object:
        from fedsec.activation_bounds import init_bounds

        state = self.state
        return init_bounds(
            state["root"],
            state["model"].encode_images,  # the learner's image path (visual prompts, adapter) under its arrays
            images,
            state["layers"],
            str(self.cfg.get("bounds-granularity")),
            self.init_quantile,
            two_sided=bool(self.cfg.get("bounds-two-sided")),
            channel_dim=-1,  # open_clip's transformer blocks (batch, tokens, channels); the adapter's (batch, units)
        ).to(state["clip"].device)

    def _tune(self, images, labels, logits_fn, server_round: int) -> dict[str, float]:
        """Choose the initial quantile on the synthetic ``images`` (``bounds-tune = "holdout"``); its metrics.

        :func:`tune_from_config` on the images the bounds are learned on (after the filter of
        ``bounds-data``) and the global model: the server's synthetic set and nothing else.
        """
        state = self.state
        chosen, costs = tune_from_config(
            self.cfg,
            state["root"],
            state["model"].encode_images,
            logits_fn,
            images,
            labels,
            state["layers"],
            server_round,
        )
        self.quantile = chosen
        log(INFO, "[fedsec] activation bounds: held-out accuracy cost per quantile %s -> %.3f", costs, chosen)
        return {f"bound-tune-cost-q{q:g}": c for q, c in costs.items()}

    def _filtered(self, mode: str = "filtered") -> tuple[object, object, dict]:
        """The synthetic images the reference model supports (all of them without a reference), their labels, metrics.

        ``"filtered"``: those whose label it predicts; ``"ranked"``: in every class, the
        ``bounds-keep`` share to whose label it gives the highest probability (:func:`ranked_keep`).
        """
        import torch

        from fedsec.models.prompt import set_arrays

        state = self.state
        if self.reference is None:
            return state["images"], state["labels"], {}
        if "features" not in state:  # the encoder is frozen and unclamped here: encode the set once per run
            state["features"] = state["clip"].encode_images_batched(state["images"])
        set_arrays(state["model"], self.reference)
        model, labels = state["model"], state["labels"]
        with torch.no_grad():
            features = model.features(state["images"], state["features"]).to(model.prompt_learner.ctx.device)
            logits = model.logits_from_features(features).cpu()
        if mode == "ranked":
            label_prob = torch.softmax(logits.float(), dim=-1).gather(1, labels.view(-1, 1)).squeeze(1)
            keep = ranked_keep(label_prob, labels, float(self.cfg.get("bounds-keep")))
        else:
            keep = logits.argmax(-1) == labels
        if int(keep.sum()) == 0:
            return state["images"], labels, {"bound-kept": 1.0}
        kept = {"bound-kept": float(keep.float().mean())}
        return state["images"][keep.to(state["images"].device)], labels[keep], kept

    def __call__(self, arrays: dict[str, np.ndarray], server_round: int) -> tuple[dict[str, np.ndarray], dict]:
        """Learn the bounds of the global model holding the learned ``arrays`` (name -> array)."""
        import torch

        from fedsec.activation_bounds import optimize_bounds
        from fedsec.models.prompt import set_arrays

        if not self.state:
            self._setup(arrays)
        cfg, state = self.cfg, self.state
        clip, model = state["clip"], state["model"]
        images, labels, extra = state["images"], state["labels"], {}
        filtered = str(cfg.get("bounds-data")) in ("filtered", "ranked")
        if filtered:
            images, labels, extra = self._filtered(str(cfg.get("bounds-data")))  # under the reference's arrays
        set_arrays(model, arrays)
        if state["text"]:

            def logits_fn(x: torch.Tensor) -> torch.Tensor:
                return model.logits_from_features(model.encode_images(x))

        else:
            with torch.no_grad():
                text = model.text_features()
            scale = clip.logit_scale

            def logits_fn(x: torch.Tensor) -> torch.Tensor:
                return scale * model.encode_images(x) @ text.T

        if str(cfg.get("bounds-tune")) == "holdout" and self.quantile is None:
            extra.update(self._tune(images, labels, logits_fn, server_round))
        if filtered or "bounds" not in state:
            state["bounds"] = self._init(images)  # the first round's arrays: the image path may depend on them
            if not filtered and self.loaded is not None:
                self._set(self.loaded)
        kwargs = optimize_kwargs(cfg, server_round)
        stats = optimize_bounds(state["root"], logits_fn, images, state["bounds"], **kwargs)
        if self.quantile is not None:
            extra["bound-quantile"] = self.quantile
        return state["bounds"].to_arrays(), {**stats, **extra}


def optimize_kwargs(cfg: RunConfig, server_round: int) -> dict:
    """The keyword arguments of :func:`~fedsec.activation_bounds.optimize_bounds` in round ``server_round``."""
    return dict(
        steps=int(cfg.get("bounds-steps")),
        lr=float(cfg.get("bounds-lr")),
        penalty=float(cfg.get("bounds-penalty")),
        loss=str(cfg.get("bounds-loss")),
        batch_size=int(cfg.get("bounds-batch-size")),
        seed=cfg.seed * 104_729 + server_round,
        trim=float(cfg.get("bounds-trim")),
    )


def tune_from_config(cfg: RunConfig, root, forward, logits_fn, images, labels, layers, server_round: int = 1):
    """The run's ``bounds-tune = "holdout"`` procedure on labelled ``images``: ``(chosen quantile, costs)``.

    :func:`~fedsec.activation_bounds.tune_quantile` with the run's keys: seeded halves of every
    class (:func:`~fedsec.activation_bounds.class_halves`), every candidate of
    ``bounds-tune-quantiles`` initialised and optimised on one half as round ``server_round``
    would (:func:`optimize_kwargs`) and costed by the accuracy it takes on the other, both ways
    round; the tightest within ``bounds-tune-tolerance``. The server runs it in round 1 on its
    synthetic set; the adaptive FM attacker runs the same on its own clean images.
    """
    from fedsec.activation_bounds import class_halves, tune_quantile

    labels = labels.cpu()
    return tune_quantile(
        root,
        forward,
        logits_fn,
        images,
        labels,
        class_halves(labels, cfg.seed * 7_919 + server_round),
        layers,
        parse_quantiles(str(cfg.get("bounds-tune-quantiles"))),
        float(cfg.get("bounds-tune-tolerance")),
        granularity=str(cfg.get("bounds-granularity")),
        two_sided=bool(cfg.get("bounds-two-sided")),
        channel_dim=-1,  # open_clip's transformer blocks (batch, tokens, channels); the adapter's (batch, units)
        **optimize_kwargs(cfg, server_round),
    )


def parse_quantiles(text: str) -> list[float]:
    """The candidate quantiles of ``bounds-tune-quantiles``: comma-separated numbers in ``(0, 1]``.

    Raises
    ------
    ValueError
        For an empty list, a value that is not a number, or one outside ``(0, 1]``.
    """
    why = quantile_list_problem(text)
    if why:
        raise ValueError(f"bounds-tune-quantiles={text!r}: {why}")
    return [float(v) for v in text.split(",") if v.strip()]


def quantile_list_problem(text: object) -> str | None:
    """Why ``text`` is not a comma-separated list of quantiles in ``(0, 1]`` (``None`` when it is)."""
    parts = [v.strip() for v in str(text).split(",") if v.strip()]
    if not parts:
        return "needs at least one quantile"
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            return f"{part!r} is not a number"
        if not 0.0 < value <= 1.0:
            return f"{value} is not in (0, 1]"
    return None


def ranked_keep(label_prob, labels, keep: float):
    """In every class, the ``keep`` share of its items with the highest ``label_prob`` (at least one each).

    The filter of ``bounds-data = "ranked"``: a poisoned foundation model's triggered images carry
    the target label, to which a model that never learned the trigger gives a low probability, so
    they rank last in the target class; unlike keeping only the items whose label the model
    predicts, every class keeps the same share, so a reference model that drifts toward a few
    classes cannot empty the others.

    Parameters
    ----------
    label_prob : torch.Tensor
        ``N`` probabilities the reference model gives each item's own label.
    labels : torch.Tensor
        ``N`` integer labels.
    keep : float
        Share kept per class, in ``(0, 1]``: ``ceil(keep * n_c)`` items of a class of ``n_c`` (ties
        broken by index).

    Returns
    -------
    torch.Tensor
        ``N`` booleans.
    """
    import math

    import torch

    if not 0.0 < keep <= 1.0:
        raise ValueError(f"bounds-keep must be in (0, 1], got {keep}")
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        k = max(1, math.ceil(keep * len(idx)))
        order = torch.argsort(-label_prob[idx].double(), stable=True)
        mask[idx[order[:k]]] = True
    return mask


# ----------------------------------------------------------------------------- the client's side
#: key -> (bounds digest, data with features under those bounds); one entry per partition.
_BOUNDED_DATA: dict[tuple, tuple[str, LocalData]] = {}


def bounds_from_content(content: RecordDict) -> ActivationBounds | None:
    """The activation bounds a server message carries beside ``ctx`` (record ``"bounds"``), or ``None``.

    Parameters
    ----------
    content : flwr.app.RecordDict
        The received message's content.

    Returns
    -------
    ActivationBounds or None
        The bounds (on the CPU), ``None`` when the message has none.
    """
    from fedsec.activation_bounds import bounds_from_content as from_record

    return from_record(content, "bounds")


def training_bounds(cfg: RunConfig, bounds: ActivationBounds | None) -> ActivationBounds | None:
    """The bounds a client trains under: the received ones, or ``None`` with ``bounds-client-training = false``.

    The bounds always apply at evaluation and inference; training under them
    restricts the features to what the global model used when they were
    learned, which slows the learning of everything else.
    """
    if bounds is None or bool(cfg.get("bounds-client-training")):
        return bounds
    return None


def local_data_under_bounds(
    data: LocalData, model: PromptCLIP, bounds: ActivationBounds | None, key: tuple
) -> LocalData:
    """``data`` with its frozen features recomputed under activation ``bounds`` (cached per key and bounds).

    The features are encoded once per new set of bounds (the server sends new
    ones each round), never per step; ``None`` returns ``data`` unchanged, and so
    does a learner that encodes its images itself (visual prompts: its bounds cover
    the prompt tokens, which the frozen features lack). Bounds on the learner's own
    layers (``adapter.hidden``) act later, where the learner maps the features.

    Parameters
    ----------
    data : LocalData
        The client's data with its unclamped features.
    model : PromptCLIP
        The client's learner: its frozen CLIP encodes, under clamps hooked into its
        :meth:`~fedsec.models.prompt.PromptCLIP.bound_root`.
    bounds : ActivationBounds or None
        The bounds to encode under.
    key : tuple
        Which data this is (e.g. ``(partition_id, num_partitions)``): one cache entry per key.

    Returns
    -------
    LocalData
        ``data`` itself, or the same images and labels with the clamped features.
    """
    if bounds is None or model.needs_images:
        return data
    from fedsec.activation_bounds import bounded
    from fedsec.training import LocalData

    digest = bounds.digest()
    hit = _BOUNDED_DATA.get(key)
    if hit is not None and hit[0] == digest:
        return hit[1]
    with bounded(model.bound_root(), bounds):
        features = model.clip.encode_images_batched(data.images)
    out = LocalData(data.images, data.labels, features)
    _BOUNDED_DATA[key] = (digest, out)
    return out
