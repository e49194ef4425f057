"""Visual prompt tuning (VPT) on the frozen CLIP: the token plumbing, a learner with zero tokens, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedsec.models.prompt import get_arrays, prompt_model, set_arrays
from fedsec.models.visual_prompt import VisualPrompt, with_visual_prompt
from fedsec.training import LocalData, train_learner

CLASSES = ["t-shirt", "trouser", "pullover"]


class _Recorder(nn.Module):
    """A block that records its input and adds 1 (stands in for a residual block)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x, attn_mask=None):
        self.seen.append(x.detach().clone())
        return x + 1


class _Transformer(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.batch_first = True
        self.resblocks = nn.ModuleList(_Recorder() for _ in range(layers))

    def forward(self, x):
        for r in self.resblocks:
            x = r(x)
        return x


class _Visual(nn.Module):
    """The parts of an open_clip VisionTransformer the hooks touch: ln_pre, transformer.resblocks."""

    def __init__(self, layers: int = 3) -> None:
        super().__init__()
        self.ln_pre = nn.Identity()
        self.transformer = _Transformer(layers)

    def forward(self, x):
        return self.transformer(self.ln_pre(x))


def test_prompt_tokens_join_each_block_and_leave_after_the_last():
    # Prepare: 2 images of 3 tokens of width 2; deep VPT with 2 tokens in the first 2 of 3 blocks
    visual = _Visual(layers=3)
    vp = VisualPrompt(width=2, n_tokens=2, depth=2, seed=0)
    with torch.no_grad():
        vp.tokens.copy_(torch.tensor([[[10.0, 10.0], [11.0, 11.0]], [[20.0, 20.0], [21.0, 21.0]]]))
    x = torch.zeros(2, 3, 2)
    # Execute
    with vp.installed(visual):
        out = visual(x)
    after = visual(x)
    b0, b1, b2 = (blk.seen[0] for blk in visual.transformer.resblocks)
    # Assert: block 0 sees the image tokens then layer-0 prompts; block 1's prompts are replaced by layer-1's
    # (the image tokens carry block 0's +1); block 2 keeps what block 1 made of them (no replacement beyond depth);
    # the output holds the image tokens only; the hooks are gone afterwards
    assert b0.shape == (2, 5, 2) and torch.equal(b0[:, 3:], vp.tokens[0].detach().expand(2, -1, -1))
    assert torch.equal(b1[:, :3], torch.ones(2, 3, 2)) and torch.equal(
        b1[:, 3:], vp.tokens[1].detach().expand(2, -1, -1)
    )
    assert torch.equal(b2[:, 3:], vp.tokens[1].detach().expand(2, -1, -1) + 1)
    assert out.shape == (2, 3, 2) and torch.equal(out, torch.full((2, 3, 2), 3.0))
    assert torch.equal(after, torch.full((2, 3, 2), 3.0)) and visual.transformer.resblocks[0].seen[1].shape == (2, 3, 2)


def test_a_learner_with_zero_prompt_tokens_equals_the_frozen_clip(random_clip):
    # Prepare: a CoOp model and the same with a zero-token visual prompt
    torch.manual_seed(0)
    images = torch.rand(4, 3, random_clip.image_size, random_clip.image_size)
    coop = prompt_model(random_clip, CLASSES, n_ctx=4, ctx_init="a photo of a")
    vpt0 = with_visual_prompt(coop, n_tokens=0)
    # Execute
    frozen = random_clip.encode_images_batched(images)
    feats = vpt0.encode_images_batched(images)
    # Assert: bit-identical features and logits; nothing is image-path-learned, the only array is the (empty) vpt
    assert torch.equal(feats, frozen)
    assert torch.equal(vpt0.logits_from_features(feats), coop.logits_from_features(frozen))
    assert not vpt0.needs_images and set(vpt0.learned()) == {"vpt"} and vpt0.learned()["vpt"].numel() == 0


@pytest.mark.parametrize("depth", [1, 2])
def test_visual_prompts_train_alone_and_travel_by_name(random_clip, depth):
    # Prepare: VPT (shallow and deep) under the fixed text prompt, a few labelled images
    torch.manual_seed(0)
    coop = prompt_model(random_clip, CLASSES, n_ctx=4, ctx_init="a photo of a")
    model = with_visual_prompt(coop, n_tokens=3, depth=depth, seed=1)
    images = torch.rand(12, 3, random_clip.image_size, random_clip.image_size)
    labels = torch.arange(12) % 3
    data = LocalData(images, labels, torch.empty(0))
    before = get_arrays(model)
    ctx_before = model.prompt_learner.ctx.detach().clone()
    frozen = {k: v.detach().clone() for k, v in random_clip.model.state_dict().items()}
    # Execute
    stats = train_learner(model, data, steps=5, batch_size=4, lr=0.5, momentum=0.0, seed=0)
    after = get_arrays(model)
    # Assert: only vpt travels and moved; ctx and the encoder are untouched; the features now differ from the
    # frozen ones; arrays round-trip by name and a wrong name is refused with both lists
    assert set(after) == {"vpt"} and after["vpt"].shape == (depth, 3, random_clip.model.visual.transformer.width)
    assert not np.allclose(after["vpt"], before["vpt"]) and np.isfinite(stats["train-loss"])
    assert torch.equal(model.prompt_learner.ctx, ctx_before)
    assert all(torch.equal(v, frozen[k]) for k, v in random_clip.model.state_dict().items())
    assert not torch.allclose(model.encode_images_batched(images), random_clip.encode_images_batched(images))
    set_arrays(model, before)
    assert np.array_equal(get_arrays(model)["vpt"], before["vpt"])
    with pytest.raises(ValueError, match=r"received arrays \['ctx'\], the learner has \['vpt'\]"):
        set_arrays(model, {"ctx": before["vpt"]})


def test_a_deeper_prompt_than_the_encoder_is_refused(random_clip):
    # Prepare: a depth beyond the encoder's blocks
    coop = prompt_model(random_clip, CLASSES)
    layers = len(random_clip.model.visual.transformer.resblocks)
    model = with_visual_prompt(coop, n_tokens=2, depth=layers + 1)
    # Execute / Assert: one clear error naming both numbers
    with pytest.raises(ValueError, match=f"vpt depth {layers + 1} > the encoder's {layers} blocks"):
        model.encode_images_batched(torch.rand(1, 3, random_clip.image_size, random_clip.image_size))


def test_the_re_evaluation_recipe_for_visual_prompts_matches_the_model(random_clip):
    # Prepare: deep VPT with set tokens; docs/reevaluate.md's encoding written out with open_clip's modules alone
    import torch.nn.functional as F

    coop = prompt_model(random_clip, CLASSES)
    model = with_visual_prompt(coop, n_tokens=3, depth=2, seed=5)
    x = torch.rand(4, 3, random_clip.image_size, random_clip.image_size)
    v = random_clip.model.visual
    mean = torch.tensor(random_clip.mean).view(1, -1, 1, 1)
    std = torch.tensor(random_clip.std).view(1, -1, 1, 1)
    p = torch.from_numpy(get_arrays(model)["vpt"])
    # Execute
    with torch.no_grad():
        h = v.conv1((x - mean) / std).flatten(2).transpose(1, 2)
        h = torch.cat([v.class_embedding.expand(len(h), 1, -1), h], 1) + v.positional_embedding
        h = v.ln_pre(torch.cat([h, p[0].expand(len(h), -1, -1)], 1))
        for i, blk in enumerate(v.transformer.resblocks):
            if 0 < i < len(p):
                h = torch.cat([h[:, : -p.shape[1]], p[i].expand(len(h), -1, -1)], 1)
            h = blk(h)
        manual = F.normalize(v.ln_post(h[:, : -p.shape[1]][:, 0]) @ v.proj, dim=-1)
    # Assert: the recipe's features are the model's
    assert torch.allclose(manual, model.encode_images_batched(x), atol=1e-5)
