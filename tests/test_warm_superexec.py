"""The warm SuperExec's executor (fedsec.warm_superexec): ClientApp tasks fork from a preloaded forkserver."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResultStatus

from fedsec.warm_superexec import ForkserverExecutor, drop_app_modules

#: A stdlib module nothing else here imports: its presence in a child shows the preload.
MARKER = "tabnanny"


def record_task(address: str, token: str, insecure: bool, certs: str | None, parent_pid: int | None) -> None:
    """A stand-in for ``run_task``: write what the child saw to the file named by ``token``."""
    Path(token).write_text(
        json.dumps(
            {
                "args": [address, insecure, certs, parent_pid],
                "pid": os.getpid(),
                "ppid": os.getppid(),
                "preloaded": MARKER in sys.modules,
            }
        )
    )


def _spec(token: str, task_type: TaskType = TaskType.CLIENT_APP, task_id: int = 1) -> ExecutionSpec:
    return ExecutionSpec(
        task_type=task_type,
        runtime_api_address="127.0.0.1:1",
        token=token,
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=4242,
        suppress_output=False,
        task_id=task_id,
    )


def _wait_for(path: Path, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} not written"
        time.sleep(0.05)
    return json.loads(path.read_text())


def test_clientapp_tasks_run_in_children_of_the_preloaded_forkserver(tmp_path):
    # Prepare: an executor preloading a marker module, started (the forkserver imports it once)
    assert MARKER not in sys.modules
    executor = ForkserverExecutor(preload=[MARKER], target=record_task)
    executor.start()

    # Execute: two ClientApp tasks
    results = [executor.launch(_spec(str(tmp_path / f"task{i}.json"), task_id=i + 1)) for i in range(2)]
    seen = [_wait_for(tmp_path / f"task{i}.json") for i in range(2)]

    # Assert: accepted; each its own process, forked from the same server (not from us), which had the
    # marker imported; the spec's address, TLS choice and parent PID reached the child
    assert all(r.status == LaunchResultStatus.ACCEPTED for r in results)
    assert seen[0]["pid"] != seen[1]["pid"] and seen[0]["ppid"] == seen[1]["ppid"] != os.getpid()
    assert all(s["preloaded"] for s in seen) and MARKER not in sys.modules
    assert seen[0]["args"] == ["127.0.0.1:1", True, None, 4242]
    deadline = time.monotonic() + 30
    while executor.child_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    executor.reconcile()
    assert executor.children == []


def test_other_task_types_go_to_flowers_subprocess_executor(tmp_path):
    # Prepare: an executor whose fallback records what it gets
    executor = ForkserverExecutor(preload=[], target=record_task)
    got = []

    class Fallback:
        def launch(self, spec):
            got.append(spec.task_type)
            return "fallback"

    executor.fallback = Fallback()

    # Execute
    result = executor.launch(_spec(str(tmp_path / "x.json"), task_type=TaskType.SERVER_APP))

    # Assert: handed over, nothing forked
    assert result == "fallback" and got == [TaskType.SERVER_APP] and executor.children == []


def test_the_apps_own_modules_are_dropped_before_flower_loads_the_fab(monkeypatch):
    # Prepare: modules of an app package and of a package that only shares its prefix
    for name in ("fakeapp", "fakeapp.node", "fakeapplication"):
        monkeypatch.setitem(sys.modules, name, type(sys)(name))

    # Execute
    dropped = drop_app_modules(("fakeapp",))

    # Assert: the package and its submodules are gone, the other stays
    assert sorted(dropped) == ["fakeapp", "fakeapp.node"]
    assert "fakeapp" not in sys.modules and "fakeapplication" in sys.modules
