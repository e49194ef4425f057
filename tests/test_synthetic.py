"""Synthetic-data sources: the offline generator, the folder source, the registry and the config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fedsec.config import ConfigError, RunConfig
from fedsec.synthetic import SYNTHETIC_SOURCES, build_synthetic_set, get_source, synthetic_param_defaults
from fedsec.synthetic.pca_gmm import ClassConditionalPCAGMM

CLASSES = ["t-shirt", "ankle boot", "bag"]


def _cfg(**extra: object) -> RunConfig:
    return RunConfig.from_mapping({k: v for k, v in extra.items()})


def test_registry_lists_the_sources_and_diffusers_is_not_imported():
    # Execute
    names = SYNTHETIC_SOURCES.names()
    # Assert: the optional source is registered without importing its dependency
    import sys

    assert {"pca-gmm", "folder", "diffusers"} <= set(names)
    assert "diffusers" not in sys.modules
    assert synthetic_param_defaults()["synthetic-source"] == "pca-gmm"


def test_pca_gmm_generator_is_class_conditional_and_deterministic():
    # Prepare: two classes that differ in where the bright pixels are
    rng = np.random.default_rng(0)
    images = rng.integers(0, 30, size=(200, 1, 8, 8)).astype(np.uint8)
    labels = np.repeat([0, 1], 100)
    images[:100, :, :4] += 200  # class 0: bright top half
    images[100:, :, 4:] += 200  # class 1: bright bottom half
    gen = ClassConditionalPCAGMM(components=6, modes=2, seed=0).fit(images, labels, 2)
    # Execute
    a0, b0, a1 = gen.sample(0, 20, seed=5), gen.sample(0, 20, seed=5), gen.sample(1, 20, seed=5)
    # Assert
    assert a0.shape == (20, 1, 8, 8) and a0.dtype == np.uint8
    assert np.array_equal(a0, b0)
    assert a0[:, :, :4].mean() > a0[:, :, 4:].mean() + 100 and a1[:, :, 4:].mean() > a1[:, :, :4].mean() + 100
    assert not np.array_equal(gen.sample(0, 20, seed=6), a0)


def test_folder_source_reads_imagefolder_pngs(tmp_path):
    # Prepare: two class folders (one with '_' for a space), three PNGs each
    for name, value in (("T-shirt", 200), ("ankle_boot", 50)):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((20, 20, 3), value + i, dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
    cfg = _cfg(**{"synthetic-source": "folder", "synthetic-root": str(tmp_path), "synthetic-image-size": 16})
    # Execute
    data = get_source("folder")(cfg).generate(CLASSES, per_class=2, seed=0)
    prepared = build_synthetic_set(cfg.with_updates(), CLASSES, image_size=32)
    # Assert: labels follow the task's class order; per_class caps each class; images are resized
    assert sorted(data.labels.tolist()) == [0, 0, 1, 1]
    assert tuple(data.images.shape) == (4, 3, 16, 16) and data.split == "synthetic"
    assert tuple(prepared.images.shape) == (6, 3, 32, 32) and float(prepared.images.max()) <= 1.0  # 50 per class
    boot = data.images[torch.from_numpy(data.labels == 1)]
    assert int(boot.max()) < 60


def test_folder_source_rejects_unknown_class_folders(tmp_path):
    (tmp_path / "spaceship").mkdir()
    cfg = _cfg(**{"synthetic-source": "folder", "synthetic-root": str(tmp_path)})
    with pytest.raises(ValueError, match="matches no class"):
        get_source("folder")(cfg).generate(CLASSES, per_class=2, seed=0)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"synthetic-source": "dalle"}, r"synthetic-source='dalle' is not allowed; allowed values: diffusers, folder"),
        ({"server-fusion": "distil"}, r"server-fusion='distil' is not allowed; allowed values: none, init, kd, tune"),
        ({"bounds-granularity": "layer"}, r"bounds-granularity='layer' is not allowed; allowed values: channel"),
    ],
)
def test_bad_synthetic_and_defense_keys_give_one_clear_error(values, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(values)
