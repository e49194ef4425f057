"""Attack registry.

An attack = an input transform (trigger) + a label map + optionally its own
optimisation, wrapping the honest training path of :mod:`fedsec.training`.
A new attack is one file under ``fedsec/attacks/``, one
``@register_attack("name")`` and one test; add its module to
``ATTACK_MODULES``.
"""

from __future__ import annotations

import importlib

from fedsec.attacks.base import ATTACKS, Attack, malicious_partitions, register_attack

#: Modules whose import registers attacks (one file per attack).
ATTACK_MODULES = [
    "fedsec.attacks.base",
    "fedsec.attacks.badpromptfl",
    "fedsec.attacks.poisoning",
    "fedsec.attacks.badclip",
    "fedsec.attacks.fm_poison",
]


def load_all() -> None:
    """Import every attack module (idempotent)."""
    for mod in ATTACK_MODULES:
        importlib.import_module(mod)


def attack_param_defaults() -> dict[str, object]:
    """Run-config keys declared by the attacks, with their defaults."""
    load_all()
    return ATTACKS.param_defaults()


def get_attack(name: str) -> type[Attack]:
    """The attack class registered as ``name``."""
    load_all()
    return ATTACKS.get(name)


__all__ = ["ATTACKS", "Attack", "attack_param_defaults", "get_attack", "malicious_partitions", "register_attack"]

load_all()
