"""A small factory around open_clip.

``create_clip(model, pretrained)`` takes any open_clip model name plus either
an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b79k"``, ...), a
local checkpoint path, or ``"embedded"`` for a model shipped inside fedsec
(the default ``fedsec-tiny-clip``). The returned model is frozen and in eval
mode; images enter it in ``[0, 1]`` pixel space and are normalised inside
:meth:`FrozenCLIP.encode_images`, so trigger budgets are in pixel space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

CONFIG_DIR = Path(__file__).parent / "configs"
WEIGHTS_DIR = Path(__file__).parent / "weights"


class PretrainedUnavailable(RuntimeError):
    """A pretrained tag or checkpoint cannot be loaded."""


def _quiet_open_clip() -> None:
    """open_clip configures the root logger; keep flwr lines single."""
    logging.getLogger("flwr").propagate = False


def register_configs() -> None:
    """Make fedsec's JSON model configs known to open_clip (idempotent)."""
    import open_clip

    if "fedsec-tiny-clip" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)
    _quiet_open_clip()


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def embedded_manifest(model_name: str) -> dict:
    """The manifest (checkpoint file, SHA-256, command) of a shipped model."""
    path = WEIGHTS_DIR / f"{model_name}.json"
    if not path.exists():
        shipped = sorted(p.stem for p in WEIGHTS_DIR.glob("*.json"))
        raise PretrainedUnavailable(f"pretrained='embedded' is only available for {shipped}; got model {model_name!r}")
    return json.loads(path.read_text())


