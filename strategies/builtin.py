"""Flower's own aggregation rules, registered as they are (never rewritten).

The registered classes are thin subclasses of Flower's that only

* hand Flower copies of the replies (FedMedian, FedTrimmedAvg, Bulyan and the
  DP wrapper modify the replies they get; ours are left untouched);
* clamp the assumed number of Byzantine nodes ``f`` to what the round's
  number of replies ``n`` allows (Krum/MultiKrum: ``n >= 2f + 3``; Bulyan:
  ``n >= 4f + 3``), with a warning, instead of skipping the round;
* report which node ids were left out and the share of each node in the
  aggregate as a :class:`strategies.detection.Detection` (``detection``).

Run-config parameters: ``num-byzantine`` (f, default 2), ``multikrum-keep``
(0 = ``n - f``), ``trim-beta`` (0.2), ``clip-norm`` (1.0) and
``dp-noise-multiplier`` (0.01).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.multikrum import select_multikrum

from fedsec.registry import Param
from strategies.common import copy_replies, example_weights, node_id
from strategies.detection import Detection, DetectionAttributes, detection_of
from strategies.registry import StrategyContext, register_strategy

NUM_BYZANTINE = Param(
    "num-byzantine", 2, "assumed number of Byzantine nodes f (Krum, MultiKrum, Bulyan)", range=(0, None)
)
CLIP_NORM = Param("clip-norm", 1.0, "L2 bound of each update (norm-clip, dp-clip)", range=(1e-12, None))


def krum_max_byzantine(num_replies: int, num_byzantine: int) -> int:
    """The largest ``f <= num_byzantine`` with ``num_replies >= 2f + 3`` (Krum's condition), at least 0."""
    return max(0, min(num_byzantine, (num_replies - 3) // 2))


def bulyan_max_byzantine(num_replies: int, num_byzantine: int) -> int:
    """The largest ``f <= num_byzantine`` with ``num_replies >= 4f + 3`` (Bulyan's condition), at least 0."""
    return max(0, min(num_byzantine, (num_replies - 3) // 4))


def detection_from_selection(ids: list[int], selected: list[bool], weights: np.ndarray) -> Detection:
    """The :class:`Detection` of a selection rule: the unselected nodes and per-node shares.

    Parameters
    ----------
    ids : list[int]
        Node ids of the replies.
    selected : list[bool]
        Whether each reply was selected for averaging.
    weights : np.ndarray
        Averaging weight (``num-examples``) of each reply.

    Returns
    -------
    Detection
        Ids not selected, and node id -> share in the weighted average (0 when
        not selected).
    """
    w = np.where(np.asarray(selected, dtype=bool), weights, 0.0)
    total = float(w.sum())
    shares = w / total if total > 0 else w
    excluded = tuple(i for i, s in zip(ids, selected, strict=True) if not s)
    return Detection(excluded, {i: float(s) for i, s in zip(ids, shares, strict=True)})


class _KrumDetection(DetectionAttributes):
    """Mixin for Flower's Krum/MultiKrum: clamp f per round, record the selection."""

    num_malicious_nodes: int
    num_nodes_to_select: int
    weighted_by_key: str

    def _init_detection(self, num_byzantine: int, num_to_keep: int) -> None:
        self.num_byzantine = num_byzantine
        self.num_to_keep = num_to_keep
        self.detection: Detection | None = Detection()

    def _num_to_select(self, num_replies: int, f: int) -> int:
        return self.num_to_keep

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's aggregation on copies of the replies, then record the selection."""
        replies = copy_replies(replies)
        valid = [m for m in replies if not m.has_error()]
        f = krum_max_byzantine(len(valid), self.num_byzantine)
        if f < self.num_byzantine and valid:
            log(
                WARNING,
                "%s: %d replies allow at most f=%d (configured %d)",
                type(self).__name__,
                len(valid),
                f,
                self.num_byzantine,
            )
        self.num_malicious_nodes = f
        self.num_nodes_to_select = max(1, min(len(valid), self._num_to_select(len(valid), f)))
        self.detection = Detection()
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None and valid:
            contents = [m.content for m in valid]
            chosen = {id(c) for c in select_multikrum(contents, f, self.num_nodes_to_select)}
            self.detection = detection_from_selection(
                [node_id(m) for m in valid],
                [id(c) in chosen for c in contents],
                example_weights(contents, self.weighted_by_key),
            )
        return arrays, metrics


class DetectingKrum(_KrumDetection, Krum):
    """Flower's Krum (selects one update) with per-round f clamping and detection info."""

    def __init__(self, num_byzantine: int = 2, **kwargs: object) -> None:
        super().__init__(num_malicious_nodes=num_byzantine, **kwargs)  # type: ignore[arg-type]
        self._init_detection(num_byzantine, 1)


class DetectingMultiKrum(_KrumDetection, MultiKrum):
    """Flower's MultiKrum keeping ``num_to_keep`` updates (0: ``n - f``), with detection info."""

    def __init__(self, num_byzantine: int = 2, num_to_keep: int = 0, **kwargs: object) -> None:
        super().__init__(num_malicious_nodes=num_byzantine, **kwargs)  # type: ignore[arg-type]
        self._init_detection(num_byzantine, num_to_keep)

    def _num_to_select(self, num_replies: int, f: int) -> int:
        return self.num_to_keep if self.num_to_keep > 0 else num_replies - f


class DetectingBulyan(DetectionAttributes, Bulyan):
    """Flower's Bulyan with f clamped to ``(n - 3) // 4`` and the Multi-Krum stage recorded.

    With fewer than 3 replies Bulyan is undefined; the round falls back to FedAvg.
    """

    def __init__(self, num_byzantine: int = 2, **kwargs: object) -> None:
        super().__init__(num_malicious_nodes=num_byzantine, **kwargs)  # type: ignore[arg-type]
        self.num_byzantine = num_byzantine
        self.selection_rule = self._recording_selection
        self._selected: list[RecordDict] = []
        self.detection: Detection | None = Detection()

    def _recording_selection(
        self, contents: list[RecordDict], num_malicious_nodes: int, num_nodes_to_select: int
    ) -> list[RecordDict]:
        self._selected = select_multikrum(contents, num_malicious_nodes, num_nodes_to_select)
        return self._selected

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's Bulyan on copies of the replies, then record the selection."""
        replies = copy_replies(replies)
        valid = [m for m in replies if not m.has_error()]
        self.detection, self._selected = Detection(), []
        if not valid:
            return None, None
        if len(valid) < 3:
            log(WARNING, "bulyan: %d replies are too few (needs 3), averaging them with FedAvg", len(valid))
            return FedAvg.aggregate_train(self, server_round, replies)
        f = bulyan_max_byzantine(len(valid), self.num_byzantine)
        if f < self.num_byzantine:
            log(WARNING, "bulyan: %d replies allow at most f=%d (configured %d)", len(valid), f, self.num_byzantine)
        self.num_malicious_nodes = f
        ids = {id(m.content): node_id(m) for m in valid}
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            chosen = {id(c) for c in self._selected}
            self.detection = Detection(tuple(nid for cid, nid in ids.items() if cid not in chosen))
        return arrays, metrics


class _NoDetection(DetectionAttributes):
    """Mixin: ``detection`` is ``None`` (the rule excludes no node); ``last_excluded`` is empty."""


class CopyingFedMedian(_NoDetection, FedMedian):
    """Flower's FedMedian on copies of the replies (Flower pops their arrays)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Coordinate-wise median of copies of the replies."""
        return super().aggregate_train(server_round, copy_replies(replies))


class CopyingFedTrimmedAvg(_NoDetection, FedTrimmedAvg):
    """Flower's FedTrimmedAvg on copies of the replies (Flower pops their arrays)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Coordinate-wise trimmed mean of copies of the replies."""
        return super().aggregate_train(server_round, copy_replies(replies))


class CopyingDPFixedClipping(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed-clipping DP wrapper on copies of the replies.

    Flower replaces the arrays of the replies it clips; this subclass gives it
    copies. ``detection`` is that of the wrapped strategy.
    """

    @property
    def detection(self) -> Detection | None:
        """The wrapped strategy's :class:`Detection`."""
        return detection_of(self.strategy)

    @property
    def last_excluded(self) -> list[int]:
        """Node ids excluded by the wrapped strategy."""
        d = self.detection
        return list(d.excluded) if d is not None else []

    @property
    def last_weights(self) -> dict[int, float]:
        """Per-node shares of the wrapped strategy."""
        d = self.detection
        return dict(d.weights) if d is not None else {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip copies of the replies, aggregate with the wrapped strategy, add noise."""
        return super().aggregate_train(server_round, copy_replies(replies))


class PlainFedAvg(_NoDetection, FedAvg):
    """Flower's FedAvg with (empty) detection attributes."""


def _num_sampled(sctx: StrategyContext) -> int:
    """Nodes FedAvg samples per training round for this context."""
    kw = sctx.fedavg_kwargs()
    return max(1, int(sctx.num_nodes * kw["fraction_train"]), kw["min_train_nodes"])


@register_strategy("fedavg")
def fedavg(sctx: StrategyContext) -> FedAvg:
    """Flower's FedAvg, weighted by ``num-examples``."""
    return PlainFedAvg(**sctx.fedavg_kwargs())


@register_strategy("krum", params=(NUM_BYZANTINE,))
def krum(sctx: StrategyContext) -> Krum:
    """Flower's Krum: keep the single update closest to its n - f - 2 neighbours."""
    return DetectingKrum(num_byzantine=int(sctx.cfg.get("num-byzantine")), **sctx.fedavg_kwargs())


@register_strategy(
    "multikrum",
    params=(NUM_BYZANTINE, Param("multikrum-keep", 0, "updates MultiKrum averages (0 = n - f)", range=(0, None))),
)
def multikrum(sctx: StrategyContext) -> MultiKrum:
    """Flower's MultiKrum: average the ``multikrum-keep`` best Krum scores (0: n - f)."""
    return DetectingMultiKrum(
        num_byzantine=int(sctx.cfg.get("num-byzantine")),
        num_to_keep=int(sctx.cfg.get("multikrum-keep")),
        **sctx.fedavg_kwargs(),
    )


@register_strategy("bulyan", params=(NUM_BYZANTINE,))
def bulyan(sctx: StrategyContext) -> Bulyan:
    """Flower's Bulyan: Multi-Krum selection, then coordinate-wise trimmed mean around the median."""
    return DetectingBulyan(num_byzantine=int(sctx.cfg.get("num-byzantine")), **sctx.fedavg_kwargs())


@register_strategy("median")
def median(sctx: StrategyContext) -> FedMedian:
    """Flower's FedMedian (coordinate-wise median)."""
    return CopyingFedMedian(**sctx.fedavg_kwargs())


@register_strategy(
    "trimmed-mean", params=(Param("trim-beta", 0.2, "fraction cut from each tail per coordinate", range=(0.0, 0.5)),)
)
def trimmed_mean(sctx: StrategyContext) -> FedTrimmedAvg:
    """Flower's FedTrimmedAvg, cutting ``trim-beta`` of each tail per coordinate."""
    return CopyingFedTrimmedAvg(beta=float(sctx.cfg.get("trim-beta")), **sctx.fedavg_kwargs())


@register_strategy(
    "dp-clip",
    params=(CLIP_NORM, Param("dp-noise-multiplier", 0.01, "Gaussian noise std / clip-norm", range=(0.0, None))),
)
def dp_clip(sctx: StrategyContext) -> Strategy:
    """Flower's server-side fixed clipping DP wrapper around FedAvg (weak noise by default)."""
    return CopyingDPFixedClipping(
        PlainFedAvg(**sctx.fedavg_kwargs()),
        noise_multiplier=float(sctx.cfg.get("dp-noise-multiplier")),
        clipping_norm=float(sctx.cfg.get("clip-norm")),
        num_sampled_clients=_num_sampled(sctx),
    )
