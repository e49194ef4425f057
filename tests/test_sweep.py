"""Sweeps: grid expansion, reports from run directories, and resuming after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedsec.sweep import MAX_NAME, expand, load_grid, report
from tests.conftest import ROOT, needs_fmnist


def _fake_run(path, seed, acc, asr, attack="badnets", strategy="fedavg"):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"seed": seed, "attack": attack, "strategy": strategy}))
    (path / "summary.json").write_text(json.dumps({"clean_acc": acc, "asr": asr, "wall_s": 1.0}))
    rows = [{"round": 0, "clean_acc": 0.4, "asr": 0.1}, {"round": 1, "clean_acc": acc, "asr": asr}]
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_grid_expands_to_the_cartesian_product(tmp_path):
    # Prepare
    grid = tmp_path / "g.toml"
    grid.write_text('[sweep]\nname="g"\n[base]\nnum-server-rounds=2\n[grid]\nattack=["none","badnets"]\nseed=[0,1,2]\n')
    # Execute
    sweep, base, lists = load_grid(grid)
    runs = expand(base, lists)
    # Assert
    assert sweep["name"] == "g" and len(runs) == 6
    assert runs[0] == ("attack=none-seed=0", {"num-server-rounds": 2, "attack": "none", "seed": 0})


def test_long_run_names_are_cut_and_stay_unique():
    # Prepare: two table values whose names differ only after the first 200 characters
    long = {"bounds-layers": "x" * 200}
    grid = {"defense": [{**long, "bounds-trim": 0.1}, {**long, "bounds-trim": 0.2}], "seed": [0]}
    # Execute
    names = [name for name, _ in expand({}, grid)]
    short = expand({}, {"attack": ["none"]})[0][0]
    # Assert: within the limit, distinct, stable, and short names untouched
    assert all(len(n.encode()) <= MAX_NAME for n in names) and len(set(names)) == 2
    assert names == [name for name, _ in expand({}, grid)]
    assert short == "attack=none"


def test_report_gives_mean_and_std_over_seeds(tmp_path):
    # Prepare: two seeds of one method, one of another
    _fake_run(tmp_path / "a0", 0, 0.80, 0.90)
    _fake_run(tmp_path / "a1", 1, 0.70, 0.70)
    _fake_run(tmp_path / "b0", 0, 0.75, 0.05, attack="none")
    # Execute
    table = report([tmp_path / d for d in ("a0", "a1", "b0")], tmp_path / "out" / "r")
    # Assert
    by = {r["attack"]: r for r in table}
    assert by["badnets"]["seeds"] == 2
    assert by["badnets"]["clean_acc"] == pytest.approx(0.75) and by["badnets"]["clean_acc_std"] == pytest.approx(0.05)
    assert by["none"]["asr"] == pytest.approx(0.05)
    md = (tmp_path / "out" / "r.md").read_text()
    assert "75.0% ± 5.0" in md
    assert (tmp_path / "out" / "r.csv").exists() and (tmp_path / "out" / "r.png").stat().st_size > 1000


def test_matrix_plot_has_one_row_of_panels_per_attack(tmp_path):
    # Prepare: a 2 x 2 attack x strategy matrix
    import matplotlib.image

    for attack in ("none", "badnets"):
        for strategy in ("fedavg", "krum"):
            _fake_run(tmp_path / f"{attack}-{strategy}", 0, 0.7, 0.3 if attack != "none" else None, attack, strategy)
    runs = [tmp_path / d for d in ("none-fedavg", "none-krum", "badnets-fedavg", "badnets-krum")]
    # Execute
    report(runs, tmp_path / "m", ["attack", "strategy"])
    report(runs[:2], tmp_path / "one", ["strategy"])
    # Assert: two rows of panels (twice the height) for two attacks, one row for one key
    two, one = matplotlib.image.imread(tmp_path / "m.png"), matplotlib.image.imread(tmp_path / "one.png")
    assert two.shape[0] == pytest.approx(2 * one.shape[0], rel=0.02) and two.shape[1] == one.shape[1]


@pytest.mark.e2e
@needs_fmnist
def test_sweep_resumes_after_kill_9(tmp_path):
    # Prepare: a 2-run grid of tiny runs
    grid = tmp_path / "resume.toml"
    grid.write_text(
        '[sweep]\nname = "resume"\nnum-supernodes = 2\n'
        f'runs-root = "{tmp_path / "runs"}"\n'
        "[base]\nnum-server-rounds = 1\nk-shot = 2\nlocal-steps = 2\neval-samples = 300\n"
        "[grid]\nseed = [0, 1]\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "fedsec.cli",
        "sweep",
        str(grid),
        "--app",
        str(ROOT),
        "--results",
        str(tmp_path / "res"),
    ]
    root = tmp_path / "runs" / "resume"
    # Execute: kill -9 the whole sweep as soon as the first run has finished
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (root / "seed=0" / "summary.json").exists():
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()  # its SuperLink (own session) survives; the next launcher reaps it by its PID file
    first = (root / "seed=0" / "summary.json").stat().st_mtime
    done_before = sorted(p.parent.name for p in root.glob("*/summary.json"))
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    # Assert: the finished run was skipped, the other completed, one table for both
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "seed=0" in done_before and f"{len(done_before)} done" in out.stdout
    assert sorted(p.parent.name for p in root.glob("*/summary.json")) == ["seed=0", "seed=1"]
    assert (root / "seed=0" / "summary.json").stat().st_mtime == first
    assert (tmp_path / "res" / "resume.csv").read_text().count("\n") == 2  # header + one method (2 seeds)
