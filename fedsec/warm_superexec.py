"""A SuperExec for a SuperNode whose ClientApp processes fork from a pre-imported parent.

Flower 1.41 runs every ClientApp message in a fresh ``flwr-clientapp`` process started by
the SuperNode's ``flower-superexec``: each message pays for the interpreter, Flower's
runtime, torch and open_clip (with torchvision and timm) again, several seconds of CPU
before the first line of the ClientApp runs (``docs/deployment-performance.md``).

This module is a drop-in for ``flower-superexec`` (same Runtime API protocol, same task
loop: Flower's own :func:`flwr.supercore.superexec.run_superexec.run_superexec`) with
one change: its executor starts each task as a child of a :mod:`multiprocessing`
*forkserver* that has imported those libraries once (:data:`PRELOAD`). The child runs
Flower's own ``run_clientapp`` with the task's token, exactly what ``flwr-clientapp
--token ...`` runs, so every message still gets its own process (nothing the app keeps in
memory survives a message, as with Flower's default), and the app's code (``clients``,
``fedsec``) is still imported in the child from the FAB Flower installed: only
third-party modules are preloaded, so a new FAB is never served by stale app code.

Use it with a SuperNode started with ``--isolation process`` (the SuperNode then starts
no SuperExec of its own)::

    flower-supernode ... --isolation process --host 127.0.0.1 --port 9094 &
    python -m fedsec.warm_superexec --runtime-api-address 127.0.0.1:9094 --insecure \\
        --parent-pid <the SuperNode's pid>

``fedsec/deploy.py --warm-clientapp`` does this for every SuperNode.

The hook into Flower is one name: ``run_superexec`` looks its executor up through the
module-level ``get_executor``, which is replaced here by one returning a
:class:`ForkserverExecutor` (an implementation of Flower's ``Executor`` protocol,
``flwr.supercore.superexec.executor.types``). Checked against flwr 1.41; other versions
are refused unless ``--any-flwr-version`` is given.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import sys
from collections.abc import Sequence
from logging import INFO, WARNING

#: Modules the forkserver imports once (what ``flwr-clientapp`` and fedsec's ClientApp import).
PRELOAD = (
    "flwr.supernode.runtime.run_clientapp",
    "flwr.app",
    "flwr.clientapp",
    "numpy",
    "torch",
    "open_clip",
)
#: The app's own packages: never preloaded, and dropped from a child before Flower loads the FAB.
APP_PACKAGES = ("fedsec", "clients", "strategies", "experiments")
#: The Flower version whose SuperExec internals this module was checked against.
CHECKED_FLWR = "1.41."


def _noop() -> None:
    """A task that does nothing (starts the forkserver)."""


def run_task(
    runtime_api_address: str,
    token: str,
    insecure: bool,
    root_certificates_path: str | None,
    parent_pid: int | None,
) -> None:
    """What ``flwr-clientapp --runtime-api-address ADDR --token TOKEN`` runs, in a forked child.

    Parameters
    ----------
    runtime_api_address : str
        The SuperNode's Runtime API.
    token : str
        The task's token (from ``AcquireTask``).
    insecure : bool
        Connect to the Runtime API without TLS.
    root_certificates_path : str or None
        CA bundle for a TLS Runtime API.
    parent_pid : int or None
        The SuperExec's PID: the child exits when it does.
    """
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    drop_app_modules()
    run_clientapp(
        runtime_api_address=runtime_api_address,
        token=token,
        insecure=insecure,
        certificates=validate_and_resolve_root_certificates(root_certificates_path, insecure),
        parent_pid=parent_pid,
        runtime_dependency_install=False,
    )


def drop_app_modules(packages: Sequence[str] = APP_PACKAGES) -> list[str]:
    """Forget the app's modules this process has imported (unpickling a task imports this module).

    Flower imports the ClientApp from the FAB's folder only if the module is not in
    ``sys.modules`` yet; with these entries gone, the app's code comes from the FAB, as in
    a fresh ``flwr-clientapp``. Returns the dropped names.
    """
    dropped = [m for m in sys.modules if m.split(".")[0] in packages]
    for name in dropped:
        del sys.modules[name]
    return dropped


class ForkserverExecutor:
    """Flower ``Executor`` that runs ClientApp tasks as forkserver children (others as subprocesses).

    Parameters
    ----------
    preload : sequence of str
        Modules the forkserver imports before it forks the first child.
    target : callable
        What a child runs for a ClientApp task (:func:`run_task`; replaceable in tests).
    """

    def __init__(self, preload: Sequence[str] = PRELOAD, target=run_task) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self.preload = [m for m in preload if importlib.util.find_spec(m.split(".")[0]) is not None]
        self.target = target
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(self.preload)
        self.fallback = SubprocessExecutor()
        self.children: list[multiprocessing.process.BaseProcess] = []

    def start(self) -> None:
        """Start the forkserver and let it import :attr:`preload` now, not at the first task."""
        p = self.ctx.Process(target=_noop, name="fedsec-warm-start")
        p.start()
        p.join()

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        """Every supported task type can start at once (as Flower's subprocess executor)."""
        return self.fallback.get_eligible_capacity(
            supported_task_types, insecure=insecure, root_certificates_path=root_certificates_path
        )

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None) -> None:
        """No capacity gate."""

    def launch(self, spec):
        """Fork a child for a ClientApp task; other task types go to Flower's subprocess executor."""
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP or spec.runtime_dependency_install:
            return self.fallback.launch(spec)
        args = (spec.runtime_api_address, spec.token, spec.insecure, spec.root_certificates_path, spec.parent_pid)
        try:
            child = self.ctx.Process(target=self.target, args=args, name=f"flwr-clientapp-task-{spec.task_id}")
            child.start()
        except Exception as exc:  # noqa: BLE001 - Flower's task expiry handles a failed launch
            return LaunchResult.failed(f"fork of the ClientApp failed: {exc!r}")
        self.children.append(child)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children."""
        for child in [c for c in self.children if not c.is_alive()]:
            child.join(0)
            self.children.remove(child)

    def close(self) -> None:
        """Nothing to release: running children exit with their task (or when this process ends)."""
        self.reconcile()

    def child_pids(self) -> list[int]:
        """PIDs of the ClientApp children now running."""
        return [c.pid for c in self.children if c.is_alive() and c.pid is not None]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    ap.add_argument("--insecure", action="store_true", help="the Runtime API has no TLS (a loopback SuperNode)")
    ap.add_argument("--root-certificates", default=None, help="CA bundle of a TLS Runtime API")
    ap.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    ap.add_argument("--preload", action="append", default=None, help="a module to preload (default: PRELOAD)")
    ap.add_argument("--any-flwr-version", action="store_true", help="run on a Flower other than 1.41")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Command line; see the module docstring."""
    args = _parser().parse_args(argv)
    from flwr.supercore import log
    from flwr.supercore.superexec import run_superexec as flower_superexec
    from flwr.supercore.version import package_version

    if not package_version.startswith(CHECKED_FLWR) and not args.any_flwr_version:
        log(WARNING, "fedsec warm SuperExec was checked with flwr %sx, not %s", CHECKED_FLWR, package_version)
        return 2
    executor = ForkserverExecutor(args.preload or PRELOAD)
    executor.start()
    log(INFO, "fedsec warm SuperExec: forkserver ready (preloaded %s), pid %s", executor.preload, os.getpid())
    flower_superexec.get_executor = lambda *a, **k: executor  # the one hook (see the module docstring)
    flower_superexec.run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
