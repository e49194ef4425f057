"""End-to-end: a loopback deployment whose ClientApp processes fork from a warm parent (fedsec.warm_superexec)."""

from __future__ import annotations

import json
import sys
import time

import pytest

from tests.conftest import needs_fmnist
from tests.deploy_helpers import load_deploy

# Away from tests/test_deploy.py (19091...) and the simulation SuperLink (39091/39093).
SUPERLINK_PORT = 19161
NODE_PORT_BASE = 19162


@pytest.mark.e2e
@needs_fmnist
def test_warm_clientapp_deployment_runs_every_round_and_stops_cleanly(tmp_path):
    # Prepare: 3 SuperNodes in --isolation process, each with a warm SuperExec (no TLS: the path under test
    # is the SuperNode <-> SuperExec <-> ClientApp side, which is loopback HTTP in both modes)
    deploy = load_deploy()
    cfg = deploy.DeployConfig(
        work_dir=tmp_path / "work",
        num_nodes=3,
        insecure=True,
        superlink_port=SUPERLINK_PORT,
        node_port_base=NODE_PORT_BASE,
        startup_timeout_s=180,
        warm_clientapp=True,
    )
    ports = [SUPERLINK_PORT, *(NODE_PORT_BASE + k for k in range(3))]
    if not all(deploy.port_free(p) for p in ports):
        pytest.skip(f"ports {ports} are in use")
    run_dir = tmp_path / "run"
    overrides = {"num-server-rounds": 2, "k-shot": 4, "local-steps": 5, "eval-samples": 300, "run-dir": str(run_dir)}

    # Execute
    dep = deploy.Deployment(cfg, quiet=True)
    try:
        with dep:
            dep.start_all()
            warm = sorted(n for n in dep.procs if n.startswith("warm-superexec-"))
            dep.run(overrides, timeout_s=1500)
    finally:
        leftovers = sorted(p for p in dep.started_pids | dep.stopped_pids if deploy.pid_alive(p))
        bound = [p for p in ports if not deploy.port_free(p)]

    # Assert: one warm SuperExec per node; both rounds got all 3 replies; the ClientApps ran as children of
    # the warm SuperExecs (their output, Flower's FAB install, is in those logs); nothing left running
    assert warm == ["warm-superexec-0", "warm-superexec-1", "warm-superexec-2"]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["num_replies"] == 3 and r["failed_replies"] == 0 for r in rows[1:])
    assert (run_dir / "final_prompt.npz").exists()
    for name in warm:
        text = (cfg.work_dir / "logs" / f"{name}.log").read_text()
        assert "forkserver ready" in text and "Successfully installed fedsec" in text, name
    assert dep.started_pids and not leftovers, f"processes left running: {leftovers}"
    assert not bound, f"ports still bound: {bound}"


def test_killing_a_warm_supernode_takes_its_superexec_and_clientapps_with_it(tmp_path):
    # Prepare: stand-ins for a SuperNode and its warm SuperExec with a running child (no Flower needed)
    deploy = load_deploy()
    cfg = deploy.DeployConfig(work_dir=tmp_path / "work", num_nodes=1, warm_clientapp=True)
    dep = deploy.Deployment(cfg, quiet=True)
    sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
    spawner = [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(300)"]
    node = dep._popen("supernode-0", sleeper)
    warm = dep._popen("warm-superexec-0", spawner + sleeper)
    deadline = time.monotonic() + 30
    while not deploy.descendants(warm.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = deploy.descendants(warm.pid)

    # Execute
    try:
        killed = dep.kill_supernode(0)
    finally:
        dep.stop()

    # Assert: the node, its SuperExec and the SuperExec's child were signalled and are gone; the SuperExec is
    # no longer tracked (start_supernode starts a new one beside the restarted node)
    assert child and {node.pid, warm.pid, *child} <= set(killed)
    assert not any(deploy.pid_alive(p) for p in killed)
    assert "warm-superexec-0" not in dep.procs
    assert not (cfg.work_dir / "pids" / "warm-superexec-0.pid").exists()
