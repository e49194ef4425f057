"""Server fusion on foundation-model synthetic data, around any aggregation rule.

In FM-FL (Li et al., "Foundation models in federated learning", arXiv 2401.10375;
Bi & Li, arXiv 2410.17573) the server holds labeled images written by a
foundation model and brings the model's knowledge into the global model with
them. The fusion acts on every learned array of the run's learner (the
ServerApp names them, ``StrategyContext.array_names``: ``ctx`` for CoOp, ``vpt``
for visual prompts, ``adapter-down``/``adapter-up`` for CLIP-Adapter), through
the learner's own forward pass (cached frozen features, or the images through
the prompted encoder). Three modes (``server-fusion``):

``tune`` (ours)
    After the wrapped rule aggregates the clients' models, ``fusion-steps`` SGD
    steps at ``fusion-lr`` of cross-entropy on the labeled synthetic set, every
    round (the learner's honest local step, :func:`fedsec.training.train_learner`).
``kd`` (FM-FL's distillation, FedDF: Lin et al., "Ensemble distillation for
robust model fusion in federated learning", NeurIPS 2020)
    After aggregation, the aggregate (the student) is distilled towards the
    ensemble of this round's client models (the teacher) on the synthetic
    images: ``fusion-steps`` SGD steps at ``fusion-lr`` of
    ``T^2 KL(teacher || student)`` at temperature ``T = fusion-temperature``;
    the teacher averages the clients' logits (FedDF's AvgLogits,
    ``fusion-teacher = "logits"``) or their softmaxes (``"probs"``). The
    synthetic *labels* are not used: a poisoned foundation model reaches the
    global model only through how the clients' prompts and the aggregate behave
    on its images.
``init`` (FM-FL's initialisation)
    Before round 1, the initial global arrays are trained with cross-entropy on
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
from strategies.common import StrategyWrapper, node_id, require_key, select_arrays
from strategies.detection import detection_of
from strategies.registry import StrategyContext, register_wrapper

if TYPE_CHECKING:
    import torch

    from fedsec.training import LocalData

#: ``(learner, synthetic data, cfg, seed[, client_arrays=...]) -> stats``: changes the learned arrays
#: of ``learner`` (a :class:`~fedsec.models.prompt.PromptCLIP`: ``ctx`` for CoOp, ``vpt`` or the
#: adapter's for an image-path learner) in place; ``synthetic data`` is a
#: :class:`~fedsec.training.LocalData` (images, labels, frozen features). A fusion marked by
#: :func:`fusion_traits` with ``needs_clients`` also receives this round's client arrays
#: (``client_arrays``, a list of name -> array dicts); one marked ``at_start`` runs once, on the
#: initial global arrays, instead of after every aggregation.
FUSIONS: Registry[Callable[..., dict[str, float]]] = Registry("server fusion")

#: The teacher of ``kd``: the clients' logits averaged (FedDF's AvgLogits) or their softmaxes.
TEACHERS = ("logits", "probs")


def _fusion_names() -> list[str]:
    return ["none", *FUSIONS.names()]


def fusion_traits(*, needs_clients: bool = False, at_start: bool = False) -> Callable:
    """Mark a fusion function: it needs the clients' arrays, or it runs on the initial arrays.

    Parameters
    ----------
    needs_clients : bool
        Called with ``client_arrays=`` (the learned arrays of this round's replies the rule accepted).
    at_start : bool
        Applied once to the initial global arrays (round 0), never after an aggregation.
    """

    def deco(fn: Callable) -> Callable:
        fn.needs_clients = needs_clients  # type: ignore[attr-defined]
        fn.at_start = at_start  # type: ignore[attr-defined]
        return fn

    return deco


def cross_entropy_fusion(model, data: LocalData, cfg, seed: int, steps: int) -> dict[str, float]:
    """``steps`` SGD steps of cross-entropy on the labeled synthetic set at ``fusion-lr`` (no weight decay).

    The learner's own honest step (:func:`fedsec.training.train_learner`): cached features for a
    text-only learner or a feature adapter, the images through the prompted encoder for visual prompts.
    """
    from fedsec.training import train_learner

    stats = train_learner(
        model, data, steps, cfg.batch_size, float(cfg.get("fusion-lr")), momentum=cfg.momentum, weight_decay=0.0,
        seed=seed,
    )  # fmt: skip
    return {"fusion-loss": stats["train-loss"], "fusion-acc": stats["train-acc"]}


@FUSIONS.register("tune")
def tune(model, data: LocalData, cfg, seed: int) -> dict[str, float]:
    """Cross-entropy tuning of the learned arrays on the labeled synthetic set (``fusion-steps``, every round)."""
    return cross_entropy_fusion(model, data, cfg, seed, int(cfg.get("fusion-steps")))


@FUSIONS.register("init")
@fusion_traits(at_start=True)
def init(model, data: LocalData, cfg, seed: int) -> dict[str, float]:
    """Cross-entropy pre-training of the initial arrays on the labeled synthetic set (FM-FL's initialisation)."""
    return cross_entropy_fusion(model, data, cfg, seed, int(cfg.get("fusion-init-steps")))


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


def learner_logits(model, data: LocalData, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``model`` on ``data`` (rows ``idx``, or all), through its image path when it learns one.

    Visual prompts encode the images (gradients reach the prompts); otherwise the cached frozen
    features, mapped by a feature adapter if any (:meth:`~fedsec.models.prompt.PromptCLIP.adapt`).
    """
    import torch

    dev = model.prompt_learner.ctx.device
    if getattr(model, "needs_images", False):
        images = data.images if idx is None else data.images[idx]
        return model(images.to(dev))
    rows = torch.arange(len(data.labels)) if idx is None else idx
    return model.logits_from_features(model.adapt(data.features[rows].to(dev)))


def distil(
    model,
    data: LocalData,
    teacher: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float,
    temperature: float,
    seed: int,
) -> dict[str, float]:
    """Distil ``teacher`` into every learned array of ``model`` on ``data`` (SGD; batches seeded by ``seed``).

    Parameters
    ----------
    model : fedsec.models.prompt.PromptCLIP
        The student: anything with ``learned()`` and the logits of :func:`learner_logits`.
    data : fedsec.training.LocalData
        The synthetic images and their frozen features (labels unused).
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

    teacher = teacher.to(model.prompt_learner.ctx.device)

    def whole_set() -> tuple[float, float]:
        with torch.no_grad():
            logits = learner_logits(model, data)
            kl = float(distillation_loss(logits, teacher, temperature))
            return kl, float((logits.argmax(-1) == teacher.argmax(-1)).float().mean())

    before, _ = whole_set()
    opt = sgd_for(list(model.learned().values()), lr, momentum, 0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for idx in batches(len(teacher), batch_size, steps, gen):
        loss = distillation_loss(learner_logits(model, data, idx), teacher[idx.to(teacher.device)], temperature)
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
def kd(model, data: LocalData, cfg, seed: int, client_arrays: Sequence[dict[str, np.ndarray]] = ()) -> dict[str, float]:
    """FedDF ensemble distillation of the clients' models into the aggregate on the synthetic images (labels unused).

    The student is ``model`` (holding the aggregate); the teacher is the ensemble of the
    ``client_arrays`` (each loaded into the same learner) on the synthetic images
    (:func:`ensemble_teacher` with ``fusion-teacher`` at ``fusion-temperature``). The labels are
    ignored: FM-FL's distillation needs only the foundation model's images (Li et al., arXiv
    2401.10375; FedDF, Lin et al., NeurIPS 2020).
    """
    import torch

    from fedsec.models.prompt import get_arrays, set_arrays

    if len(client_arrays) == 0:
        log(WARNING, "server fusion (kd): no client model to distil this round; the aggregate is kept")
        return {}
    temperature = float(cfg.get("fusion-temperature"))
    aggregate = get_arrays(model)
    logits = []
    with torch.no_grad():
        for arrays in client_arrays:
            set_arrays(model, arrays)
            logits.append(learner_logits(model, data))
        teacher = ensemble_teacher(logits, temperature, str(cfg.get("fusion-teacher")))
    set_arrays(model, aggregate)
    stats = distil(
        model,
        data,
        teacher,
        int(cfg.get("fusion-steps")),
        cfg.batch_size,
        float(cfg.get("fusion-lr")),
        cfg.momentum,
        temperature,
        seed,
    )
    return {**stats, "fusion-teachers": float(len(client_arrays))}


class ServerFusion(StrategyWrapper):
    """Fuse the aggregate of ``inner`` with the server's synthetic data every round, or the initial arrays once.

    Parameters
    ----------
    inner : Strategy
        Any strategy whose aggregate holds the arrays ``array_names``.
    fuse : callable or None
        ``(arrays, server_round) -> (new arrays, metrics)``, called after every aggregation, with
        ``arrays`` a dict of copies of the ``array_names`` arrays;
        ``(arrays, server_round, client_arrays) -> ...`` when ``pass_clients``. ``None``: the
        aggregates are returned as ``inner`` made them (``server-fusion = "init"``).
    mode : str
        Name of the fusion (logs).
    array_names : str or sequence of str
        The arrays of the aggregate to fuse (the model's learned arrays; a missing one raises
        :class:`~strategies.common.MissingKeyError`); every other array passes unchanged.
    arrayrecord_key : str
        Record key of the arrays in the replies (Flower's default ``"arrays"``); read only when ``pass_clients``.
    pass_clients : bool
        Hand ``fuse`` the ``array_names`` arrays of every reply ``inner`` aggregated: the replies
        without error whose node ``inner``'s :class:`~strategies.detection.Detection` did not
        exclude (a robust rule's rejected clients do not teach the fused model). Copies: the
        replies are never changed.
    prepare : callable, optional
        ``arrays -> (new arrays, metrics)``, applied to the initial global arrays by :meth:`initial_arrays`.

    Attributes
    ----------
    pre_fusion_arrays : dict[str, np.ndarray] or None
        The newest aggregate before fusion (the clients' model without the synthetic data's
        influence; the activation-bound defense can filter the synthetic set with it,
        ``bounds-data = "filtered"``).
    """

    def __init__(
        self,
        inner: Strategy,
        fuse: Callable[..., tuple[dict[str, np.ndarray], dict]] | None,
        mode: str,
        array_names: str | Sequence[str],
        *,
        arrayrecord_key: str = "arrays",
        pass_clients: bool = False,
        prepare: Callable[[dict[str, np.ndarray]], tuple[dict[str, np.ndarray], dict]] | None = None,
    ) -> None:
        self.inner = inner
        self.fuse = fuse
        self.mode = mode
        self.array_names = (array_names,) if isinstance(array_names, str) else tuple(array_names)
        if not self.array_names:
            raise ValueError("ServerFusion needs the name of at least one array to fuse")
        self.arrayrecord_key = arrayrecord_key
        self.pass_clients = pass_clients
        self.prepare = prepare
        self.pre_fusion_arrays: dict[str, np.ndarray] | None = None

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        log(INFO, "\t├──> Server fusion on synthetic data: %s", self.mode)
        self.inner.summary()

    def _select(self, record: ArrayRecord) -> dict[str, np.ndarray]:
        return select_arrays(record, self.array_names, "server fusion")

    def _replace(self, record: ArrayRecord, new: dict[str, np.ndarray]) -> ArrayRecord:
        return ArrayRecord({k: (Array(np.asarray(new[k])) if k in new else v) for k, v in record.items()})

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
        new, stats = self.prepare(self._select(arrays))
        log(INFO, "server fusion (%s) of the initial arrays: %s", self.mode, _rounded(stats))
        return self._replace(arrays, new)

    def client_arrays(self, replies: Sequence[Message]) -> list[dict[str, np.ndarray]]:
        """Copies of the ``array_names`` arrays of every reply ``inner`` aggregated (see ``pass_clients``)."""
        detection = detection_of(self.inner)
        excluded = set(detection.excluded) if detection is not None else set()
        out = []
        for msg in replies:
            if msg.has_error() or not msg.has_content() or node_id(msg) in excluded:
                continue
            out.append(self._select(require_key(msg.content, self.arrayrecord_key, "server fusion")))
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate with ``inner``, then fuse the global ``array_names`` arrays on the synthetic data."""
        replies = list(replies)  # read twice: by ``inner`` and for the clients' arrays
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        self.pre_fusion_arrays = self._select(arrays)
        if self.fuse is None:
            return arrays, metrics
        current = {k: v.copy() for k, v in self.pre_fusion_arrays.items()}
        if self.pass_clients:
            new, stats = self.fuse(current, server_round, self.client_arrays(replies))
        else:
            new, stats = self.fuse(current, server_round)
        merged = MetricRecord(dict(metrics.items()) if metrics is not None else {})
        for key, value in stats.items():
            merged[key] = float(value)
        log(INFO, "server fusion (%s): %s", self.mode, _rounded(stats))
        return self._replace(arrays, new), merged


def _rounded(stats: dict) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in stats.items()}


def synthetic_prompt_model(cfg, synthetic) -> tuple:
    """The frozen CLIP and a server-side model of the run's learner over the synthetic set's classes."""
    from fedsec.caches import clip_for
    from fedsec.models.learners import build_learner
    from fedsec.models.prompt import build_prompt_model

    clip = clip_for(cfg)
    return clip, build_learner(cfg, build_prompt_model(cfg, clip, synthetic.classnames))


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
    """``ServerFusion`` around ``inner`` unless ``server-fusion = "none"``; it fuses every learned array."""
    cfg = sctx.cfg
    mode = str(cfg.get("server-fusion"))
    if mode == "none":
        return inner
    if sctx.synthetic_data is None:
        raise ValueError("server-fusion needs the server's synthetic data (StrategyContext.synthetic_data)")
    names = sctx.learned_names()
    if not names:
        raise ValueError("server-fusion needs the names of the learned arrays (StrategyContext.array_names)")
    fusion = FUSIONS.get(mode)
    needs_clients = bool(getattr(fusion, "needs_clients", False))
    state: dict = {}

    def run(
        arrays: dict[str, np.ndarray], server_round: int, client_arrays: list[dict[str, np.ndarray]] | None = None
    ) -> tuple[dict[str, np.ndarray], dict]:
        from fedsec.models.prompt import get_arrays, set_arrays
        from fedsec.training import LocalData

        if not state:
            synthetic = sctx.synthetic_data()
            clip, model = synthetic_prompt_model(cfg, synthetic)
            features = clip.encode_images_batched(synthetic.images)
            state.update(model=model, data=LocalData(synthetic.images, synthetic.labels, features))
        set_arrays(state["model"], arrays)
        seed = cfg.seed * 7_919 + server_round
        if needs_clients:
            stats = fusion(state["model"], state["data"], cfg, seed, client_arrays=client_arrays or [])
        else:
            stats = fusion(state["model"], state["data"], cfg, seed)
        return get_arrays(state["model"]), stats

    if getattr(fusion, "at_start", False):
        return ServerFusion(inner, None, mode, names, prepare=lambda arrays: run(arrays, 0))
    return ServerFusion(
        inner,
        run,
        mode,
        names,
        arrayrecord_key=sctx.arrayrecord_key or "arrays",
        pass_clients=needs_clients,
    )
