"""Data: IDX reading, splits, partitioners, k-shot, image preparation."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from fedsec.data import client_indices, k_shot_indices, load_dataset, prepare_images
from fedsec.data.datasets import _read_idx, fashion_mnist
from tests.conftest import needs_fmnist


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_roundtrip(tmp_path):
    # Prepare
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x.gz", arr)
    # Execute
    out = _read_idx(tmp_path / "x.gz")
    # Assert
    np.testing.assert_array_equal(out, arr)


def test_fashion_mnist_from_custom_root_and_disjoint_halves(tmp_path):
    # Prepare: a 20-image fake Fashion-MNIST
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 6)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    # Execute
    train = fashion_mnist(str(tmp_path), "train")
    pre = fashion_mnist(str(tmp_path), "pretrain")
    test = fashion_mnist(str(tmp_path), "test")
    # Assert
    assert len(train) == 10 and len(pre) == 10 and len(test) == 6
    assert train.images.shape == (10, 1, 28, 28) and train.images.dtype == torch.uint8
    pooled = torch.cat([train.images, pre.images]).flatten(1)
    assert len({tuple(r.tolist()) for r in pooled}) == 20  # the halves partition the split


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist(str(tmp_path), "test")


@needs_fmnist
def test_fashion_mnist_real_files():
    test = load_dataset("fashion-mnist", "test")
    train = load_dataset("fashion-mnist", "train")
    assert len(test) == 10_000 and len(train) == 30_000
    assert sorted(np.unique(test.labels)) == list(range(10))


def test_iid_partitions_cover_pool_disjointly():
    # Prepare
    labels = np.repeat(np.arange(10), 30)
    # Execute
    parts = [client_indices(labels, i, 5, "iid", seed=1) for i in range(5)]
    # Assert
    allidx = np.concatenate(parts)
    assert len(allidx) == len(labels) and len(np.unique(allidx)) == len(labels)
    assert all(len(np.unique(labels[p])) >= 8 for p in parts)  # shuffled, not label-sorted shards


def test_pathological_partition_has_k_classes():
    labels = np.repeat(np.arange(10), 30)
    parts = [client_indices(labels, i, 5, "pathological", seed=0, classes_per_client=2) for i in range(5)]
    assert all(len(np.unique(labels[p])) == 2 for p in parts)


def test_dirichlet_partition_is_seeded_and_skewed():
    labels = np.repeat(np.arange(10), 100)
    a = client_indices(labels, 0, 4, "dirichlet", seed=3, alpha=0.1)
    b = client_indices(labels, 0, 4, "dirichlet", seed=3, alpha=0.1)
    np.testing.assert_array_equal(a, b)
    counts = np.bincount(labels[a], minlength=10)
    assert counts.max() > 3 * max(1, np.median(counts))


def test_k_shot_keeps_at_most_k_per_class():
    labels = np.repeat(np.arange(3), 10)
    idx = k_shot_indices(labels, np.arange(30), 4, seed=0)
    assert np.bincount(labels[idx]).tolist() == [4, 4, 4]
    np.testing.assert_array_equal(k_shot_indices(labels, np.arange(30), 0, seed=0), np.arange(30))


def test_unknown_partitioner_lists_known():
    with pytest.raises(KeyError, match="dirichlet, iid, pathological"):
        client_indices(np.zeros(10, dtype=int), 0, 2, "zipf")


def test_prepare_images_pad_and_resize():
    x = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    padded = prepare_images(x, 32, "pad")
    resized = prepare_images(x, 32, "resize")
    assert padded.shape == resized.shape == (2, 3, 32, 32)
    assert padded[0, 0, 0, 0] == 0 and padded[0, 0, 2, 2] == 1.0
    assert torch.allclose(resized, torch.ones_like(resized))


def test_digits_loads():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and train.classnames[3] == "three"
