"""CoOp prompt learning on a frozen open_clip CLIP.

:class:`TextEncoder` mirrors ``open_clip.CLIP.encode_text`` but starts from
token *embeddings*, so learned context vectors can stand in for words.
:class:`PromptLearner` owns the only trainable tensor, ``ctx``; the frozen
prefix (start token) and suffix (class name, ".", end token, padding)
embeddings are buffers. :func:`prompt_model` (or :func:`build_prompt_model`,
from a run config) is the one builder of a prompt classifier;
:func:`set_ctx` and :func:`get_ctx` move its learned ``ctx`` in and out as numpy;
:func:`get_arrays` and :func:`set_arrays` move every learned array of a learner
(``ctx`` and, with visual prompts, ``vpt``) by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from fedsec.config import RunConfig

POSITIONS = ("end", "middle", "front")


class TextEncoder(nn.Module):
    """The text tower of an open_clip ``CLIP`` applied to token embeddings.

    Parameters
    ----------
    clip_model : open_clip.CLIP
        The frozen model whose text tower is reused (not copied).
    """

    def __init__(self, clip_model: nn.Module) -> None:
        super().__init__()
        self.transformer = clip_model.transformer
        self.positional_embedding = clip_model.positional_embedding
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.pool_type = clip_model.text_pool_type
        self.eos_id = getattr(clip_model, "text_eos_id", None)
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)

    def forward(self, embeddings: torch.Tensor, tokenized: torch.Tensor) -> torch.Tensor:
        """Encode ``embeddings`` (``P x L x D``) whose token ids are ``tokenized``.

        ``tokenized`` only locates the pooled (end-of-text) position. With the
        causal mask and end-of-text pooling, positions after the last
        end-of-text token cannot influence the pooled output, so they are cut
        off before the transformer: the result is the same, at the cost of the
        longest prompt instead of the context length.
        """
        from open_clip.transformer import text_global_pool  # here, so importing this module needs no open_clip

        keep = self.keep_length(tokenized)
        cast_dtype = self.transformer.get_cast_dtype()
        x = embeddings[:, :keep].to(cast_dtype) + self.positional_embedding[:keep].to(cast_dtype)
        mask = None if self.attn_mask is None else self.attn_mask[:keep, :keep]
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        x = text_global_pool(x, tokenized[:, :keep], self.pool_type, eos_token_id=self.eos_id)
        if self.text_projection is not None:
            if isinstance(self.text_projection, nn.Linear):
                x = self.text_projection(x)
            else:
                x = x @ self.text_projection
        return x

    def keep_length(self, tokenized: torch.Tensor) -> int:
        """How many leading positions determine the pooled output (all of them unless causal + EOT pooling)."""
        full = int(tokenized.shape[1])
        if self.attn_mask is None:
            return full
        if self.pool_type == "argmax":
            return int(tokenized.argmax(dim=-1).max()) + 1
        if self.pool_type == "eos" and self.eos_id is not None:
            return int((tokenized == self.eos_id).int().argmax(dim=-1).max()) + 1
        return full


class PromptLearner(nn.Module):
    """CoOp context vectors for a list of class names.

    Parameters
    ----------
    clip_model : open_clip.CLIP
        Frozen model (its token embedding initialises ``ctx`` and the buffers).
    tokenizer : callable
        The model's open_clip tokenizer.
    classnames : list of str
        Class names, in label order.
    n_ctx : int
        Number of context vectors (must equal the token count of ``ctx_init``
        when that is given).
    ctx_init : str
        Words to initialise the context from, e.g. ``"a photo of a"``; empty
        for a random normal init (std 0.02).
    class_token_position : str
        ``"end"``, ``"middle"`` or ``"front"``.
    class_specific : bool
        One context per class (CSC) instead of one shared context.
    seed : int
        Seed of the random init.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer,
        classnames: list[str],
        n_ctx: int = 4,
        ctx_init: str = "a photo of a",
        class_token_position: str = "end",
        class_specific: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if class_token_position not in POSITIONS:
            raise ValueError(f"class-token-position must be one of {POSITIONS}; got {class_token_position!r}")
        emb = clip_model.token_embedding
        dim = emb.weight.shape[1]
        dev = emb.weight.device  # token ids go where the frozen embedding lives (CPU or GPU)
        n_cls = len(classnames)
        names = [c.replace("_", " ") for c in classnames]
        with torch.no_grad():
            if ctx_init:
                n_init = len(tokenizer.encode(ctx_init))
                if n_ctx != n_init:
                    raise ValueError(
                        f"n-ctx={n_ctx} but ctx-init {ctx_init!r} has {n_init} tokens; "
                        "set n-ctx to match or ctx-init='' for a random init"
                    )
                ids = tokenizer([ctx_init]).to(dev)
                vectors = emb(ids)[0, 1 : 1 + n_ctx].float().clone()
                ctx = vectors.unsqueeze(0).repeat(n_cls, 1, 1) if class_specific else vectors
                placeholder = ctx_init
            else:
                g = torch.Generator().manual_seed(seed)
                shape = (n_cls, n_ctx, dim) if class_specific else (n_ctx, dim)
                ctx = (torch.randn(shape, generator=g) * 0.02).to(dev)
                placeholder = " ".join(["X"] * n_ctx)
        self.n_ctx = n_ctx
        self.n_cls = n_cls
        self.class_token_position = class_token_position
        self.class_specific = class_specific
        self.ctx_init = ctx_init
        self.ctx = nn.Parameter(ctx)
        self.name_lens = [len(tokenizer.encode(n)) for n in names]
        tokenized = tokenizer([f"{placeholder} {n}." for n in names]).to(dev)
        with torch.no_grad():
            embedding = emb(tokenized).float()
        self.register_buffer("tokenized", tokenized, persistent=False)
        self.register_buffer("token_prefix", embedding[:, :1].clone(), persistent=False)
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx :].clone(), persistent=False)

    def forward(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt embeddings ``n_cls x L x D`` (optionally for another ``ctx``)."""
        ctx = self.ctx if ctx is None else ctx
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        prefix, suffix = self.token_prefix, self.token_suffix
        if self.class_token_position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        prompts = []
        half = self.n_ctx // 2
        for i, n in enumerate(self.name_lens):
            name, rest = suffix[i : i + 1, :n], suffix[i : i + 1, n:]
            c = ctx[i : i + 1]
            if self.class_token_position == "middle":
                parts = [prefix[i : i + 1], c[:, :half], name, c[:, half:], rest]
            else:  # front
                parts = [prefix[i : i + 1], name, c, rest]
            prompts.append(torch.cat(parts, dim=1))
        return torch.cat(prompts, dim=0)


class PromptCLIP(nn.Module):
    """Classifier = frozen CLIP + prompt learner (+ optional visual prompt): logits from images or features.

    Parameters
    ----------
    clip : fedsec.models.factory.FrozenCLIP
        Frozen model bundle.
    prompt_learner : PromptLearner
        Holds ``ctx``.
    visual_prompt : VisualPrompt, optional
        Prompt tokens inside the image transformer (:mod:`fedsec.models.visual_prompt`); with
        them the image features depend on learned weights and cannot be cached.
    learn_ctx : bool
        Whether ``ctx`` is learned (False: it stays at its initialisation, e.g. visual prompt
        tuning under the hand-written text prompt).
    feature_adapter : FeatureAdapter, optional
        A learned map of the frozen image features (CLIP-Adapter, :mod:`fedsec.models.adapter`):
        the encoder's features stay cacheable and :meth:`adapt` maps them.
    """

    def __init__(
        self, clip, prompt_learner: PromptLearner, visual_prompt=None, learn_ctx: bool = True, feature_adapter=None
    ) -> None:
        super().__init__()
        self.clip = clip
        self.prompt_learner = prompt_learner
        self.text_encoder = TextEncoder(clip.model)
        self.visual_prompt = visual_prompt
        self.feature_adapter = feature_adapter
        self.learn_ctx = learn_ctx
        prompt_learner.ctx.requires_grad_(learn_ctx)

    @property
    def needs_images(self) -> bool:
        """Whether the image path learns (image features cannot be cached)."""
        return self.visual_prompt is not None and self.visual_prompt.n_tokens > 0

    @property
    def learns_features(self) -> bool:
        """Whether the image features depend on learned weights (visual prompts or a feature adapter)."""
        return self.needs_images or self.feature_adapter is not None

    def learned(self) -> dict[str, nn.Parameter]:
        """The learned arrays by name: what a client sends (``ctx``, ``vpt``, ``adapter-down``/``-up``)."""
        out = {"ctx": self.prompt_learner.ctx} if self.learn_ctx else {}
        if self.visual_prompt is not None:
            out["vpt"] = self.visual_prompt.tokens
        if self.feature_adapter is not None:
            out["adapter-down"], out["adapter-up"] = self.feature_adapter.down, self.feature_adapter.up
        return out

    def bound_root(self) -> nn.Module:
        """The module whose layer names activation bounds use (``bounds-layers``).

        The frozen CLIP's modules under their open_clip names (``visual.ln_pre``,
        ``visual.transformer.resblocks.3``, ...) plus the learner's own modules in the image
        path: ``adapter`` (CLIP-Adapter; its hidden layer is ``adapter.hidden``). The modules
        are shared, not copied: :func:`fedsec.activation_bounds.bounded` on this root clamps
        every forward pass of the model. Visual prompts add no module: they join the encoder's
        blocks, whose bounds then cover the prompt tokens too.
        """
        root = self.__dict__.get("_bound_root")
        if root is None:
            root = nn.Module()
            for name, child in self.clip.model.named_children():
                root.add_module(name, child)
            if self.feature_adapter is not None:
                root.add_module("adapter", self.feature_adapter)
            self.__dict__["_bound_root"] = root  # not a submodule: the CLIP's weights stay out of state_dict()
        return root

    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        """The learner's features from the (prompted) encoder's: the feature adapter's map, or as they are."""
        if self.feature_adapter is None:
            return features
        return self.feature_adapter(features.to(self.feature_adapter.down.device))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features of ``[0, 1]`` images through the learner's image path."""
        if not self.needs_images:
            return self.adapt(self.clip.encode_images(images))
        with self.visual_prompt.installed(self.clip.model.visual):
            return self.adapt(self.clip.encode_images(images))

    @torch.no_grad()
    def encode_images_batched(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """:meth:`encode_images` in batches without gradients; CPU features."""
        if not self.needs_images:
            return self.adapt(self.clip.encode_images_batched(images, batch_size)).cpu()
        with self.visual_prompt.installed(self.clip.model.visual):
            return self.adapt(self.clip.encode_images_batched(images, batch_size)).cpu()

    @torch.no_grad()
    def features(self, images: torch.Tensor, frozen: torch.Tensor | None = None) -> torch.Tensor:
        """The learner's features of ``images``, from their cached ``frozen`` features when the encoder is frozen."""
        if frozen is None or self.needs_images:
            return self.encode_images_batched(images)
        return self.adapt(frozen).cpu()

    def text_features(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised class text features ``n_cls x E``."""
        prompts = self.prompt_learner(ctx)
        return F.normalize(self.text_encoder(prompts, self.prompt_learner.tokenized), dim=-1)

    def logits_from_features(self, image_features: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for precomputed L2-normalised image features."""
        return self.clip.logit_scale * image_features @ self.text_features(ctx).T

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for ``[0, 1]`` images (gradients flow to ``images`` and every learned array)."""
        return self.logits_from_features(self.encode_images(images))


def prompt_model(
    clip,
    classnames: Sequence[str],
    n_ctx: int = 4,
    ctx_init: str = "a photo of a",
    class_token_position: str = "end",
    class_specific: bool = False,
    seed: int = 0,
) -> PromptCLIP:
    """A fresh prompt classifier for ``classnames`` on ``clip``, with the prompt layout said explicitly.

    The one place a :class:`PromptLearner` is built; :func:`build_prompt_model`
    reads the layout from a run config.

    Parameters
    ----------
    clip : fedsec.models.factory.FrozenCLIP
        Frozen model bundle; the learner goes to its device.
    classnames : sequence of str
        Class names, in label order.
    n_ctx, ctx_init, class_token_position, class_specific, seed
        The prompt layout, as in :class:`PromptLearner`.

    Returns
    -------
    PromptCLIP
        A new model (nothing is cached here: see ``fedsec.caches.prompt_model_for``).
    """
    learner = PromptLearner(
        clip.model,
        clip.tokenizer,
        list(classnames),
        n_ctx,
        ctx_init,
        class_token_position,
        class_specific,
        seed,
    )
    return PromptCLIP(clip, learner.to(clip.device))


def prompt_layout(cfg: RunConfig) -> tuple[int, str, str, bool, int]:
    """The run's prompt layout: ``(n_ctx, ctx_init, class_token_position, class_specific, seed)``.

    The positional arguments of :func:`prompt_model` after the class names, read
    from ``n-ctx``, ``ctx-init``, ``class-token-position``, ``class-specific`` and ``seed``.
    """
    return cfg.n_ctx, cfg.ctx_init, cfg.class_token_position, cfg.class_specific, cfg.seed


def build_prompt_model(cfg: RunConfig, clip, classnames: Sequence[str]) -> PromptCLIP:
    """A fresh prompt classifier for ``classnames`` with the run's prompt layout.

    Parameters
    ----------
    cfg : RunConfig
        Reads the prompt layout (:func:`prompt_layout`).
    clip : fedsec.models.factory.FrozenCLIP
        Frozen model bundle.
    classnames : sequence of str
        Class names, in label order.

    Returns
    -------
    PromptCLIP
        A new model, see :func:`prompt_model`.
    """
    return prompt_model(clip, classnames, *prompt_layout(cfg))


def set_ctx(model: PromptCLIP, ctx: np.ndarray) -> None:
    """Load a received ``ctx`` into the prompt learner (shape-checked).

    Parameters
    ----------
    model : PromptCLIP
        The model whose ``prompt_learner.ctx`` is overwritten in place.
    ctx : np.ndarray
        The new context, of the learner's shape.

    Raises
    ------
    ValueError
        When the shapes differ.
    """
    p = model.prompt_learner.ctx
    if tuple(ctx.shape) != tuple(p.shape):
        raise ValueError(f"received ctx of shape {tuple(ctx.shape)}, expected {tuple(p.shape)}")
    with torch.no_grad():
        p.copy_(torch.from_numpy(np.asarray(ctx, dtype=np.float32)))


def get_ctx(model: PromptCLIP) -> np.ndarray:
    """The current ``ctx`` of ``model`` as a new numpy array."""
    return model.prompt_learner.ctx.detach().cpu().numpy().copy()


def get_arrays(model: PromptCLIP) -> dict[str, np.ndarray]:
    """Every learned array of ``model`` (:meth:`PromptCLIP.learned`) as new numpy arrays."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.learned().items()}


def set_arrays(model: PromptCLIP, arrays: dict[str, np.ndarray]) -> None:
    """Load received learned arrays into ``model`` (names and shapes checked).

    Raises
    ------
    ValueError
        When the names differ from the learner's (both listed) or a shape differs.
    """
    learned = model.learned()
    if set(arrays) != set(learned):
        raise ValueError(f"received arrays {sorted(arrays)}, the learner has {sorted(learned)}")
    for name, p in learned.items():
        a = np.asarray(arrays[name], dtype=np.float32)
        if tuple(a.shape) != tuple(p.shape):
            raise ValueError(f"received {name} of shape {tuple(a.shape)}, expected {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(torch.from_numpy(a))
