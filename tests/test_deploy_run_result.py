"""``Deployment.run`` counts a run as finished only by a summary.json that this run wrote."""

from __future__ import annotations

import json
import os
import stat

import pytest

from tests.deploy_helpers import load_deploy


def _fake_flwr(path, write_summary: bool):
    """A stand-in for the ``flwr`` CLI that exits 0, writing the run directory's files or not."""
    body = "#!/bin/sh\nexit 0\n"
    if write_summary:
        body = (
            "#!/bin/sh\n"
            'rd=$(echo "$@" | sed -n "s/.*run-dir=\\"\\([^\\"]*\\)\\".*/\\1/p")\n'
            'echo \'{"clean_acc": 0.5}\' > "$rd/summary.json"\n'
            'echo \'{"round": 1, "round_s": 0.1}\' > "$rd/metrics.jsonl"\n'
            "exit 0\n"
        )
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.mark.parametrize("write_summary", [False, True])
def test_a_stale_summary_is_not_success(tmp_path, monkeypatch, write_summary):
    # Prepare: a run directory holding an old summary.json, and an flwr that exits 0
    deploy = load_deploy()
    fake = _fake_flwr(tmp_path / "flwr", write_summary)
    monkeypatch.setattr(deploy, "flower_bin", lambda name: fake)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"clean_acc": 0.9}))
    os.utime(run_dir / "summary.json", (0, 0))
    dep = deploy.Deployment(deploy.DeployConfig(work_dir=tmp_path / "work", insecure=True), quiet=True)
    # Execute / Assert: without a fresh summary the run failed; with one, its figures come back
    if not write_summary:
        with pytest.raises(RuntimeError, match="no summary.json written by this run"):
            dep.run({"run-dir": str(run_dir)}, timeout_s=30)
    else:
        summary = dep.run({"run-dir": str(run_dir)}, timeout_s=30)
        assert summary["clean_acc"] == 0.5 and summary["deploy_round_s"] == [0.1]
