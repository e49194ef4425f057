"""What open_clip knows about a model, read without importing the open_clip package.

``import open_clip`` imports torchvision (and with it ``torch._dynamo`` and
sympy) and timm: about 2 CPU seconds, more than the rest of a config check.
The launcher checks every run config before it starts a Flower process
(:mod:`fedsec.preflight`), so it reads what it needs from the same files
open_clip reads: the architecture JSON configs (open_clip's ``model_configs/``
and fedsec's ``fedsec/models/configs/``) and, for token counts, open_clip's
own ``tokenizer.py`` and BPE vocabulary, loaded as a standalone module.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from types import ModuleType

FEDSEC_CONFIGS = Path(__file__).parent / "configs"


def _open_clip_dir() -> Path:
    """The installed open_clip package folder (found, not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("open_clip is not installed (pip install open_clip_torch)")
    return Path(spec.origin).parent


@lru_cache(maxsize=1)
def config_files() -> dict[str, Path]:
    """Model name -> its architecture JSON, open_clip's and fedsec's (fedsec's win on a clash, as registered)."""
    files = {p.stem: p for p in sorted((_open_clip_dir() / "model_configs").glob("*.json"))}
    files.update({p.stem: p for p in sorted(FEDSEC_CONFIGS.glob("*.json"))})
    return files


def known_models() -> list[str]:
    """The names ``open_clip.list_models()`` gives once fedsec's configs are registered."""
    return sorted(config_files())


def model_config(name: str) -> dict | None:
    """The architecture config of ``name`` (as ``open_clip.get_model_config``), or ``None``."""
    path = config_files().get(name)
    return json.loads(path.read_text()) if path is not None else None


@lru_cache(maxsize=1)
def _tokenizer_module() -> ModuleType:
    """open_clip's ``tokenizer.py`` as a standalone module (it imports torch, ftfy and regex, not the package)."""
    path = _open_clip_dir() / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("fedsec_open_clip_tokenizer", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def count_tokens(model: str, text: str) -> int:
    """How many tokens ``text`` takes under ``model``'s tokenizer (no start/end tokens).

    Models whose text tower uses CLIP's BPE tokenizer (every model without an
    ``hf_tokenizer_name``) are counted with open_clip's ``SimpleTokenizer``
    loaded standalone; the others through ``open_clip.get_tokenizer`` (``-1`` when
    that tokenizer cannot count).
    """
    cfg = model_config(model) or {}
    if (cfg.get("text_cfg") or {}).get("hf_tokenizer_name"):
        import open_clip

        tokenizer = open_clip.get_tokenizer(model)
        return len(tokenizer.encode(text)) if hasattr(tokenizer, "encode") else -1
    return len(_tokenizer_module().SimpleTokenizer().encode(text))
