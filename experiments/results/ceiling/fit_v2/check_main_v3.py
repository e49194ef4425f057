# Run from the repository root: .venv/bin/python experiments/results/ceiling/fit_v2/check_main_v3.py > experiments/results/ceiling/fit_v2/check_main_v3.txt
"""The main job's final trigger under four prompts: its global, its benign-only shadow, and the no-attack twins."""
import sys, numpy as np, torch, glob
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/experiments")
torch.set_num_threads(2)
from pathlib import Path
from fedsec.config import RunConfig
from ceiling import final_metrics
cfg = RunConfig.from_mapping({"attack": "badpromptfl", "num-malicious": 2})
ck = np.load("runs/main-v3/checkpoints/round_0020.npz")
print({k: ck[k].shape for k in ck})
ctx = ck["ctx"]; shadow = ck["shadow_ctx"]
twin = np.load("experiments/results/ceiling/fit_v2/fit05-seed0.npz")["benign_ctx"]
for name, b in (("shadow", shadow), ("twin50-seed0", twin)):
    m = final_metrics(cfg, ctx, b, Path("runs/main-v3"))
    print(name, {k: round(v * 100, 1) for k, v in m.items()})
# and the fit05-seed0 trigger/global ctx under the twin (sanity)
for name, b in (("shadow", shadow), ("twin50-seed0", twin), ("main global", ctx)):
    m = final_metrics(cfg, b, b, Path("/nonexistent"))
    print("clean acc of", name, round(m["clean_acc"] * 100, 1), "norm", float(np.linalg.norm(b)), "dist to global", float(np.linalg.norm(b - ctx)))
