"""The main job's final trigger under its benign-only shadow prompt and under a no-attack twin's prompt.

Run from the repository root after ``bash experiments/main.sh -c "run-dir='/work/main/runs/main-v3'"``:
``.venv/bin/python experiments/results/ceiling/fit_v2/check_main_v3.py > .../check_main_v3.txt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[4]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]

from ceiling import final_metrics  # noqa: E402

from fedsec.config import RunConfig  # noqa: E402
from fedsec.data import load_dataset, prepare_images  # noqa: E402
from fedsec.node import clip_for  # noqa: E402

torch.set_num_threads(2)
cfg = RunConfig.from_mapping({"attack": "badpromptfl", "num-malicious": 2})
ck = np.load(ROOT / "runs/main-v3/checkpoints/round_0020.npz")
ctx, shadow = ck["ctx"], ck["shadow_ctx"]
twin = np.load(ROOT / "experiments/results/ceiling/fit_v2/fit05-seed0.npz")["benign_ctx"]
clip = clip_for(cfg)
test = load_dataset(cfg.dataset, "test", cfg.data_root)
feats = clip.encode_images_batched(prepare_images(test.images, clip.image_size, test.fit))  # encoded once
for name, benign in (("shadow", shadow), ("twin50-seed0", twin)):
    m = final_metrics(cfg, ctx, benign, ROOT / "runs/main-v3", feats)
    print(name, {k: round(v * 100, 1) for k, v in m.items()})
for name, prompt in (("shadow", shadow), ("twin50-seed0", twin), ("main global", ctx)):
    acc = final_metrics(cfg, prompt, prompt, Path("/nonexistent"), feats)["clean_acc"]
    print(
        "clean acc of", name, round(acc * 100, 1), "distance to the global prompt", float(np.linalg.norm(prompt - ctx))
    )
