"""Run fedsec on a Flower 1.41 *deployment* (SuperLink + SuperNodes), TLS and SuperNode auth on by default.

Flower 1.41 serves the Fleet, Control and Runtime APIs of the SuperLink over HTTP(S) on ONE port
(``flower-superlink --host H --port P``); SuperNodes and ``flwr`` both connect to ``H:P``.
Each SuperNode also serves a local Runtime API for its ClientApp processes (``--port``, one per node).

Modes (``fedsec deploy MODE --help``):

``all`` (one machine, e.g. loopback)
    make certificates and node keys if missing (``make_certs.sh``), start a SuperLink, register the
    SuperNodes' public keys (``flwr supernode register``), start N SuperNodes with
    ``--node-config "partition-id=i num-partitions=N"``, wait until all are online, write the
    ``config.toml`` connection, run ``flwr run <app> <connection> --stream --run-config ...`` with an
    absolute ``run-dir``, then stop every process it started, by PID (also on errors and Ctrl-C)::

        fedsec deploy all --nodes 3 -c "num-server-rounds=2 attack='badnets'"

``superlink`` (the server machine; blocks until Ctrl-C)
    start the SuperLink (bind ``--host 0.0.0.0``), register the node keys ``<certs>/node_<i>.pub`` for
    i < ``--nodes`` (and any ``--register-key FILE``), write the connection, wait::

        fedsec deploy superlink --host 0.0.0.0 --port 19091 \\
            --superlink-address link.example.org:19091 --nodes 3

``supernodes`` (each client machine; blocks until Ctrl-C)
    start the SuperNodes for ``--partition-ids`` (default all) of ``--nodes`` partitions, connecting
    to ``--superlink-address``; needs ``<certs>/ca.crt`` and ``<certs>/node_<i>``::

        fedsec deploy supernodes --superlink-address link.example.org:19091 \\
            --nodes 3 --partition-ids 1,2 --certs-dir certs

``register`` / ``run`` (any machine with ``ca.crt``)
    register extra public keys (``register KEY.pub ...``) or only run an experiment on a running
    deployment (``run -c ...``). The ``run-dir`` is a path on the SuperLink machine (the ServerApp
    runs there); an attacker's files go to the same path on its SuperNode's machine.

``--insecure`` turns TLS off (and with it SuperNode authentication, which Flower allows only with TLS);
``--no-node-auth`` keeps TLS but lets any SuperNode join. ``min-train-nodes`` defaults to ``--nodes``
so that every SuperNode has joined before round 1. Logs go to ``<work-dir>/logs/``, the ``flwr`` home
(config.toml) to ``<work-dir>/flwr-home``; keep ``--work-dir`` out of the app folder unless git ignores
it (``runs/`` is ignored), since ``flwr run`` packs the app folder.

Python::

    from fedsec.deploy import DeployConfig, Deployment
    with Deployment(DeployConfig(work_dir=Path("/abs/work"), num_nodes=3)) as dep:
        dep.start_all()
        summary = dep.run({"num-server-rounds": 2, "run-dir": "/abs/run"})
    # here every process is stopped; dep.stopped_pids lists them
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fedsec.launch import (
    ROUND_RE,
    descendants,
    flower_bin,
    flower_env,
    kill_tree,
    parse_overrides,
    pid_alive,
    toml_value,
)

#: The app folder ``flwr run`` packs by default: the fedsec checkout this module belongs to.
ROOT = Path(__file__).resolve().parents[1]

MAKE_CERTS = Path(__file__).resolve().parent / "make_certs.sh"  # shipped with the package
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
#: Seconds between a SuperNode's task polls of its ClientApp launcher (``flower-superexec``; Flower's default 1 s).
#: ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` in the environment wins.
SUPEREXEC_POLL_S = "0.2"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could bind ``host:port`` now (with ``SO_REUSEADDR``, as servers do)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _cmdline(pid: int) -> str:
    """A process's command line ("" when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class DeployConfig:
    """Where and how to deploy. Paths are made absolute."""

    app_dir: Path = ROOT
    work_dir: Path = ROOT / "runs" / "deploy"
    certs_dir: Path | None = None  # default: <work_dir>/certs
    insecure: bool = False  # no TLS (implies no node authentication)
    node_auth: bool = True  # SuperNode authentication (needs TLS)
    superlink_host: str = "127.0.0.1"  # the SuperLink binds here (0.0.0.0 for remote nodes)
    superlink_port: int = 19091  # Fleet + Control + Runtime API (one port in Flower 1.41)
    superlink_address: str | None = None  # what nodes and flwr connect to; default <host>:<port>
    cert_hosts: list[str] = field(default_factory=list)  # extra SANs for a generated server certificate
    num_nodes: int = 3  # num-partitions
    partition_ids: list[int] | None = None  # the nodes started here; default range(num_nodes)
    node_host: str = "127.0.0.1"  # each SuperNode's local Runtime API host
    node_port_base: int = 19092  # SuperNode k (k-th of partition_ids) serves its Runtime API on base + k
    connection: str = "fedsec-deploy"  # name of the config.toml connection
    database: str | None = None  # SuperLink state; default <work_dir>/state.db
    fresh_state: bool = True  # delete the SuperLink database before starting
    startup_timeout_s: float = 120.0
    # ClientApp processes forked from a pre-imported parent (fedsec.warm_superexec; SuperNodes in
    # --isolation process) instead of a fresh flwr-clientapp process per message
    warm_clientapp: bool = False

    def __post_init__(self) -> None:
        self.app_dir = Path(self.app_dir).resolve()
        self.work_dir = Path(self.work_dir).resolve()
        self.certs_dir = Path(self.certs_dir).resolve() if self.certs_dir else self.work_dir / "certs"
        if self.insecure:
            self.node_auth = False
        if self.partition_ids is None:
            self.partition_ids = list(range(self.num_nodes))
        if self.superlink_address is None:
            host = self.superlink_host
            host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
            self.superlink_address = _hostport(host, self.superlink_port)
        if self.database is None:
            self.database = str(self.work_dir / "state.db")

    @property
    def ca(self) -> Path:
        return self.certs_dir / "ca.crt"

    def node_key(self, pid: int) -> Path:
        return self.certs_dir / f"node_{pid}"

    def node_port(self, k: int) -> int:
        return self.node_port_base + k


