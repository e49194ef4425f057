"""The open_clip factory: local checkpoints, checksums, offline tags, the embedded model."""

from __future__ import annotations

import time

import pytest
import torch

from fedsec.models.factory import PretrainedUnavailable, create_clip, embedded_manifest, sha256_file


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory):
    import open_clip

    from fedsec.models.factory import register_configs

    register_configs()
    torch.manual_seed(7)
    model = open_clip.create_model("fedsec-tiny-clip")
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path, model


def test_local_checkpoint_loads_through_pretrained_path(local_checkpoint):
    # Prepare
    path, reference = local_checkpoint
    # Execute
    clip = create_clip("fedsec-tiny-clip", str(path))
    # Assert
    assert clip.checkpoint == str(path.resolve()) and clip.checkpoint_sha256 == sha256_file(path)
    for (name, a), b in zip(reference.state_dict().items(), clip.model.state_dict().values(), strict=False):
        torch.testing.assert_close(a, b, msg=name)
    assert not any(p.requires_grad for p in clip.model.parameters()) and not clip.model.training


def test_checksum_mismatch_is_refused(local_checkpoint):
    path, _ = local_checkpoint
    with pytest.raises(PretrainedUnavailable, match="SHA-256"):
        create_clip("fedsec-tiny-clip", str(path), expected_sha256="0" * 64)


def test_missing_checkpoint_file_fails_clearly():
    with pytest.raises(PretrainedUnavailable, match="does not exist"):
        create_clip("fedsec-tiny-clip", "/nonexistent/ckpt.pt")


def test_unknown_model_fails_clearly():
    with pytest.raises(PretrainedUnavailable, match="unknown model"):
        create_clip("no-such-model", "none")


def test_offline_tag_fails_at_once(monkeypatch):
    # Prepare: a real open_clip tag, no network (HF_HUB_OFFLINE=1 as our launcher sets)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    # Execute / Assert
    with pytest.raises(PretrainedUnavailable, match="unavailable offline"):
        create_clip("RN50", "openai")
    assert time.perf_counter() - t0 < 30


def test_unknown_tag_lists_known_tags():
    with pytest.raises(PretrainedUnavailable, match="not known for 'ViT-B-32'"):
        create_clip("ViT-B-32", "no-such-tag")


def test_embedded_model_matches_its_manifest(embedded_clip):
    manifest = embedded_manifest("fedsec-tiny-clip")
    assert embedded_clip.checkpoint_sha256 == manifest["sha256"]
    assert embedded_clip.image_size == 32
    assert 5 < float(embedded_clip.logit_scale) < 100
