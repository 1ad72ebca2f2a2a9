"""Run a whole deployment on this machine, on loopback: for the end-to-end test and
``fedface bench deploy``.

:class:`LocalDeployment` provisions a deployment, starts the SuperLink and the SuperNodes
with the real commands (``fedface deploy superlink`` / ``supernode``, which start
``flower-superlink`` / ``flower-supernode``), submits jobs with ``flwr run .`` and stops
every process it started by its PID, with all their descendants (the SuperExec, ServerApp
and ClientApp processes Flower starts), when it closes. :class:`Proc` is one such process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from fedface.deploy.launch import flwr_env, tool
from fedface.deploy.provision import CONNECTION, Provisioned, init_deployment


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], object], timeout: float, what: str,
               proc: Proc | None = None, every: float = 0.5) -> object:
    """Poll ``check`` until it returns something true; a clear error after ``timeout`` or
    when ``proc`` has exited (with the end of its log)."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited (code {proc.popen.returncode}) while waiting "
                               f"for {what}; its log ends:\n{proc.tail()}")
        if time.monotonic() > end:
            extra = f"; {proc.name}'s log ends:\n{proc.tail()}" if proc is not None else ""
            raise TimeoutError(f"{what}: not after {timeout:.0f} s{extra}")
        time.sleep(every)


class Proc:
    """A process started in its own session, its output in a log file; stopped (or
    killed, as in a crash) together with every process it started."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path,
                 cwd: Path | None = None) -> None:
        self.name, self.cmd, self.env, self.log, self.cwd = name, cmd, env, Path(log), cwd
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.log, "ab")  # noqa: SIM115 (closed in stop)
        self.popen = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.popen.pid
        self.root = psutil.Process(self.pid)
        self.seen: dict[int, psutil.Process] = {}

    def alive(self) -> bool:
        self._tree()  # remember its descendants while it runs
        return self.popen.poll() is None

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def _tree(self) -> list[psutil.Process]:
        if self.popen.poll() is not None:  # reaped: its pid may belong to another process
            return []
        try:
            tree = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self.seen.update({p.pid: p for p in tree})
        return tree

    def leftovers(self) -> list[psutil.Process]:
        """Processes of its tree (as last seen) still running."""
        self._tree()
        out = []
        for p in list(self.seen.values()):
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    def kill(self) -> None:
        """SIGKILL the process and every descendant at once: a crash, nothing cleans up."""
        for p in self._tree():
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self._reap()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL for whatever of the tree is left after ``timeout``."""
        stop_all([self], timeout)

    def _terminate(self) -> list[psutil.Process]:
        tree = self._tree()
        if self.alive():  # the process passes it on (``fedface deploy`` to Flower's)
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        return tree

    def _reap(self) -> None:
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self._out.close()

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} still runs after {timeout:.0f} s; its log ends:\n"
                               f"{self.tail()}") from None


def stop_all(procs: list[Proc], timeout: float = 15.0) -> None:
    """Stop ``procs`` together: SIGTERM to each, then SIGKILL for whatever of their trees
    is left after ``timeout``."""
    trees = [p for proc in procs for p in proc._terminate()]
    trees += [p for proc in procs for p in proc.leftovers() if p not in trees]
    _, left = psutil.wait_procs(trees, timeout=timeout)
    for p in left:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=5)
    for proc in procs:
        proc._reap()


