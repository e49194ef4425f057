"""Per-process state shared by a node's messages: the model, prompt learner and local data.

Flower runs many messages in one process (a simulation actor or a SuperNode's
ClientApp process). Everything here is built once per process and reused, so
the frozen CLIP loads once and a client's image features are encoded once.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from fedsec.activation_bounds import ActivationBounds, bounded
from fedsec.config import RunConfig
from fedsec.data import client_indices, k_shot_indices, load_dataset, prepare_images
from fedsec.models.factory import FrozenCLIP, cached_clip, pick_device
from fedsec.models.prompt import PromptCLIP, PromptLearner
from fedsec.training import LocalData


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators."""
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def clip_for(cfg: RunConfig) -> FrozenCLIP:
    """The frozen CLIP of this run (one per process)."""
    return cached_clip(cfg.model, cfg.pretrained, pick_device(cfg.device))


def prompt_model_for(cfg: RunConfig, classnames: tuple[str, ...]) -> PromptCLIP:
    """A prompt classifier for ``classnames`` (one per process and prompt layout)."""
    return _prompt_model(
        cfg.model,
        cfg.pretrained,
        pick_device(cfg.device),
        classnames,
        cfg.n_ctx,
        cfg.ctx_init,
        cfg.class_token_position,
        cfg.class_specific,
        cfg.seed,
    )


@lru_cache(maxsize=4)
def _prompt_model(model, pretrained, device, classnames, n_ctx, ctx_init, position, csc, seed) -> PromptCLIP:
    clip = cached_clip(model, pretrained, device)
    learner = PromptLearner(clip.model, clip.tokenizer, list(classnames), n_ctx, ctx_init, position, csc, seed)
    return PromptCLIP(clip, learner.to(device))


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


@lru_cache(maxsize=64)
def _local_data(dataset, root, partitioner, alpha, cpc, k_shot, seed, pid, n, model, pretrained, device):
    pool = load_dataset(dataset, "train", root)
    idx = client_indices(pool.labels, pid, n, partitioner, seed, alpha, cpc)
    idx = k_shot_indices(pool.labels, idx, k_shot, seed + 1000 * (pid + 1))
    part = pool.subset(idx)
    clip = cached_clip(model, pretrained, device)
    images = prepare_images(part.images, clip.image_size, part.fit)
    features = clip.encode_images_batched(images)
    return LocalData(images, torch.from_numpy(part.labels), features), list(part.classnames)


#: key -> (bounds digest, data with features under those bounds); one entry per partition.
_BOUNDED_DATA: dict[tuple, tuple[str, LocalData]] = {}


def local_data_under_bounds(
    data: LocalData, clip: FrozenCLIP, bounds: ActivationBounds | None, key: tuple
) -> LocalData:
    """``data`` with its frozen features recomputed under activation ``bounds`` (cached per key and bounds).

    The features are encoded once per new set of bounds (the server sends new
    ones each round), never per step; ``None`` returns ``data`` unchanged.
    """
    if bounds is None:
        return data
    digest = bounds.digest()
    hit = _BOUNDED_DATA.get(key)
    if hit is not None and hit[0] == digest:
        return hit[1]
    with bounded(clip.model, bounds):
        features = clip.encode_images_batched(data.images)
    out = LocalData(data.images, data.labels, features)
    _BOUNDED_DATA[key] = (digest, out)
    return out


def bounds_from_content(content) -> ActivationBounds | None:
    """The activation bounds a server message carries beside ``ctx`` (record ``"bounds"``), or ``None``."""
    if "bounds" not in content:
        return None
    return ActivationBounds.from_arrays({k: v.numpy() for k, v in content["bounds"].items()})


def set_ctx(model: PromptCLIP, ctx: np.ndarray) -> None:
    """Load a received ``ctx`` into the prompt learner (shape-checked)."""
    p = model.prompt_learner.ctx
    if tuple(ctx.shape) != tuple(p.shape):
        raise ValueError(f"received ctx of shape {tuple(ctx.shape)}, expected {tuple(p.shape)}")
    with torch.no_grad():
        p.copy_(torch.from_numpy(np.asarray(ctx, dtype=np.float32)))


def get_ctx(model: PromptCLIP) -> np.ndarray:
    """The current ``ctx`` as a numpy array."""
    return model.prompt_learner.ctx.detach().cpu().numpy().copy()
