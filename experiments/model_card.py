"""Model card of an embedded CLIP: zero-shot with canonical names and with pretraining synonyms, and a linear probe.

For ``fedsec-tiny-clip`` (v1) it shows a competent CLIP that does not know the
dataset's label words (zero-shot with canonical names near chance, with a
synonym it was trained on high, linear probe high); for ``fedsec-tiny-clip-v2``
a CLIP that knows them loosely (canonical zero-shot between chance and the
synonym figure). Writes ``experiments/results/model_card.json`` (v1) or
``experiments/results/model_card_<suffix>.json`` (``model_card_v2.json``).

Run: ``.venv/bin/python experiments/model_card.py [--model fedsec-tiny-clip-v2]``
"""

from __future__ import annotations

import argparse
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


def card_path(model: str) -> Path:
    """Where the card of ``model`` is written (v1 keeps its historical name)."""
    results = Path(__file__).parent / "results"
    suffix = model.removeprefix("fedsec-tiny-clip").lstrip("-")
    return results / (f"model_card_{suffix}.json" if suffix else "model_card.json")


def main() -> None:
    """Measure the card and write it."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--model", default=RunConfig.model, help="(default: the run config's default model) embedded model name"
    )
    args = ap.parse_args()
    cfg = RunConfig.from_mapping({"model": args.model, "pretrained": "embedded"})
    clip = clip_for(cfg)
    test, pool = load_dataset("fashion-mnist", "test"), load_dataset("fashion-mnist", "train")
    feats = clip.encode_images_batched(prepare_images(test.images, clip.image_size, test.fit))
    labels = torch.from_numpy(test.labels)
    out = {
        "model": args.model,
        "checkpoint_sha256": clip.checkpoint_sha256,
        "zero_shot_canonical": zero_shot_accuracy(clip, test.classnames, feats, labels, cfg.prompt_template),
        "zero_shot_synonym": [
            zero_shot_accuracy(clip, [s[j] for s in SYNONYMS], feats, labels, cfg.prompt_template) for j in range(3)
        ],
    }
    idx = k_shot_indices(pool.labels, np.arange(len(pool)), 16, 0)
    train = clip.encode_images_batched(prepare_images(pool.images[idx], clip.image_size, pool.fit))
    probe = LogisticRegression(max_iter=2000, C=10.0).fit(train.numpy(), pool.labels[idx])
    out["linear_probe_16shot"] = float((probe.predict(feats.numpy()) == test.labels).mean())
    path = card_path(args.model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
