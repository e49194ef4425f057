"""fedsec's defenses as a library: importing them loads no model code (torch, open_clip) until used."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

#: Packages a server-side defense module must not load at import time.
HEAVY = ("torch", "open_clip", "torchvision")


def _modules_after(statement: str) -> list[str]:
    """``sorted(sys.modules)`` of a fresh interpreter after running ``statement``."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "module", ["strategies.flame", "strategies.validation", "strategies.bounds_wrapper", "strategies.activation_bound"]
)
def test_importing_a_defense_loads_no_torch_or_open_clip(module):
    # Prepare / Execute: a fresh interpreter imports the defense, as a user's ServerApp would
    modules = _modules_after(f"import {module}")

    # Assert: the module is there, no model package came with it
    assert module in modules
    found = [m for m in modules if m.split(".")[0] in HEAVY]
    assert not found, f"import {module} pulled in {found[:5]}"


def test_the_cnn_example_app_uses_no_fedsec_prompt_or_clip_code():
    # Prepare / Execute: import the example's ServerApp and ClientApp modules
    modules = _modules_after("import experiments.examples.cnn_app.server_app, experiments.examples.cnn_app.client_app")

    # Assert: fedsec's defenses came, its CLIP, prompt model, node and ServerApp code did not
    assert {"strategies.flame", "strategies.validation", "strategies.bounds_wrapper"} <= set(modules)
    unwanted = ("open_clip", "fedsec.models", "fedsec.node", "fedsec.bounds_clip", "strategies.server_app")
    assert not [m for m in modules if m.startswith(unwanted)]
