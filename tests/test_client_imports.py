"""The ClientApp module's import graph: Flower loads it before every deployment message, so it stays light."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

#: Top-level packages (or package prefixes) that ``import clients.client_app`` must not load.
HEAVY = (
    "torch",
    "open_clip",
    "torchvision",
    "timm",
    "sklearn",
    "scipy",
    "matplotlib",
    "pandas",
    "ray",
    "datasets",
    "flwr_datasets",
    "strategies",
    "fedsec.attacks",
    "fedsec.activation_bounds",
    "fedsec.models",
    "fedsec.data",
)


def _modules_after(statement: str) -> list[str]:
    """``sorted(sys.modules)`` of a fresh interpreter after running ``statement``."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _loaded(modules: list[str], prefix: str) -> list[str]:
    return [m for m in modules if m == prefix or m.startswith(prefix + ".")]


def test_importing_the_clientapp_loads_no_model_attack_or_defense_module():
    # Prepare / Execute: a fresh interpreter imports the ClientApp module, as flwr-clientapp does
    modules = _modules_after("import clients.client_app")

    # Assert: the app object exists, and none of the heavy or unrelated packages came with it
    assert "clients.client_app" in modules and "flwr.clientapp" in modules
    found = {p: _loaded(modules, p) for p in HEAVY if _loaded(modules, p)}
    assert not found, f"import clients.client_app pulled in {found}"


def test_the_handlers_still_resolve_what_they_import_lazily():
    # Prepare / Execute: import the names the train and evaluate handlers import inside their bodies
    modules = _modules_after(
        "import clients.client_app as c\n"
        "from fedsec.node import clip_for, local_data_for, prompt_model_for\n"
        "from fedsec.attacks import get_attack, malicious_partitions\n"
        "from fedsec.training import accuracy_on_features\n"
        "assert callable(c.train) and callable(c.evaluate)"
    )

    # Assert: they exist (a renamed function would fail at the first message, not at import)
    assert "fedsec.node" in modules and "fedsec.models.fastload" in modules
