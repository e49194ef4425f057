"""The launcher's own SuperLink: port choice and process-tree helpers (no Flower run)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from flwr.cli.build import build_fab_from_disk

from fedsec.launch import LocalSuperLink, _port_busy, descendants, kill_tree, stage_app
from tests.conftest import ROOT


def _listening_socket() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock, sock.getsockname()[1]


def test_busy_default_port_moves_to_the_next_free_pair(tmp_path):
    # Prepare: something already listens on the port the launcher would take
    sock, port = _listening_socket()
    env: dict[str, str] = {}
    link = LocalSuperLink(env, tmp_path / "superlink.log")
    link.http_port, link.control_port = str(port), str(port + 2)
    try:
        # Execute
        link._pick_ports()
        # Assert: a different, free pair, exported for the `flwr run` that follows
        assert link.http_port != str(port)
        assert not _port_busy(link.http_port) and not _port_busy(link.control_port)
        assert env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] == link.http_port
        assert env["FLWR_LOCAL_CONTROL_API_PORT"] == link.control_port
    finally:
        sock.close()


def test_ports_fixed_by_the_environment_are_kept(tmp_path):
    # Prepare: the user pinned the port, and it is busy
    sock, port = _listening_socket()
    env = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port)}
    link = LocalSuperLink(env, tmp_path / "superlink.log")
    try:
        # Execute
        link._pick_ports()
        # Assert: no silent move (the start then fails with a clear message)
        assert link.http_port == str(port)
        assert link.control_port == str(port + 2)
    finally:
        sock.close()


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_tree_stops_a_process_and_its_children():
    # Prepare: a process with a child that sleeps
    sleeper = "import time; time.sleep(60)"
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 10
    while not descendants(parent.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    children = descendants(parent.pid)
    # Execute
    kill_tree(parent.pid, grace_s=5.0)
    parent.wait(timeout=10)
    # Assert: the parent and its child are gone
    assert children, "the child process did not start"
    assert not any(_running(pid) for pid in children)


def test_stage_app_keeps_exactly_what_the_fab_holds(tmp_path):
    # Prepare: an app with a virtual env, ignored run folders, a Flower home, and files the FAB leaves out
    app = tmp_path / "app"
    for rel, text in {
        "pyproject.toml": (ROOT / "pyproject.toml").read_text(),
        ".gitignore": "runs/\n*.log\n",
        "pkg/__init__.py": "",
        "pkg/mod.py": "X = 1\n",
        "pkg/data.json": "{}",
        "pkg/picture.png": "not text",
        "runs/r1/summary.json": "{}",
        "pkg/debug.log": "x",
        "env/pyvenv.cfg": "home = /usr\n",
        "env/lib/site.py": "Y = 2\n",
        ".flwr/apps/old/a.py": "",
    }.items():
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(text)
    # Execute
    staged = stage_app(app, tmp_path / "staging")
    # Assert: only the FAB's files are copied, and the FAB built from them is byte-identical
    files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    assert files == [".gitignore", "pkg/__init__.py", "pkg/data.json", "pkg/mod.py", "pyproject.toml"]
    assert build_fab_from_disk(staged) == build_fab_from_disk(app)