class Deployment:
    """SuperLink and/or SuperNodes started by us and stopped by PID (a context manager)."""

    def __init__(self, cfg: DeployConfig, quiet: bool = False) -> None:
        self.cfg = cfg
        self.quiet = quiet
        cfg.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = cfg.work_dir / "logs"
        self.log_dir.mkdir(exist_ok=True)
        self.flwr_home = cfg.work_dir / "flwr-home"
        self.env = flower_env(cfg.app_dir)
        self.env["FLWR_HOME"] = str(self.flwr_home)
        self.env["NO_PROXY"] = ",".join(filter(None, [self.env.get("NO_PROXY", ""), "127.0.0.1,localhost,::1"]))
        self.env["no_proxy"] = self.env["NO_PROXY"]
        self.procs: dict[str, subprocess.Popen] = {}
        self.started_pids: set[int] = set()  # every process we started (incl. flwr CLI calls)
        self.stopped_pids: set[int] = set()  # everything stop() signalled (process trees)
        self.node_ids: dict[int, str] = {}  # partition id -> registered node id
        self.ports: list[int] = []  # ports our servers listen on (on this machine)
        self.timings: dict[str, float] = {}
        self.pid_dir = cfg.work_dir / "pids"  # <name>.pid while it runs: a killed launcher's leftovers

    # -- helpers ---------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(f"[deploy] {msg}", flush=True)

    def _popen(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        log.write(("$ " + shlex.join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            env=env or self.env,
            cwd=self.cfg.work_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        self.started_pids.add(proc.pid)
        self.pid_dir.mkdir(exist_ok=True)
        (self.pid_dir / f"{name}.pid").write_text(str(proc.pid))
        return proc

    def _reap_stale(self, name: str) -> None:
        """Stop the process ``name`` that a killed launcher using this work dir left behind."""
        pid_file = self.pid_dir / f"{name}.pid"
        if not pid_file.exists():
            return
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            pid, cmdline = 0, ""
        if pid and ("flower-" in cmdline or "fedsec.warm_superexec" in cmdline) and pid_alive(pid):
            self._say(f"stopping stale {name} (pid {pid}) from an earlier launcher")
            kill_tree(pid, grace_s=5.0)
        pid_file.unlink(missing_ok=True)

    def flwr(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run a ``flwr`` CLI command against our connection (FLWR_HOME in the work dir)."""
        cmd = [flower_bin("flwr"), *args]
        with subprocess.Popen(
            cmd,
            env=self.env,
            cwd=self.cfg.work_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as proc:
            self.started_pids.add(proc.pid)
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid, grace_s=2.0)
                out, err = proc.communicate()
                raise RuntimeError(f"{shlex.join(cmd)} timed out after {timeout:.0f} s:\n{out}\n{err}") from None
        res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        with open(self.log_dir / "flwr-cli.log", "a") as f:
            f.write(f"$ {shlex.join(cmd)}  (exit {res.returncode})\n{out}{err}\n")
        if check and res.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed (exit {res.returncode}):\n{out}\n{err}")
        return res

    @staticmethod
    def _json_out(text: str) -> dict:
        start = text.find("{")
        if start < 0:
            raise ValueError(f"no JSON in flwr output: {text!r}")
        return json.loads(text[start:])

    def _log_tail(self, name: str, n: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(lines[-n:])

    def _check_alive(self, *names: str) -> None:
        for name in names or tuple(self.procs):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}; {self.log_dir / (name + '.log')}:\n{self._log_tail(name)}"
                )

    def healthy(self) -> bool:
        """Whether the SuperLink answers ``/health`` (over TLS, verified with our CA, unless insecure)."""
        if self.cfg.insecure:
            url, handlers = f"http://{self.cfg.superlink_address}/health", []
        else:
            ctx = ssl.create_default_context(cafile=str(self.cfg.ca))
            url, handlers = f"https://{self.cfg.superlink_address}/health", [urllib.request.HTTPSHandler(context=ctx)]
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), *handlers)
        try:
            with opener.open(url, timeout=1.0) as r:
                return r.status == 200
        except Exception:
            return False

    # -- certificates ----------------------------------------------------------------------
    def ensure_certs(self) -> None:
        """Make the CA, the server certificate and missing node keys with ``make_certs.sh`` when needed."""
        cfg = self.cfg
        if cfg.insecure:
            return
        need = not (
            cfg.ca.exists() and (cfg.certs_dir / "server.pem").exists() and (cfg.certs_dir / "server.key").exists()
        )
        if cfg.node_auth:
            need = need or any(
                not cfg.node_key(p).exists() or not cfg.node_key(p).with_suffix(".pub").exists()
                for p in range(cfg.num_nodes)
            )
        if not need:
            return
        hosts = list(cfg.cert_hosts)
        addr_host = _split_address(cfg.superlink_address)[0]
        if addr_host not in LOOPBACK and addr_host not in hosts:
            hosts.append(addr_host)
        cmd = ["bash", str(MAKE_CERTS), "-n", str(cfg.num_nodes), str(cfg.certs_dir), *hosts]
        self._say("$ " + shlex.join(cmd))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if self.quiet else None)

    def write_connection(self) -> Path:
        """Write ``$FLWR_HOME/config.toml`` with our SuperLink connection as the default."""
        cfg = self.cfg
        lines = [
            "[superlink]",
            f"default = {toml_value(cfg.connection)}",
            "",
            f"[superlink.{cfg.connection}]",
            f"address = {toml_value(cfg.superlink_address)}",
        ]
        if cfg.insecure:
            lines.append("insecure = true")
        else:
            lines.append(f"root-certificates = {toml_value(str(cfg.ca))}")
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        path = self.flwr_home / "config.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    # -- SuperLink -------------------------------------------------------------------------
    def start_superlink(self) -> None:
        """Start ``flower-superlink`` and wait until it answers; write the connection."""
        cfg = self.cfg
        t0 = time.perf_counter()
        self._reap_stale("superlink")
        bind_host = "127.0.0.1" if cfg.superlink_host in ("", "0.0.0.0") else cfg.superlink_host
        if not port_free(cfg.superlink_port, bind_host):
            raise RuntimeError(f"port {cfg.superlink_port} on {bind_host} is in use; choose another --port")
        self.ensure_certs()
        if cfg.fresh_state and cfg.database and not cfg.database.startswith(":"):
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(cfg.database + suffix).unlink(missing_ok=True)
        cmd = [
            flower_bin("flower-superlink"),
            "--host",
            cfg.superlink_host,
            "--port",
            str(cfg.superlink_port),
            "--database",
            str(cfg.database),
            "--disable-runtime-dependency-installation",
        ]
        if cfg.insecure:
            cmd.append("--insecure")
        else:
            cmd += [
                "--ssl-ca-certfile",
                str(cfg.ca),
                "--ssl-certfile",
                str(cfg.certs_dir / "server.pem"),
                "--ssl-keyfile",
                str(cfg.certs_dir / "server.key"),
            ]
            if cfg.node_auth:
                cmd.append("--enable-supernode-auth")
        self._popen("superlink", cmd)
        self.ports.append(cfg.superlink_port)
        deadline = time.monotonic() + cfg.startup_timeout_s
        while not self.healthy():
            self._check_alive("superlink")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"SuperLink not healthy after {cfg.startup_timeout_s:.0f} s:\n{self._log_tail('superlink')}"
                )
            time.sleep(0.5)
        self.write_connection()
        self.timings["superlink_start_s"] = time.perf_counter() - t0
        tls = "off" if cfg.insecure else "on"
        self._say(
            f"SuperLink pid {self.procs['superlink'].pid} on {_hostport(cfg.superlink_host, cfg.superlink_port)} "
            f"(TLS {tls}, node auth {'on' if cfg.node_auth else 'off'})"
        )

    def register_key(self, public_key: Path) -> str:
        """``flwr supernode register KEY.pub <connection>``; returns the node id (an already registered key is fine)."""
        res = self.flwr("supernode", "register", str(public_key), self.cfg.connection, "--format", "json", check=False)
        text = res.stdout + res.stderr
        try:
            data = self._json_out(res.stdout)
        except ValueError:
            data = {}
        if data.get("success") and data.get("node-id"):
            return str(data["node-id"])
        if re.search(r"already (in use|registered)", text, re.I):
            return "registered-before"
        raise RuntimeError(f"registering {public_key} failed (exit {res.returncode}):\n{text}")

    def register_nodes(self, partition_ids: list[int] | None = None) -> dict[int, str]:
        """Register ``<certs>/node_<i>.pub`` for the given partitions (default all ``num_nodes``)."""
        cfg = self.cfg
        if not cfg.node_auth:
            return {}
        t0 = time.perf_counter()
        for pid in range(cfg.num_nodes) if partition_ids is None else partition_ids:
            self.node_ids[pid] = self.register_key(cfg.node_key(pid).with_suffix(".pub"))
        self.timings["register_s"] = time.perf_counter() - t0
        self._say(f"registered SuperNode keys: {self.node_ids}")
        return self.node_ids

    # -- SuperNodes ------------------------------------------------------------------------
    def start_supernodes(self) -> None:
        """Start one ``flower-supernode`` per partition id (each its own Runtime API port and FLWR_HOME)."""
        cfg = self.cfg
        assert cfg.partition_ids is not None
        for pid in cfg.partition_ids:
            self.start_supernode(pid)
        self._say(
            f"SuperNodes {cfg.partition_ids} of {cfg.num_nodes}: pids "
            f"{[self.procs[f'supernode-{p}'].pid for p in cfg.partition_ids]}"
        )

    def start_supernode(self, pid: int) -> subprocess.Popen:
        """Start (or, after :meth:`kill_supernode`, restart) the SuperNode of partition ``pid``.

        Its Runtime API port is ``node_port_base + k`` for the ``k``-th of ``partition_ids``;
        with node authentication it signs with ``node_<pid>`` (so it keeps its node id).
        """
        cfg = self.cfg
        assert cfg.partition_ids is not None
        name = f"supernode-{pid}"
        if name in self.procs and self.procs[name].poll() is None:
            raise RuntimeError(f"{name} is running (pid {self.procs[name].pid})")
        self._reap_stale(name)
        port = cfg.node_port(cfg.partition_ids.index(pid))
        if not port_free(port, cfg.node_host):
            raise RuntimeError(f"port {port} on {cfg.node_host} is in use; choose another --node-port-base")
        cmd = [
            flower_bin("flower-supernode"),
            "--superlink",
            cfg.superlink_address,
            "--host",
            cfg.node_host,
            "--port",
            str(port),
            "--node-config",
            f"partition-id={pid} num-partitions={cfg.num_nodes}",
        ]
        if cfg.insecure:
            cmd.append("--insecure")
        else:
            if not cfg.ca.exists():
                raise FileNotFoundError(f"{cfg.ca} missing (copy the SuperLink's ca.crt here)")
            cmd += ["--root-certificates", str(cfg.ca)]
            if cfg.node_auth:
                if not cfg.node_key(pid).exists():
                    raise FileNotFoundError(f"{cfg.node_key(pid)} missing (the node's private key)")
                cmd += ["--auth-supernode-private-key", str(cfg.node_key(pid))]
        if cfg.warm_clientapp:
            cmd += ["--isolation", "process"]  # the SuperNode starts no SuperExec: start_warm_superexec does
        env = dict(self.env, FLWR_HOME=str(self.flwr_home / name))
        # The SuperNode's flower-superexec asks its Runtime API for a task every 1 s by default.
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL_S)
        proc = self._popen(name, cmd, env)
        if port not in self.ports:
            self.ports.append(port)
        if cfg.warm_clientapp:
            self.start_warm_superexec(pid, port, proc.pid, env)
        return proc

    def start_warm_superexec(self, pid: int, port: int, supernode_pid: int, env: dict[str, str]) -> subprocess.Popen:
        """Start ``fedsec.warm_superexec`` for the SuperNode of partition ``pid`` (its Runtime API on ``port``).

        It exits with the SuperNode (``--parent-pid``) and is stopped by PID with everything else.
        """
        name = f"warm-superexec-{pid}"
        old = self.procs.get(name)
        if old is not None and old.poll() is None:
            kill_tree(old.pid, grace_s=5.0)
        self._reap_stale(name)
        cmd = [sys.executable, "-m", "fedsec.warm_superexec", "--runtime-api-address"]
        cmd += [_hostport(self.cfg.node_host, port), "--insecure", "--parent-pid", str(supernode_pid)]
        return self._popen(name, cmd, dict(env, PYTHONPATH=str(self.cfg.app_dir)))

    def clientapp_pids(self, pid: int) -> list[int]:
        """PIDs of the ``flwr-clientapp`` processes the SuperNode of partition ``pid`` runs now (a message in work)."""
        proc = self.procs.get(f"supernode-{pid}")
        if proc is None or proc.poll() is not None:
            return []
        out = []
        warm = self.procs.get(f"warm-superexec-{pid}")
        if warm is not None and warm.poll() is None:  # forkserver children run the messages
            server = [c for c in descendants(warm.pid) if "forkserver" in _cmdline(c)]
            return [c for s in server for c in descendants(s) if pid_alive(c)]
        for child in descendants(proc.pid):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "flwr-clientapp" in cmdline and pid_alive(child):
                out.append(child)
        return out

    def kill_supernode(self, pid: int, sig: int = signal.SIGKILL) -> list[int]:
        """Kill the SuperNode of partition ``pid`` and everything it started (its ClientApp), as a crash does.

        The process tree is collected first (killed children would be re-parented
        and lost), then every PID gets ``sig`` (default ``SIGKILL``: no clean
        deactivation, the SuperLink notices the node only when its heartbeat lapses).

        Returns
        -------
        list[int]
            The PIDs signalled.
        """
        name = f"supernode-{pid}"
        proc = self.procs.pop(name)
        tree = [proc.pid, *descendants(proc.pid)]
        warm = self.procs.pop(f"warm-superexec-{pid}", None)
        if warm is not None:  # --warm-clientapp: the node's SuperExec and its ClientApp children go with it
            tree += [warm.pid, *descendants(warm.pid)]
            (self.pid_dir / f"warm-superexec-{pid}.pid").unlink(missing_ok=True)
        self.stopped_pids.update(tree)
        for p in tree:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
        if warm is not None:
            warm.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(pid_alive(p) for p in tree):
            time.sleep(0.1)
        (self.pid_dir / f"{name}.pid").unlink(missing_ok=True)
        self._say(f"killed {name} ({signal.Signals(sig).name}): pids {tree}")
        return tree

    def online_nodes(self) -> list[dict]:
        """``flwr supernode ls --format json``: the nodes whose status is online."""
        res = self.flwr("supernode", "ls", self.cfg.connection, "--format", "json", check=False, timeout=60)
        try:
            nodes = self._json_out(res.stdout).get("nodes", [])
        except ValueError:
            return []
        return [n for n in nodes if n.get("status") == "online"]

    def wait_for_nodes(self, n: int | None = None, poll_s: float = 3.0) -> int:
        """Wait until ``n`` (default ``num_nodes``) SuperNodes are online; fail early if ours exit."""
        n = self.cfg.num_nodes if n is None else n
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while True:
            self._check_alive()
            online = len(self.online_nodes())
            if online >= n:
                break
            if time.monotonic() > deadline:
                names = [k for k in self.procs if k.startswith("supernode")]
                tails = "\n".join(f"--- {k}\n{self._log_tail(k, 10)}" for k in names)
                raise RuntimeError(
                    f"only {online}/{n} SuperNodes online after {self.cfg.startup_timeout_s:.0f} s\n{tails}"
                )
            time.sleep(poll_s)
        self.timings["nodes_online_s"] = time.perf_counter() - t0
        self._say(f"{online} SuperNodes online")
        return online

    def start_all(self) -> None:
        """SuperLink, node registration, SuperNodes, and wait until all are online."""
        t0 = time.perf_counter()
        self.start_superlink()
        self.register_nodes()
        self.start_supernodes()
        self.wait_for_nodes()
        self.timings["setup_s"] = time.perf_counter() - t0

    # -- flwr run --------------------------------------------------------------------------
    def run(self, overrides: dict[str, object], timeout_s: float | None = None) -> dict:
        """``flwr run <app> <connection> --stream --run-config ...``; returns ``summary.json`` plus timings."""
        cfg = self.cfg
        values = dict(overrides)
        values.setdefault("min-train-nodes", cfg.num_nodes)
        run_dir = str(values.get("run-dir", "") or "")
        if not run_dir:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = str(Path(self.env["FEDSEC_RUNS_ROOT"]) / f"{stamp}-deploy-{values.get('attack', 'none')}")
        run_path = Path(run_dir)
        run_path = (run_path if run_path.is_absolute() else Path.cwd() / run_path).resolve()
        values["run-dir"] = str(run_path)
        run_path.mkdir(parents=True, exist_ok=True)
        rc_str = " ".join(f"{k}={toml_value(v)}" for k, v in values.items())
        cmd = [flower_bin("flwr"), "run", str(cfg.app_dir), cfg.connection, "--stream", "--run-config", rc_str]
        log_path = run_path / "flwr.log"
        self._say("$ " + shlex.join(cmd))
        t0, started = time.perf_counter(), time.time()
        with open(log_path, "w") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            proc = subprocess.Popen(
                cmd,
                env=self.env,
                cwd=cfg.app_dir,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            self.procs["flwr-run"] = proc
            self.started_pids.add(proc.pid)
            assert proc.stdout is not None
            expired = threading.Event()

            def _expire() -> None:
                expired.set()
                kill_tree(proc.pid, grace_s=5.0)

            timer = threading.Timer(timeout_s, _expire) if timeout_s else None
            if timer is not None:
                timer.daemon = True
                timer.start()
            seen: set[str] = set()
            for line in proc.stdout:
                log.write(line)
                log.flush()
                m = ROUND_RE.search(line)
                if m and m.group(0) not in seen:
                    seen.add(m.group(0))
                    self._say(
                        f"round {m.group(1)}/{m.group(2)}  clean_acc {m.group(3)}%  asr {m.group(4)}  "
                        f"({time.perf_counter() - t0:.0f} s)"
                    )
            rc = proc.wait()
            if timer is not None:
                timer.cancel()
            if expired.is_set():
                raise TimeoutError(f"flwr run exceeded {timeout_s:.0f} s; see {log_path}")
        self.procs.pop("flwr-run", None)
        wall = time.perf_counter() - t0
        summary_path = run_path / "summary.json"
        # flwr run exits 0 when the ServerApp raises, and a resumed or repeated run directory may hold an
        # older summary.json: only one written by this run is proof of success (as in fedsec.launch.run).
        fresh = summary_path.exists() and summary_path.stat().st_mtime >= started - 1.0
        if rc != 0 or not fresh:
            why = f"exit {rc}" if rc else "no summary.json written by this run"
            raise RuntimeError(
                f"flwr run failed ({why}); see {log_path}\n"
                + "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            )
        summary = json.loads(summary_path.read_text())
        rows = [json.loads(x) for x in (run_path / "metrics.jsonl").read_text().splitlines() if x.strip()]
        summary["deploy_run_wall_s"] = wall
        summary["deploy_round_s"] = [r.get("round_s") for r in rows]
        summary["deploy_timings"] = dict(self.timings)
        summary["run_dir"] = str(run_path)
        self.timings["flwr_run_s"] = wall
        self._say(f"flwr run finished in {wall:.1f} s; run directory {run_path}")
        return summary

    # -- stopping --------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every process we started and all their descendants, by PID (SuperNodes first)."""
        order = [n for n in self.procs if n == "flwr-run"]
        order += [n for n in self.procs if n.startswith("supernode")]
        order += [n for n in self.procs if n not in order]
        for name in order:
            proc = self.procs[name]
            tree = [proc.pid, *descendants(proc.pid)]
            self.stopped_pids.update(tree)
            if proc.poll() is None or len(tree) > 1:
                kill_tree(proc.pid)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            (self.pid_dir / f"{name}.pid").unlink(missing_ok=True)
        self.procs.clear()
        leftovers = [p for p in self.stopped_pids if pid_alive(p)]
        if leftovers:
            self._say(f"WARNING: still alive after stop: {leftovers}")
        elif order:
            self._say(f"stopped {len(self.stopped_pids)} processes")

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_forever(self) -> None:
        """Block until Ctrl-C/SIGTERM or until one of our processes exits (then raise)."""
        self._say("running; Ctrl-C stops everything")
        while True:
            self._check_alive()
            time.sleep(1.0)


def deploy_and_run(
    cfg: DeployConfig, overrides: dict[str, object], quiet: bool = False, timeout_s: float | None = None
) -> tuple[dict, Deployment]:
    """Start everything on this machine, run one experiment, stop everything; returns (summary, deployment)."""
    t0 = time.perf_counter()
    with Deployment(cfg, quiet=quiet) as dep:
        dep.start_all()
        summary = dep.run(overrides, timeout_s=timeout_s)
    summary["deploy_total_s"] = time.perf_counter() - t0
    return summary, dep


# -- command line ---------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fedsec deploy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--app", default=str(ROOT), help="Flower app folder (default: the fedsec repo)")
    common.add_argument(
        "--work-dir", default=str(ROOT / "runs" / "deploy"), help="logs, flwr home, state (default: runs/deploy)"
    )
    common.add_argument(
        "--certs-dir", default=None, help="ca.crt, server.pem/.key, node_<i>[.pub] (default: <work-dir>/certs)"
    )
    common.add_argument("--insecure", action="store_true", help="no TLS (and no node authentication)")
    common.add_argument("--no-node-auth", action="store_true", help="TLS, but any SuperNode may join")
    common.add_argument("--host", default="127.0.0.1", help="SuperLink bind host (0.0.0.0 for remote nodes)")
    common.add_argument("--port", type=int, default=19091, help="SuperLink port (Fleet, Control and Runtime API)")
    common.add_argument(
        "--superlink-address", default=None, help="HOST:PORT nodes and flwr connect to (default <host>:<port>)"
    )
    common.add_argument("--cert-host", action="append", default=[], help="extra SAN for a generated server certificate")
    common.add_argument("--nodes", type=int, default=3, help="number of partitions / SuperNodes in the federation")
    common.add_argument("--partition-ids", default=None, help="comma-separated partitions to start here (default all)")
    common.add_argument("--node-host", default="127.0.0.1", help="SuperNodes' local Runtime API host")
    common.add_argument(
        "--node-port-base", type=int, default=19092, help="k-th local SuperNode's Runtime API port = base + k"
    )
    common.add_argument("--connection", default="fedsec-deploy", help="name of the flwr config.toml connection")
    common.add_argument(
        "--keep-state", action="store_true", help="keep the SuperLink database (registrations) from before"
    )
    common.add_argument(
        "--warm-clientapp",
        action="store_true",
        help="fork ClientApp processes from a pre-imported parent (fedsec.warm_superexec; SuperNodes in "
        "--isolation process)",
    )
    common.add_argument("--quiet", action="store_true")
    runargs = argparse.ArgumentParser(add_help=False)
    runargs.add_argument("--run-config", "-c", action="append", default=[], help="key=value run-config overrides")
    runargs.add_argument("--timeout", type=float, default=None, help="give up on flwr run after this many seconds")
    sub.add_parser("all", parents=[common, runargs], help="everything on this machine, one run, then stop")
    p = sub.add_parser("superlink", parents=[common], help="only the SuperLink (blocks)")
    p.add_argument("--register-key", action="append", default=[], help="also register this public key file")
    p.add_argument("--no-register", action="store_true", help="do not register <certs>/node_<i>.pub")
    sub.add_parser("supernodes", parents=[common], help="only the SuperNodes for --partition-ids (blocks)")
    p = sub.add_parser("register", parents=[common], help="register public keys with a running SuperLink")
    p.add_argument("keys", nargs="+", help="public key files (OpenSSH ECDSA)")
    sub.add_parser("run", parents=[common, runargs], help="only flwr run on a running deployment")
    return ap


def _config(args: argparse.Namespace) -> DeployConfig:
    ids = [int(x) for x in args.partition_ids.split(",")] if args.partition_ids else None
    return DeployConfig(
        app_dir=Path(args.app),
        work_dir=Path(args.work_dir),
        certs_dir=Path(args.certs_dir) if args.certs_dir else None,
        insecure=args.insecure,
        node_auth=not args.no_node_auth,
        superlink_host=args.host,
        superlink_port=args.port,
        superlink_address=args.superlink_address,
        cert_hosts=args.cert_host,
        num_nodes=args.nodes,
        partition_ids=ids,
        node_host=args.node_host,
        node_port_base=args.node_port_base,
        connection=args.connection,
        fresh_state=not args.keep_state,
        warm_clientapp=args.warm_clientapp,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cfg = _config(args)

    def _term(signum, frame):  # SIGTERM -> the same clean-up as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    try:
        with Deployment(cfg, quiet=args.quiet) as dep:
            if args.mode == "all":
                t0 = time.perf_counter()
                dep.start_all()
                s = dep.run(parse_overrides(args.run_config), timeout_s=args.timeout)
                print(
                    json.dumps(
                        {
                            k: s.get(k)
                            for k in (
                                "clean_acc",
                                "asr",
                                "zero_shot_acc",
                                "deploy_run_wall_s",
                                "deploy_round_s",
                                "deploy_timings",
                                "run_dir",
                            )
                        },
                        indent=1,
                    )
                )
                print(f"[deploy] total {time.perf_counter() - t0:.1f} s (setup + run)")
            elif args.mode == "superlink":
                dep.start_superlink()
                if not args.no_register:
                    dep.register_nodes()
                for key in args.register_key:
                    print(f"[deploy] {key}: node {dep.register_key(Path(key))}")
                print(f"[deploy] connection {cfg.connection!r} in {dep.flwr_home / 'config.toml'}")
                dep.wait_forever()
            elif args.mode == "supernodes":
                dep.start_supernodes()
                dep.wait_forever()
            elif args.mode == "register":
                dep.write_connection()
                for key in args.keys:
                    print(f"{key}: node {dep.register_key(Path(key))}")
            elif args.mode == "run":
                dep.write_connection()
                s = dep.run(parse_overrides(args.run_config), timeout_s=args.timeout)
                print(
                    json.dumps(
                        {k: s.get(k) for k in ("clean_acc", "asr", "deploy_run_wall_s", "deploy_round_s", "run_dir")},
                        indent=1,
                    )
                )
    except KeyboardInterrupt:
        print("[deploy] interrupted; everything we started is stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
