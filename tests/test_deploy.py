"""End-to-end: a Flower deployment (SuperLink + 3 SuperNodes) on loopback with TLS and SuperNode authentication."""

from __future__ import annotations

import json

import pytest

from tests.conftest import needs_fmnist
from tests.deploy_helpers import load_deploy

pytestmark = [pytest.mark.e2e, needs_fmnist]

# Unusual ports, away from the simulation SuperLink (39091/39093) and Flower's defaults (8000, 9094).
SUPERLINK_PORT = 19091
NODE_PORT_BASE = 19092


def test_tls_node_auth_deployment_with_one_attacker(tmp_path):
    # Prepare: TLS certificates and 3 node key pairs, a SuperLink on loopback with node authentication
    deploy = load_deploy()
    cfg = deploy.DeployConfig(
        work_dir=tmp_path / "work",
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
        "attack": "badnets",
        "num-malicious": 1,
        "malicious-ids": "0",
        "k-shot": 4,
        "local-steps": 5,
        "eval-samples": 1000,
        "asr-eval-samples": 300,
        "run-dir": str(run_dir),
    }

    # Execute: start everything, one flwr run, stop everything (the context manager)
    dep = deploy.Deployment(cfg, quiet=True)
    try:
        with dep:
            dep.start_all()
            assert dep.cfg.node_auth and not dep.cfg.insecure
            assert len(dep.node_ids) == 3 and all(v.isdigit() for v in dep.node_ids.values())
            summary = dep.run(overrides, timeout_s=1500)
    finally:
        # (also on failure) every process we started, and their children, by PID; our ports
        leftovers = sorted(p for p in dep.started_pids | dep.stopped_pids if deploy.pid_alive(p))
        bound = [p for p in ports if not deploy.port_free(p)]

    # Assert: every process we started is gone and the ports are free again
    assert dep.started_pids and not leftovers, f"processes left running: {leftovers}"
    assert sorted(dep.ports) == ports and not bound, f"ports still bound: {bound}"

    # Assert: the run went through TLS with authenticated nodes and wrote its metrics
    conn = (tmp_path / "work" / "flwr-home" / "config.toml").read_text()
    assert "root-certificates" in conn and "insecure" not in conn
    superlink_log = (tmp_path / "work" / "logs" / "superlink.log").read_text()
    assert "--enable-supernode-auth" in superlink_log and "authentication is disabled" not in superlink_log
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r.get("clean_acc") is not None for r in rows)
    assert all(r["asr"] is not None for r in rows if r["round"] >= 1)
    assert (run_dir / "summary.json").exists()
    assert summary["deploy_run_wall_s"] > 0 and len(summary["deploy_round_s"]) == 3
    print(
        f"\ndeployment: setup {summary['deploy_timings'].get('setup_s', 0):.1f} s, "
        f"flwr run {summary['deploy_run_wall_s']:.1f} s, round_s {summary['deploy_round_s']}"
    )
