"""Server fusion on foundation-model synthetic data, around any aggregation rule.

In FM-FL (Li et al., "Foundation models in federated learning", arXiv 2401.10375;
Bi & Li, arXiv 2410.17573) the server holds labeled images written by a
foundation model and brings the model's knowledge into the global model with
them. Three modes (``server-fusion``; the ServerApp names fedsec's ``ctx`` as the
global prompt, ``array_name``):

``tune`` (ours)
    After the wrapped rule aggregates the clients' prompts, ``fusion-steps`` SGD
    steps at ``fusion-lr`` of cross-entropy on the synthetic images' frozen
    features and their labels, every round.
``kd`` (FM-FL's distillation, FedDF: Lin et al., "Ensemble distillation for
robust model fusion in federated learning", NeurIPS 2020)
    After aggregation, the aggregate (the student) is distilled towards the
    ensemble of this round's client prompts (the teacher) on the synthetic
    images: ``fusion-steps`` SGD steps at ``fusion-lr`` of
    ``T^2 KL(teacher || student)`` at temperature ``T = fusion-temperature``;
    the teacher averages the clients' logits (FedDF's AvgLogits,
    ``fusion-teacher = "logits"``) or their softmaxes (``"probs"``). The
    synthetic *labels* are not used: a poisoned foundation model reaches the
    global model only through how the clients' prompts and the aggregate behave
    on its images.
``init`` (FM-FL's initialisation)
    Before round 1, the initial global prompt is trained with cross-entropy on
    the labeled synthetic set (``fusion-init-steps`` SGD steps at
    ``fusion-lr``); the aggregates of later rounds are left as they are. The
    ServerApp applies :meth:`ServerFusion.initial_arrays` to its initial arrays.

Either way a poisoned foundation model (``attack = "fm-poison"``) reaches every
client through the global prompt. Fusion modes live in the ``FUSIONS`` registry
(one function each, see :data:`FUSIONS`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from logging import INFO, WARNING
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from fedsec.registry import Param, Registry
from strategies.common import StrategyWrapper, node_id, require_key
from strategies.detection import detection_of
from strategies.registry import StrategyContext, register_wrapper

if TYPE_CHECKING:
    import torch

#: ``(prompt model, synthetic features, labels, cfg, seed[, client_ctxs=...]) -> stats``: changes
#: ``model.prompt_learner.ctx`` in place. A fusion marked by :func:`fusion_traits` with
#: ``needs_clients`` also receives this round's client prompts (``client_ctxs``, a list of arrays);
#: one marked ``at_start`` runs once, on the initial global prompt, instead of after every aggregation.
FUSIONS: Registry[Callable[..., dict[str, float]]] = Registry("server fusion")

#: The teacher of ``kd``: the clients' logits averaged (FedDF's AvgLogits) or their softmaxes.
TEACHERS = ("logits", "probs")


def _fusion_names() -> list[str]:
    return ["none", *FUSIONS.names()]


def fusion_traits(*, needs_clients: bool = False, at_start: bool = False) -> Callable:
    """Mark a fusion function: it needs the clients' prompts, or it runs on the initial prompt.

    Parameters
    ----------
    needs_clients : bool
        Called with ``client_ctxs=`` (the prompts of this round's replies the rule accepted).
    at_start : bool
        Applied once to the initial global prompt (round 0), never after an aggregation.
    """

    def deco(fn: Callable) -> Callable:
        fn.needs_clients = needs_clients  # type: ignore[attr-defined]
        fn.at_start = at_start  # type: ignore[attr-defined]
        return fn

    return deco


def cross_entropy_fusion(model, features, labels, cfg, seed: int, steps: int) -> dict[str, float]:
    """``steps`` SGD steps of cross-entropy on the labeled synthetic features at ``fusion-lr`` (no weight decay)."""
    from fedsec.training import train_on_features

    stats = train_on_features(
        model, features, labels, steps, cfg.batch_size, float(cfg.get("fusion-lr")), cfg.momentum, 0.0, seed
    )
    return {"fusion-loss": stats["train-loss"], "fusion-acc": stats["train-acc"]}


@FUSIONS.register("tune")
def tune(model, features, labels, cfg, seed: int) -> dict[str, float]:
    """Cross-entropy tuning of ``ctx`` on the labeled synthetic features (``fusion-steps``, every round)."""
    return cross_entropy_fusion(model, features, labels, cfg, seed, int(cfg.get("fusion-steps")))


@FUSIONS.register("init")
@fusion_traits(at_start=True)
def init(model, features, labels, cfg, seed: int) -> dict[str, float]:
    """Cross-entropy pre-training of the initial ``ctx`` on the labeled synthetic features (FM-FL's initialisation)."""
    return cross_entropy_fusion(model, features, labels, cfg, seed, int(cfg.get("fusion-init-steps")))


def ensemble_teacher(logits: Sequence[torch.Tensor], temperature: float, average: str = "logits") -> torch.Tensor:
    """The ensemble's soft labels at temperature ``temperature``.

    Parameters
    ----------
    logits : sequence of torch.Tensor
        One ``N x C`` tensor of logits per client model, on the same ``N`` inputs.
    temperature : float
        Softmax temperature ``T > 0``.
    average : {"logits", "probs"}
        ``"logits"``: ``softmax(mean_k z_k / T)``, the averaged logits of FedDF (Lin et al.,
        NeurIPS 2020, AvgLogits), which FM-FL's distillation follows (Li et al., arXiv 2401.10375);
        ``"probs"``: ``mean_k softmax(z_k / T)``, the average of the clients' predictions.

    Returns
    -------
    torch.Tensor
        ``N x C`` probabilities (rows sum to 1).
    """
    import torch
    import torch.nn.functional as F

    if not logits:
        raise ValueError("ensemble_teacher needs the logits of at least one model")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    stacked = torch.stack([z.float() for z in logits])
    if average == "logits":
        return F.softmax(stacked.mean(0) / temperature, dim=-1)
    if average == "probs":
        return F.softmax(stacked / temperature, dim=-1).mean(0)
    raise ValueError(f"average must be one of {TEACHERS}, got {average!r}")


def distillation_loss(student_logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 KL(teacher || softmax(student / T))``, averaged over the batch (Hinton et al.; FedDF).

    The ``T^2`` keeps the gradients' scale independent of ``T``.
    """
    import torch.nn.functional as F

    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_student, teacher, reduction="batchmean")


def distil(
    model,
    features: torch.Tensor,
    teacher: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float,
    temperature: float,
    seed: int,
) -> dict[str, float]:
    """Distil ``teacher`` into ``model.prompt_learner.ctx`` on ``features`` (SGD; batches seeded by ``seed``).

    Parameters
    ----------
    model : fedsec.models.prompt.PromptCLIP
        The student; anything with ``prompt_learner.ctx`` and ``logits_from_features(features)``.
    features : torch.Tensor
        ``N x E`` frozen image features.
    teacher : torch.Tensor
        ``N x C`` soft labels (:func:`ensemble_teacher`).
    steps, batch_size, lr, momentum
        The optimisation (the same SGD as ``tune``, no weight decay).
    temperature : float
        ``T`` of :func:`distillation_loss`.
    seed : int
        Seeds the batch order.

    Returns
    -------
    dict
        ``fusion-loss`` (mean over steps), ``fusion-kl-before``/``fusion-kl-after`` (the loss on
        the whole set before and after) and ``fusion-agree`` (share of the images where the
        student's top class is the teacher's, after).
    """
    import torch

    from fedsec.training import batches, sgd_for

    ctx = model.prompt_learner.ctx
    dev = ctx.device
    features, teacher = features.to(dev), teacher.to(dev)

    def whole_set() -> tuple[float, float]:
        with torch.no_grad():
            logits = model.logits_from_features(features)
            kl = float(distillation_loss(logits, teacher, temperature))
            return kl, float((logits.argmax(-1) == teacher.argmax(-1)).float().mean())

    before, _ = whole_set()
    opt = sgd_for(ctx, lr, momentum, 0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for idx in batches(len(teacher), batch_size, steps, gen):
        idx = idx.to(dev)
        loss = distillation_loss(model.logits_from_features(features[idx]), teacher[idx], temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after, agree = whole_set()
    return {
        "fusion-loss": float(np.mean(losses)) if losses else 0.0,
        "fusion-kl-before": before,
        "fusion-kl-after": after,
        "fusion-agree": agree,
    }


@FUSIONS.register("kd")
@fusion_traits(needs_clients=True)
def kd(model, features, labels, cfg, seed: int, client_ctxs: Sequence[np.ndarray] = ()) -> dict[str, float]:
    """FedDF ensemble distillation of the clients' prompts into the aggregate on the synthetic images (labels unused).

    The student is ``model`` (holding the aggregate); the teacher is the ensemble of
    ``client_ctxs`` on ``features`` (:func:`ensemble_teacher` with ``fusion-teacher`` at
    ``fusion-temperature``). ``labels`` are ignored: FM-FL's distillation needs only the
    foundation model's images (Li et al., arXiv 2401.10375; FedDF, Lin et al., NeurIPS 2020).
    """
    import torch

    del labels  # kd uses the synthetic images only
    if len(client_ctxs) == 0:
        log(WARNING, "server fusion (kd): no client prompt to distil this round; the aggregate is kept")
        return {}
    temperature = float(cfg.get("fusion-temperature"))
    ctx = model.prompt_learner.ctx
    features = features.to(ctx.device)
    with torch.no_grad():
        logits = [
            model.logits_from_features(features, torch.as_tensor(np.asarray(c), dtype=ctx.dtype, device=ctx.device))
            for c in client_ctxs
        ]
        teacher = ensemble_teacher(logits, temperature, str(cfg.get("fusion-teacher")))
    stats = distil(
        model,
        features,
        teacher,
        int(cfg.get("fusion-steps")),
        cfg.batch_size,
        float(cfg.get("fusion-lr")),
        cfg.momentum,
        temperature,
        seed,
    )
    return {**stats, "fusion-teachers": float(len(client_ctxs))}


class ServerFusion(StrategyWrapper):
    """Fuse the aggregate of ``inner`` with the server's synthetic data every round, or the initial prompt once.

    Parameters
    ----------
    inner : Strategy
        Any strategy whose aggregate holds the array ``array_name``.
    fuse : callable or None
        ``(array, server_round) -> (new array, metrics)``, called after every aggregation;
        ``(array, server_round, client_arrays) -> ...`` when ``pass_clients``. ``None``: the
        aggregates are returned as ``inner`` made them (``server-fusion = "init"``).
    mode : str
        Name of the fusion (logs).
    array_name : str
        The array of the aggregate to fuse (a missing one raises :class:`~strategies.common.MissingKeyError`).
    arrayrecord_key : str
        Record key of the arrays in the replies (Flower's default ``"arrays"``); read only when ``pass_clients``.
    pass_clients : bool
        Hand ``fuse`` the ``array_name`` array of every reply ``inner`` aggregated: the replies
        without error whose node ``inner``'s :class:`~strategies.detection.Detection` did not
        exclude (a robust rule's rejected clients do not teach the fused model). Copies: the
        replies are never changed.
    prepare : callable, optional
        ``array -> (new array, metrics)``, applied to the initial global array by :meth:`initial_arrays`.

    Attributes
    ----------
    pre_fusion_ctx : np.ndarray or None
        The newest aggregate before fusion (the clients' model without the
        synthetic data's influence; the activation-bound defense can filter
        the synthetic set with it, ``bounds-data = "filtered"``).
    """

    def __init__(
        self,
        inner: Strategy,
        fuse: Callable[..., tuple[np.ndarray, dict]] | None,
        mode: str,
        array_name: str,
        *,
        arrayrecord_key: str = "arrays",
        pass_clients: bool = False,
        prepare: Callable[[np.ndarray], tuple[np.ndarray, dict]] | None = None,
    ) -> None:
        self.inner = inner
        self.fuse = fuse
        self.mode = mode
        self.array_name = array_name
        self.arrayrecord_key = arrayrecord_key
        self.pass_clients = pass_clients
        self.prepare = prepare
        self.pre_fusion_ctx: np.ndarray | None = None

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> Server fusion on synthetic data: %s", self.mode)
        self.inner.summary()

    def initial_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """The initial global arrays after ``inner``'s hook (if any) and ``prepare`` (if any).

        The ServerApp calls this on the outermost strategy (wrappers delegate unknown
        attributes to ``inner``) before round 1 of a fresh run.
        """
        hook = getattr(self.inner, "initial_arrays", None)
        if callable(hook):
            arrays = hook(arrays)
        if self.prepare is None:
            return arrays
        ctx = require_key(arrays, self.array_name, "server fusion").numpy().copy()
        new, stats = self.prepare(ctx)
        log(INFO, "server fusion (%s) of the initial prompt: %s", self.mode, _rounded(stats))
        return ArrayRecord({k: (Array(new) if k == self.array_name else v) for k, v in arrays.items()})

    def client_arrays(self, replies: Sequence[Message]) -> list[np.ndarray]:
        """Copies of the ``array_name`` array of every reply ``inner`` aggregated (see ``pass_clients``)."""
        detection = detection_of(self.inner)
        excluded = set(detection.excluded) if detection is not None else set()
        out = []
        for msg in replies:
            if msg.has_error() or not msg.has_content() or node_id(msg) in excluded:
                continue
            record = require_key(msg.content, self.arrayrecord_key, "server fusion")
            out.append(np.array(require_key(record, self.array_name, "server fusion").numpy(), copy=True))
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate with ``inner``, then fuse the global ``array_name`` on the synthetic data."""
        replies = list(replies)  # read twice: by ``inner`` and for the clients' arrays
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        self.pre_fusion_ctx = require_key(arrays, self.array_name, "server fusion").numpy().copy()
        if self.fuse is None:
            return arrays, metrics
        if self.pass_clients:
            ctx, stats = self.fuse(self.pre_fusion_ctx, server_round, self.client_arrays(replies))
        else:
            ctx, stats = self.fuse(self.pre_fusion_ctx, server_round)
        out = ArrayRecord({k: (Array(ctx) if k == self.array_name else v) for k, v in arrays.items()})
        merged = MetricRecord(dict(metrics.items()) if metrics is not None else {})
        for key, value in stats.items():
            merged[key] = float(value)
        log(INFO, "server fusion (%s): %s", self.mode, _rounded(stats))
        return out, merged


def _rounded(stats: dict) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in stats.items()}


def synthetic_prompt_model(cfg, synthetic) -> tuple:
    """A server-side prompt classifier over the synthetic set's classes and the set's frozen features."""
    from fedsec.caches import clip_for
    from fedsec.models.prompt import build_prompt_model

    clip = clip_for(cfg)
    return clip, build_prompt_model(cfg, clip, synthetic.classnames)


def _learner_problem(cfg) -> str | None:
    """Server fusion trains ``ctx`` on the synthetic data; an image-path learner has no such path yet."""
    if str(cfg.get("server-fusion")) == "none":
        return None
    return (
        f"run-config server-fusion={cfg.get('server-fusion')!r} has no path for learner={cfg.learner!r} (weights in "
        "the image path: fusion trains ctx alone); use learner='coop', or server-fusion='none'"
    )


@register_wrapper(
    "server-fusion",
    params=(
        Param(
            "server-fusion",
            "none",
            "fusion of the synthetic data: tune (CE every round), kd (distil the clients), init (CE pre-training)",
            choices=_fusion_names,
        ),
        Param("fusion-steps", 50, "tune, kd: SGD steps of server fusion per round", range=(0, None)),
        Param("fusion-lr", 0.002, "learning rate of server fusion", range=(0.0, None)),
        Param(
            "fusion-temperature",
            1.0,
            "kd: softmax temperature T (> 0) of the teacher and the student",
            range=(1e-6, None),
        ),
        Param(
            "fusion-teacher",
            "logits",
            "kd: the teacher averages the clients' logits (FedDF) or probs",
            choices=TEACHERS,
        ),
        Param("fusion-init-steps", 200, "init: SGD steps of pre-training the initial prompt", range=(0, None)),
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
    needs_clients = bool(getattr(fusion, "needs_clients", False))
    state: dict = {}

    def run(ctx: np.ndarray, server_round: int, client_ctxs: list[np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
        from fedsec.node import get_ctx, set_ctx

        if not state:
            synthetic = sctx.synthetic_data()
            clip, model = synthetic_prompt_model(cfg, synthetic)
            state.update(model=model, features=clip.encode_images_batched(synthetic.images), labels=synthetic.labels)
        set_ctx(state["model"], ctx)
        seed = cfg.seed * 7_919 + server_round
        if needs_clients:
            stats = fusion(state["model"], state["features"], state["labels"], cfg, seed, client_ctxs=client_ctxs or [])
        else:
            stats = fusion(state["model"], state["features"], state["labels"], cfg, seed)
        return get_ctx(state["model"]), stats

    if getattr(fusion, "at_start", False):
        return ServerFusion(inner, None, mode, sctx.array_name, prepare=lambda ctx: run(ctx, 0))
    return ServerFusion(
        inner,
        run,
        mode,
        sctx.array_name,
        arrayrecord_key=sctx.arrayrecord_key or "arrays",
        pass_clients=needs_clients,
    )


server_fusion.learner_problem = _learner_problem  # type: ignore[attr-defined]
