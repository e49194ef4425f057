"""Client partitions: flwr-datasets partitioners plus PromptFL-style k-shot.

The partitioners run on a tiny Hugging Face dataset holding only the labels
and the example index, so a client computes its own indices without touching
anyone else's images.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedsec.registry import Registry

PartitionerFactory = Callable[..., object]
PARTITIONERS: Registry[PartitionerFactory] = Registry("partitioner")


@PARTITIONERS.register("iid")
def _iid(num_partitions: int, seed: int, **_: object) -> object:
    from flwr_datasets.partitioner import IidPartitioner

    return IidPartitioner(num_partitions=num_partitions)


@PARTITIONERS.register("dirichlet")
def _dirichlet(num_partitions: int, seed: int, alpha: float = 0.5, **_: object) -> object:
    from flwr_datasets.partitioner import DirichletPartitioner

    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=alpha,
        min_partition_size=0,
        self_balancing=False,
        seed=seed,
    )


@PARTITIONERS.register("pathological")
def _pathological(num_partitions: int, seed: int, classes_per_client: int = 2, **_: object) -> object:
    from flwr_datasets.partitioner import PathologicalPartitioner

    return PathologicalPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        num_classes_per_partition=classes_per_client,
        class_assignment_mode="first-deterministic",
        seed=seed,
    )


def client_indices(
    labels: np.ndarray,
    partition_id: int,
    num_partitions: int,
    partitioner: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    classes_per_client: int = 2,
) -> np.ndarray:
    """Indices into ``labels`` of one client's partition.

    Parameters
    ----------
    labels : np.ndarray
        Labels of the whole client pool.
    partition_id, num_partitions : int
        This client and the federation size.
    partitioner : str
        ``iid``, ``dirichlet`` (``alpha``) or ``pathological`` (``classes_per_client``).
    seed : int
        Seed of the partitioner.

    Returns
    -------
    np.ndarray
        Sorted ``int64`` indices.
    """
    from datasets import Dataset

    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} not in [0, {num_partitions})")
    part = PARTITIONERS.get(partitioner)(
        num_partitions=num_partitions, seed=seed, alpha=alpha, classes_per_client=classes_per_client
    )
    if partitioner == "iid":
        # IidPartitioner splits in order: shuffle first so shards are IID.
        order = np.random.default_rng(seed).permutation(len(labels))
    else:
        order = np.arange(len(labels))
    part.dataset = Dataset.from_dict({"idx": order, "label": labels[order]})
    idx = np.asarray(part.load_partition(partition_id)["idx"], dtype=np.int64)
    return np.sort(idx)


def k_shot_indices(labels: np.ndarray, indices: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Keep at most ``k`` examples per class from ``indices`` (``k <= 0``: all).

    Parameters
    ----------
    labels : np.ndarray
        Labels of the whole pool.
    indices : np.ndarray
        Candidate indices (a client's partition).
    k : int
        Shots per class.
    seed : int
        Seed of the per-class draw.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if k <= 0:
        return indices
    rng = np.random.default_rng(seed)
    keep: list[np.ndarray] = []
    for c in np.unique(labels[indices]):
        members = indices[labels[indices] == c]
        keep.append(rng.choice(members, size=min(k, len(members)), replace=False))
    return np.sort(np.concatenate(keep)) if keep else indices[:0]
