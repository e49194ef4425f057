"""Run a fedsec experiment with ``flwr run`` on a SuperLink this process owns.

``python -m fedsec.launch`` (or ``fedsec run``) does what a user would do by
hand, with the pitfalls handled:

* a project-local ``FLWR_HOME`` (``<app>/.flwr``), no runtime dependency
  installation, no telemetry or update checks, ``HF_HUB_OFFLINE=1``;
* a local simulation SuperLink started by us (the one ``flwr run`` would
  start itself keeps running afterwards), stopped by its PID at the end;
* an absolute run directory and checkpoint path (the SuperLink's working directory is not ours);
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

from fedsec.config import ConfigError

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


def flower_bin(name: str) -> str:
    """The path of a Flower executable (``flwr``, ``flower-superlink``, ...) beside this interpreter, else ``name``."""
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
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and pid_alive(p) for p in tree):
        time.sleep(0.2)
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as dead)."""
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


class LaunchError(RuntimeError):
    """The launcher cannot start: not an app folder, an unreadable TOML file."""


class RunFailed(RuntimeError):
    """A run started but did not finish; ``cause`` is the ServerApp's error line when the log has one."""

    def __init__(self, message: str, cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause


def port_lock_path() -> Path:
    """The machine-wide lock file under which launchers choose ports and start their SuperLink."""
    return Path(tempfile.gettempdir()) / f"fedsec-superlink-ports-{os.getuid()}.lock"


class _PortLock:
    """``fcntl.flock`` on :func:`port_lock_path`: one launcher at a time picks ports and binds them."""

    def __enter__(self) -> _PortLock:
        import fcntl

        self.fh = open(port_lock_path(), "a")
        fcntl.flock(self.fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


class LocalSuperLink:
    """A simulation SuperLink on loopback that we start and stop by PID.

    Ports are chosen and the SuperLink started under a machine-wide file lock
    (:func:`port_lock_path`), and the lock is held until it answers, so two
    launchers started at the same moment never pick the same port. A watchdog
    process (:mod:`fedsec.watchdog`) reaps the SuperLink's tree, and every
    other root added with :meth:`watch`, when this launcher dies without
    stopping them (``kill -9``).
    """

    def __init__(self, env: dict[str, str], log_file: Path) -> None:
        self.env = env
        self.log_file = log_file
        self.fixed_ports = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT" in env
        self.http_port = env.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091")
        self.control_port = env.get("FLWR_LOCAL_CONTROL_API_PORT", str(int(self.http_port) + 2))
        self.proc: subprocess.Popen | None = None
        self.watchdog: subprocess.Popen | None = None
        self.roots_file: Path | None = None

    def watch(self, pid: int) -> None:
        """Have the watchdog reap ``pid``'s tree too if this launcher dies."""
        if self.roots_file is not None:
            with open(self.roots_file, "a") as fh:
                fh.write(f"{pid}\n")

    def _start_watchdog(self) -> None:
        fd, name = tempfile.mkstemp(prefix="fedsec-roots-", suffix=".txt")
        os.close(fd)
        self.roots_file = Path(name)
        self.watchdog = subprocess.Popen(
            [sys.executable, "-m", "fedsec.watchdog", str(os.getpid()), name],
            env=self.env,
            cwd=str(Path(__file__).resolve().parents[1]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )

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
            if owner and pid_alive(owner) and owner != os.getpid():
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
        self._start_watchdog()
        try:
            with _PortLock():
                return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> LocalSuperLink:
        self._pick_ports()
        if _healthy(self.http_port):
            raise RuntimeError(
                f"a SuperLink already answers on 127.0.0.1:{self.http_port}; stop it (flwr's managed "
                "SuperLink keeps running after `flwr run`) or set FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"
            )
        cmd = [
            flower_bin("flower-superlink"),
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
        self.watch(self.proc.pid)
        self.pid_file.write_text(f"{self.proc.pid} {os.getpid()}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with {self.proc.returncode}; see {self.log_file}")
            if _healthy(self.http_port):
                return self
            time.sleep(0.3)
        raise RuntimeError(f"flower-superlink did not start within 60 s; see {self.log_file}")

    def stop(self) -> None:
        """Stop the SuperLink and everything it started (its process group), then the watchdog."""
        if self.proc is not None:
            if self.proc.poll() is None:
                kill_tree(self.proc.pid)
            self.proc.wait(timeout=10)
            self.pid_file.unlink(missing_ok=True)
        if self.watchdog is not None and self.watchdog.poll() is None:
            self.watchdog.kill()
            self.watchdog.wait(timeout=10)
        if self.roots_file is not None:
            self.roots_file.unlink(missing_ok=True)

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


def toml_value(v: object) -> str:
    """``v`` written as a TOML value for ``flwr run --run-config`` (strings quoted, booleans lower case)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def load_toml(path: Path) -> dict:
    """Read a TOML file; a syntax error names the file, the line and the column.

    Raises
    ------
    LaunchError
        ``<file>: TOML syntax error at line L, column C: <what>``, or a missing file.
    """
    import tomllib

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise LaunchError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LaunchError(f"{path}: TOML syntax error: {exc}") from None


def app_config_defaults(app_dir: Path) -> dict[str, object]:
    """The app's ``[tool.flwr.app.config]`` (every key and default); check ``app_dir`` is the fedsec app.

    Raises
    ------
    LaunchError
        When ``app_dir`` holds no Flower app's ``pyproject.toml``.
    """
    pyproject = Path(app_dir) / "pyproject.toml"
    hint = "run from the fedsec checkout (the folder with its pyproject.toml) or pass --app <that folder>"
    if not pyproject.exists():
        raise LaunchError(f"{Path(app_dir).resolve()} is not the fedsec app folder (no pyproject.toml); {hint}")
    data = load_toml(pyproject)
    app = data.get("tool", {}).get("flwr", {}).get("app", {})
    if "components" not in app or "config" not in app:
        raise LaunchError(f"{pyproject} has no [tool.flwr.app] with components and config; {hint}")
    return dict(app["config"])


def failure_cause(log_text: str) -> str:
    """The ServerApp's error from a Flower log: the last exception line of the last traceback, or ``""``.

    ``flwr run --stream`` exits 0 even when the ServerApp raises; its log holds
    the traceback and ``Exit Code: 700``.
    """
    lines = [re.sub(r"^\[\s*[\d.]+s\]\s?", "", ln.rstrip()) for ln in log_text.splitlines()]
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln) for ln in lines]
    exc_re = re.compile(
        r"^([A-Za-z_][\w.]*(?:Error|Exception|Failed|Mismatch|Unavailable|Interrupt|Exit))(?::\s?(.*))?$"
    )
    cause = ""
    for ln in lines:
        m = exc_re.match(ln.strip())
        if m and not ln.startswith(" "):
            cause = m.group(1).rsplit(".", 1)[-1] + ln.strip()[len(m.group(1)) :]  # fedsec.rundir.X -> X
    if not cause and any("Exit Code:" in ln and "Exit Code: 0" not in ln for ln in lines):
        cause = next(ln.strip() for ln in reversed(lines) if "Exit Code:" in ln)
    return cause


def resolve_run_dir(values: dict[str, object], env: dict[str, str]) -> Path:
    """The absolute run directory: ``run-dir`` (relative to the working directory), or a stamped one."""
    raw = str(values.get("run-dir", "") or "")
    if not raw:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{stamp}-{values.get('attack', 'none')}-{values.get('strategy', 'fedavg')}"
        return (Path(env["FEDSEC_RUNS_ROOT"]) / name).resolve()
    p = Path(raw).expanduser()
    return (p if p.is_absolute() else Path.cwd() / p).resolve()


def absolute_paths(values: dict[str, object]) -> None:
    """Make ``pretrained``, ``data-root`` and every component key declared ``path=True`` absolute where they exist.

    The SuperLink runs the apps in its own working directory, so ``runs/x/model.pt`` would name
    another file there. Values that name nothing here (an open_clip tag, ``embedded``) stay as they are.
    """
    from fedsec.config import component_params

    for key in ("pretrained", "data-root", *(p.key for p in component_params() if p.path)):
        raw = str(values.get(key, "") or "")
        path = Path(raw).expanduser()
        if raw and not path.is_absolute() and path.exists():
            values[key] = str(path.absolute())


def prepare(
    app_dir: Path,
    overrides: dict[str, object],
    config_file: Path | None = None,
    num_supernodes: int = 10,
    overwrite: bool = False,
    env: dict[str, str] | None = None,
):
    """Everything before Flower starts: read and check the whole config, claim the run directory.

    Returns ``(values, cfg, run_dir)``; nothing is written unless ``overwrite``
    moves a previous run aside (to ``<run-dir>.replaced-<time>``, never deleted).

    Raises
    ------
    LaunchError, ConfigError, fedsec.rundir.RunDirError
        One line each: what is wrong and how to fix it.
    """
    from fedsec.preflight import check_config, check_keys
    from fedsec.rundir import RunDirError, claim, move_aside

    env = env if env is not None else flower_env(Path(app_dir).resolve())
    defaults = app_config_defaults(app_dir)
    values: dict[str, object] = {}
    if config_file is not None:
        values.update(load_toml(Path(config_file)))
    values.update(overrides)
    check_keys(values, defaults, num_supernodes)  # keys, types, ranges, federation: before any heavy import
    run_dir = resolve_run_dir(values, env)
    values["run-dir"] = str(run_dir)
    absolute_paths(values)
    cfg = check_config(values, num_nodes=num_supernodes)
    try:
        claim(run_dir, cfg.to_dict(), cfg.resume)
    except RunDirError:
        if not overwrite or cfg.resume:
            raise
        moved = move_aside(run_dir)
        print(f"fedsec run: --overwrite: moved the previous contents of {run_dir} to {moved}", file=sys.stderr)
        claim(run_dir, cfg.to_dict(), cfg.resume)
    return values, cfg, run_dir


def run(
    app_dir: Path,
    overrides: dict[str, object],
    config_file: Path | None = None,
    num_supernodes: int = 10,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    quiet: bool = False,
    overwrite: bool = False,
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
    quiet : bool
        No progress bar, no error lines echoed.
    overwrite : bool
        Move a finished or other run in ``run-dir`` aside (``<run-dir>.replaced-<time>``) and start anew.

    Raises
    ------
    ConfigError, fedsec.rundir.RunDirError, LaunchError
        Before any Flower process starts.
    RunFailed
        The run started but wrote no fresh ``summary.json`` (the ServerApp's error in ``cause``).
    """
    from tqdm import tqdm

    app_dir = app_dir.resolve()
    env = flower_env(app_dir)
    values, cfg, run_dir = prepare(app_dir, overrides, config_file, num_supernodes, overwrite, env)
    run_dir.mkdir(parents=True, exist_ok=True)
    rc_str = " ".join(f"{k}={toml_value(v)}" for k, v in values.items())
    cpus = int(cpus_per_client) if float(cpus_per_client).is_integer() else cpus_per_client
    fed = f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus}"
    if gpus_per_client:
        fed += f" client-resources-num-gpus={gpus_per_client}"
    t0 = time.time()
    _exit_on_sigterm()
    staged = stage_app(app_dir, Path(env["FLWR_HOME"]) / "staging")  # flwr run walks every file of its folder
    cmd = [
        flower_bin("flwr"),
        "run",
        str(staged),
        "local",
        "--stream",
        "--federation-config",
        fed,
        "--run-config",
        rc_str,
    ]
    log_path = run_dir / "flwr.log"
    rounds = cfg.num_server_rounds
    superlink_log = Path(env["FLWR_HOME"]) / "local-superlink" / "superlink.log"
    captured: list[str] = []
    try:
        # A resumed run keeps the interrupted run's log and appends to it.
        with LocalSuperLink(env, superlink_log) as link, open(log_path, "a" if cfg.resume else "w") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(
                cmd, env=env, cwd=app_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            link.watch(proc.pid)
            bar = tqdm(total=rounds, desc="rounds", unit="round", disable=quiet, file=sys.stdout, dynamic_ncols=True)
            seen: set[str] = set()
            assert proc.stdout is not None
            for line in proc.stdout:
                captured.append(line)
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
                elif re.search(r"ERROR|ConfigError", line) and not quiet:
                    tqdm.write(line.rstrip())
            rc = proc.wait()
            bar.close()
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    summary_path = run_dir / "summary.json"
    fresh = summary_path.exists() and summary_path.stat().st_mtime >= t0 - 1.0
    if rc != 0 or not fresh:  # flwr exits 0 when the ServerApp raises: a fresh summary.json is the proof
        cause = failure_cause("".join(captured))
        why = cause or (f"flwr run exited with {rc}" if rc else "no summary.json was written")
        raise RunFailed(f"the run failed: {why}; full log: {log_path}", cause)
    summary = json.loads(summary_path.read_text())
    summary["launcher_wall_s"] = time.time() - t0
    summary["run_dir"] = str(run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary["failed_replies_total"] = int(sum(r.get("failed_replies", 0) or 0 for r in rows))
    return summary


def parse_overrides(items: list[str]) -> dict[str, object]:
    """``key=value`` strings to a dict (values parsed as TOML scalars)."""
    import tomllib

    out: dict[str, object] = {}
    for item in items:
        for part in shlex.split(item):
            key, sep, raw = part.partition("=")
            if not sep:
                raise ConfigError(f"--run-config expects key=value, got {part!r}")
            try:
                out[key] = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                out[key] = raw  # a bare word: a string (validation names the key if it should be a number)
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
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="run-dir holds a finished or another run: move it aside to <run-dir>.replaced-<time> and start anew",
    )
    args = ap.parse_args(argv)
    from fedsec.rundir import RunDirError

    try:
        summary = run(
            Path(args.app),
            parse_overrides(args.run_config),
            Path(args.config) if args.config else None,
            args.num_supernodes,
            args.cpus_per_client,
            args.gpus_per_client,
            overwrite=args.overwrite,
        )
    except (ConfigError, RunDirError, LaunchError) as exc:
        print(f"fedsec run: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunFailed as exc:
        print(f"\nfedsec run: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    from fedsec.evaluation import format_table

    keys = ("attack", "strategy", "zero_shot_acc", "clean_acc", "asr", "wall_s")
    baselines = ("trigger_only_asr", "trigger_zs_asr", "clean_target_rate", "det_tpr", "det_fpr")
    extra = tuple(k for k in baselines if k in summary)
    print()
    print(format_table([summary], keys[:4] + keys[4:5] + extra + keys[5:]))
    print(f"\nrun directory: {summary['run_dir']}")
    if summary.get("failed_replies_total"):
        print(
            f"warning: {summary['failed_replies_total']} client replies failed during the run "
            "(failed_replies in metrics.jsonl; causes in flwr.log)",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
