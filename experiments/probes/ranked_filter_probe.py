"""Which synthetic images the ranked filter keeps, under the initial model or a run's unfused shadow.

Rebuilds a run's poisoned synthetic set (deterministic by its config), loads the server's shadow arrays from the
run's checkpointed strategy state (``checkpoints/strategy_NNNN.npz``; the last two rounds are kept) or takes the
learner's initial arrays (``init``), and reports how many triggered images the ranked filter
(``bounds-keep`` of the run, 0.5 by default) keeps and how well the reference classifies the clean synthetic
images (docs/fm-fl.md, session 12).

    python experiments/probes/ranked_filter_probe.py <run dir> init 9 10
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from fedsec.attacks import get_attack
from fedsec.bounds_clip import ranked_keep
from fedsec.config import RunConfig
from fedsec.data import load_dataset
from fedsec.models.prompt import get_arrays, set_arrays
from fedsec.synthetic import SyntheticSet, build_synthetic_set
from strategies.fusion import synthetic_prompt_model


def reference_arrays(run: Path, which: str, initial: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The initial arrays (``init``) or the server's shadow after round ``which``."""
    if which == "init":
        return initial
    with np.load(run / "checkpoints" / f"strategy_{int(which):04d}.npz") as z:
        return {k.split("bounds-shadow/", 1)[1]: z[k] for k in z.files if "bounds-shadow/" in k}


def main(run: Path, references: list[str]) -> None:
    """Print, per reference, what the ranked filter keeps of the run's poisoned synthetic set."""
    cfg = RunConfig.from_mapping(json.loads((run / "config.json").read_text()))
    names = list(load_dataset(cfg.dataset, "test", cfg.data_root).classnames)
    clean = build_synthetic_set(cfg, names, 32)
    attack = get_attack("fm-poison")(cfg, Path(tempfile.mkdtemp()))
    images, labels, idx = attack.poison_synthetic(clean.images, clean.labels, int(cfg.seed))
    clip, model = synthetic_prompt_model(cfg, SyntheticSet(images, labels, names))
    features = clip.encode_images_batched(images)
    poisoned = np.zeros(len(labels), bool)
    poisoned[idx] = True
    target = (labels == cfg.target_label).numpy()
    initial = get_arrays(model)
    for which in references:
        set_arrays(model, reference_arrays(run, which, initial))
        with torch.no_grad():
            logits = model.logits_from_features(model.features(images, features))
        prob = torch.softmax(logits, -1).gather(1, labels.view(-1, 1)).squeeze(1)
        keep = ranked_keep(prob, labels, float(cfg.get("bounds-keep"))).numpy()
        pred = logits.argmax(-1).numpy()
        print(
            f"reference {which}: kept {keep.mean():.3f}; triggered kept {keep[poisoned].sum()}/{poisoned.sum()}; "
            f"genuine target-class kept {keep[target & ~poisoned].sum()}/{(target & ~poisoned).sum()}; "
            f"accuracy on the clean part {(pred == labels.numpy())[~poisoned].mean():.3f}"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
