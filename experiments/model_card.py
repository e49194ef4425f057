"""Model card of the embedded CLIP: zero-shot with canonical names and with pretraining synonyms, and a linear probe.

Shows that ``fedsec-tiny-clip`` is a competent CLIP that does not know the
dataset's label words (zero-shot with canonical names near chance, with a
synonym it was trained on high, linear probe high). Writes
``experiments/results/model_card.json``.

Run: ``.venv/bin/python experiments/model_card.py``
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from fedsec.config import RunConfig
from fedsec.data import k_shot_indices, load_dataset, prepare_images
from fedsec.metrics import zero_shot_accuracy
from fedsec.models.captions import SYNONYMS
from fedsec.node import clip_for


def main() -> None:
    cfg = RunConfig.from_mapping({})
    clip = clip_for(cfg)
    test, pool = load_dataset("fashion-mnist", "test"), load_dataset("fashion-mnist", "train")
    feats = clip.encode_images_batched(prepare_images(test.images, clip.image_size, test.fit))
    labels = torch.from_numpy(test.labels)
    out = {
        "zero_shot_canonical": zero_shot_accuracy(clip, test.classnames, feats, labels, cfg.prompt_template),
        "zero_shot_synonym": [
            zero_shot_accuracy(clip, [s[j] for s in SYNONYMS], feats, labels, cfg.prompt_template) for j in range(3)
        ],
    }
    idx = k_shot_indices(pool.labels, np.arange(len(pool)), 16, 0)
    train = clip.encode_images_batched(prepare_images(pool.images[idx], clip.image_size, pool.fit))
    probe = LogisticRegression(max_iter=2000, C=10.0).fit(train.numpy(), pool.labels[idx])
    out["linear_probe_16shot"] = float((probe.predict(feats.numpy()) == test.labels).mean())
    path = Path(__file__).parent / "results" / "model_card.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
