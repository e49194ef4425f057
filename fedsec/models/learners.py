"""Learners: what a client learns on the frozen CLIP, chosen by the run-config key ``learner``.

A learner turns the run's CoOp prompt model (:func:`fedsec.models.prompt.build_prompt_model`)
into the model a client trains; its learned arrays (:meth:`~fedsec.models.prompt.PromptCLIP.learned`)
are what travels, by name. fedsec's own:

* ``coop``: the learned text context ``ctx`` (CoOp, Zhou et al., IJCV 2022; the default);
* ``vpt-shallow`` / ``vpt-deep``: visual prompt tuning (Jia et al., ECCV 2022) under the initial text
  prompt: ``vpt`` tokens before the first block, or fresh ones before every block
  (:mod:`fedsec.models.visual_prompt`). Their image features cannot be cached;
* ``clip-adapter``: CLIP-Adapter's visual adapter (Gao et al., IJCV 2024) on the frozen image
  features, text prompt fixed (:mod:`fedsec.models.adapter`): arrays ``adapter-down``, ``adapter-up``;
  the encoder's features stay cached.

A learner with weights in the image path sets ``image_path = True`` on its
registration; attacks and defenses that have no path for such a learner refuse it
up front with one message (``Attack.image_path_learners``, the wrappers' checks).
Another package adds a learner through the ``fedsec.learners`` entry point::

    @register_learner("my-adapter", image_path=True, params=(Param("my-adapter-dim", 16, "..."),))
    def my_adapter(model, cfg): ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from fedsec.registry import Param, Registry

if TYPE_CHECKING:
    from fedsec.config import RunConfig
    from fedsec.models.prompt import PromptCLIP

#: ``(coop_model, cfg) -> model``: the learner built on the run's CoOp prompt model.
LearnerFactory = Callable[["PromptCLIP", "RunConfig"], "PromptCLIP"]

LEARNERS: Registry[LearnerFactory] = Registry("learner", packages=("fedsec.models.learners",))

VPT_TOKENS = Param("vpt-tokens", 4, "visual prompt tokens per block (vpt-shallow, vpt-deep)", range=(1, 64))


def register_learner(name: str, *, image_path: bool, params: Sequence[Param] = ()):
    """Register a learner factory under ``name``.

    Parameters
    ----------
    name : str
        The run-config ``learner`` value.
    image_path : bool
        Whether it learns weights in the image path (image features then depend on them).
    params : sequence of Param
        Run-config keys it reads.
    """

    def deco(fn: LearnerFactory) -> LearnerFactory:
        fn.image_path = image_path  # type: ignore[attr-defined]
        return LEARNERS.register(name, params=params)(fn)

    return deco


def learns_image_path(name: str) -> bool:
    """Whether learner ``name`` has weights in the image path."""
    return bool(getattr(LEARNERS.get(name), "image_path", False))


def build_learner(cfg: RunConfig, model: PromptCLIP) -> PromptCLIP:
    """The run's learner (``learner``) built on its CoOp prompt model ``model``."""
    return LEARNERS.get(cfg.learner)(model, cfg)


@register_learner("coop", image_path=False)
def coop(model: PromptCLIP, cfg: RunConfig) -> PromptCLIP:
    """CoOp: the learned text context (the prompt model itself)."""
    return model


@register_learner("vpt-shallow", image_path=True, params=(VPT_TOKENS,))
def vpt_shallow(model: PromptCLIP, cfg: RunConfig) -> PromptCLIP:
    """VPT-shallow: learned tokens before the first image block, text prompt fixed."""
    from fedsec.models.visual_prompt import with_visual_prompt

    return with_visual_prompt(model, int(cfg.get("vpt-tokens")), depth=1, seed=cfg.seed)


@register_learner("vpt-deep", image_path=True, params=(VPT_TOKENS,))
def vpt_deep(model: PromptCLIP, cfg: RunConfig) -> PromptCLIP:
    """VPT-deep: fresh learned tokens before every image block, text prompt fixed."""
    from fedsec.models.visual_prompt import with_visual_prompt

    depth = len(model.clip.model.visual.transformer.resblocks)
    return with_visual_prompt(model, int(cfg.get("vpt-tokens")), depth=depth, seed=cfg.seed)


@register_learner(
    "clip-adapter",
    image_path=True,
    params=(
        Param("adapter-reduction", 4, "bottleneck reduction of CLIP-Adapter's visual adapter", range=(1, None)),
        Param("adapter-ratio", 0.2, "residual ratio of the adapted image feature (CLIP-Adapter)", range=(0.0, 1.0)),
    ),
)
def clip_adapter(model: PromptCLIP, cfg: RunConfig) -> PromptCLIP:
    """CLIP-Adapter: a learned bottleneck MLP blended into the frozen image features, text prompt fixed."""
    from fedsec.models.adapter import with_feature_adapter

    return with_feature_adapter(
        model, int(cfg.get("adapter-reduction")), float(cfg.get("adapter-ratio")), seed=cfg.seed
    )
