"""Strategy registry: a defense is one file in ``strategies/`` (or in any package with an entry point), one test.

A factory takes a :class:`StrategyContext` and returns a Flower
``flwr.serverapp.strategy.Strategy``. Flower's own rules (FedAvg, Krum,
MultiKrum, Bulyan, FedMedian, FedTrimmedAvg, DP clipping) are registered in
:mod:`strategies.builtin` without being rewritten.

Discovery (:mod:`fedsec.registry`): every module of this package with a
top-level ``@register_strategy``/``@register_wrapper`` is imported on the first
lookup, and so is every module an installed distribution names under the
entry-point groups ``fedsec.strategies`` / ``fedsec.wrappers``.

Wrappers (server fusion, activation bounds...) are applied around whatever
rule ``strategy`` names, in ascending ``order`` (innermost first; ties by
name): ``server-fusion`` (order 10) wraps the rule, ``activation-bounds``
(order 20) wraps that, so the bounds are learned on the fused model. The
ServerApp then wraps the result in reply validation and the recorder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.serverapp.strategy import Strategy

from fedsec.registry import Param, Registry

if TYPE_CHECKING:
    from fedsec.config import RunConfig


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
        The model's main array in the ``ArrayRecord`` (fedsec's text context ``ctx``).
    array_names : tuple of str, optional
        Every learned array of the model in the ``ArrayRecord``, which server-side model code
        (fusion, activation bounds) acts on (``None``: ``array_name`` alone; see :meth:`learned_names`).
    """

    cfg: RunConfig
    num_nodes: int
    server_update: Callable | None = None
    synthetic_data: Callable | None = None
    arrayrecord_key: str | None = None
    weighted_by_key: str | None = None
    client_id_key: str | None = None
    array_name: str | None = None
    array_names: tuple[str, ...] | None = None

    def learned_names(self) -> tuple[str, ...]:
        """The learned arrays server-side model code acts on: ``array_names``, else ``(array_name,)``, else ``()``."""
        if self.array_names:
            return tuple(self.array_names)
        return (self.array_name,) if self.array_name else ()

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
STRATEGIES: Registry[StrategyFactory] = Registry("strategy", packages=("strategies",))

#: ``(strategy, sctx) -> strategy``: returns its argument unchanged when its run-config key leaves it off.
WrapperFactory = Callable[[Strategy, StrategyContext], Strategy]
STRATEGY_WRAPPERS: Registry[WrapperFactory] = Registry("strategy wrapper", packages=("strategies",))


def register_strategy(name: str, params: Sequence[Param] = ()):
    """Register a strategy factory under ``name``.

    Parameters
    ----------
    name : str
        The run-config ``strategy`` value.
    params : sequence of Param
        Run-config keys this strategy reads (a key several strategies share is
        declared by each, with one default).
    """
    return STRATEGIES.register(name, params=params)


def register_wrapper(name: str, params: Sequence[Param] = (), order: int = 0):
    """Register a wrapper applied around every strategy (server fusion, activation bounds...).

    Parameters
    ----------
    name : str
        Wrapper name (logs and errors).
    params : sequence of Param
        Run-config keys it reads (one of them switches it on).
    order : int
        Where it goes: wrappers apply in ascending order, the lowest innermost.
    """
    return STRATEGY_WRAPPERS.register(name, params=params, order=order)


def load_all() -> None:
    """Discover every strategy and wrapper (idempotent)."""
    STRATEGIES.load()
    STRATEGY_WRAPPERS.load()


def wrap_strategy(strategy: Strategy, sctx: StrategyContext) -> Strategy:
    """Apply every registered wrapper in ascending ``order`` (each decides from the run config whether it is on)."""
    for component in STRATEGY_WRAPPERS.components():
        strategy = component.obj(strategy, sctx)
    return strategy


def strategy_params() -> list[Param]:
    """Run-config keys declared by the strategies and the wrappers."""
    from fedsec.registry import merge_params

    return merge_params([*STRATEGIES.params(), *STRATEGY_WRAPPERS.params()], "strategy")


def strategy_param_defaults() -> dict[str, object]:
    """Run-config keys declared by strategies and wrappers, with defaults."""
    return {p.key: p.default for p in strategy_params()}


def build_strategy(sctx: StrategyContext) -> Strategy:
    """Build the strategy named by ``sctx.cfg.strategy``, inside the wrappers the run config switches on."""
    return wrap_strategy(STRATEGIES.get(sctx.cfg.strategy)(sctx), sctx)
