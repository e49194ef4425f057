"""Embedded model v2: the caption recipe, the shipped checkpoint and its manifest, loading by name."""

from __future__ import annotations

import pytest
import tomllib

from fedsec.models.captions import (
    CANONICAL_NAMES,
    SYNONYMS,
    TEMPLATES,
    caption_pool,
    synonym_captions,
    uses_canonical_name,
)
from fedsec.models.factory import WEIGHTS_DIR, create_clip, embedded_manifest, sha256_file
from tests.conftest import ROOT

V2 = "fedsec-tiny-clip-v2"


def test_canonical_names_are_the_dataset_class_names():
    # Prepare
    from fedsec.data.datasets import FASHION_MNIST_CLASSES

    # Execute / Assert
    assert CANONICAL_NAMES == FASHION_MNIST_CLASSES
    assert len(SYNONYMS) == len(CANONICAL_NAMES)


@pytest.mark.parametrize("share", [0.0, 0.0125, 0.03, 0.05, 0.1, 0.5, 1.0])
def test_pool_uses_canonical_names_at_the_configured_share(share):
    # Prepare
    expected = round(share * 160)
    for cls in range(10):
        # Execute
        pool = caption_pool(cls, share, seed=0)
        # Assert: exact count, the rest are distinct v1 synonym captions of the same class
        canonical = [c for c in pool if uses_canonical_name(c, cls)]
        rest = [c for c in pool if not uses_canonical_name(c, cls)]
        assert len(pool) == 160
        assert len(canonical) == expected
        assert all(CANONICAL_NAMES[cls] in c for c in canonical)
        assert len(set(rest)) == len(rest) and set(rest) <= set(synonym_captions(cls))


def test_pool_is_deterministic_and_seeded():
    # Prepare / Execute
    a = [caption_pool(c, 0.05, seed=0) for c in range(10)]
    b = [caption_pool(c, 0.05, seed=0) for c in range(10)]
    other = [caption_pool(c, 0.05, seed=1) for c in range(10)]
    # Assert
    assert a == b
    assert a != other


def test_share_zero_is_the_v1_pool():
    # Prepare
    v1 = [[t.format(s) for t in TEMPLATES for s in syns] for syns in SYNONYMS]
    # Execute
    pools = [caption_pool(c, 0.0) for c in range(10)]
    # Assert: v1's command still builds v1's captions, none of which is a canonical-name caption
    assert pools == v1
    assert not any(uses_canonical_name(c, cls) for cls in range(10) for c in pools[cls])


def test_canonical_captions_cycle_through_templates():
    # Prepare / Execute
    pool = caption_pool(4, 0.1, seed=0)
    canonical = [c for c in pool if uses_canonical_name(c, 4)]
    # Assert: 16 canonical captions = each template once
    assert sorted(canonical) == sorted(t.format("coat") for t in TEMPLATES)


def test_large_pool_gives_a_finer_share_and_repeats_synonyms_evenly():
    # Prepare / Execute
    pool = caption_pool(2, 1 / 320, pool_size=320, seed=0)
    rest = [c for c in pool if not uses_canonical_name(c, 2)]
    # Assert: one canonical caption in 320, every synonym caption of the class twice but one once
    assert len(pool) == 320 and len(pool) - len(rest) == 1
    counts = {c: rest.count(c) for c in set(rest)}
    assert set(counts) == set(synonym_captions(2)) and sorted(set(counts.values())) == [1, 2]
    assert sum(counts.values()) == 319


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_share_out_of_range_is_refused(share):
    with pytest.raises(ValueError, match="canonical_share"):
        caption_pool(0, share)


def test_v2_manifest_matches_shipped_checkpoint():
    # Prepare
    manifest = embedded_manifest(V2)
    ckpt = WEIGHTS_DIR / manifest["file"]
    # Execute
    digest = sha256_file(ckpt)
    # Assert
    assert digest == manifest["sha256"]
    assert manifest["command"].startswith("python -m fedsec.pretrain ") and f"--model {V2}" in manifest["command"]
    share = manifest["captions"]["canonical_share"]
    assert 0 < share < 1 and f"--canonical-share {share}" in manifest["command"]
    pool = manifest["captions"]["caption_pool"]
    assert manifest["captions"]["canonical_captions_per_class"] == round(share * pool)
    assert isinstance(manifest["seed"], int)


def test_v2_is_the_default_and_v2_1ep_stays_selectable():
    # Prepare
    from fedsec.config import RunConfig

    old = embedded_manifest("fedsec-tiny-clip-v2-1ep")
    # Execute
    digest = sha256_file(WEIGHTS_DIR / old["file"])
    # Assert: the default is v2 with one shared context; v2's first checkpoint loads by its own name
    assert RunConfig().model == V2 and RunConfig().class_specific is False
    assert digest == old["sha256"] != embedded_manifest(V2)["sha256"]
    assert create_clip("fedsec-tiny-clip-v2-1ep", "embedded").checkpoint_sha256 == old["sha256"]


def test_v2_loads_by_name_and_differs_from_v1():
    # Prepare
    manifest = embedded_manifest(V2)
    # Execute
    v2 = create_clip(V2, "embedded")
    v1 = create_clip("fedsec-tiny-clip", "embedded")
    # Assert
    assert v2.name == V2 and v2.checkpoint_sha256 == manifest["sha256"]
    assert v2.checkpoint.endswith(manifest["file"]) and v2.image_size == 32
    assert v1.checkpoint_sha256 != v2.checkpoint_sha256
    assert not any(p.requires_grad for p in v2.model.parameters())


def test_promptfl_v2_config_selects_v2_with_shared_context():
    # Prepare
    from fedsec.config import RunConfig

    raw = tomllib.loads((ROOT / "experiments" / "conf" / "promptfl_v2.toml").read_text())
    # Execute
    cfg = RunConfig.from_mapping(raw)
    # Assert
    assert cfg.model == V2 and cfg.pretrained == "embedded" and cfg.class_specific is False
    assert cfg.strategy == "fedavg" and cfg.num_server_rounds == 20 and cfg.k_shot == 16
