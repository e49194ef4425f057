"""Dataset loaders behind one registry.

Every loader returns an :class:`ImageDataset` holding ``uint8`` images at their
native resolution (``N x C x H x W``) and integer labels; :func:`prepare_images`
turns a batch into the model's ``[0, 1]`` pixel space. Splits:

``train``
    the pool the clients' partitions are drawn from;
``test``
    the held-out server test set;
``pretrain``
    (Fashion-MNIST only) the half of the official train split reserved for
    pretraining the embedded CLIP, disjoint from ``train``.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedsec.registry import Registry

DatasetLoader = Callable[[str, str], "ImageDataset"]
DATASETS: Registry[DatasetLoader] = Registry("dataset")

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
#: Seed of the fixed permutation that splits Fashion-MNIST's train split into
#: the pretraining half and the clients' half. Part of the dataset's identity.
FASHION_MNIST_SPLIT_SEED = 20260101


@dataclass(frozen=True)
class ImageDataset:
    """Images and labels of one split.

    Attributes
    ----------
    name : str
        Registry name of the dataset.
    split : str
        ``train``, ``test`` or ``pretrain``.
    images : torch.Tensor
        ``uint8`` tensor ``N x C x H x W`` at native resolution.
    labels : np.ndarray
        ``int64`` labels, shape ``(N,)``.
    classnames : list[str]
        Human-readable class names, indexed by label.
    fit : str
        How images reach the model resolution: ``"pad"`` (centre, zeros) or
        ``"resize"`` (bilinear).
    """

    name: str
    split: str
    images: torch.Tensor
    labels: np.ndarray
    classnames: list[str]
    fit: str = "resize"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray) -> ImageDataset:
        """Return the examples at ``indices`` (a copy)."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ImageDataset(
            self.name,
            self.split,
            self.images[idx].clone(),
            self.labels[np.asarray(indices, dtype=np.int64)].copy(),
            list(self.classnames),
            self.fit,
        )


def load_dataset(name: str, split: str, root: str = "") -> ImageDataset:
    """Load ``split`` of the registered dataset ``name`` (cached per process).

    Parameters
    ----------
    name : str
        Registry name, e.g. ``"fashion-mnist"``.
    split : str
        ``"train"``, ``"test"`` (and ``"pretrain"`` where the dataset has one).
    root : str
        Data directory; empty for the dataset's default.
    """
    return _load_cached(name, split, root)


@lru_cache(maxsize=8)
def _load_cached(name: str, split: str, root: str) -> ImageDataset:
    return DATASETS.get(name)(root, split)


def _tree_stat(path: Path) -> list:
    """``[relative path, size, mtime_ns]`` of every file under ``path`` (or of ``path`` itself), sorted."""
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    out = []
    for dirpath, _, files in os.walk(path):
        for f in files:
            p = Path(dirpath) / f
            try:
                st = p.stat()
            except OSError:
                continue
            out.append([str(p.relative_to(path)), st.st_size, st.st_mtime_ns])
    return sorted(out)


def source_fingerprint(name: str, root: str = "") -> dict:
    """What identifies the files a registered dataset is read from (for the on-disk cache's keys).

    The resolved data folder and the relative path, size and modification time of
    every file in it (not their contents: a rewritten file changes its mtime), or,
    for ``digits``, the scikit-learn version that ships it.

    Parameters
    ----------
    name : str
        Registry name.
    root : str
        The run config's ``data-root`` (empty for the dataset's default).
    """
    if name == "digits":
        from importlib.metadata import version

        return {"name": name, "sklearn": version("scikit-learn")}
    if name == "fashion-mnist":
        base = Path(root or os.environ.get("FEDSEC_FASHION_MNIST", FASHION_MNIST_ROOT))
    else:
        base = Path(root)
    base = base.expanduser().resolve()
    out = {"name": name, "root": str(base), "files": _tree_stat(base) if base.exists() else []}
    if name == "imagefolder":
        out["image_size"] = FOLDER_IMAGE_SIZE
    return out


