"""What a node process keeps: the frozen CLIP, prompt models and local data, in memory and on disk.

A simulation actor runs many messages in one process: everything here is built
once per process (``lru_cache``) and reused, so the frozen CLIP loads once and a
client's image features are encoded once. A deployment runs every ClientApp
message in a fresh ``flwr-clientapp`` process (Flower 1.41), where these caches
start empty: a client's k-shot data with its frozen features, and the parsed
dataset split it is drawn from, are therefore also kept on disk
(:mod:`fedsec.diskcache`, keyed by everything that determines them: the source
data, the model's weights (:func:`model_cache_identity`), the code that computes
them and the library versions), so a process after the first skips the dataset,
the partitioner and the encoding; the frozen CLIP of a local checkpoint comes
from the same cache in a fast format (:mod:`fedsec.models.fastload`).

The prompt model itself is built by :func:`fedsec.models.prompt.build_prompt_model`;
:func:`prompt_model_for` keeps one per process and prompt layout.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedsec import diskcache
from fedsec.config import RunConfig
from fedsec.data import ImageDataset, client_indices, k_shot_indices, load_dataset, prepare_images
from fedsec.data.datasets import source_fingerprint
from fedsec.models.factory import FrozenCLIP, pick_device
from fedsec.models.fastload import cached_clip
from fedsec.models.prompt import PromptCLIP, prompt_layout, prompt_model
from fedsec.training import LocalData


def clip_for(cfg: RunConfig) -> FrozenCLIP:
    """The frozen CLIP of this run (one per process)."""
    return cached_clip(cfg.model, cfg.pretrained, pick_device(cfg.device))


def prompt_model_for(cfg: RunConfig, classnames: tuple[str, ...]) -> PromptCLIP:
    """A prompt classifier for ``classnames`` (one per process and prompt layout), at its initial context.

    The model object is shared by every caller in the process, so its context is
    reset to the initial one (``ctx-init`` or the seeded random init) on every
    call: a run never starts from the prompt an earlier run in the same process
    left behind (a ceiling cell after its no-attack twin, a warm ServerApp).
    """
    from fedsec.models.prompt import get_ctx, set_ctx

    model = _prompt_model(cfg.model, cfg.pretrained, pick_device(cfg.device), classnames, *prompt_layout(cfg))
    init = model.__dict__.get("_fedsec_initial_ctx")
    if init is None:  # first call: the context as built (get_ctx copies it)
        init = model.__dict__["_fedsec_initial_ctx"] = get_ctx(model)
    set_ctx(model, init)
    return model


def learner_model_for(cfg: RunConfig, classnames: tuple[str, ...]) -> PromptCLIP:
    """The run's learner (``learner``) on its prompt model, one per process and settings, at its initial arrays.

    For ``coop`` this is :func:`prompt_model_for`'s model itself; other learners are built once
    on it (:func:`fedsec.models.learners.build_learner`), kept with it, and reset to their
    initial arrays on every call, as the context is.
    """
    from fedsec.models.learners import LEARNERS, build_learner
    from fedsec.models.prompt import get_arrays, set_arrays

    base = prompt_model_for(cfg, classnames)
    built = base.__dict__.setdefault("_fedsec_learners", {})  # lives and dies with the prompt model's cache entry
    key = (cfg.learner, tuple((p.key, cfg.get(p.key)) for p in LEARNERS.component(cfg.learner).params))
    if key not in built:
        model = build_learner(cfg, base)
        built[key] = (model, get_arrays(model))
    model, init = built[key]
    set_arrays(model, init)
    return model


@lru_cache(maxsize=4)
def _prompt_model(model, pretrained, device, classnames, n_ctx, ctx_init, position, csc, seed) -> PromptCLIP:
    """:func:`prompt_model_for`'s cache, keyed by everything that determines the model."""
    return prompt_model(cached_clip(model, pretrained, device), classnames, n_ctx, ctx_init, position, csc, seed)


def local_data_for(cfg: RunConfig, partition_id: int, num_partitions: int) -> tuple[LocalData, list[str]]:
    """This client's partition with its frozen features (cached per process)."""
    return _local_data(
        cfg.dataset,
        cfg.data_root,
        cfg.partitioner,
        cfg.dirichlet_alpha,
        cfg.classes_per_client,
        cfg.k_shot,
        cfg.seed,
        partition_id,
        num_partitions,
        cfg.model,
        cfg.pretrained,
        pick_device(cfg.device),
    )


def client_shots(
    labels: np.ndarray, pid: int, n: int, partitioner: str, seed: int, alpha: float, cpc: int, k_shot: int
) -> np.ndarray:
    """Indices into the clients' pool of the images client ``pid`` of ``n`` holds (its partition's k shots)."""
    idx = client_indices(labels, pid, n, partitioner, seed, alpha, cpc)
    return k_shot_indices(labels, idx, k_shot, seed + 1000 * (pid + 1))


