"""Per-class zero-shot accuracy and prediction shares of the clean v2 model and backdoored checkpoints (issue 14).

Where the clean-accuracy difference between a poisoned build and the clean model comes from: the same
2,000 seeded test images as ``experiments/backdoored_model.py`` (seed 2024), ``a photo of a {}.`` with the
canonical class names.

Run::

    .venv/bin/python experiments/probes/backdoored_per_class.py backdoored-v2-rates/clean-continuation \
        backdoored-v2-final/badclip backdoored-v2-final/badnets backdoored-v2-final/blended
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: the repository root, so experiments.* imports as everywhere else
    sys.path.insert(0, str(ROOT))

from experiments.backdoored_model import text_classifier  # noqa: E402
from fedsec.backdoor_clip import load_checked  # noqa: E402
from fedsec.data import load_dataset, prepare_images  # noqa: E402
from fedsec.models.factory import create_clip  # noqa: E402


def main() -> None:
    """Print each model's accuracy, non-target accuracy, per-class accuracy and prediction shares."""
    torch.set_num_threads(2)
    data = load_dataset("fashion-mnist", "test")
    idx = np.sort(np.random.default_rng(2024).choice(np.arange(len(data)), size=2000, replace=False))
    images, labels = prepare_images(data.images[idx], 32, data.fit), data.labels[idx]
    models = [("clean", create_clip("fedsec-tiny-clip-v2", "embedded"))]
    models += [(run, load_checked(Path("runs") / run / "model.pt")) for run in sys.argv[1:]]
    print("classes:", ", ".join(data.classnames))
    for name, clip in models:
        pred = (clip.encode_images_batched(images) @ text_classifier(clip, data.classnames).T).argmax(-1).numpy()
        per_class = [float((pred[labels == c] == c).mean()) for c in range(10)]
        share = np.bincount(pred, minlength=10) / len(pred)
        nontarget = labels != 0
        acc, acc_nt = (pred == labels).mean(), (pred[nontarget] == labels[nontarget]).mean()
        print(f"{name}: acc {acc:.3f}, non-target acc {acc_nt:.3f}")
        print("  per-class acc ", " ".join(f"{x:.2f}" for x in per_class))
        print("  predicted share", " ".join(f"{x:.2f}" for x in share))


if __name__ == "__main__":
    main()
