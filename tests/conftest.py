"""Shared fixtures: a random-weight tiny CLIP (fast) and the embedded one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(
    not FMNIST.exists() and not os.environ.get("CI"),
    reason="dataset-fashion-mnist not installed (CI installs it)",
)


@pytest.fixture(scope="session")
def random_clip():
    """``fedsec-tiny-clip`` with random weights (no checkpoint)."""
    from fedsec.models.factory import create_clip

    torch.manual_seed(0)
    return create_clip("fedsec-tiny-clip", "none")


@pytest.fixture(scope="session")
def embedded_clip():
    """The shipped, pretrained ``fedsec-tiny-clip``."""
    from fedsec.models.factory import create_clip

    return create_clip("fedsec-tiny-clip", "embedded")
