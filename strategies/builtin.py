"""Flower's own aggregation rules, registered as they are (never rewritten)."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from strategies.registry import StrategyContext, register_strategy


@register_strategy("fedavg")
def fedavg(sctx: StrategyContext) -> FedAvg:
    """Flower's FedAvg, weighted by ``num-examples``."""
    return FedAvg(**sctx.fedavg_kwargs())
