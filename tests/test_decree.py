"""DECREE's trigger inversion: its similarity statistic by hand, and a planted shortcut found with a small mask."""

from __future__ import annotations

import torch

from fedsec.decree import invert, lr_at, self_cosine


def test_self_cosine_is_the_mean_off_diagonal_cosine():
    # Prepare: three embeddings; pairwise cosines 1 (rows 0, 1), 0 (rows 0/1 vs 2)
    f = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    # Execute / Assert: (1 + 0 + 0) * 2 / 6 off-diagonal entries = 1/3
    assert torch.isclose(self_cosine(f), torch.tensor(1 / 3))


def test_the_learning_rate_follows_the_authors_32px_schedule():
    assert [lr_at(e, 1e-3) for e in (0, 29, 30, 49, 50, 999)] == [1e-3, 1e-3, 0.1, 0.1, 0.05, 0.05]


def _encoders(size: int = 8):
    torch.manual_seed(0)
    proj = torch.randn(3 * size * size, 16)

    def clean(x):
        return (x.flatten(1) - 0.5) @ proj

    def backdoored(x):  # a planted shortcut: the top-left 2 x 2 corner dominates the embedding
        corner = x[:, :, :2, :2].flatten(1)
        return clean(x) + 200.0 * torch.cat([corner, torch.zeros(len(x), 4)], 1)

    return clean, backdoored


def test_a_planted_shortcut_is_inverted_with_a_much_smaller_mask_than_a_clean_encoder_needs():
    # Prepare: 8 x 8 images, the same random projection with and without a dominant 2 x 2 corner
    clean, backdoored = _encoders()
    images = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    # Execute
    bad = invert(backdoored, images, epochs=300, seed=0)
    good = invert(clean, images, epochs=300, seed=0)
    # Assert: both reach the similarity threshold; the backdoored encoder's mask covers a small share of the image,
    # concentrated on the corner, and far less than the clean encoder's
    assert bad["mask"] is not None and good["mask"] is not None
    assert bad["pl1"] < 0.25 and bad["pl1"] < 0.5 * good["pl1"]
    assert bad["mask"][:2, :2].mean() > bad["mask"][2:, 2:].mean()
