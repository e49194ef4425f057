"""FedProx (Li et al., MLSys 2020, "Federated optimization in heterogeneous networks"): Flower's own strategy.

The server aggregates like FedAvg and sends ``proximal-mu`` in every round's
config; honest fedsec clients add ``mu / 2 * ||ctx - ctx_global||^2`` to their
local loss (:func:`fedsec.training.train_on_features`). Malicious clients follow
their own objective and may ignore the term, as a real attacker would.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedProx

from fedsec.registry import Param
from strategies.detection import DetectionAttributes
from strategies.registry import StrategyContext, register_strategy


class FlowerFedProx(DetectionAttributes, FedProx):
    """Flower's FedProx; it excludes no node (``detection`` is ``None``)."""


@register_strategy(
    "fedprox", params=(Param("proximal-mu", 0.01, "FedProx's proximal weight mu sent to clients", range=(0.0, None)),)
)
def fedprox(sctx: StrategyContext) -> FedProx:
    """Flower's FedProx with ``proximal-mu``."""
    return FlowerFedProx(proximal_mu=float(sctx.cfg.get("proximal-mu")), **sctx.fedavg_kwargs())
