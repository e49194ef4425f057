"""Shared by the deployment tests: the deployment launcher module."""

from __future__ import annotations

from types import ModuleType


def load_deploy() -> ModuleType:
    """:mod:`fedsec.deploy` (``fedsec deploy``)."""
    import fedsec.deploy

    return fedsec.deploy
