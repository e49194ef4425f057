"""The synthetic-data interface: a source stands in for a foundation model (FM) that writes labeled images.

A :class:`SyntheticSource` turns class names into a labeled image set
(:class:`fedsec.data.ImageDataset`, split ``"synthetic"``). Sources are
registered by name (``synthetic-source`` in the run config); each declares its
own run-config keys in ``params``. The server uses the set for fusion and for
learning activation bounds; an ``fm-poison`` attacker controls what it holds.
"""

from __future__ import annotations

from typing import ClassVar

from fedsec.data import ImageDataset
from fedsec.registry import Registry

SYNTHETIC_SOURCES: Registry[type] = Registry("synthetic source")


def register_source(name: str):
    """Register a :class:`SyntheticSource` subclass under ``name``."""

    def deco(cls: type[SyntheticSource]) -> type[SyntheticSource]:
        cls.name = name
        return SYNTHETIC_SOURCES.register(name)(cls)

    return deco


class SyntheticSource:
    """Base class of synthetic-data sources.

    Parameters
    ----------
    cfg : fedsec.config.RunConfig
        The run config (source parameters are in ``cfg.extra``).

    Attributes
    ----------
    params : dict
        Run-config keys this source reads, with defaults (kebab-case).
    """

    name: ClassVar[str] = ""
    params: ClassVar[dict[str, object]] = {}

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
