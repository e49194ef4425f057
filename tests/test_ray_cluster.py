"""End-to-end: a simulation on an existing two-node Ray cluster reached through ``RAY_ADDRESS``.

The cluster is started here with ``ray start`` (a head and a second node on this
machine, each on its own free ports, stopped by process group). The simulation
SuperLink inherits ``RAY_ADDRESS`` from the launcher, so Flower's Ray backend
connects to the cluster instead of starting its own Ray. What proves it: the
ClientApp actors write their logs into the cluster's own temp dir, and there are
more of them than the head node alone has CPUs for (Flower sizes the actor pool
per node from ``ray.nodes()``), so the second node hosted actors too.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsec.launch import run
from tests.conftest import ROOT

pytestmark = [pytest.mark.e2e]

RAY = str(Path(sys.executable).parent / "ray")
HEAD_CPUS, NODE_CPUS = 2, 3


_TAKEN: set[int] = set()  # ports handed out in this process (a component's port must not be another's)


def _free_port() -> int:
    """A free port no earlier call returned (the OS hands ports out of its ephemeral range)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _TAKEN:
            _TAKEN.add(port)
            return port


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return low, high


def _free_range(width: int) -> int:
    """The first port of ``width`` consecutive ports that are free now."""
    rng = random.Random(os.getpid())
    low, _ = _ephemeral_range()  # below the OS's ephemeral ports, so no _free_port() lands inside the range
    for _ in range(200):
        base = rng.randrange(10000, low - width)
        try:
            socks = []
            for p in range(base, base + width):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def _node_ports() -> list[str]:
    base = _free_range(40)
    return [
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
        f"--min-worker-port={base}",
        f"--max-worker-port={base + 39}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
    ]


def _stop(proc: subprocess.Popen) -> None:
    """Stop a ``ray start --block`` and everything it started (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _wait_for_cpus(address: str, cpus: int, timeout: float = 120.0) -> None:
    code = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(int(ray.cluster_resources().get('CPU', 0)))"
    )
    deadline = time.time() + timeout
    seen = ""
    while time.time() < deadline:
        out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=60)
        seen = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]
        if seen == str(cpus):
            return
        time.sleep(2)
    raise RuntimeError(f"the Ray cluster at {address} did not reach {cpus} CPUs (last: {seen})")


@pytest.fixture
def ray_cluster(tmp_path):
    """A head (2 CPUs) and a second node (3 CPUs) on free ports; yields (address, temp dir)."""
    temp = Path("/tmp") / f"fedsec-ray-{os.getpid()}-{int(time.time())}"  # Ray's socket paths must be short
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    logs = [open(tmp_path / "head.log", "w"), open(tmp_path / "node.log", "w")]
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", f"--num-cpus={HEAD_CPUS}", "--include-dashboard=false",
         "--node-ip-address=127.0.0.1",
         f"--ray-client-server-port={_free_port()}", f"--temp-dir={temp}", *_node_ports()],
        env=env, stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    procs = [head]
    try:
        _wait_for_cpus(address, HEAD_CPUS)
        node = subprocess.Popen(
            [RAY, "start", "--block", f"--address={address}", f"--num-cpus={NODE_CPUS}", "--node-ip-address=127.0.0.1",
             *_node_ports()],
            env=env, stdout=logs[1], stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        procs.append(node)
        _wait_for_cpus(address, HEAD_CPUS + NODE_CPUS)
        yield address, temp
    finally:
        for p in reversed(procs):
            _stop(p)
        for f in logs:
            f.close()
        subprocess.run(["rm", "-rf", str(temp)], check=False)


def test_simulation_runs_on_an_existing_two_node_ray_cluster(ray_cluster, tmp_path, monkeypatch):
    # Prepare: the launcher passes its environment to the simulation SuperLink
    address, temp = ray_cluster
    monkeypatch.setenv("RAY_ADDRESS", address)
    cfg = {
        "num-server-rounds": 2,
        "dataset": "digits",
        "k-shot": 4,
        "local-steps": 3,
        "eval-samples": 200,
        "run-dir": str(tmp_path / "run"),
    }
    # Execute: 6 clients, each needing 1 CPU
    summary = run(ROOT, cfg, num_supernodes=6, quiet=True)
    # Assert: the run finished, and its client actors ran in the cluster, on both nodes
    assert summary["clean_acc"] >= 0.0 and (tmp_path / "run" / "summary.json").exists()
    actor_logs = [
        p
        for p in temp.glob("session_*/logs/worker-*.out")
        if ":actor_name:ClientAppActor" in p.read_text(errors="replace")
    ]
    assert len(actor_logs) > HEAD_CPUS, f"{len(actor_logs)} ClientApp actors in the cluster's logs"
