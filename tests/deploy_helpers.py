"""Shared by the deployment tests: ``experiments/deploy/deploy.py`` loaded as a module."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.conftest import ROOT

DEPLOY_PY = ROOT / "experiments" / "deploy" / "deploy.py"


def load_deploy() -> ModuleType:
    """Import ``experiments/deploy/deploy.py`` (not a package) as ``fedsec_deploy``."""
    spec = importlib.util.spec_from_file_location("fedsec_deploy", DEPLOY_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module
