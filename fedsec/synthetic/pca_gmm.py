"""The offline default source: a class-conditional generator trained by our own code.

For each class, a PCA of the pixels (``synthetic-pca-components`` components)
followed by a Gaussian mixture (``synthetic-gmm-modes`` full-covariance modes)
in the PCA space, fitted on the dataset's ``pretrain`` split (Fashion-MNIST:
the half of the official train split that pretrained the embedded CLIP,
disjoint from the clients' pool and from the test split). Sampling draws
latent codes from the mixture and maps them back to pixels.

Why it stands in for a foundation model: like a text-to-image FM prompted with
a class name, it produces labeled images of each class from data the federation
never saw, with the FM's typical flaws (smooth, less detailed, a slight domain
shift from the clients' real images). It fits in seconds, is deterministic by
seed and ships no weights, so every test and experiment runs offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.common.logger import log
from threadpoolctl import threadpool_limits

from fedsec.data import ImageDataset, load_dataset
from fedsec.registry import Param
from fedsec.synthetic.base import SyntheticSource, register_source

#: Bump when the generator changes, to invalidate cached samples.
CACHE_VERSION = 1


class ClassConditionalPCAGMM:
    """Per-class PCA + Gaussian mixture on flattened pixels.

    Parameters
    ----------
    components : int
        PCA components per class.
    modes : int
        Gaussian-mixture modes per class.
    seed : int
        Seed of the mixture fit.
    """

    def __init__(self, components: int = 48, modes: int = 6, seed: int = 0, max_per_class: int = 1000) -> None:
        self.components = components
        self.max_per_class = max_per_class
        self.modes = modes
        self.seed = seed
        self.models: list[tuple[np.ndarray, np.ndarray, object]] = []
        self.shape: tuple[int, ...] = ()

    def fit(self, images: np.ndarray, labels: np.ndarray, num_classes: int) -> ClassConditionalPCAGMM:
        """Fit on ``uint8`` images ``N x C x H x W`` with labels in ``[0, num_classes)``.

        At most ``max_per_class`` images per class (a seeded choice) are used;
        BLAS runs on one thread (the fit is small, and the machine is shared).
        """
        from sklearn.mixture import GaussianMixture

        self.shape = tuple(images.shape[1:])
        flat = images.reshape(len(images), -1)
        rng = np.random.default_rng([self.seed, 0x5EED])
        self.models = []
        with threadpool_limits(1):
            for c in range(num_classes):
                idx = np.flatnonzero(labels == c)
                if len(idx) < 2:
                    raise ValueError(f"class {c} has {len(idx)} training images; the generator needs at least 2")
                if len(idx) > self.max_per_class:
                    idx = np.sort(rng.choice(idx, size=self.max_per_class, replace=False))
                x = torch.from_numpy(flat[idx].astype(np.float64) / 255.0)
                mean = x.mean(0)
                k = min(self.components, len(idx) - 1, x.shape[1])
                evals, evecs = torch.linalg.eigh((x - mean).T @ (x - mean))
                basis = evecs[:, -k:].flip(1).T.contiguous()  # top-k principal directions
                z = ((x - mean) @ basis.T).numpy()
                gmm = GaussianMixture(
                    n_components=min(self.modes, len(idx)),
                    covariance_type="full",
                    random_state=self.seed,
                    reg_covar=1e-4,
                ).fit(z)
                self.models.append((mean.numpy(), basis.numpy(), gmm))
        return self

    def sample(self, label: int, n: int, seed: int) -> np.ndarray:
        """``n`` ``uint8`` images of class ``label`` (deterministic in ``seed``)."""
        mean, basis, gmm = self.models[label]
        rng = np.random.default_rng([seed, label])
        counts = rng.multinomial(n, gmm.weights_)
        zs = [
            gmm.means_[m] + rng.standard_normal((k, len(gmm.means_[m]))) @ np.linalg.cholesky(gmm.covariances_[m]).T
            for m, k in enumerate(counts)
            if k
        ]
        z = np.concatenate(zs) if zs else np.zeros((0, basis.shape[0]))
        z = z[rng.permutation(len(z))]
        x = np.clip(z @ basis + mean, 0.0, 1.0)
        return np.round(x * 255.0).astype(np.uint8).reshape((n, *self.shape))


@lru_cache(maxsize=4)
def _fitted(
    dataset: str, root: str, components: int, modes: int, seed: int
) -> tuple[ClassConditionalPCAGMM, str, list]:
    data = load_dataset(dataset, "pretrain", root)
    log(INFO, "[fedsec] fitting the pca-gmm synthetic generator on %d %s pretrain images", len(data), dataset)
    gen = ClassConditionalPCAGMM(components, modes, seed).fit(data.images.numpy(), data.labels, len(data.classnames))
    return gen, data.fit, list(data.classnames)


def _cache_file(key: str) -> Path:
    root = Path(os.environ.get("FEDSEC_CACHE_DIR", Path.home() / ".cache" / "fedsec")) / "synthetic"
    return root / f"pca-gmm-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


@register_source(
    "pca-gmm",
    params=(
        Param("synthetic-pca-components", 48, "PCA components of the generator", range=(1, None)),
        Param("synthetic-gmm-modes", 6, "Gaussian-mixture modes per class", range=(1, None)),
    ),
)
class PCAGMMSource(SyntheticSource):
    """Class-conditional PCA + Gaussian-mixture generator fitted on the ``pretrain`` split."""

    def generate(self, classnames: list[str], per_class: int, seed: int) -> ImageDataset:
        """Sample ``per_class`` images per class (cached on disk: the generator is deterministic)."""
        cfg = self.cfg
        comps, modes = int(cfg.get("synthetic-pca-components")), int(cfg.get("synthetic-gmm-modes"))
        key = json.dumps([CACHE_VERSION, cfg.dataset, cfg.data_root, comps, modes, seed, per_class, list(classnames)])
        cache = _cache_file(key)
        if cache.exists():
            with np.load(cache) as z:
                return ImageDataset(
                    "pca-gmm", "synthetic", torch.from_numpy(z["images"]), z["labels"], list(classnames), str(z["fit"])
                )
        try:
            gen, fit, names = _fitted(cfg.dataset, cfg.data_root, comps, modes, seed)
        except ValueError as exc:
            raise ValueError(
                f"synthetic-source 'pca-gmm' needs a dataset with a 'pretrain' split (fashion-mnist); "
                f"for dataset {cfg.dataset!r} use synthetic-source='folder' ({exc})"
            ) from exc
        if [n.lower() for n in names] != [n.lower() for n in classnames]:
            raise ValueError(f"pca-gmm generator classes {names} differ from the task's {classnames}")
        with threadpool_limits(1):
            images = np.concatenate([gen.sample(c, per_class, seed) for c in range(len(classnames))])
        labels = np.repeat(np.arange(len(classnames), dtype=np.int64), per_class)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".npz")
            os.close(fd)
            np.savez(tmp, images=images, labels=labels, fit=np.str_(fit))
            os.replace(tmp, cache)
        except OSError:  # a read-only home: no cache, same images
            pass
        return ImageDataset("pca-gmm", "synthetic", torch.from_numpy(images), labels, list(classnames), fit)
