"""Attack registry.

An attack = an input transform (trigger) + a label map + optionally its own
optimisation, wrapping the honest training path of :mod:`fedsec.training`.
A new attack is one file under ``fedsec/attacks/`` (or in any package with a
``fedsec.attacks`` entry point, see :mod:`fedsec.registry`) with one
``@register_attack("name", params=(Param(...), ...))`` and one test.
"""

from __future__ import annotations

from fedsec.attacks.base import ATTACKS, Attack, malicious_partitions, register_attack


def load_all() -> None:
    """Discover every attack (idempotent)."""
    ATTACKS.load()


def attack_param_defaults() -> dict[str, object]:
    """Run-config keys declared by the attacks, with their defaults."""
    return ATTACKS.param_defaults()


def get_attack(name: str) -> type[Attack]:
    """The attack class registered as ``name``."""
    return ATTACKS.get(name)


__all__ = ["ATTACKS", "Attack", "attack_param_defaults", "get_attack", "malicious_partitions", "register_attack"]
