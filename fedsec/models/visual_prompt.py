"""Visual prompt tuning of a frozen open_clip vision transformer (VPT, Jia et al., ECCV 2022).

Learnable prompt tokens join the image tokens of the frozen ViT: *shallow* VPT
adds ``n_tokens`` tokens to the input of the first block; *deep* VPT also
replaces them with fresh learnable tokens at the input of each of the next
``depth - 1`` blocks. As in MaPLe's CLIP implementation (Khattak et al., CVPR
2023, ``VisionTransformer_MaPLe``), the tokens are appended after the positional
embedding and before ``ln_pre`` (they carry no position; attention is blind to
token order, so appending equals VPT's insertion after the class token), and
they leave the sequence after the last block, so pooling and every later layer
see the image tokens only. The encoder's weights are untouched: the prompts
enter through forward hooks installed for the duration of a ``with`` block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class VisualPrompt(nn.Module):
    """Learnable prompt tokens for a frozen open_clip ``VisionTransformer``.

    Parameters
    ----------
    width : int
        Token width of the vision transformer (``visual.transformer.width``).
    n_tokens : int
        Prompt tokens per block (0: the frozen encoder, exactly).
    depth : int
        Blocks that get their own tokens: 1 is shallow VPT, more is deep VPT
        (at most the number of blocks).
    seed : int
        Seeds the initialisation: uniform in ``±sqrt(6 / (width + width))``
        (Xavier), as VPT's ``prompt_embeddings``.

    Attributes
    ----------
    tokens : nn.Parameter
        ``depth x n_tokens x width``: the only learned array.
    """

    def __init__(self, width: int, n_tokens: int, depth: int = 1, seed: int = 0) -> None:
        super().__init__()
        if n_tokens < 0 or depth < 1:
            raise ValueError(f"VisualPrompt needs n_tokens >= 0 and depth >= 1, got {n_tokens} and {depth}")
        gen = torch.Generator().manual_seed(seed)
        bound = (6.0 / (2 * width)) ** 0.5
        self.tokens = nn.Parameter((torch.rand(depth, n_tokens, width, generator=gen) * 2 - 1) * bound)

    @property
    def n_tokens(self) -> int:
        """Prompt tokens per block."""
        return int(self.tokens.shape[1])

    @property
    def depth(self) -> int:
        """Blocks with their own tokens (1: shallow)."""
        return int(self.tokens.shape[0])

    @contextmanager
    def installed(self, visual: nn.Module) -> Iterator[None]:
        """Run ``visual`` (an open_clip ``VisionTransformer``) with these prompts inside the block.

        Raises
        ------
        ValueError
            When ``visual`` is not a batch-first open_clip vision transformer with at least ``depth`` blocks.
        """
        if self.n_tokens == 0:
            yield
            return
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks is None or not hasattr(visual, "ln_pre") or not getattr(visual.transformer, "batch_first", False):
            raise ValueError("visual prompts need an open_clip VisionTransformer (batch-first, with ln_pre)")
        if self.depth > len(blocks):
            raise ValueError(f"vpt depth {self.depth} > the encoder's {len(blocks)} blocks")
        p = self.n_tokens

        def add(_module, args):
            x = args[0]
            return (torch.cat([x, self.tokens[0].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1), *args[1:])

        def replace(i: int):
            def hook(_module, args):
                x = args[0]
                fresh = self.tokens[i].to(x.dtype).expand(x.shape[0], -1, -1)
                return (torch.cat([x[:, :-p], fresh], dim=1), *args[1:])

            return hook

        def drop(_module, _args, out):
            return out[:, :-p]

        handles = [visual.ln_pre.register_forward_pre_hook(add)]
        handles += [blocks[i].register_forward_pre_hook(replace(i)) for i in range(1, self.depth)]
        handles.append(visual.transformer.register_forward_hook(drop))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def with_visual_prompt(model, n_tokens: int, depth: int = 1, seed: int = 0, learn_ctx: bool = False):
    """A new :class:`~fedsec.models.prompt.PromptCLIP` with visual prompts on ``model``'s frozen CLIP.

    Parameters
    ----------
    model : PromptCLIP
        Gives the frozen CLIP and the text prompt (copied: ``model`` itself is left as it is).
    n_tokens, depth, seed : int
        As :class:`VisualPrompt` (``depth`` 1: shallow VPT).
    learn_ctx : bool
        Whether the text context is learned too (False: VPT under the initial text prompt).
    """
    import copy

    from fedsec.models.prompt import PromptCLIP

    visual = model.clip.model.visual
    prompt = VisualPrompt(visual.transformer.width, n_tokens, depth, seed).to(model.clip.device)
    return PromptCLIP(model.clip, copy.deepcopy(model.prompt_learner), prompt, learn_ctx)
