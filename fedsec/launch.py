"""Run a fedsec experiment with ``flwr run`` on a SuperLink this process owns.

``python -m fedsec.launch`` (or ``fedsec run``) does what a user would do by
hand, with the pitfalls handled:

* a project-local ``FLWR_HOME`` (``<app>/.flwr``), no runtime dependency
  installation, no telemetry or update checks, ``HF_HUB_OFFLINE=1``;
* a local simulation SuperLink started by us (the one ``flwr run`` would
  start itself keeps running afterwards), stopped by its PID at the end;
* an absolute run directory (the SuperLink's working directory is not ours);
* a progress bar over rounds, the Flower log kept in ``<run-dir>/flwr.log`` (each line prefixed
  with the seconds since launch),
  and a results table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedsec.evaluation import format_table

ROUND_RE = re.compile(r"\[fedsec\] round (\d+)/(\d+)\s+clean_acc ([\d.]+)%\s+asr (\S+)")


def flower_env(app_dir: Path) -> dict[str, str]:
    """The environment every Flower process of ours runs with."""
    env = os.environ.copy()
    env.setdefault("FLWR_HOME", str(app_dir / ".flwr"))
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("FEDSEC_RUNS_ROOT", str(app_dir / "runs"))
    env.setdefault("PYTHONUNBUFFERED", "1")
    # The SuperLink starts flower-superexec & co. from PATH: put this interpreter's bin first.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray renices its workers to 15; the client actors do the work of a run, keep them at our priority.
    env.setdefault("RAY_worker_niceness", "0")
    # Each simulated client gets one thread: actors run side by side on the cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit`` so ``with LocalSuperLink(...)`` stops what it started."""
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (Linux ``/proc``)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int, grace_s: float = 15.0) -> None:
    """SIGTERM ``pid`` and its descendants (Flower detaches some into new sessions), then SIGKILL leftovers."""
    tree = [pid, *descendants(pid)]
    for p in tree:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and _alive(p) for p in tree):
        time.sleep(0.2)
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _healthy(port: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
            return r.status == 200
    except Exception:
        return False


def _port_busy(port: str) -> bool:
    """Whether something listens on ``127.0.0.1:port``."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", int(port))) == 0


class LocalSuperLink:
    """A simulation SuperLink on loopback that we start and stop by PID."""

    def __init__(self, env: dict[str, str], log_file: Path) -> None:
        self.env = env
        self.log_file = log_file
        self.fixed_ports = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT" in env
        self.http_port = env.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091")
        self.control_port = env.get("FLWR_LOCAL_CONTROL_API_PORT", str(int(self.http_port) + 2))
        self.proc: subprocess.Popen | None = None

    @property
    def pid_file(self) -> Path:
        return self.log_file.parent / f"fedsec-superlink-{self.http_port}.pid"

    def _reap_stale(self) -> None:
        """Stop a SuperLink a killed launcher of ours left behind (its PID file is still there)."""
        if not self.pid_file.exists():
            return
        try:
            fields = self.pid_file.read_text().split()
            pid = int(fields[0])
            owner = int(fields[1]) if len(fields) > 1 else 0
            if owner and _alive(owner) and owner != os.getpid():
                return  # another launcher's SuperLink, still in use
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            if "flower-superlink" in cmdline:
                kill_tree(pid, grace_s=5.0)
                for _ in range(50):
                    if not Path(f"/proc/{pid}").exists() or not _healthy(self.http_port):
                        break
                    time.sleep(0.2)
        except (ValueError, OSError):
            pass
        self.pid_file.unlink(missing_ok=True)

    def _pick_ports(self) -> None:
        """Move to the next free port pair when another launcher's SuperLink holds this one."""
        for _ in range(50):
            self._reap_stale()
            if not (_healthy(self.http_port) or _port_busy(self.http_port) or _port_busy(self.control_port)):
                break
            if self.fixed_ports:
                break
            self.http_port = str(int(self.http_port) + 10)
            self.control_port = str(int(self.control_port) + 10)
        # flwr's "local" federation reads these: the `flwr run` we start talks to this SuperLink.
        self.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = self.http_port
        self.env["FLWR_LOCAL_CONTROL_API_PORT"] = self.control_port

    def __enter__(self) -> LocalSuperLink:
        self._pick_ports()
        if _healthy(self.http_port):
            raise RuntimeError(
                f"a SuperLink already answers on 127.0.0.1:{self.http_port}; stop it (flwr's managed "
                "SuperLink keeps running after `flwr run`) or set FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"
            )
        cmd = [
            _bin("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--control-api-address",
            f"127.0.0.1:{self.control_port}",
            "--host",
            "127.0.0.1",
            "--port",
            self.http_port,
        ]
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid_file.write_text(f"{self.proc.pid} {os.getpid()}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with {self.proc.returncode}; see {self.log_file}")
            if _healthy(self.http_port):
                return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"flower-superlink did not start within 60 s; see {self.log_file}")

    def stop(self) -> None:
        """Stop the SuperLink and everything it started (its process group)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                kill_tree(self.proc.pid)
            self.proc.wait(timeout=10)
        self.pid_file.unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stage_app(app_dir: Path, dest_root: Path) -> Path:
    """Copy the files ``flwr run`` would package into a fresh folder under ``dest_root``; return it.

    ``flwr run <dir>`` walks *every* file below ``<dir>`` before it filters them
    (``flwr.cli.utils.collect_files``), and a checkout with its ``.venv``, run
    directories and installed FABs holds tens of thousands: about 10 s a run. Here
    the walk skips what the app's ``.gitignore`` ignores, ``.git``, the Flower home
    and any virtual environment (a folder with ``pyvenv.cfg``), and copies only
    files Flower would put into the FAB (its own include patterns) plus the
    ``.gitignore``; Flower then applies its usual rules to this small folder, so
    the FAB (and its hash) is the same as from ``app_dir``.
    """
    from flwr.cli.utils import build_pathspec  # Flower's own pattern semantics
    from flwr.common.constant import FAB_INCLUDE_PATTERNS, FLWR_DIR

    gitignore = app_dir / ".gitignore"
    ignore_lines = gitignore.read_text().splitlines() if gitignore.exists() else []
    ignored = build_pathspec(ignore_lines)
    include = build_pathspec(FAB_INCLUDE_PATTERNS)
    dest_root.mkdir(parents=True, exist_ok=True)
    dest = Path(tempfile.mkdtemp(prefix="app-", dir=dest_root))
    for dirpath, dirnames, filenames in os.walk(app_dir, followlinks=False):
        rel_dir = Path(dirpath).relative_to(app_dir)
        keep_dirs = []
        for d in dirnames:
            rel = (rel_dir / d).as_posix()
            full = Path(dirpath) / d
            if d in (".git", FLWR_DIR) or full.is_symlink() or (full / "pyvenv.cfg").exists():
                continue
            if ignored.match_file(rel + "/"):
                continue
            keep_dirs.append(d)
        dirnames[:] = keep_dirs
        for name in filenames:
            src = Path(dirpath) / name
            rel = (rel_dir / name).as_posix()
            if src.is_symlink() or ignored.match_file(rel):
                continue
            if rel == ".gitignore" or include.match_file(rel):
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
    return dest


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def run(
    app_dir: Path,
    overrides: dict[str, object],
    config_file: Path | None = None,
    num_supernodes: int = 10,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    quiet: bool = False,
) -> dict:
    """Run one experiment and return its ``summary.json``.

    Parameters
    ----------
    app_dir : Path
        The Flower app (folder with ``pyproject.toml``).
    overrides : dict
        Run-config values (``run-dir`` is made absolute here).
    config_file : Path, optional
        A named experiment TOML (``experiments/*.toml``); ``overrides`` win.
    num_supernodes : int
        Simulated clients.
    cpus_per_client, gpus_per_client : float
        Ray resources per client (fractional GPUs allowed).
    """
    from tqdm import tqdm

    app_dir = app_dir.resolve()
    env = flower_env(app_dir)
    values: dict[str, object] = {}
    if config_file is not None:
        import tomllib

        values.update(tomllib.loads(Path(config_file).read_text()))
    values.update(overrides)
    run_dir = Path(str(values.get("run-dir", "")) or "")
    if not str(values.get("run-dir", "")):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = (
            Path(env["FEDSEC_RUNS_ROOT"]) / f"{stamp}-{values.get('attack', 'none')}-{values.get('strategy', 'fedavg')}"
        )
    run_dir = run_dir if run_dir.is_absolute() else (Path.cwd() / run_dir)
    run_dir = run_dir.resolve()
    values["run-dir"] = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rc_str = " ".join(f"{k}={_toml_value(v)}" for k, v in values.items())
    cpus = int(cpus_per_client) if float(cpus_per_client).is_integer() else cpus_per_client
    fed = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus}"
    if gpus_per_client:
        fed += f" client-resources-num-gpus={gpus_per_client}"
    t0 = time.time()
    _exit_on_sigterm()
    staged = stage_app(app_dir, Path(env["FLWR_HOME"]) / "staging")  # flwr run walks every file of its folder
    cmd = [_bin("flwr"), "run", str(staged), "local", "--stream", "--federation-config", fed, "--run-config", rc_str]
    log_path = run_dir / "flwr.log"
    rounds = int(values.get("num-server-rounds", 0)) or None
    superlink_log = Path(env["FLWR_HOME"]) / "local-superlink" / "superlink.log"
    try:
        with LocalSuperLink(env, superlink_log), open(log_path, "w") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(
                cmd, env=env, cwd=app_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            bar = tqdm(total=rounds, desc="rounds", unit="round", disable=quiet, file=sys.stdout, dynamic_ncols=True)
            seen: set[str] = set()
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(f"[{time.time() - t0:7.1f}s] {line}")  # seconds since launch: start-up cost is visible
                log.flush()
                m = ROUND_RE.search(line)
                if m and m.group(0) not in seen:  # open_clip's root handler may duplicate lines
                    seen.add(m.group(0))
                    r, total = int(m.group(1)), int(m.group(2))
                    bar.total = total
                    bar.n = r
                    bar.set_postfix_str(f"clean_acc {m.group(3)}%  asr {m.group(4)}")
                    bar.refresh()
                elif re.search(r"ERROR|Traceback|ConfigError", line) and not quiet:
                    tqdm.write(line.rstrip())
            rc = proc.wait()
            bar.close()
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    summary_path = run_dir / "summary.json"
    if rc != 0 or not summary_path.exists():
        raise RuntimeError(f"flwr run failed (exit {rc}); see {log_path}")
    summary = json.loads(summary_path.read_text())
    summary["launcher_wall_s"] = time.time() - t0
    summary["run_dir"] = str(run_dir)
    return summary


def parse_overrides(items: list[str]) -> dict[str, object]:
    """``key=value`` strings to a dict (values parsed as TOML scalars)."""
    import tomllib

    out: dict[str, object] = {}
    for item in items:
        for part in shlex.split(item):
            key, sep, raw = part.partition("=")
            if not sep:
                raise SystemExit(f"--run-config expects key=value, got {part!r}")
            try:
                out[key] = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                out[key] = raw
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: run one experiment and print its results table."""
    ap = argparse.ArgumentParser(
        prog="fedsec run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("config", nargs="?", help="named experiment TOML, e.g. experiments/conf/main.toml")
    ap.add_argument("--app", default=".", help="Flower app folder (default: .)")
    ap.add_argument("--run-config", "-c", action="append", default=[], help="key=value overrides")
    ap.add_argument("--num-supernodes", type=int, default=10)
    ap.add_argument(
        "--cpus-per-client", type=int, default=1, help="CPUs per simulated client (Flower takes an integer)"
    )
    ap.add_argument("--gpus-per-client", type=float, default=0.0)
    args = ap.parse_args(argv)
    summary = run(
        Path(args.app),
        parse_overrides(args.run_config),
        Path(args.config) if args.config else None,
        args.num_supernodes,
        args.cpus_per_client,
        args.gpus_per_client,
    )
    keys = ("attack", "strategy", "zero_shot_acc", "clean_acc", "asr", "wall_s")
    extra = tuple(k for k in ("trigger_only_asr", "det_tpr", "det_fpr") if k in summary)
    print()
    print(format_table([summary], keys[:4] + keys[4:5] + extra + keys[5:]))
    print(f"\nrun directory: {summary['run_dir']}")


if __name__ == "__main__":
    main()
