"""A node's helpers under one name, re-exported from the modules that own them.

Kept so ``from fedsec.node import ...`` (the ClientApp, the ServerApp's
evaluation, the experiment scripts) goes on working; new code may import from
the owners directly:

- :mod:`fedsec.caches`: the per-process frozen CLIP, prompt models and local
  data, and the disk-cache keys behind them (:func:`clip_for`,
  :func:`prompt_model_for`, :func:`learner_model_for`, :func:`local_data_for`, :func:`train_pool`,
  :func:`test_features`, :func:`model_cache_identity`);
- :mod:`fedsec.models.prompt`: the prompt model's builder and its learned
  ``ctx`` in and out (:func:`set_ctx`, :func:`get_ctx`), every learned array by
  name (:func:`set_arrays`, :func:`get_arrays`);
- :mod:`fedsec.bounds_clip`: the client's side of the activation bounds
  (:func:`bounds_from_content`, :func:`training_bounds`,
  :func:`local_data_under_bounds`);
- :mod:`fedsec.training`: :func:`seed_everything`.
"""

from __future__ import annotations

from fedsec.bounds_clip import bounds_from_content, local_data_under_bounds, training_bounds
from fedsec.caches import (
    clip_for,
    learner_model_for,
    local_data_for,
    model_cache_identity,
    prompt_model_for,
    test_features,
    train_pool,
)
from fedsec.models.prompt import get_arrays, get_ctx, set_arrays, set_ctx
from fedsec.training import seed_everything

__all__ = [
    "bounds_from_content",
    "clip_for",
    "get_arrays",
    "get_ctx",
    "learner_model_for",
    "local_data_for",
    "local_data_under_bounds",
    "model_cache_identity",
    "prompt_model_for",
    "seed_everything",
    "set_arrays",
    "set_ctx",
    "test_features",
    "train_pool",
    "training_bounds",
]
