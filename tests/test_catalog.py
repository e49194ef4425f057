"""fedsec.models.catalog reads what open_clip knows without importing it, and agrees with open_clip."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedsec.models import catalog
from tests.conftest import ROOT


def test_catalog_agrees_with_open_clip():
    # Prepare
    import open_clip

    from fedsec.models.factory import register_configs

    register_configs()
    # Execute / Assert: the same model list and configs; the same token counts
    assert catalog.known_models() == sorted(open_clip.list_models())
    for name in ("fedsec-tiny-clip", "ViT-B-16", "RN50"):
        assert catalog.model_config(name) == open_clip.get_model_config(name)
    for text in ("a photo of a", "an extremely blurry photograph of a", "X X X X", ""):
        assert catalog.count_tokens("fedsec-tiny-clip", text) == len(
            open_clip.get_tokenizer("fedsec-tiny-clip").encode(text)
        )
    assert catalog.model_config("no-such-model") is None


@pytest.mark.parametrize("values", [{}, {"n-ctx": 6}])
def test_deep_config_check_imports_neither_open_clip_nor_torchvision(values):
    # Prepare: a fresh interpreter, as the launcher is before any Flower process starts
    code = (
        "import json, sys\n"
        "from fedsec.config import ConfigError\n"
        "from fedsec.preflight import check_config\n"
        "try:\n"
        f"    check_config({values!r}, num_nodes=10)\n"
        "    out = 'ok'\n"
        "except ConfigError as exc:\n"
        "    out = str(exc)\n"
        "print(json.dumps([out, sorted(m for m in ('open_clip', 'torchvision', 'timm') if m in sys.modules)]))\n"
    )
    # Execute
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    # Assert
    assert proc.returncode == 0, proc.stderr[-2000:]
    out, heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert heavy == []
    assert out == "ok" if not values else "n-ctx=6" in out and "4 tokens" in out
