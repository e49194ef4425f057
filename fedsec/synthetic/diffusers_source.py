"""Optional: generate the synthetic set with a text-to-image diffusion model (``pip install fedsec[diffusers]``).

Never required: the import happens only when ``synthetic-source = "diffusers"``
is used. ``synthetic-model`` is a local folder or a Hugging Face id available
in the local cache (runs are offline); prompts are ``synthetic-prompt`` with the
class name.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsec.data import ImageDataset
from fedsec.registry import Param
from fedsec.synthetic.base import IMAGE_SIZE, SyntheticSource, register_source


@register_source(
    "diffusers",
    params=(
        Param("synthetic-model", "", "diffusers model id or local path"),
        Param("synthetic-prompt", "a photo of a {}", "text prompt per class ({} = class name)"),
        Param("synthetic-steps", 25, "denoising steps", range=(1, None)),
        IMAGE_SIZE,
    ),
)
class DiffusersSource(SyntheticSource):
    """Text-to-image generation through Hugging Face ``diffusers``."""

    def generate(self, classnames: list[str], per_class: int, seed: int) -> ImageDataset:
        try:
            from diffusers import AutoPipelineForText2Image
        except ImportError as exc:
            raise ImportError(
                "synthetic-source 'diffusers' needs the optional extra: pip install -e '.[diffusers]'"
            ) from exc
        model = str(self.cfg.get("synthetic-model"))
        if not model:
            raise ValueError("synthetic-source 'diffusers' needs synthetic-model (a local folder or a cached hub id)")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = AutoPipelineForText2Image.from_pretrained(model).to(device)
        size = int(self.cfg.get("synthetic-image-size"))
        template = str(self.cfg.get("synthetic-prompt"))
        images, labels = [], []
        for label, name in enumerate(classnames):
            gen = torch.Generator(device=device).manual_seed(seed * 1000 + label)
            out = pipe(
                [template.format(name)] * per_class,
                num_inference_steps=int(self.cfg.get("synthetic-steps")),
                generator=gen,
            ).images
            for img in out:
                arr = np.asarray(img.convert("RGB").resize((size, size)), dtype=np.uint8)
                images.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
                labels.append(label)
        return ImageDataset(
            "diffusers",
            "synthetic",
            torch.stack(images),
            np.asarray(labels, dtype=np.int64),
            list(classnames),
            "resize",
        )
