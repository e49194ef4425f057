"""A folder of images a user generated with any foundation model (ImageFolder layout).

``synthetic-root/<class>/*.png`` (any format Pillow reads); a folder name
matches a class name case-insensitively, with ``_`` read as a space. Classes
without a folder contribute nothing; a folder without a matching class is an
error. Up to ``synthetic-per-class`` images per class are taken (a seeded choice
when there are more).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedsec.data import ImageDataset
from fedsec.registry import Param
from fedsec.synthetic.base import IMAGE_SIZE, SyntheticSource, register_source

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _norm(name: str) -> str:
    return name.replace("_", " ").strip().lower()


@register_source(
    "folder", params=(Param("synthetic-root", "", "ImageFolder root of FM-generated images", path=True), IMAGE_SIZE)
)
class FolderSource(SyntheticSource):
    """Images from ``synthetic-root`` in ImageFolder layout, resized to ``synthetic-image-size``."""

    def generate(self, classnames: list[str], per_class: int, seed: int) -> ImageDataset:
        from PIL import Image

        root = Path(str(self.cfg.get("synthetic-root"))).expanduser()
        if not str(self.cfg.get("synthetic-root")) or not root.is_dir():
            raise ValueError(f"synthetic-source 'folder' needs synthetic-root to be a folder; got {str(root)!r}")
        size = int(self.cfg.get("synthetic-image-size"))
        index = {_norm(c): i for i, c in enumerate(classnames)}
        images, labels = [], []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if _norm(folder.name) not in index:
                raise ValueError(f"synthetic-root folder {folder.name!r} matches no class of {classnames}")
            label = index[_norm(folder.name)]
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if len(files) > per_class:
                keep = np.random.default_rng([seed, label]).choice(len(files), size=per_class, replace=False)
                files = [files[i] for i in sorted(keep)]
            for f in files:
                with Image.open(f) as img:
                    arr = np.asarray(img.convert("RGB").resize((size, size)), dtype=np.uint8)
                images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
                labels.append(label)
        if not images:
            raise ValueError(f"synthetic-root {root} holds no images in <class>/ folders")
        return ImageDataset(
            "folder", "synthetic", torch.stack(images), np.asarray(labels, dtype=np.int64), list(classnames), "resize"
        )