@lru_cache(maxsize=64)
def _local_data(dataset, root, partitioner, alpha, cpc, k_shot, seed, pid, n, model, pretrained, device):
    clip = cached_clip(model, pretrained, device)

    def build() -> dict:
        pool = train_pool(dataset, root)
        part = pool.subset(client_shots(pool.labels, pid, n, partitioner, seed, alpha, cpc, k_shot))
        features = clip.encode_images_batched(prepare_images(part.images, clip.image_size, part.fit))
        labels = torch.from_numpy(part.labels)
        return {
            "images": part.images,
            "labels": labels,
            "features": features,
            "classnames": list(part.classnames),
            "fit": part.fit,
        }

    key = None
    if model_cache_identity(clip) is not None:
        key = {
            "kind": "local-data",
            "dataset": dataset,
            "split": "train",
            "source": source_fingerprint(dataset, root),
            "partitioner": partitioner,
            "dirichlet_alpha": alpha,
            "classes_per_client": cpc,
            "k_shot": k_shot,
            "seed": seed,
            "partition_id": pid,
            "num_partitions": n,
            "model": model_cache_identity(clip),
            "device": str(device),
            "code": _code_digest(),
            "versions": _versions(),
        }
    payload = diskcache.cached("local-data", key, build, _valid_local_data)
    images = prepare_images(payload["images"], clip.image_size, payload["fit"])
    return LocalData(images, payload["labels"], payload["features"]), list(payload["classnames"])


def test_features(clip: FrozenCLIP, dataset: str, root: str, indices: np.ndarray | None, images: torch.Tensor):
    """Frozen image features of (a subset of) the ``test`` split, kept in the disk cache.

    The server's evaluation encodes the same test images in every run of a sweep; with
    the cache only the first run pays for it. ``indices`` is the evaluated subset
    (``None``: the whole split); ``images`` are those images, prepared for the model.
    """

    def build() -> dict:
        return {"features": clip.encode_images_batched(images)}

    key = None
    if model_cache_identity(clip) is not None:
        sub = "all" if indices is None else hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()
        key = {
            "kind": "test-features",
            "dataset": dataset,
            "split": "test",
            "source": source_fingerprint(dataset, root),
            "subset": sub,
            "n": len(images),
            "model": model_cache_identity(clip),
            "device": str(clip.device),
            "code": _code_digest(),
            "versions": _versions(),
        }

    def valid(p: dict) -> bool:
        f = p.get("features")
        return isinstance(f, torch.Tensor) and f.ndim == 2 and len(f) == len(images)

    return diskcache.cached("test-features", key, build, valid)["features"]


def _valid_local_data(p: dict) -> bool:
    """Structural check of a cached local-data payload."""
    tensors = [p.get(k) for k in ("images", "labels", "features")]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    images, labels, features = tensors
    names = p.get("classnames")
    return (
        images.dtype == torch.uint8
        and images.ndim == 4
        and labels.dtype == torch.int64
        and labels.ndim == 1
        and features.ndim == 2
        and len(images) == len(labels) == len(features)
        and isinstance(names, list)
        and all(isinstance(c, str) for c in names)
        and p.get("fit") in ("pad", "resize")
    )


def model_cache_identity(clip: FrozenCLIP) -> dict | None:
    """What identifies the frozen model's weights for the disk cache; ``None`` for random weights.

    A checkpoint file counts by its SHA-256 (not its path), a hub tag by name (with
    the open_clip version in :func:`_versions`); random weights (``pretrained="none"``)
    differ between processes and are never cached.
    """
    if clip.pretrained in ("", "none"):
        return None
    ident = clip.identity()
    if ident["checkpoint_sha256"]:
        ident.pop("checkpoint")
    return ident


@lru_cache(maxsize=8)
def train_pool(dataset: str, root: str) -> ImageDataset:
    """The ``train`` split of ``dataset`` (the clients' pool), parsed once and kept on disk."""

    def build() -> dict:
        pool = load_dataset(dataset, "train", root)
        return {
            "images": pool.images,
            "labels": torch.from_numpy(pool.labels),
            "classnames": list(pool.classnames),
            "fit": pool.fit,
            "name": pool.name,
        }

    key = {
        "kind": "dataset",
        "dataset": dataset,
        "split": "train",
        "source": source_fingerprint(dataset, root),
        "code": _code_digest(),
        "versions": _versions(),
    }
    p = diskcache.cached("dataset", key, build, _valid_pool)
    return ImageDataset(p["name"], "train", p["images"], p["labels"].numpy(), list(p["classnames"]), p["fit"])


def _valid_pool(p: dict) -> bool:
    """Structural check of a cached dataset payload."""
    images, labels = p.get("images"), p.get("labels")
    return (
        isinstance(images, torch.Tensor)
        and isinstance(labels, torch.Tensor)
        and images.dtype == torch.uint8
        and len(images) == len(labels)
        and isinstance(p.get("classnames"), list)
        and p.get("fit") in ("pad", "resize")
        and isinstance(p.get("name"), str)
    )


@lru_cache(maxsize=1)
def _code_digest() -> str:
    """SHA-256 of the source files that compute the cached values (data loading, partitions, encoding)."""
    here = Path(__file__).resolve().parent
    files = [here / "data" / f for f in ("datasets.py", "partition.py", "transforms.py")]
    return diskcache.file_digest([*files, here / "models" / "factory.py"])


@lru_cache(maxsize=1)
def _versions() -> dict:
    """Versions of the libraries behind the cached values."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__, "numpy": np.__version__}
    for dist in ("open_clip_torch", "flwr-datasets", "datasets"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = ""
    return out
