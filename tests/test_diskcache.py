"""The on-disk cache (``fedsec.diskcache``) and the client data kept in it (``fedsec.caches``)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsec import caches, diskcache
from fedsec.config import RunConfig
from fedsec.data.datasets import source_fingerprint
from fedsec.diskcache import MAGIC, DiskCache, cached, key_digest

KEY = {
    "kind": "local-data",
    "dataset": "fashion-mnist",
    "seed": 0,
    "partition_id": 1,
    "k_shot": 4,
    "model": {"name": "fedsec-tiny-clip", "checkpoint_sha256": "ab" * 32},
}


def _payload() -> dict:
    return {"features": torch.arange(6, dtype=torch.float32).view(2, 3), "names": ["a", "b"], "fit": "pad"}


class _Builder:
    """A ``build`` callable that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict:
        self.calls += 1
        return _payload()


def _same(a: dict, b: dict) -> bool:
    return torch.equal(a["features"], b["features"]) and a["names"] == b["names"] and a["fit"] == b["fit"]


def test_miss_builds_and_stores_then_hit_loads_without_building(tmp_path):
    # Prepare
    cache, build = DiskCache(tmp_path), _Builder()
    # Execute
    first, hit1 = cache.get_or_build("kind", KEY, build)
    second, hit2 = cache.get_or_build("kind", KEY, build)
    # Assert
    assert (hit1, hit2) == (False, True) and build.calls == 1
    assert _same(first, second) and _same(second, _payload())
    assert cache.path("kind", KEY) == tmp_path / "kind" / f"{key_digest(KEY)}.pt"
    assert [p.name for p in (tmp_path / "kind").iterdir()] == [f"{key_digest(KEY)}.pt"]  # no temp files left


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"partition_id": 2},
        {"k_shot": 16},
        {"dataset": "cifar10"},
        {"model": {"name": "fedsec-tiny-clip", "checkpoint_sha256": "cd" * 32}},
        {"extra": None},
    ],
    ids=["seed", "partition", "k-shot", "dataset", "checkpoint", "new-key-part"],
)
def test_changing_any_key_part_misses(tmp_path, change):
    # Prepare
    cache, build = DiskCache(tmp_path), _Builder()
    cache.get_or_build("kind", KEY, build)
    # Execute
    _, hit = cache.get_or_build("kind", {**KEY, **change}, build)
    # Assert
    assert not hit and build.calls == 2
    assert len(list((tmp_path / "kind").glob("*.pt"))) == 2


def test_key_order_does_not_matter(tmp_path):
    # Prepare
    cache = DiskCache(tmp_path)
    cache.store("kind", KEY, _payload())
    # Execute
    loaded = cache.load("kind", dict(reversed(list(KEY.items()))))
    # Assert
    assert loaded is not None and _same(loaded, _payload())


def _flip_last_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize(
    "damage",
    [
        _flip_last_byte,
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
        lambda p: p.write_bytes(b"XXXXXXXX" + p.read_bytes()[len(MAGIC) :]),
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(b"not a cache file at all"),
    ],
    ids=["flipped-byte", "truncated", "bad-magic", "empty", "garbage"],
)
def test_corrupted_file_is_ignored_and_rewritten(tmp_path, damage):
    # Prepare
    cache, build = DiskCache(tmp_path), _Builder()
    cache.get_or_build("kind", KEY, build)
    damage(cache.path("kind", KEY))
    # Execute
    missed = cache.load("kind", KEY)
    rebuilt, hit = cache.get_or_build("kind", KEY, build)
    reloaded = cache.load("kind", KEY)
    # Assert
    assert missed is None and not hit and build.calls == 2
    assert _same(rebuilt, _payload()) and reloaded is not None and _same(reloaded, _payload())


