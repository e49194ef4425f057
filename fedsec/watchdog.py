"""Reap a launcher's process trees when the launcher dies without cleaning up (``kill -9``).

``python -m fedsec.watchdog <launcher pid> <roots file>`` runs in its own
session beside the launcher. Every ``interval`` seconds it reads the root PIDs
the launcher wrote into the roots file (its SuperLink, its ``flwr run``) and
takes a snapshot of those trees (PID and start time, so a reused PID is never
touched). When the launcher is gone it sends SIGTERM to every process of the
last snapshot, SIGKILL to what is left after ``grace`` seconds, and exits. A
launcher that stops normally kills the watchdog itself.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22), or ``None``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def snapshot(roots: list[int]) -> dict[int, int]:
    """PID -> start time of every live process in the trees below ``roots`` (roots included)."""
    from fedsec.launch import descendants

    out: dict[int, int] = {}
    for root in roots:
        for pid in [root, *descendants(root)]:
            st = start_time(pid)
            if st is not None:
                out[pid] = st
    return out


def reap(procs: dict[int, int], grace: float = 4.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` s, every process of ``procs`` still running with its start time."""

    def same(pid: int, st: int) -> bool:
        return start_time(pid) == st

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid, st in procs.items():
            if same(pid, st):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 0.0)
        while time.monotonic() < deadline and any(same(p, s) for p, s in procs.items()):
            time.sleep(0.1)


def _read_roots(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except (OSError, ValueError):
        return []


def watch(launcher: int, roots_file: Path, interval: float = 0.5, grace: float = 4.0) -> None:
    """Snapshot the trees of ``roots_file`` while ``launcher`` lives; reap them once it is gone.

    Parameters
    ----------
    launcher : int
        PID of the launcher to watch.
    roots_file : Path
        Whitespace-separated root PIDs, appended by the launcher as it starts them.
    interval : float
        Seconds between polls.
    grace : float
        Seconds between SIGTERM and SIGKILL.
    """
    launcher_start = start_time(launcher)
    procs: dict[int, int] = {}
    while launcher_start is not None and start_time(launcher) == launcher_start:
        procs.update(snapshot(_read_roots(roots_file)))
        procs = {p: s for p, s in procs.items() if start_time(p) == s}
        time.sleep(interval)
    procs.update(snapshot(_read_roots(roots_file)))
    reap(procs, grace)
    roots_file.unlink(missing_ok=True)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    watch(int(sys.argv[1]), Path(sys.argv[2]))
