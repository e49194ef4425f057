"""The fast-loading format of the frozen CLIP (fedsec.models.fastload)."""

from __future__ import annotations

import pytest
import torch

from fedsec.models import fastload
from fedsec.models.factory import PretrainedUnavailable, create_clip, sha256_file

MODEL = "fedsec-tiny-clip"


def _checkpoint(path, seed: int):
    import open_clip

    from fedsec.models.factory import register_configs

    register_configs()
    torch.manual_seed(seed)
    torch.save(open_clip.create_model(MODEL).state_dict(), path)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FEDSEC_DISK_CACHE", "1")
    return tmp_path / "cache" / fastload.KIND


def _same_outputs(a, b) -> None:
    torch.manual_seed(0)
    images = torch.rand(6, 3, a.image_size, a.image_size)
    tokens = a.tokenizer(["a photo of a shirt", "a photo of a bag"])
    assert torch.equal(a.encode_images(images), b.encode_images(images))
    assert torch.equal(a.model.encode_text(tokens), b.model.encode_text(tokens))


def test_second_load_comes_from_the_fast_format_with_identical_tensors_and_outputs(tmp_path, cache, monkeypatch):
    # Prepare: a local checkpoint; the first load goes the slow way and stores the module
    ckpt = _checkpoint(tmp_path / "tiny.pt", seed=3)
    reference = create_clip(MODEL, str(ckpt))
    first = fastload.load_clip(MODEL, str(ckpt))
    assert len(list(cache.glob("*.pt"))) == 1

    # Execute: load again with the slow path made to fail, so only the fast format can answer
    def no_slow_path(*args, **kwargs):
        raise AssertionError("create_clip called: the fast format was not used")

    monkeypatch.setattr(fastload, "create_clip", no_slow_path)
    fast = fastload.load_clip(MODEL, str(ckpt))

    # Assert: same class, every parameter and buffer bit-identical, same outputs, frozen, same identity
    assert type(fast.model) is type(reference.model)
    want, got = fastload.module_tensors(reference.model), fastload.module_tensors(fast.model)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)
    _same_outputs(reference, fast)
    assert not fast.model.training and not any(p.requires_grad for p in fast.model.parameters())
    assert fast.identity() == reference.identity() == first.identity()
    assert fast.checkpoint_sha256 == sha256_file(ckpt)


def test_a_changed_checkpoint_is_never_served_from_the_old_entry(tmp_path, cache):
    # Prepare: load one checkpoint (stored), then overwrite the file with other weights
    ckpt = _checkpoint(tmp_path / "tiny.pt", seed=3)
    old = fastload.load_clip(MODEL, str(ckpt))
    _checkpoint(ckpt, seed=4)

    # Execute
    new = fastload.load_clip(MODEL, str(ckpt))

    # Assert: the new file's weights (keyed by its SHA-256), a second entry
    assert new.checkpoint_sha256 != old.checkpoint_sha256
    assert not torch.equal(new.model.token_embedding.weight, old.model.token_embedding.weight)
    _same_outputs(new, create_clip(MODEL, str(ckpt)))
    assert len(list(cache.glob("*.pt"))) == 2


def test_a_checkpoint_with_the_wrong_sha256_is_refused(tmp_path, cache, monkeypatch):
    # Prepare: a stored entry for the file, then a manifest that expects another SHA-256
    ckpt = _checkpoint(tmp_path / "tiny.pt", seed=3)
    fastload.load_clip(MODEL, str(ckpt))
    monkeypatch.setattr(fastload, "resolve_pretrained", lambda model, pretrained: (str(ckpt), "0" * 64))

    # Execute / Assert
    with pytest.raises(PretrainedUnavailable, match="SHA-256"):
        fastload.load_clip(MODEL, "embedded")


def test_an_entry_that_leaves_a_tensor_unset_is_refused(tmp_path, cache):
    # Prepare: the stored tensors of a module, minus one parameter
    ckpt = _checkpoint(tmp_path / "tiny.pt", seed=3)
    tensors = fastload.module_tensors(create_clip(MODEL, str(ckpt)).model)
    tensors.pop("ln_final.weight")

    # Execute / Assert: assigning them leaves a meta tensor, which is refused by name
    with pytest.raises(ValueError, match="meta"):
        fastload.assign_tensors(fastload.build_on_meta(MODEL), tensors)


def test_random_weights_and_a_disabled_cache_take_the_factory_path(tmp_path, cache, monkeypatch):
    # Prepare
    ckpt = _checkpoint(tmp_path / "tiny.pt", seed=3)
    monkeypatch.setenv("FEDSEC_DISK_CACHE", "0")

    # Execute
    clip = fastload.load_clip(MODEL, str(ckpt))
    random = fastload.load_clip(MODEL, "none")

    # Assert: models as the factory builds them, and nothing stored
    assert clip.checkpoint_sha256 == sha256_file(ckpt) and random.checkpoint == ""
    assert not cache.exists()
