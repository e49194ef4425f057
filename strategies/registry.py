"""Strategy registry: a defense is one file, one ``@register_strategy``, one test.

A factory takes a :class:`StrategyContext` and returns a Flower
``flwr.serverapp.strategy.Strategy``. Flower's own rules (FedAvg, Krum,
MultiKrum, Bulyan, FedMedian, FedTrimmedAvg, DP clipping) are registered in
:mod:`strategies.builtin` without being rewritten.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from flwr.serverapp.strategy import Strategy

from fedsec.config import RunConfig
from fedsec.registry import Registry


@dataclass
class StrategyContext:
    """What a strategy factory may use.

    Attributes
    ----------
    cfg : RunConfig
        The validated run config (a defense reads only its own parameters and
        the sampling settings; it never learns who is malicious).
    num_nodes : int
        Nodes connected when the run starts.
    server_update : callable, optional
        ``ctx -> ctx`` after training on the server's root set (FLTrust).
    synthetic_data : callable, optional
        ``() -> fedsec.synthetic.SyntheticSet``: the foundation model's labeled
        synthetic images (server fusion, activation bounds); which of them an
        attacker poisoned is not part of it.
    arrayrecord_key, weighted_by_key : str, optional
        Flower's record keys (FedAvg's arguments; Flower's defaults when ``None``).
    client_id_key : str, optional
        Metric of a reply holding a stable client identity (``None``: node ids).
    array_name : str, optional
        The array of the ``ArrayRecord`` that server-side model code (fusion,
        activation bounds) acts on; the wrappers that need it refuse ``None``.
    """

    cfg: RunConfig
    num_nodes: int
    server_update: Callable | None = None
    synthetic_data: Callable | None = None
    arrayrecord_key: str | None = None
    weighted_by_key: str | None = None
    client_id_key: str | None = None
    array_name: str | None = None

    def fedavg_kwargs(self) -> dict:
        """Sampling keyword arguments shared by every FedAvg-derived rule."""
        c = self.cfg
        keys = {"arrayrecord_key": self.arrayrecord_key, "weighted_by_key": self.weighted_by_key}
        return {
            "fraction_train": c.fraction_train,
            "fraction_evaluate": c.fraction_evaluate,
            "min_train_nodes": min(c.min_train_nodes, self.num_nodes),
            "min_evaluate_nodes": 1 if c.fraction_evaluate > 0 else 0,
            "min_available_nodes": min(c.min_train_nodes, self.num_nodes),
            **{k: v for k, v in keys.items() if v is not None},
        }

    def rule_kwargs(self) -> dict:
        """Keyword arguments of a :class:`strategies.base.UpdateRule`: FedAvg's and ``client_id_key``."""
        return {**self.fedavg_kwargs(), "client_id_key": self.client_id_key}


StrategyFactory = Callable[[StrategyContext], Strategy]
STRATEGIES: Registry[StrategyFactory] = Registry("strategy")
_PARAMS: dict[str, dict[str, object]] = {}

#: Modules whose import registers strategies (one file per rule).
STRATEGY_MODULES = [
    "strategies.builtin",
    "strategies.norm_clip",
    "strategies.rlr",
    "strategies.flame",
    "strategies.fltrust",
    "strategies.foolsgold",
]


def _declare_params(user: str, params: dict[str, object] | None) -> None:
    """Record the run-config keys ``user`` reads; one key may serve several users with one default."""
    for key, value in (params or {}).items():
        if key in _PARAMS and _PARAMS[key]["default"] != value:
            raise ValueError(f"strategy parameter {key!r} declared twice with different defaults")
        _PARAMS.setdefault(key, {"default": value, "users": []})["users"].append(user)


def register_strategy(name: str, params: dict[str, object] | None = None):
    """Register a strategy factory under ``name``.

    Parameters
    ----------
    name : str
        The run-config ``strategy`` value.
    params : dict, optional
        Run-config keys this strategy reads and their defaults (kebab-case).
    """

    def deco(factory: StrategyFactory) -> StrategyFactory:
        STRATEGIES.register(name)(factory)
        _declare_params(name, params)
        return factory

    return deco


#: ``(strategy, sctx) -> strategy``: returns its argument unchanged when its run-config key leaves it off.
WrapperFactory = Callable[[Strategy, StrategyContext], Strategy]
STRATEGY_WRAPPERS: Registry[WrapperFactory] = Registry("strategy wrapper")
_WRAPPER_ORDER: list[str] = []

#: Modules whose import registers strategy wrappers, applied around every rule in this order (innermost first).
WRAPPER_MODULES = ["strategies.fusion", "strategies.activation_bound"]


def register_wrapper(name: str, params: dict[str, object] | None = None):
    """Register a wrapper applied around every strategy (server fusion, activation bounds...).

    Parameters
    ----------
    name : str
        Wrapper name (logs and errors).
    params : dict, optional
        Run-config keys it reads (one of them switches it on), with defaults.
    """

    def deco(factory: WrapperFactory) -> WrapperFactory:
        STRATEGY_WRAPPERS.register(name)(factory)
        _WRAPPER_ORDER.append(name)
        _declare_params(name, params)
        return factory

    return deco


def load_all() -> None:
    """Import every strategy and wrapper module (idempotent)."""
    for mod in STRATEGY_MODULES + WRAPPER_MODULES:
        importlib.import_module(mod)


def wrap_strategy(strategy: Strategy, sctx: StrategyContext) -> Strategy:
    """Apply every registered wrapper (each decides from the run config whether it is on)."""
    load_all()
    for name in _WRAPPER_ORDER:
        strategy = STRATEGY_WRAPPERS.get(name)(strategy, sctx)
    return strategy


def strategy_param_defaults() -> dict[str, object]:
    """Run-config keys declared by registered strategies, with defaults."""
    load_all()
    return {k: v["default"] for k, v in _PARAMS.items()}


def build_strategy(sctx: StrategyContext) -> Strategy:
    """Build the strategy named by ``sctx.cfg.strategy``, inside the wrappers the run config switches on."""
    load_all()
    return wrap_strategy(STRATEGIES.get(sctx.cfg.strategy)(sctx), sctx)
