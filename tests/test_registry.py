"""Components: one declaration (Param), discovery by package scan and entry points, wrapper order, no import cycle."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from fedsec.registry import Param, Registry, merge_params, registers_components
from tests.conftest import ROOT


def _run(code: str, pythonpath: str = "") -> str:
    """Last stdout line of ``code`` in a fresh interpreter (the repo first on the path, then ``pythonpath``)."""
    env = {"PYTHONPATH": f"{ROOT}:{pythonpath}" if pythonpath else str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_a_param_checks_its_range_and_choices():
    # Prepare
    rate = Param("rate", 0.5, "a fraction", range=(0.0, 1.0))
    mode = Param("mode", "a", "a mode", choices=("a", "b"))

    # Execute / Assert
    assert rate.type is float and rate.problem(0.7) is None
    assert rate.problem(1.5) == "run-config rate=1.5 is out of range [0.0, 1.0]"
    assert mode.problem("c") == "run-config mode='c' is not allowed; allowed values: a, b"


def test_one_key_declared_twice_must_have_one_default():
    # Prepare
    reg: Registry[object] = Registry("thing")
    reg.register("x", params=(Param("k", 1, "k"), Param("j", 2, "j")))(object())
    reg.register("y", params=(Param("k", 1, "k again"),))(object())

    # Execute / Assert
    assert reg.param_defaults({"base": 0}) == {"base": 0, "k": 1, "j": 2}
    with pytest.raises(ValueError, match="'k' declared twice"):
        merge_params([Param("k", 1, ""), Param("k", 3, "")])


def test_a_module_registers_components_when_a_top_level_decorator_says_so():
    # Prepare
    rule = '@register_strategy("x")\ndef x(sctx): ...\n'
    fusion = '@FUSIONS.register("y")\ndef y(*a): ...\n'
    helper = 'def register_strategy(name): ...\n"""@register_strategy("in-a-docstring")"""\n'

    # Execute / Assert
    assert registers_components(rule) and registers_components(fusion)
    assert not registers_components(helper)


def test_wrappers_compose_in_their_declared_order():
    # Prepare / Execute
    from strategies.registry import STRATEGY_WRAPPERS

    # Assert: fusion innermost, bounds around it (learned on the fused model)
    assert [(c.name, c.order) for c in STRATEGY_WRAPPERS.components()] == [
        ("server-fusion", 10),
        ("activation-bounds", 20),
    ]


def test_fedsec_config_imports_no_component_and_flame_no_torch():
    # Prepare
    code = "import sys, json\n{}\nprint(json.dumps(sorted(sys.modules)))"

    # Execute
    config = json.loads(_run(code.format("import fedsec.config")))
    flame = json.loads(_run(code.format("import strategies.flame")))

    # Assert
    components = ("strategies", "fedsec.attacks", "fedsec.synthetic", "fedsec.data")
    assert [m for m in config if m.startswith(components)] == []
    assert [m for m in flame if m.split(".")[0] in ("torch", "open_clip", "sklearn")] == []


def test_a_rule_in_an_installed_outside_package_is_found_by_name(tmp_path):
    # Prepare: a tiny distribution "my-rules" (package + .dist-info with a fedsec.strategies entry point)
    pkg = tmp_path / "my_rules"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "trimmed.py").write_text(
        textwrap.dedent(
            '''
            """A user's rule: FedAvg, registered from outside fedsec."""
            from flwr.serverapp.strategy import FedAvg

            from strategies.registry import register_strategy


            @register_strategy("outside-avg")
            def outside_avg(sctx):
                """FedAvg from an outside package."""
                return FedAvg(**sctx.fedavg_kwargs())
            '''
        )
    )
    info = tmp_path / "my_rules-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rules\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedsec.strategies]\nmy-rules = my_rules\n")

    # Execute: a fresh interpreter that has the distribution on its path
    found = _run(
        "from strategies.registry import STRATEGIES\n"
        "print(STRATEGIES.component('outside-avg').doc, 'flame' in STRATEGIES)",
        pythonpath=str(tmp_path),
    )

    # Assert: the outside rule, and fedsec's own ones still there
    assert found == "FedAvg from an outside package. True"