class LocalDeployment:
    """A deployment on loopback: provision, SuperLink, SuperNodes, jobs, and a clean stop.

    Parameters
    ----------
    root : Path
        Working folder (provisioned folders, logs, the SuperLink's database).
    sites : int
        Sites to provision.
    app_dir : Path
        The Flower app submitted with ``flwr run`` (this project's root).
    """

    def __init__(self, root: Path, sites: int, app_dir: Path) -> None:
        self.root, self.sites, self.app_dir = Path(root), sites, Path(app_dir)
        self.port = free_port()
        self.procs: list[Proc] = []
        self.superlink: Proc | None = None
        self.nodes: dict[int, Proc] = {}
        self.prov: Provisioned | None = None

    # -------------------------------------------------------------- set up
    def provision(self) -> Provisioned:
        self.prov = init_deployment(self.root / "deploy", self.sites, ["127.0.0.1", "localhost"],
                                    port=self.port)
        return self.prov

    @property
    def coordinator(self) -> Path:
        assert self.prov is not None, "provision() first"
        return self.prov.coordinator

    def site(self, k: int) -> Path:
        assert self.prov is not None, "provision() first"
        return self.prov.site(k)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return flwr_env(self.coordinator / "flwr")

    def fedface(self, name: str, *args: str, log: str | None = None) -> Proc:
        """``fedface ARGS`` as a managed process (its log under root/logs)."""
        proc = Proc(name, [sys.executable, "-m", "fedface.cli", *args], self.env(),
                    self.root / "logs" / (log or f"{name}.log"), cwd=self.app_dir)
        self.procs.append(proc)
        return proc

    def start_superlink(self, *extra: str, timeout: float = 90.0) -> Proc:
        """``fedface deploy superlink`` on loopback; returns once every site is registered."""
        n = len(self.procs)
        self.superlink = self.fedface("superlink", "deploy", "superlink", str(self.coordinator),
                                      "--host", "127.0.0.1", *extra, log=f"superlink-{n}.log")
        wait_until(lambda: "SuperLink ready" in self.superlink.text(), timeout,
                   "the SuperLink to start and register the sites", self.superlink)
        return self.superlink

    def start_supernode(self, k: int, data: Path, *extra: str, wait: bool = True,
                        timeout: float = 90.0) -> Proc:
        """``fedface deploy supernode`` of site ``k``; waits until the SuperLink lists it
        online (``wait``)."""
        n = len(self.procs)
        proc = self.fedface(f"site-{k}", "deploy", "supernode", str(self.site(k)), "--data",
                            str(data), "--superlink", self.address, "--local-port",
                            str(free_port()), "--max-retries", "60", "--max-wait", "180",
                            *extra, log=f"site-{k}-{n}.log")
        self.nodes[k] = proc
        if wait:
            wait_until(lambda: "SuperNode ID" in proc.text(), timeout,
                       f"site {k}'s SuperNode to connect", proc)
        return proc

    def online(self) -> int:
        """How many SuperNodes the SuperLink lists online."""
        out = subprocess.run([tool("flwr"), "supernode", "list", CONNECTION, "--format", "json"],
                             env=self.env(), capture_output=True, text=True, timeout=60)
        try:
            doc = json.loads(out.stdout[out.stdout.index("{"):])
        except ValueError:
            return 0
        return sum(1 for n in doc.get("nodes", []) if n.get("status") == "online")

    def submit(self, run_config: dict, name: str = "job") -> Proc:
        """``flwr run . fedface --stream -c ...`` from the app folder."""
        items = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else _toml(v)}"
                         for k, v in run_config.items())
        proc = Proc(name, [tool("flwr"), "run", ".", CONNECTION, "--stream", "-c", items],
                    self.env(), self.root / "logs" / f"{name}.log", cwd=self.app_dir)
        self.procs.append(proc)
        return proc

    # -------------------------------------------------------------- tear down
    def close(self) -> None:
        """Stop every process this deployment started (by PID, with descendants): the
        nodes and jobs together, then the SuperLink (which the nodes tell they leave);
        whatever is left after 15 s is killed."""
        links = [p for p in self.procs if p.name == "superlink"]
        stop_all([p for p in self.procs if p.name != "superlink"])
        stop_all(links)

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


def rounds_done(out: Path) -> int:
    """Rounds recorded in ``out/metrics.json`` so far (0 when none or unreadable)."""
    try:
        return len(json.loads((Path(out) / "metrics.json").read_text()).get("rounds", []))
    except (OSError, ValueError):
        return 0
