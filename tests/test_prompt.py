"""CoOp prompt learner and text encoder."""

from __future__ import annotations

import pytest
import torch

from fedsec.models.prompt import PromptCLIP, PromptLearner, TextEncoder

NAMES = ["t-shirt", "trouser", "ankle boot"]


@pytest.mark.parametrize(
    ("position", "text_of"),
    [
        ("end", lambda n: f"a photo of a {n}."),
        ("middle", lambda n: f"a photo {n} of a."),
        ("front", lambda n: f"{n} a photo of a."),
    ],
)
def test_text_encoder_equals_encode_text_when_ctx_is_token_embeddings(random_clip, position, text_of):
    # Prepare: ctx initialised from the words "a photo of a"
    learner = PromptLearner(
        random_clip.model, random_clip.tokenizer, NAMES, ctx_init="a photo of a", class_token_position=position
    )
    encoder = TextEncoder(random_clip.model)
    # Execute
    with torch.no_grad():
        ours = encoder(learner(), learner.tokenized)
        ref = random_clip.model.encode_text(random_clip.tokenizer([text_of(n) for n in NAMES]))
    # Assert: equal to the full-length encode_text, though only the leading positions were computed
    assert encoder.keep_length(learner.tokenized) < learner.tokenized.shape[1]
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_class_specific_context_matches_shared_at_init(random_clip):
    # Prepare
    shared = PromptLearner(random_clip.model, random_clip.tokenizer, NAMES, ctx_init="a photo of a")
    csc = PromptLearner(random_clip.model, random_clip.tokenizer, NAMES, ctx_init="a photo of a", class_specific=True)
    # Execute / Assert
    assert csc.ctx.shape == (len(NAMES), 4, shared.ctx.shape[-1])
    torch.testing.assert_close(csc(), shared())


def test_ctx_is_the_only_trainable_tensor(random_clip):
    # Prepare
    learner = PromptLearner(random_clip.model, random_clip.tokenizer, NAMES, n_ctx=8, ctx_init="", seed=3)
    model = PromptCLIP(random_clip, learner)
    # Execute
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [p for n, p in random_clip.model.named_parameters() if p.requires_grad]
    # Assert
    assert trainable == ["prompt_learner.ctx"]
    assert frozen == []
    assert learner.ctx.shape == (8, random_clip.model.token_embedding.weight.shape[1])
    assert set(learner.state_dict()) == {"ctx"}


def test_random_init_is_seeded(random_clip):
    a = PromptLearner(random_clip.model, random_clip.tokenizer, NAMES, n_ctx=4, ctx_init="", seed=1)
    b = PromptLearner(random_clip.model, random_clip.tokenizer, NAMES, n_ctx=4, ctx_init="", seed=1)
    c = PromptLearner(random_clip.model, random_clip.tokenizer, NAMES, n_ctx=4, ctx_init="", seed=2)
    torch.testing.assert_close(a.ctx, b.ctx)
    assert not torch.allclose(a.ctx, c.ctx)


def test_gradient_reaches_ctx_only(random_clip):
    # Prepare
    learner = PromptLearner(random_clip.model, random_clip.tokenizer, NAMES)
    model = PromptCLIP(random_clip, learner)
    feats = torch.nn.functional.normalize(torch.randn(5, random_clip.model.text_projection.shape[1]), dim=-1)
    # Execute
    loss = torch.nn.functional.cross_entropy(model.logits_from_features(feats), torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    # Assert
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0


def test_bad_position_is_rejected(random_clip):
    with pytest.raises(ValueError, match="class-token-position"):
        PromptLearner(random_clip.model, random_clip.tokenizer, NAMES, class_token_position="left")


def test_n_ctx_must_match_ctx_init(random_clip):
    with pytest.raises(ValueError, match="n-ctx=8"):
        PromptLearner(random_clip.model, random_clip.tokenizer, NAMES, n_ctx=8, ctx_init="a photo of a")
