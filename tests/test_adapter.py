"""CLIP-Adapter's visual adapter: its maths on a hand-built case, scale invariance, and training alone."""

from __future__ import annotations

import numpy as np
import torch

from fedsec.models.adapter import FeatureAdapter, with_feature_adapter
from fedsec.models.prompt import get_arrays, prompt_model
from fedsec.training import LocalData, train_learner

CLASSES = ["t-shirt", "trouser", "pullover"]


def test_the_adapter_blends_a_relu_bottleneck_into_the_feature_by_its_ratio():
    # Prepare: width 2, reduction 1 (a 2x2 bottleneck), ratio 0.5, hand-set weights
    adapter = FeatureAdapter(width=2, reduction=1, ratio=0.5)
    with torch.no_grad():
        adapter.down.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        adapter.up.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    f = torch.tensor([[3.0, 4.0]])
    # Execute
    out = adapter(f)
    # Assert: down -> [3, -4] -> ReLU [3, 0] -> up [6, 0] -> ReLU [6, 0]; 0.5*[6, 0] + 0.5*[3, 4] = [4.5, 2],
    # normalised; and the same for 10 f (no biases, ReLU: cached normalised features give the same result)
    expected = torch.tensor([[4.5, 2.0]]) / torch.tensor([4.5, 2.0]).norm()
    assert torch.allclose(out, expected)
    assert torch.allclose(adapter(10 * f), expected)


def test_clip_adapter_trains_its_two_matrices_on_cached_features_only(random_clip):
    # Prepare: CLIP-Adapter on a CoOp model; cached frozen features of a few labelled images
    torch.manual_seed(0)
    coop = prompt_model(random_clip, CLASSES, n_ctx=4, ctx_init="a photo of a")
    model = with_feature_adapter(coop, reduction=4, ratio=0.2, seed=3)
    images = torch.rand(12, 3, random_clip.image_size, random_clip.image_size)
    labels = torch.arange(12) % 3
    frozen = random_clip.encode_images_batched(images)
    before = get_arrays(model)
    ctx = model.prompt_learner.ctx.detach().clone()
    # Execute
    stats = train_learner(model, LocalData(images, labels, frozen), steps=5, batch_size=4, lr=0.5, seed=0)
    after = get_arrays(model)
    # Assert: the two adapter arrays travel and moved, ctx did not; features stay cacheable (not needs_images) but
    # are the learner's: from cached features they equal a fresh encoding through the adapter
    assert set(after) == {"adapter-down", "adapter-up"} and not model.needs_images and model.learns_features
    assert all(not np.allclose(after[k], before[k]) for k in after) and np.isfinite(stats["train-loss"])
    assert torch.equal(model.prompt_learner.ctx, ctx)
    assert torch.allclose(model.features(images, frozen), model.encode_images_batched(images), atol=1e-6)