def _read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found under {root}. "
        "Install it with: sudo apt-get install -y dataset-fashion-mnist "
        "(or set run-config data-root to a folder holding the IDX files)"
    )


@DATASETS.register("fashion-mnist")
def fashion_mnist(root: str, split: str) -> ImageDataset:
    """Fashion-MNIST from gzipped IDX files (Debian's ``dataset-fashion-mnist``)."""
    base = Path(root or os.environ.get("FEDSEC_FASHION_MNIST", FASHION_MNIST_ROOT))
    if split not in ("train", "test", "pretrain"):
        raise ValueError(f"fashion-mnist has splits train, test, pretrain; got {split!r}")
    prefix = "t10k" if split == "test" else "train"
    images = _read_idx(_find(base, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(base, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if split != "test":
        perm = np.random.default_rng(FASHION_MNIST_SPLIT_SEED).permutation(len(labels))
        half = len(labels) // 2
        keep = np.sort(perm[:half] if split == "pretrain" else perm[half:])
        images, labels = images[keep], labels[keep]
    tensor = torch.from_numpy(np.array(images, copy=True)).unsqueeze(1)
    return ImageDataset("fashion-mnist", split, tensor, labels, FASHION_MNIST_CLASSES, "pad")


@DATASETS.register("digits")
def digits(root: str, split: str) -> ImageDataset:
    """scikit-learn's 8x8 digits (1797 images): a tiny dataset for fast tests."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"digits has splits train, test; got {split!r}")
    bunch = load_digits()
    images = np.clip(bunch.images * 16.0, 0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(labels))
    cut = int(0.7 * len(labels))
    keep = np.sort(perm[:cut] if split == "train" else perm[cut:])
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    tensor = torch.from_numpy(images[keep]).unsqueeze(1)
    return ImageDataset("digits", split, tensor, labels[keep], names, "resize")


def _pil_to_uint8(img, size: int) -> torch.Tensor:
    img = img.convert("RGB").resize((size, size))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


#: Images from ImageFolder/torchvision sources are stored at this square size.
FOLDER_IMAGE_SIZE = int(os.environ.get("FEDSEC_FOLDER_IMAGE_SIZE", "224"))


@DATASETS.register("imagefolder")
def imagefolder(root: str, split: str) -> ImageDataset:
    """An ImageFolder tree: ``root/train/<class>/*.png`` and ``root/test/<class>/*``.

    Class names are the folder names with ``_`` read as spaces. Images are
    stored at ``FEDSEC_FOLDER_IMAGE_SIZE`` (default 224) pixels square.
    """
    from torchvision.datasets import ImageFolder

    if not root:
        raise ValueError("dataset imagefolder needs run-config data-root (a folder with train/ and test/)")
    folder = ImageFolder(str(Path(root) / split))
    images = torch.stack([_pil_to_uint8(folder.loader(p), FOLDER_IMAGE_SIZE) for p, _ in folder.samples])
    labels = np.asarray([y for _, y in folder.samples], dtype=np.int64)
    names = [c.replace("_", " ") for c in folder.classes]
    return ImageDataset("imagefolder", split, images, labels, names, "resize")


def _torchvision_loader(cls_name: str, registry_name: str) -> DatasetLoader:
    def load(root: str, split: str) -> ImageDataset:
        import torchvision.datasets as tvd

        if not root:
            raise ValueError(f"dataset {registry_name} needs run-config data-root (no downloads)")
        ds = getattr(tvd, cls_name)(root, train=(split == "train"), download=False)
        data = torch.as_tensor(np.asarray(ds.data))
        images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
        labels = np.asarray(ds.targets, dtype=np.int64)
        names = [c.replace("_", " ") for c in ds.classes]
        return ImageDataset(registry_name, split, images.contiguous(), labels, names, "resize")

    load.__doc__ = f"torchvision.datasets.{cls_name} from a local root (download=False)."
    return load


for _cls, _name in (("CIFAR10", "cifar10"), ("CIFAR100", "cifar100"), ("MNIST", "mnist")):
    DATASETS.register(_name)(_torchvision_loader(_cls, _name))
