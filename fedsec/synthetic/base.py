"""The synthetic-data interface: a source stands in for a foundation model (FM) that writes labeled images.

A :class:`SyntheticSource` turns class names into a labeled image set
(:class:`fedsec.data.ImageDataset`, split ``"synthetic"``). Sources are
registered by name (``synthetic-source`` in the run config); each declares its
own run-config keys in ``register_source(name, params=...)``. The server uses the set for fusion and for
learning activation bounds; an ``fm-poison`` attacker controls what it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from fedsec.data import ImageDataset
from fedsec.registry import Param, Registry

#: Run-config keys shared by every source.
COMMON_PARAMS: tuple[Param, ...] = (
    Param(
        "synthetic-source", "pca-gmm", "where the server's synthetic images come from", choices=lambda: _source_names()
    ),
    Param("synthetic-per-class", 50, "synthetic images per class", range=(1, None)),
)
#: Output size of sources that load or generate images at their own size.
IMAGE_SIZE = Param("synthetic-image-size", 64, "side of the generated or loaded images, in pixels", range=(1, None))

SYNTHETIC_SOURCES: Registry[type] = Registry("synthetic source", packages=("fedsec.synthetic",), common=COMMON_PARAMS)


def _source_names() -> list[str]:
    return SYNTHETIC_SOURCES.names()


def register_source(name: str, params: Sequence[Param] = ()):
    """Register a :class:`SyntheticSource` subclass under ``name`` with the run-config keys it reads."""

    def deco(cls: type[SyntheticSource]) -> type[SyntheticSource]:
        cls.name = name
        cls.params = tuple(params)
        return SYNTHETIC_SOURCES.register(name, params=params)(cls)

    return deco


class SyntheticSource:
    """Base class of synthetic-data sources.

    Parameters
    ----------
    cfg : fedsec.config.RunConfig
        The run config (source parameters are in ``cfg.extra``).

    Attributes
    ----------
    params : tuple of Param
        Run-config keys this source reads (as registered).
    """

    name: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def generate(self, classnames: list[str], per_class: int, seed: int) -> ImageDataset:
        """Return ``per_class`` labeled images per class (labels index ``classnames``).

        Parameters
        ----------
        classnames : list of str
            The task's class names, in label order.
        per_class : int
            Images per class (a folder source may hold fewer; it never returns more).
        seed : int
            Seed of any randomness (same seed, same images).

        Returns
        -------
        ImageDataset
            ``uint8`` images ``N x C x H x W`` with split ``"synthetic"``.
        """
        raise NotImplementedError