def _weights_dirs() -> list[Path]:
    """Where an embedded checkpoint may lie, in order.

    Flower ships the app to its processes as a FAB holding only source and
    config files, so the checkpoint is also looked up in the installed
    ``fedsec`` distribution (editable or not) and ``~/.cache/fedsec/weights``.
    """
    dirs = []
    if os.environ.get("FEDSEC_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["FEDSEC_WEIGHTS_DIR"]))
    dirs.append(WEIGHTS_DIR)
    try:
        from importlib.metadata import distribution

        dist = distribution("fedsec")
        direct = dist.read_text("direct_url.json")
        if direct:
            url = json.loads(direct).get("url", "")
            if url.startswith("file://"):
                dirs.append(Path(url[len("file://") :]) / "fedsec" / "models" / "weights")
        dirs.append(Path(str(dist.locate_file("fedsec/models/weights"))))
    except Exception:  # not installed: the package dir is all there is
        pass
    dirs.append(Path.home() / ".cache" / "fedsec" / "weights")
    return dirs


def find_embedded_checkpoint(filename: str) -> Path | None:
    """The first existing copy of a shipped checkpoint file, or ``None``."""
    for d in _weights_dirs():
        if (d / filename).exists():
            return (d / filename).resolve()
    return None


def _online(host: str = "huggingface.co", port: int = 443, timeout: float = 1.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class FrozenCLIP:
    """A frozen open_clip model plus what is needed to feed it.

    Attributes
    ----------
    model : torch.nn.Module
        The open_clip ``CLIP`` (eval mode, no gradients on parameters).
    tokenizer : callable
        open_clip tokenizer with the model's context length.
    name, pretrained : str
        As passed to :func:`create_clip`.
    checkpoint : str
        Absolute checkpoint path ("" for a hub tag).
    checkpoint_sha256 : str
        SHA-256 of the checkpoint file ("" for a hub tag).
    image_size : int
        Square input size.
    mean, std : tuple of float
        The model's normalisation, applied inside :meth:`encode_images`.
    """

    model: torch.nn.Module
    tokenizer: object
    name: str
    pretrained: str
    checkpoint: str
    checkpoint_sha256: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the model's mean/std normalisation to ``[0, 1]`` images."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features of ``[0, 1]`` images (differentiable in ``x``)."""
        return F.normalize(self.model.encode_image(self.normalize(x.to(self.device))), dim=-1)

    @torch.no_grad()
    def encode_images_batched(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """:meth:`encode_images` in batches without gradients; returns CPU features."""
        out = [self.encode_images(x[i : i + batch_size]).cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out) if out else torch.empty(0)

    @property
    def logit_scale(self) -> torch.Tensor:
        """The learned temperature ``exp(logit_scale)``."""
        return self.model.logit_scale.detach().exp()

    def identity(self) -> dict:
        """What identifies the frozen model in a run directory."""
        return {
            "model": self.name,
            "pretrained": self.pretrained,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }


def resolve_pretrained(model_name: str, pretrained: str) -> tuple[str, str]:
    """Resolve ``pretrained`` into ``(checkpoint path or tag, expected sha256)``.

    ``"embedded"`` maps to the shipped checkpoint; an existing path is made
    absolute; anything else is treated as an open_clip pretrained tag.
    """
    if pretrained == "embedded":
        manifest = embedded_manifest(model_name)
        ckpt = find_embedded_checkpoint(manifest["file"])
        if ckpt is None:
            raise PretrainedUnavailable(
                f"embedded checkpoint {manifest['file']} not found in {[str(d) for d in _weights_dirs()]}; "
                f"install fedsec (pip install -e .) or rebuild it with: {manifest['command']}"
            )
        return str(ckpt), manifest["sha256"]
    if pretrained in ("", "none"):
        return "", ""
    path = Path(pretrained).expanduser()
    if path.exists():
        return str(path.resolve()), ""
    if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise PretrainedUnavailable(f"checkpoint file {pretrained!r} does not exist")
    return pretrained, ""


def create_clip(
    model_name: str = "fedsec-tiny-clip",
    pretrained: str = "embedded",
    device: str | torch.device = "cpu",
    expected_sha256: str = "",
) -> FrozenCLIP:
    """Create a frozen open_clip CLIP.

    Parameters
    ----------
    model_name : str
        Any open_clip model name (``open_clip.list_models()``) or a fedsec one.
    pretrained : str
        ``"embedded"``, a local checkpoint path, an open_clip pretrained tag,
        or ``"none"`` (random weights, for tests).
    device : str or torch.device
        Where the model lives.
    expected_sha256 : str
        If given, a local checkpoint must have this SHA-256.

    Raises
    ------
    PretrainedUnavailable
        At once, with one message, when the checkpoint or tag cannot be had
        (offline tags never wait on hub retries).
    """
    import open_clip

    register_configs()
    if model_name not in open_clip.list_models():
        raise PretrainedUnavailable(f"unknown model {model_name!r}; see open_clip.list_models() or add a JSON config")
    source, sha = resolve_pretrained(model_name, pretrained)
    sha = expected_sha256 or sha
    checkpoint, digest = "", ""
    if source and os.path.exists(source):
        checkpoint = source
        digest = sha256_file(source)
        if sha and digest != sha:
            raise PretrainedUnavailable(
                f"checkpoint {source} has SHA-256 {digest}, expected {sha}: "
                "every node must load the identical frozen model"
            )
        from fedsec.models.checkpoint import check_checkpoint

        check_checkpoint(model_name, source)  # unreadable file or another architecture: one clear error
    elif source:
        known = open_clip.list_pretrained_tags_by_model(model_name)
        if source not in known:
            raise PretrainedUnavailable(
                f"pretrained tag {source!r} is not known for {model_name!r}; known tags: {known}"
            )
        if os.environ.get("HF_HUB_OFFLINE", "0") in ("1", "true", "True") or not _online():
            os.environ["HF_HUB_OFFLINE"] = "1"  # use a cached copy if there is one, never retry
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=source or None, device=device
        )
    except Exception as exc:  # open_clip / hub raise many types
        if checkpoint:
            raise PretrainedUnavailable(f"cannot load checkpoint {checkpoint}: {exc}") from exc
        raise PretrainedUnavailable(
            f"pretrained tag {source!r} for {model_name!r} is unavailable offline and not cached "
            f"({type(exc).__name__}); pass a local checkpoint path instead"
        ) from exc
    _quiet_open_clip()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    size = model.visual.image_size
    image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(float(m) for m in getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(float(s) for s in getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    tokenizer = open_clip.get_tokenizer(model_name)
    return FrozenCLIP(
        model,
        tokenizer,
        model_name,
        pretrained,
        checkpoint,
        digest,
        image_size,
        mean,
        std,
        torch.device(device),
    )


@lru_cache(maxsize=2)
def cached_clip(model_name: str, pretrained: str, device: str) -> FrozenCLIP:
    """:func:`create_clip` once per process (ClientApps and the ServerApp use this)."""
    return create_clip(model_name, pretrained, device)


def pick_device(requested: str = "auto") -> str:
    """``"auto"`` picks ``cuda`` when a GPU is present, else ``cpu``."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested
