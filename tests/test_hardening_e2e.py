"""Issue 18 end to end: one tiny Flower run, re-evaluated from its directory, then a failing re-run into it.

Two Flower starts in all (about a minute on two idle cores), plus SuperLinks without a run
for the launcher's port lock and watchdog.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsec.launch import RunFailed, main, run
from tests.conftest import ROOT, needs_fmnist

CFG = {
    "num-server-rounds": 2,
    "k-shot": 2,
    "local-steps": 2,
    "eval-samples": 300,
    "asr-eval-samples": 100,
    "attack": "badnets",
    "num-malicious": 1,
    "seed": 1,
}


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished 2-round BadNets run on 2 SuperNodes: (summary, run directory).

    Session scope: the two tests using it share one xdist group (one worker), and a module-scoped
    fixture would be built again whenever the worker ran another module's test in between.
    """
    path = tmp_path_factory.mktemp("hardening") / "run"
    summary = run(ROOT, {**CFG, "run-dir": str(path)}, num_supernodes=2, quiet=True)
    return summary, path


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.e2e
@needs_fmnist
@pytest.mark.xdist_group("hardening-finished-run")
def test_reevaluation_recipe_reproduces_the_reported_figures(finished_run, tmp_path):
    # Prepare: the recipe's code block from docs/reevaluate.md, the run's provenance files
    summary, path = finished_run
    doc = (ROOT / "docs" / "reevaluate.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    assert "fedsec" not in re.sub(r'""".*?"""', "", code, flags=re.S).replace("fedsec run", "")
    script = tmp_path / "reevaluate.py"
    script.write_text(code)
    prov = json.loads((path / "provenance.json").read_text())
    # Execute: in a clean interpreter that never imports fedsec
    out = subprocess.run(
        [sys.executable, "-I", str(script), str(path)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    # Assert: the recomputed figures are the reported ones; the provenance names its files and denominators
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    got, want = result["recomputed"], result["reported"]
    assert got["clean_acc"] == pytest.approx(summary["clean_acc"], abs=1e-9)
    assert got["asr"] == pytest.approx(summary["asr"], abs=1e-9)
    assert got["trigger_only_asr"] == pytest.approx(want["trigger_only_asr"], abs=1e-9)
    assert got["asr_n"] == want["asr_n"] == prov["evaluation"]["asr_final_denominator"]
    assert prov["evaluation"]["clean_acc_denominator"] == 300 and prov["evaluation"]["asr_round_denominator"] == 100
    assert [f["path"] for f in prov["trigger"]["sources"]["files"]] == [
        "attacker/round_0002/p" + str(summary["malicious_partitions"][0]) + ".pt"
    ]
    assert prov["architecture"]["open_clip_config"]["text_cfg"]["heads"] == 4


@pytest.mark.e2e
@needs_fmnist
@pytest.mark.xdist_group("hardening-finished-run")
def test_failed_rerun_exits_1_with_the_serverapps_cause_and_keeps_the_finished_run(finished_run, monkeypatch, capsys):
    # Prepare: the launcher's own run-directory check switched off, so the ServerApp's is the one that acts
    _, path = finished_run
    before = _files(path)
    monkeypatch.setattr("fedsec.rundir.claim", lambda *a, **k: "new")
    argv = ["--num-supernodes", "2", "-c", " ".join(f"{k}={json.dumps(v)}" for k, v in CFG.items())]
    argv += ["-c", "strategy='krum'", "-c", f"run-dir='{path}'"]
    # Execute
    with pytest.raises(SystemExit) as exc:
        main(argv)
    # Assert: non-zero, the ServerApp's error in the terminal, no table, the finished run untouched
    out = capsys.readouterr()
    assert exc.value.code == 1
    assert re.search(r"fedsec run: error: the run failed: RunDirError: run-dir .* holds a finished run", out.err)
    assert "| attack |" not in out.out
    after = _files(path)
    assert {k: v for k, v in after.items() if k != "flwr.log"} == {k: v for k, v in before.items() if k != "flwr.log"}


@pytest.mark.e2e
@needs_fmnist
def test_every_malicious_client_failing_stops_the_run_with_the_cause(tmp_path):
    # Prepare: the attacker store cannot be created (a file where its folder goes): only malicious clients fail
    path = tmp_path / "run"
    path.mkdir()
    (path / "attacker").write_text("not a folder")
    # Execute
    with pytest.raises(RunFailed) as exc:
        run(ROOT, {**CFG, "run-dir": str(path)}, num_supernodes=2, quiet=True)
    # Assert: the ServerApp stopped in round 1 and the launcher names why (before: exit 0 with ASR 0.0%)
    assert exc.value.cause.startswith("MaliciousClientsFailed: every malicious client failed"), exc.value.cause
    assert not (path / "summary.json").exists()


_HOLDER = """
import sys, time
from pathlib import Path
from fedsec.launch import LocalSuperLink, flower_env
env = flower_env(Path(sys.argv[1]))
with LocalSuperLink(env, Path(sys.argv[2])) as link:
    print(link.http_port, link.proc.pid, flush=True)
    time.sleep(120)
"""


def pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.e2e
def test_simultaneous_launchers_get_their_own_superlink_and_a_killed_one_leaves_nothing(tmp_path):
    # Prepare: two launchers starting their SuperLink at the same moment, on the default ports
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_LOCAL_")}
    env["FLWR_HOME"] = str(tmp_path / "flwr")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(ROOT), str(tmp_path / f"sl{i}.log")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for i in range(2)
    ]
    try:
        # Execute
        started = [p.stdout.readline().split() for p in procs]
        ports = [s[0] for s in started]
        links = [int(s[1]) for s in started]
        trees = {pid for pid in links}
        from fedsec.launch import descendants

        for pid in links:
            trees.update(descendants(pid))
        os.kill(procs[0].pid, signal.SIGKILL)  # no cleanup code of the launcher runs
        procs[0].wait()
        t0 = time.monotonic()
        first = {links[0], *descendants(links[0])}
        while time.monotonic() - t0 < 10 and any(pid_alive(p) for p in first):
            time.sleep(0.2)
        reaped_s = time.monotonic() - t0
        # Assert: two SuperLinks on two ports; the killed launcher's tree is gone within 10 s, the other lives
        assert len(set(ports)) == 2, ports
        assert not any(pid_alive(p) for p in first), f"left after {reaped_s:.1f}s"
        assert pid_alive(links[1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=60)