def test_file_holding_another_key_is_a_miss(tmp_path):
    # Prepare: a valid file of key B at key A's path (a renamed or colliding file)
    cache = DiskCache(tmp_path)
    other = {**KEY, "seed": 99}
    cache.path("kind", KEY).parent.mkdir(parents=True)
    cache.path("kind", other).parent.mkdir(parents=True, exist_ok=True)
    cache.store("kind", other, _payload())
    cache.path("kind", other).rename(cache.path("kind", KEY))
    # Execute
    loaded = cache.load("kind", KEY)
    # Assert
    assert loaded is None


def test_payload_failing_validation_is_a_miss(tmp_path):
    # Prepare
    cache = DiskCache(tmp_path)
    cache.store("kind", KEY, _payload())
    # Execute
    rejected = cache.load("kind", KEY, validate=lambda p: p["features"].shape == (5, 5))
    accepted = cache.load("kind", KEY, validate=lambda p: p["features"].shape == (2, 3))
    # Assert
    assert rejected is None and accepted is not None


def test_unwritable_cache_dir_only_costs_speed(tmp_path):
    # Prepare: the cache root is a file, so no folder can be made under it
    (tmp_path / "root").write_text("")
    cache, build = DiskCache(tmp_path / "root"), _Builder()
    # Execute
    first, hit1 = cache.get_or_build("kind", KEY, build)
    _, hit2 = cache.get_or_build("kind", KEY, build)
    # Assert
    assert _same(first, _payload()) and (hit1, hit2) == (False, False) and build.calls == 2


def test_env_sets_the_folder_and_turns_the_cache_off(tmp_path, monkeypatch):
    # Prepare
    build = _Builder()
    monkeypatch.setenv("FEDSEC_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.delenv("FEDSEC_DISK_CACHE", raising=False)
    # Execute
    cached("kind", KEY, build)
    cached("kind", KEY, build)
    calls_on = build.calls
    monkeypatch.setenv("FEDSEC_DISK_CACHE", "0")
    cached("kind", KEY, build)
    cached("kind", None, build)  # an un-keyable value is never cached
    # Assert
    assert calls_on == 1 and build.calls == 3
    assert (tmp_path / "c" / "kind" / f"{key_digest(KEY)}.pt").exists()
    assert diskcache.default_cache() is None


# --- the client data in fedsec.caches ------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path, monkeypatch):
    """A 40-image fake Fashion-MNIST, a fresh cache folder, and empty in-process caches."""
    root = tmp_path / "fmnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 10)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    monkeypatch.setenv("FEDSEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDSEC_DISK_CACHE", raising=False)
    caches._local_data.cache_clear()
    caches.train_pool.cache_clear()
    yield root, tmp_path / "cache"
    caches._local_data.cache_clear()
    caches.train_pool.cache_clear()


def _cfg(root: Path, **changes) -> RunConfig:
    values = {"dataset": "fashion-mnist", "data-root": str(root), "k-shot": 1, "device": "cpu", **changes}
    return RunConfig.from_mapping(values)


def _equal(a, b) -> bool:
    (da, na), (db, nb) = a, b
    return (
        na == nb
        and torch.equal(da.images, db.images)
        and torch.equal(da.labels, db.labels)
        and torch.allclose(da.features, db.features)
    )


def test_local_data_from_disk_equals_freshly_built(fake_fmnist, monkeypatch):
    # Prepare
    root, cache_dir = fake_fmnist
    cfg = _cfg(root)
    monkeypatch.setenv("FEDSEC_DISK_CACHE", "0")
    reference = caches.local_data_for(cfg, 1, 2)
    caches._local_data.cache_clear()
    caches.train_pool.cache_clear()
    monkeypatch.setenv("FEDSEC_DISK_CACHE", "1")
    # Execute
    miss = caches.local_data_for(cfg, 1, 2)
    caches._local_data.cache_clear()  # a fresh process: the in-process caches are empty
    caches.train_pool.cache_clear()
    monkeypatch.setattr(caches, "client_indices", lambda *a, **k: pytest.fail("a hit must not partition again"))
    monkeypatch.setattr(caches, "load_dataset", lambda *a, **k: pytest.fail("a hit must not load the dataset"))
    hit = caches.local_data_for(cfg, 1, 2)
    # Assert
    assert _equal(reference, miss) and _equal(reference, hit)
    assert len(list((cache_dir / "local-data").glob("*.pt"))) == 1
    assert len(list((cache_dir / "dataset").glob("*.pt"))) == 1


def test_local_data_key_changes_with_partition_k_shot_and_seed(fake_fmnist):
    # Prepare
    root, cache_dir = fake_fmnist
    # Execute
    caches.local_data_for(_cfg(root), 0, 2)
    caches.local_data_for(_cfg(root), 1, 2)
    caches.local_data_for(_cfg(root, **{"k-shot": 2}), 0, 2)
    caches.local_data_for(_cfg(root, seed=3), 0, 2)
    caches.local_data_for(_cfg(root), 0, 2)  # the first again: no new file
    # Assert
    assert len(list((cache_dir / "local-data").glob("*.pt"))) == 4
    assert len(list((cache_dir / "dataset").glob("*.pt"))) == 1  # one parsed pool for all of them


def test_changed_dataset_file_invalidates(fake_fmnist):
    # Prepare
    root, cache_dir = fake_fmnist
    before = source_fingerprint("fashion-mnist", str(root))
    caches.local_data_for(_cfg(root), 0, 2)
    caches._local_data.cache_clear()
    caches.train_pool.cache_clear()
    rng = np.random.default_rng(1)
    _write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (40, 28, 28)) // 2 + 1)
    # Execute
    after = source_fingerprint("fashion-mnist", str(root))
    caches.local_data_for(_cfg(root), 0, 2)
    # Assert
    assert before != after
    assert len(list((cache_dir / "local-data").glob("*.pt"))) == 2
    assert len(list((cache_dir / "dataset").glob("*.pt"))) == 2


