"""Image preparation into the model's ``[0, 1]`` pixel space.

Triggers and their budgets live in this space (after fitting to the model's
resolution, before the model's own mean/std normalisation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prepare_images(images: torch.Tensor, image_size: int, fit: str = "resize") -> torch.Tensor:
    """Turn ``uint8`` images ``N x C x H x W`` into float RGB in ``[0, 1]``.

    Parameters
    ----------
    images : torch.Tensor
        ``uint8`` batch, one or three channels.
    image_size : int
        The model's square input size.
    fit : str
        ``"pad"``: centre with a zero border (images no larger than the model's
        input); ``"resize"``: bilinear resize.

    Returns
    -------
    torch.Tensor
        ``float32`` tensor ``N x 3 x image_size x image_size``.
    """
    x = images.float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    if (h, w) != (image_size, image_size):
        if fit == "pad" and h <= image_size and w <= image_size:
            top, left = (image_size - h) // 2, (image_size - w) // 2
            x = F.pad(x, (left, image_size - w - left, top, image_size - h - top))
        else:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.contiguous()
