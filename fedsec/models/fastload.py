"""Load the frozen CLIP of a local checkpoint from a fast on-disk format.

A Flower 1.41 deployment runs every ClientApp message in a fresh process, so the
frozen model is built again for every message. :func:`fedsec.models.factory.create_clip`
does that the careful way: resolve the open_clip config, read and check the checkpoint
against the architecture (:mod:`fedsec.models.checkpoint`), build the model with its
random initialisation, then copy the checkpoint's weights in. Most of that only has to
happen once per checkpoint.

Here the first load of a checkpoint goes through :func:`~fedsec.models.factory.create_clip`
and stores every tensor of the resulting module (parameters *and* buffers, including
non-persistent ones such as the causal attention mask) in the disk cache of
:mod:`fedsec.diskcache` (kind ``frozen-model``), keyed by the checkpoint's SHA-256, the
architecture config, this code and the torch / open_clip versions. Later loads build the
module on the ``meta`` device (no memory, no random init) and assign the stored tensors;
the module is the same open_clip class holding bit-identical tensors, so its outputs are
identical. The entry is checked like every disk-cache file (checksum, full key,
structure) and a module that is left with a ``meta`` tensor is refused (the slow path
runs instead).

Only local checkpoint files take this path (``pretrained="embedded"`` or a path); random
weights (``"none"``) and hub tags go straight to :func:`~fedsec.models.factory.create_clip`,
as does everything when ``FEDSEC_DISK_CACHE=0``.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsec import diskcache
from fedsec.models.factory import (
    FrozenCLIP,
    PretrainedUnavailable,
    create_clip,
    register_configs,
    resolve_pretrained,
    sha256_file,
)

log = logging.getLogger(__name__)

#: Disk-cache kind (sub-folder) of the stored modules.
KIND = "frozen-model"
#: Version of the stored payload's layout.
FORMAT = 1


def fast_key(model_name: str, checkpoint_sha256: str, config: dict) -> dict[str, Any]:
    """What determines the stored module of ``model_name`` with a checkpoint's weights.

    Parameters
    ----------
    model_name : str
        open_clip model name.
    checkpoint_sha256 : str
        SHA-256 of the checkpoint file's bytes (never its path).
    config : dict
        The model's open_clip architecture config.

    Returns
    -------
    dict
        A JSON-serialisable key for :mod:`fedsec.diskcache`.
    """
    import open_clip

    return {
        "kind": KIND,
        "format": FORMAT,
        "model": model_name,
        "checkpoint_sha256": checkpoint_sha256,
        "config": config,
        "code": _code_digest(),
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", ""),
    }


@lru_cache(maxsize=1)
def _code_digest() -> str:
    """SHA-256 of the files that build the module (this one, the factory and the checkpoint check)."""
    here = Path(__file__).resolve().parent
    files = [here / "fastload.py", here / "factory.py", here / "checkpoint.py"]
    return diskcache.file_digest([f for f in files if f.exists()])


def module_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by dotted name, detached CPU copies.

    Shared tensors appear under each name (``remove_duplicate=False``), so every
    slot of a module built on ``meta`` gets its value back.
    """
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = p.detach().cpu().clone()
    for name, b in model.named_buffers(remove_duplicate=False):
        if b is not None:
            out[name] = b.detach().cpu().clone()
    return out


def build_on_meta(model_name: str) -> nn.Module:
    """The open_clip module of ``model_name`` built on the ``meta`` device (no storage, no random init)."""
    import open_clip

    register_configs()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns "No pretrained weights loaded": expected here
    try:
        with torch.device("meta"):
            return open_clip.create_model(model_name, pretrained=None, device="meta")
    finally:
        root.setLevel(level)


def assign_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Put ``tensors`` into ``model``'s parameter and buffer slots (frozen); refuse anything left on ``meta``.

    Raises
    ------
    ValueError
        When a name has no slot in ``model`` or a slot keeps a ``meta`` tensor.
    """
    for name, value in tensors.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
        elif attr in owner._buffers:
            owner._buffers[attr] = value
        else:
            raise ValueError(f"stored tensor {name!r} has no slot in {type(model).__name__}")
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and t.is_meta]
    if left:
        raise ValueError(f"{len(left)} tensors left on the meta device, e.g. {left[0]!r}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _valid(payload: dict) -> bool:
    """Structural check of a stored payload."""
    tensors = payload.get("tensors")
    return (
        isinstance(tensors, dict)
        and bool(tensors)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items())
        and isinstance(payload.get("image_size"), int)
        and isinstance(payload.get("mean"), list)
        and isinstance(payload.get("std"), list)
    )


def _payload(clip: FrozenCLIP) -> dict[str, Any]:
    return {
        "tensors": module_tensors(clip.model),
        "image_size": int(clip.image_size),
        "mean": [float(m) for m in clip.mean],
        "std": [float(s) for s in clip.std],
    }


def load_clip(model_name: str, pretrained: str = "embedded", device: str = "cpu") -> FrozenCLIP:
    """:func:`~fedsec.models.factory.create_clip`, from the fast format when a local checkpoint has been loaded before.

    Parameters
    ----------
    model_name : str
        open_clip model name (fedsec's configs are registered).
    pretrained : str
        ``"embedded"``, a local checkpoint path, a hub tag or ``"none"``.
    device : str
        Where the model lives.

    Raises
    ------
    PretrainedUnavailable
        As :func:`~fedsec.models.factory.create_clip`; in particular when the checkpoint's
        SHA-256 differs from the shipped manifest's (the stored module of another SHA-256
        is never used).
    """
    source, expected = resolve_pretrained(model_name, pretrained)
    cache = diskcache.default_cache()
    if cache is None or not source or not os.path.exists(source):
        return create_clip(model_name, pretrained, device)
    digest = sha256_file(source)
    if expected and digest != expected:
        raise PretrainedUnavailable(
            f"checkpoint {source} has SHA-256 {digest}, expected {expected}: "
            "every node must load the identical frozen model"
        )
    import open_clip

    register_configs()
    config = dict(open_clip.get_model_config(model_name) or {})
    if not config:  # a model open_clip has no config for: nothing to key the architecture by
        return create_clip(model_name, pretrained, device)
    key = fast_key(model_name, digest, config)
    payload = cache.load(KIND, key, _valid)
    if payload is not None:
        try:
            model = assign_tensors(build_on_meta(model_name), payload["tensors"]).to(device)
        except (ValueError, AttributeError, RuntimeError) as exc:  # another layout: build the slow way
            log.warning("fedsec fast load of %s refused (%s); loading the checkpoint", model_name, exc)
        else:
            return FrozenCLIP(
                model,
                open_clip.get_tokenizer(model_name),
                model_name,
                pretrained,
                source,
                digest,
                payload["image_size"],
                tuple(payload["mean"]),
                tuple(payload["std"]),
                torch.device(device),
            )
    clip = create_clip(model_name, pretrained, device, expected_sha256=digest)
    cache.store(KIND, key, _payload(clip))
    return clip


@lru_cache(maxsize=2)
def cached_clip(model_name: str, pretrained: str, device: str) -> FrozenCLIP:
    """:func:`load_clip` once per process (the ClientApp's path, :mod:`fedsec.node`)."""
    return load_clip(model_name, pretrained, device)
