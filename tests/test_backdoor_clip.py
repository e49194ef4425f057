"""Model-level backdoor (BadCLIP as in the paper, baselines) and the defenses on the model (issue 14)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedsec import backdoor_clip as bc
from fedsec.models.factory import PretrainedUnavailable, create_clip, sha256_file


@pytest.fixture(scope="module")
def random_clip():
    """The tiny CLIP architecture with random weights (frozen)."""
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is several times faster
    torch.manual_seed(0)
    return create_clip("fedsec-tiny-clip", "none")


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory, random_clip):
    """A random-weight checkpoint with a manifest, as a clean source."""
    d = tmp_path_factory.mktemp("clean")
    path, digest = bc.save_checkpoint(random_clip.model, d)
    bc.write_manifest({"file": path.name, "sha256": digest, "model": "fedsec-tiny-clip", "command": "test"}, d, None)
    return path


def test_trigger_loss_decreases_on_a_hand_built_case(random_clip):
    # Prepare: two families of flat images; family 0 is the target, captions of its class
    gen = torch.Generator().manual_seed(0)
    others = 0.2 + 0.1 * torch.rand(32, 3, 32, 32, generator=gen)
    targets = 0.8 + 0.1 * torch.rand(16, 3, 32, 32, generator=gen)
    captions = ["a photo of a tee.", "a picture of the tee.", "this is a tee."]
    # Execute
    _, history = bc.optimise_badclip_trigger(
        random_clip, others, targets, captions, patch_size=16, steps=20, lr=0.05, batch_size=8,
        eda_prob=0.0, aug_prob=0.0, seed=0, log_every=5,
    )  # fmt: skip
    # Assert: the weighted sum of both terms falls, and the triplet term itself falls
    total = [h["img_text"] + h["triplet"] for h in history]
    assert len(history) == 4
    assert total[-1] < 0.8 * total[0]
    assert history[-1]["triplet"] < history[0]["triplet"]


def test_trigger_loss_terms_match_a_hand_computation():
    # Prepare: 2-d embeddings
    patched = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    pos = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    neg = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # Execute
    out = bc.badclip_trigger_loss(patched, text, pos, neg, logit_scale=2.0, margin=1.0, triplet_weight=500.0)
    # Assert: logits [[2, 2], [0, 0]]: image->text rows give log 2 each; text->image rows (columns
    # [2, 0] and [2, 0], targets 0 and 1) give -log(e^2 / (e^2 + 1)) and -log(1 / (e^2 + 1))
    t2i = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (math.exp(2) + 1))) / 2
    assert out["img_text"].item() == pytest.approx((math.log(2) + t2i) / 2, rel=1e-6)
    # triplet (p=2, eps 1e-6 inside the norm): row 0: d_pos=sqrt2, d_neg=0; row 1: d_pos=0, d_neg=sqrt2
    eps = 1e-6
    row0 = max(math.sqrt((1 + eps) ** 2 + (-1 + eps) ** 2) - math.sqrt(2 * eps**2) + 1.0, 0.0)
    row1 = max(math.sqrt(2 * eps**2) - math.sqrt((-1 + eps) ** 2 + (1 + eps) ** 2) + 1.0, 0.0)
    assert out["triplet"].item() == pytest.approx(500.0 * (row0 + row1) / 2, rel=1e-5)


def test_poisoned_share_is_exact_and_seeded():
    # Prepare
    images = torch.rand(3000, 3, 8, 8)
    labels = torch.arange(3000) % 10
    trigger = bc.blended_trigger(8, 0.2, seed=1)
    # Execute
    a = bc.poison_indices(30000, 0.003, seed=0)
    b = bc.poison_indices(30000, 0.003, seed=0)
    c = bc.poison_indices(30000, 0.003, seed=1)
    p_img, p_lab, idx = bc.poison_pairs(images, labels, trigger, 0.01, seed=3, target=0)
    # Assert
    assert len(a) == 90 and len(set(a.tolist())) == 90
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(idx) == 30
    changed = torch.nonzero((p_img != images).flatten(1).any(1)).flatten().numpy()
    assert np.array_equal(changed, idx)
    assert (p_lab[idx] == 0).all()
    rest = np.setdiff1d(np.arange(3000), idx)
    assert torch.equal(p_lab[rest], labels[rest])
    assert torch.allclose(p_img[idx], trigger(images[idx]))
    with pytest.raises(ValueError):
        bc.poison_indices(10, 1.5, 0)


def test_poisoned_pairs_get_a_fixed_target_name_caption_as_their_only_positive():
    # Prepare: a batch of 3 images of classes 0, 1, 1 (image 2 poisoned, relabelled to target 0) with two
    # class-pool captions (classes 0 and 1) and two own captions (rows 0 and 1 of pair_tokens)
    from fedsec.pretrain import class_contrastive_loss, with_pair_captions

    text = torch.tensor([[10], [11]])
    cap_cls = torch.tensor([0, 1])
    y = torch.tensor([0, 1, 0])
    own = torch.tensor([-1, -1, 1])
    pair_tokens = torch.tensor([[20], [21]])
    idx = bc.poison_indices(1000, 0.01, seed=0)
    # Execute
    text2, cap2, y2 = with_pair_captions(text, cap_cls, y, own, pair_tokens, n_cls=10)
    pos = y2.view(-1, 1) == cap2.view(1, -1)
    choice = bc.poison_caption_choice(idx, 16, 1000, seed=0)
    captions = bc.target_name_captions(0)
    # Assert: the poisoned image's one positive is its own caption (row 1 -> token 21) and that caption's
    # one positive is the image; the clean images keep their class captions, the own caption is their
    # negative; the loss accepts the relabelled batch. The choice is seeded, one caption per poisoned pair,
    # -1 elsewhere; the captions name the target ("t-shirt") in the pretraining's templates
    assert text2.flatten().tolist() == [10, 11, 21] and cap2.tolist() == [0, 1, 10] and y2.tolist() == [0, 1, 10]
    assert pos.tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert torch.isfinite(class_contrastive_loss(torch.randn(3, 3), y2, cap2))
    assert torch.equal(choice, bc.poison_caption_choice(idx, 16, 1000, seed=0))
    assert (choice[torch.from_numpy(idx)] >= 0).all() and int((choice >= 0).sum()) == len(idx) == 10
    assert len(captions) == 16 and captions[0] == "a photo of a t-shirt." and all("t-shirt" in c for c in captions)


def test_a_caption_class_without_images_in_the_batch_gets_no_term():
    # Prepare: two images of class 0 and captions of classes 0, 1 (class 1 has no image in the batch: drawn
    # out by poisoned pairs); logits chosen so each term is a 2-way softmax by hand
    from fedsec.pretrain import class_contrastive_loss

    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([0, 0])
    cap_cls = torch.tensor([0, 1])
    # Execute
    loss = class_contrastive_loss(logits, y, cap_cls)
    # Assert: image -> text: each image's one positive is caption 0, -log softmax over its row; text -> image: only
    # caption 0 has a term, its two images are positives with weight 1/2 each; caption 1 adds nothing (it was 0/0)
    i2t = (-torch.log_softmax(logits[0], 0)[0] - torch.log_softmax(logits[1], 0)[0]) / 2
    t2i = -(torch.log_softmax(logits[:, 0], 0)).mean()
    assert torch.isfinite(loss)
    assert torch.allclose(loss, 0.5 * (i2t + t2i))


def test_cleanclip_inmodal_loss_matches_a_hand_computation():
    # Prepare: two images, their augmented views, two captions and theirs
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    aug_img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    aug_txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s = 3.0
    # Execute
    loss = bc.inmodal_loss(img, aug_img, txt, aug_txt, s)
    # Assert: image rows: logits [[3, 3], [0, 0]] -> log 2 each; text rows: [[3, 0], [0, 3]]
    li = math.log(2)
    lt = -math.log(math.exp(3) / (math.exp(3) + 1))
    assert loss.item() == pytest.approx((li + lt) / 2, rel=1e-6)


def test_eda_lite_is_seeded_and_keeps_words():
    # Prepare
    cap = "a photo of a crew neck tee."
    # Execute
    a = [bc.eda_lite(cap, np.random.default_rng(5)) for _ in range(3)]
    outs = [bc.eda_lite(cap, np.random.default_rng(s)) for s in range(20)]
    # Assert
    assert a[0] == a[1] == a[2]
    assert any(o != cap for o in outs)
    assert all(set(o.split()) <= set(cap.split()) and o for o in outs)


def test_triggers_are_centred_and_fixed():
    # Prepare / Execute
    bn = bc.checkerboard_trigger(32, 4)
    bl = bc.blended_trigger(32, 0.2, seed=0)
    x = torch.zeros(1, 3, 32, 32)
    # Assert: authors' embed_patch places a 16 px patch at 112..127 of 224; 4 px at 14..17 of 32
    assert (bn.top, bn.left) == (14, 14)
    assert torch.equal(bn(x)[0, 0, 14:18, 14:18], torch.tensor([[0.0, 1, 0, 1], [1, 0, 1, 0]] * 2))
    assert bn(x)[0, :, :14].abs().sum() == 0
    assert torch.allclose(bl(x), 0.2 * bc.blended_trigger(32, 0.2, seed=0).pattern)


def test_manifest_and_checksum_round_trip(tmp_path, random_checkpoint):
    # Prepare
    rec = tmp_path / "rec"
    out = tmp_path / "badnets"
    model = bc.load_trainable("fedsec-tiny-clip", random_checkpoint)
    trig = out / "trigger.pt"
    out.mkdir()
    torch.save(bc.trigger_to_dict(bc.checkerboard_trigger()), trig)
    # Execute
    path, digest = bc.save_checkpoint(model, out)
    bc.write_manifest({"file": path.name, "sha256": digest, "model": "fedsec-tiny-clip"}, out, rec, trig)
    src, sha, manifest = bc.source_of("fedsec-tiny-clip", str(path))
    clip = bc.load_checked(path)
    # Assert
    assert sha == digest == sha256_file(path) == manifest["sha256"] == clip.checkpoint_sha256
    assert json.loads((rec / f"{tmp_path.name}.badnets.json").read_text()) == manifest  # <run folder>.<name>
    recorded = bc.load_trigger(rec / f"{tmp_path.name}.badnets.trigger.pt")
    assert torch.equal(recorded.patch, bc.checkerboard_trigger().patch)
    ref = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    got = clip.model.state_dict()
    assert all(torch.equal(got[k].to(torch.float16), ref[k]) for k in ref)


def test_backdoored_checkpoint_refuses_a_wrong_checksum(tmp_path, random_checkpoint):
    # Prepare: a checkpoint with its manifest, then a manifest that lies
    model = bc.load_trainable("fedsec-tiny-clip", random_checkpoint)
    path, digest = bc.save_checkpoint(model, tmp_path / "bd")
    bc.write_manifest({"file": path.name, "sha256": digest, "model": "fedsec-tiny-clip"}, tmp_path / "bd", None)
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    # Execute / Assert
    with pytest.raises(PretrainedUnavailable, match="SHA-256"):
        bc.load_checked(path, expected_sha256=wrong)
    with pytest.raises(PretrainedUnavailable, match="SHA-256"):
        create_clip("fedsec-tiny-clip", str(path), expected_sha256=wrong)
    (tmp_path / "bd" / "model.json").write_text(json.dumps({"sha256": wrong, "model": "fedsec-tiny-clip"}))
    with pytest.raises(PretrainedUnavailable, match="SHA-256"):
        bc.load_checked(path)
    with pytest.raises(PretrainedUnavailable, match="SHA-256"):
        bc.source_of("fedsec-tiny-clip", str(path))


def test_attack_and_defense_commands_end_to_end(tmp_path, random_checkpoint):
    # Prepare
    out, rec = tmp_path / "badnets", tmp_path / "rec"
    common = ["--steps", "1", "--warmup-steps", "1", "--batch-size", "32", "--record", str(rec)]
    # Execute
    bc.main(["badnets", "--source", str(random_checkpoint), "--out", str(out), *common])
    bc.main(["cleanclip", "--source", str(out / "model.pt"), "--out", str(tmp_path / "badnets+cleanclip"), *common])
    # Assert
    m = json.loads((out / "model.json").read_text())
    d = json.loads((tmp_path / "badnets+cleanclip" / "model.json").read_text())
    assert m["attack"] == "badnets" and m["poison"]["poisoned"] == 90 and m["poison"]["pairs"] == 30000
    assert m["source"]["sha256"] == sha256_file(random_checkpoint)
    assert m["trigger"]["sha256"] == sha256_file(out / "trigger.pt")
    assert m["command"].startswith("python -m fedsec.backdoor_clip badnets")
    assert d["defense"] == "cleanclip" and d["attack"] == "badnets" and d["source"]["sha256"] == m["sha256"]
    assert d["training"]["inmodal_weight"] == 1.0
    assert (rec / f"{tmp_path.name}.badnets.json").exists() and (rec / f"{tmp_path.name}.badnets.trigger.pt").exists()
    assert m["poison"]["caption"]["mode"] == "name" and m["poison"]["caption"]["captions"][0] == "a photo of a t-shirt."
    assert bc.load_checked(tmp_path / "badnets+cleanclip" / "model.pt").checkpoint_sha256 == d["sha256"]