def test_random_weights_are_never_cached(fake_fmnist):
    # Prepare
    root, cache_dir = fake_fmnist
    # Execute
    data, _ = caches.local_data_for(_cfg(root, pretrained="none"), 0, 2)
    # Assert
    assert len(data) > 0
    assert not (cache_dir / "local-data").exists()


def test_evaluation_test_features_come_from_disk_in_the_next_run(fake_fmnist, monkeypatch):
    # Prepare: the embedded model, the fake test split's 10 images, a subset of 6 of them
    root, cache_dir = fake_fmnist
    clip = caches.clip_for(_cfg(root))
    images = torch.rand(10, 3, clip.image_size, clip.image_size)
    subset = np.array([0, 2, 3, 5, 7, 9])
    # Execute: a miss encodes and stores; then a hit (encoding would fail) and a different subset (a miss)
    first = caches.test_features(clip, "fashion-mnist", str(root), None, images)
    other = caches.test_features(clip, "fashion-mnist", str(root), subset, images[subset])
    monkeypatch.setattr(clip, "encode_images_batched", lambda x: pytest.fail("a hit must not encode"))
    again = caches.test_features(clip, "fashion-mnist", str(root), None, images)
    # Assert
    assert torch.equal(first, again) and first.shape[0] == 10 and other.shape[0] == 6
    assert len(list((cache_dir / "test-features").glob("*.pt"))) == 2


def test_cached_prompt_model_starts_every_caller_at_the_initial_context():
    # Prepare: the process-wide prompt model of a layout, trained (here: overwritten) by a first run
    import numpy as np

    from fedsec.config import RunConfig
    from fedsec.models.prompt import get_ctx, set_ctx

    cfg = RunConfig.from_mapping({"model": "fedsec-tiny-clip", "pretrained": "none", "device": "cpu"})
    names = ("a", "b", "c")
    first = caches.prompt_model_for(cfg, names)
    initial = get_ctx(first)
    set_ctx(first, np.full_like(initial, 7.0))
    # Execute: a second run in the same process asks for the model again
    second = caches.prompt_model_for(cfg, names)
    # Assert: the same object, back at the initial context (a run never inherits an earlier run's prompt)
    assert second is first
    np.testing.assert_array_equal(get_ctx(second), initial)
