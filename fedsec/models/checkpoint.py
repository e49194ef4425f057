"""Check a local CLIP checkpoint against the model it is meant for, before loading it.

open_clip loads a checkpoint with ``torch.load`` and then ``load_state_dict``;
a file that is not a state_dict fails with a hint to re-run with
``weights_only=False`` (unsafe, and the wrong advice), and a checkpoint of
another architecture fails deep inside position-embedding resizing (e.g.
``"compute_index_ranges_weights" not implemented for 'Half'``). Here the file
is read as a plain tensor state_dict and every key and shape is compared with
the model built on the ``meta`` device (no memory, no weights); the first
mismatches are named in one message.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from fedsec.models.factory import PretrainedUnavailable, register_configs


class CheckpointMismatch(PretrainedUnavailable):
    """A checkpoint file is unreadable or does not fit the model's architecture."""


def architecture_config(model_name: str) -> dict:
    """The open_clip JSON config (architecture) of ``model_name``.

    Parameters
    ----------
    model_name : str
        An open_clip model name (fedsec's own configs must be registered).

    Returns
    -------
    dict
        The config, or ``{}`` when open_clip knows none (e.g. a hub-only model).
    """
    import open_clip

    return dict(open_clip.get_model_config(model_name) or {})


def config_sha256(config: dict) -> str:
    """SHA-256 of a config as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def read_state_dict(path: str | Path) -> dict:
    """Read a checkpoint as open_clip does, without unpickling arbitrary objects.

    Raises
    ------
    CheckpointMismatch
        When the file cannot be read as a tensor state_dict.
    """
    from open_clip.factory import load_state_dict

    try:
        sd = load_state_dict(str(path), device="cpu", weights_only=True)
    except Exception as exc:  # torch/pickle/safetensors raise many types
        text = str(exc).strip()
        if "weights_only" in text or "Unpickl" in type(exc).__name__:
            # torch's message suggests weights_only=False, which would run arbitrary code from the file
            why = "not a file of tensors: torch.load(weights_only=True) refused it"
        else:
            why = f"{type(exc).__name__}: {(text.splitlines() or [''])[0][:160]}"
        raise CheckpointMismatch(
            f"checkpoint {path} is not a readable PyTorch/safetensors state_dict ({why}); "
            "save one with torch.save(model.state_dict(), path)"
        ) from exc
    if not isinstance(sd, dict) or not sd:
        raise CheckpointMismatch(f"checkpoint {path} holds no state_dict (got {type(sd).__name__})")
    return sd


def check_checkpoint(model_name: str, path: str | Path, max_listed: int = 3) -> None:
    """Raise :class:`CheckpointMismatch` unless ``path`` loads into ``model_name`` key for key, shape for shape.

    Parameters
    ----------
    model_name : str
        open_clip model name (its config must be registered).
    path : str or Path
        Local checkpoint file.
    max_listed : int
        How many mismatching keys the message names.
    """
    import open_clip
    import torch
    from open_clip.factory import convert_state_dict

    register_configs()  # fedsec's JSON architectures (the embedded models) next to open_clip's
    sd = read_state_dict(path)
    logging.disable(logging.WARNING)  # open_clip warns that a model without weights is random: it is meant to be
    try:
        with torch.device("meta"):
            model = open_clip.create_model(model_name, pretrained=None, device="meta")
    finally:
        logging.disable(logging.NOTSET)
    try:
        sd = convert_state_dict(model, sd)
    except Exception:  # noqa: BLE001 - a third-party layout it does not know: compare as is
        pass
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(getattr(v, "shape", ())) for k, v in sd.items()}
    got.pop("text.transformer.embeddings.position_ids", None)
    if "logit_bias" in want and "logit_bias" not in got:
        got["logit_bias"] = want["logit_bias"]
    for key in ("logit_scale", "logit_bias"):  # open_clip reshapes scalar vs 1-d
        if key in got and key in want and int(torch.tensor(got[key]).prod()) == int(torch.tensor(want[key]).prod()):
            got[key] = want[key]
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if not (missing or extra or shapes):
        return
    parts = []
    if shapes:
        listed = ", ".join(f"{k} {list(got[k])} vs model {list(want[k])}" for k in shapes[:max_listed])
        parts.append(f"{len(shapes)} shape mismatches ({listed})")
    if missing:
        parts.append(f"{len(missing)} keys missing ({', '.join(missing[:max_listed])})")
    if extra:
        parts.append(f"{len(extra)} unexpected keys ({', '.join(extra[:max_listed])})")
    raise CheckpointMismatch(
        f"checkpoint {path} does not fit model {model_name!r}: {'; '.join(parts)}; "
        "pass the model name the checkpoint was trained as (run-config model) or its own checkpoint"
    )
