"""A throwaway PostgreSQL server for tests: a fresh cluster in a temporary folder.

:func:`postgres_server` runs ``initdb`` into a new folder, starts ``postgres`` listening on
127.0.0.1 only (a free port, its Unix socket inside the folder, trust authentication for
the one role ``fedface``), yields a :class:`PostgresServer`, then stops it
(``pg_ctl stop -m immediate``) and removes the folder, whatever happened in between.

The server binaries are found by :func:`find_pg_bin`: ``$FEDFACE_PG_BIN``, else the highest
``/usr/lib/postgresql/<version>/bin`` (Debian's layout), else ``pg_config --bindir``.
PostgreSQL refuses to run as root; as root the server-side commands (``initdb``,
``pg_ctl``) run as the ``postgres`` user through ``runuser``, with the folder given to it.
Client commands (``pg_dump``) connect over TCP and run as the caller.

The cluster trades durability for speed (``fsync=off``): it holds test data only.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SERVER_TOOLS = ("initdb", "pg_ctl", "postgres")
RUN_AS = "postgres"  # the account the server runs as when the caller is root


def find_pg_bin() -> tuple[Path | None, str]:
    """The folder of PostgreSQL's server binaries, or ``None`` and why none was found.

    Looks at ``$FEDFACE_PG_BIN``, then the highest ``/usr/lib/postgresql/*/bin``, then
    ``pg_config --bindir``; a folder counts when it holds ``initdb``, ``pg_ctl`` and
    ``postgres``.
    """
    def complete(folder: Path) -> bool:
        return all(os.access(folder / tool, os.X_OK) for tool in SERVER_TOOLS)

    env = os.environ.get("FEDFACE_PG_BIN")
    if env:
        if complete(Path(env)):
            return Path(env), ""
        return None, (f"FEDFACE_PG_BIN={env} does not hold PostgreSQL's server binaries "
                      f"({', '.join(SERVER_TOOLS)}): point it at their folder")

    def version(folder: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", folder.parent.name)) or (0,)

    debian = sorted((p for p in Path("/usr/lib/postgresql").glob("*/bin") if complete(p)),
                    key=version)
    if debian:
        return debian[-1], ""
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        folder = Path(out.stdout.strip())
        if out.returncode == 0 and complete(folder):
            return folder, ""
    return None, ("PostgreSQL server binaries not found (no FEDFACE_PG_BIN, no "
                  "/usr/lib/postgresql/*/bin, no pg_config): install PostgreSQL "
                  "(Debian: apt-get install postgresql) or set FEDFACE_PG_BIN")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    """A running throwaway cluster (see :func:`postgres_server`)."""

    bin_dir: Path
    root: Path
    port: int
    user: str = "fedface"
    database: str = "fedface"

    def url(self, database: str | None = None) -> str:
        """SQLAlchemy URL of ``database`` (default: the one created at start)."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database or self.database}"

    def _client(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / tool), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user,
               *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(f"{tool} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def create_database(self, name: str) -> str:
        """Create an empty database ``name``; return its URL."""
        self._client("createdb", name)
        return self.url(name)

    def dump(self, database: str | None = None) -> str:
        """``pg_dump`` of ``database`` as plain SQL text (data included)."""
        return self._client("pg_dump", "--no-owner", database or self.database).stdout


def _as_server(cmd: list[str]) -> list[str]:
    """``cmd`` run as the ``postgres`` account when the caller is root."""
    return ["runuser", "-u", RUN_AS, "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], what: str, log: Path | None = None) -> None:
    out = subprocess.run(_as_server(cmd), capture_output=True, text=True, timeout=120)
    if out.returncode:
        tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
        raise RuntimeError(f"{what} failed ({out.returncode}): {out.stderr.strip()}\n{tail}")


def _stop(bin_dir: Path, data: Path) -> None:
    """Stop the cluster at ``data`` now; kill its postmaster if ``pg_ctl`` cannot."""
    pid_file = data / "postmaster.pid"
    if not pid_file.exists():
        return
    try:
        _run([str(bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate", "-w"],
             "pg_ctl stop")
    except (RuntimeError, subprocess.TimeoutExpired, OSError):
        try:
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)
        except (OSError, ValueError, IndexError):
            pass


@contextmanager
def postgres_server(bin_dir: Path, *, user: str = "fedface",
                    database: str = "fedface") -> Iterator[PostgresServer]:
    """Start a fresh cluster with ``database`` owned by ``user``; stop and remove it on exit.

    Raises
    ------
    RuntimeError
        The cluster could not be set up or started; the message carries the server's log.
    """
    root = Path(tempfile.mkdtemp(prefix="fedface-pg-"))
    data, sockets, log = root / "data", root / "sock", root / "server.log"
    sockets.mkdir()
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam(RUN_AS)
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(f"running as root and there is no {RUN_AS!r} account to run "
                               "PostgreSQL as (it refuses root): create it, or run the tests "
                               "as another user") from None
        for path in (root, sockets):
            os.chown(path, account.pw_uid, account.pw_gid)
    try:
        port = free_port()
        _run([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", user, "-E", "UTF8",
              "--locale=C", "--no-sync"], "initdb")
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        try:
            _run([str(bin_dir / "pg_ctl"), "start", "-D", str(data), "-w", "-t", "60",
                  "-l", str(log), "-o", options], "pg_ctl start", log)
            server = PostgresServer(bin_dir, root, port, user, database)
            server.create_database(database)
            yield server
        finally:
            _stop(bin_dir, data)
    finally:
        shutil.rmtree(root, ignore_errors=True)
