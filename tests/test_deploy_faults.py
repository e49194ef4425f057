"""End-to-end: a SuperNode killed (SIGKILL) mid-round; the round completes with the others; the node rejoins."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.conftest import needs_fmnist
from tests.deploy_helpers import load_deploy

pytestmark = [pytest.mark.e2e, needs_fmnist]

# Away from tests/test_deploy.py (19091-19094), the simulation SuperLink (39091/39093) and Flower's defaults.
SUPERLINK_PORT = 19191
NODE_PORT_BASE = 19192
VICTIM = 2  # the partition whose SuperNode is killed in round 1


def test_supernode_killed_mid_round_then_restarted(tmp_path):
    # Prepare: an insecure loopback deployment, 3 SuperNodes, rounds that need only 2 of them
    deploy = load_deploy()
    cfg = deploy.DeployConfig(
        work_dir=tmp_path / "work",
        insecure=True,
        num_nodes=3,
        superlink_port=SUPERLINK_PORT,
        node_port_base=NODE_PORT_BASE,
        startup_timeout_s=180,
    )
    ports = [SUPERLINK_PORT, *(NODE_PORT_BASE + k for k in range(3))]
    if not all(deploy.port_free(p) for p in ports):
        pytest.skip(f"ports {ports} are in use")
    run_dir = tmp_path / "run"
    overrides = {
        "num-server-rounds": 2,
        "min-train-nodes": 2,
        "round-timeout": 300.0,  # a safety net only: the dead node's heartbeat lapses within 60 s
        "k-shot": 4,
        "local-steps": 5,
        "eval-samples": 1000,
        "asr-eval-samples": 300,
        "run-dir": str(run_dir),
    }
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = dep.run(overrides, timeout_s=900)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            outcome["error"] = exc

    # Execute: run in a thread; once the victim's ClientApp holds round 1's message, kill its SuperNode
    # (SIGKILL, the whole process tree), start it again at once, let the run finish; stop everything.
    dep = deploy.Deployment(cfg, quiet=True)
    t0 = time.perf_counter()
    try:
        with dep:
            dep.start_all()
            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            deadline = time.monotonic() + 600
            while not dep.clientapp_pids(VICTIM) and thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            working = dep.clientapp_pids(VICTIM)
            killed = dep.kill_supernode(VICTIM) if working else []
            killed_at = time.perf_counter() - t0
            if working:
                dep.start_supernode(VICTIM)
            thread.join(timeout=900)
    finally:
        leftovers = sorted(p for p in dep.started_pids | dep.stopped_pids if deploy.pid_alive(p))
        bound = [p for p in ports if not deploy.port_free(p)]
    wall = time.perf_counter() - t0

    # Assert: the victim was working on round 1 when it was killed, and the run finished
    assert working and set(working) <= set(killed), "the victim's ClientApp never started"
    assert "error" not in outcome, outcome.get("error")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    # Assert: round 1 completed with the other two; the failure is counted (an error reply from the SuperLink)
    r1, r2 = rows[1], rows[2]
    assert r1["num_sent"] == 3 and r1["failed_replies"] == 1 and r1["missing_replies"] == 0
    assert len(r1["failed_nodes"]) == 1 and r1["rejected_replies"] == 1
    assert r1["clean_acc"] > rows[0]["clean_acc"] - 0.05
    log = (run_dir / "flwr.log").read_text()
    assert "1 of 3 nodes failed" in log and "Node Unavailable" in log
    # Assert: the restarted SuperNode (a new node id, insecure mode) took part in round 2
    assert r2["num_sent"] == 3 and r2["failed_nodes"] == [] and r2["num_replies"] == 3
    assert r1["failed_nodes"][0] not in r2.get("failed_nodes", [])
    victim_log = (tmp_path / "work" / "logs" / f"supernode-{VICTIM}.log").read_text()
    assert victim_log.count("$ ") == 2  # started twice
    # Assert: every process we started (also the killed tree) is gone, the ports are free
    assert not leftovers, f"processes left running: {leftovers}"
    assert not bound, f"ports still bound: {bound}"
    print(f"\nfault test: killed at {killed_at:.1f} s, round_s {[round(r['round_s'], 1) for r in rows]}, {wall:.1f} s")
