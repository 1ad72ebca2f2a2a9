"""The Flower processes of a deployment: their command lines, the pre-flight check of the
SuperLink's address, node registration, and running them in the foreground.

``fedface deploy superlink`` and ``fedface deploy supernode`` print the exact lines they
run (:func:`superlink_command`, :func:`supernode_command`, :func:`register_command`), so
an IT team can run the same lines by hand or under systemd. Flower is the engine:
``flower-superlink``, ``flower-supernode`` and ``flwr`` of this environment do all the
networking; fedface only checks, composes and explains.

- :func:`preflight`: before a SuperNode starts, the SuperLink's address is tried within
  the retry budget (a clear message when it never answers, not a hang) and its TLS
  certificate is verified against the site's CA (a wrong CA is named at once).
- :func:`explain_exit`: Flower's exit codes of a refused node, in the site's terms.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from fedface.deploy.checks import Coordinator, Site
from fedface.deploy.provision import (
    CONNECTION,
    FLWR_DIR,
    NODE_KEY,
    REVOKED_DIR,
    STATE_DIR,
    TLS_CA,
    TLS_CERT,
    TLS_KEY,
    DeployError,
)

NODES_FILE = "nodes.json"  # coordinator/state/nodes.json: site -> Flower node id
SUPERLINK_DB = "superlink.db"
CLIENTAPPIO_BASE = 9094  # a SuperNode's local Runtime API port: 9094 + site index

# Flower's exit codes that a site can act on (flwr.common.exit.ExitCode).
EXIT_AUTH_NEEDS_TLS = 303


def tool(name: str) -> str:
    """A Flower executable of this environment (next to this Python), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"`{name}` is not installed here: install fedface with its "
                          "dependencies (`make install`) in the environment you run from")
    return found


def flwr_env(flwr_home: Path, base: dict | None = None) -> dict[str, str]:
    """The environment of a Flower process: this environment's executables first on PATH
    (the ServerApp and ClientApp processes Flower starts must find fedface), and
    ``FLWR_HOME`` (where Flower keeps installed apps and the connection config)."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def split_address(superlink: str) -> tuple[str, int]:
    host, sep, port = superlink.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise DeployError(f"SuperLink address {superlink!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def superlink_command(coord: Coordinator, host: str, port: int, insecure: bool = False
                      ) -> list[str]:
    """``flower-superlink`` with TLS, node authentication and a persistent database."""
    cmd = [tool("flower-superlink")]
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-certfile", str(coord.path(TLS_CERT)), "--ssl-keyfile",
                str(coord.path(TLS_KEY)), "--ssl-ca-certfile", str(coord.path(TLS_CA)),
                "--enable-supernode-auth"]
    cmd += ["--host", host, "--port", str(port),
            "--database", str(coord.path(f"{STATE_DIR}/{SUPERLINK_DB}")),
            "--isolation", "subprocess", "--disable-runtime-dependency-installation"]
    return cmd


def register_command(pub: Path) -> list[str]:
    """``flwr supernode register`` of one site's public key (connection ``fedface``)."""
    return [tool("flwr"), "supernode", "register", str(Path(pub).resolve()), CONNECTION,
            "--format", "json"]


def supernode_command(site: Site, superlink: str, insecure: bool = False,
                      local_port: int | None = None) -> list[str]:
    """``flower-supernode`` with the site's CA, node key and node config."""
    cmd = [tool("flower-supernode"), "--superlink", superlink]
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(site.path(TLS_CA)),
                "--auth-supernode-private-key", str(site.path(NODE_KEY))]
    node_config = " ".join(f"{k}={json.dumps(str(v))}" for k, v in site.node_config.items())
    port = CLIENTAPPIO_BASE + site.index if local_port is None else local_port
    cmd += ["--node-config", node_config, "--port", str(port), "--isolation", "subprocess"]
    # Flower's --max-retries/--max-wait-time bound reconnecting for the node's whole life:
    # left unset (no limit), a site outlives a coordinator outage of any length. fedface's
    # own budget bounds the first connection (preflight) and the activation.
    return cmd


def shell_line(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """The command as one line for a shell (with ``FLWR_HOME`` when it matters)."""
    prefix = f"FLWR_HOME={shlex.quote(env['FLWR_HOME'])} " if env and "FLWR_HOME" in env else ""
    return prefix + shlex.join(cmd)


def _cert_refusal(superlink: str, host: str, ca: Path | None,
                  err: ssl.SSLCertVerificationError) -> str:
    """Why the SuperLink's certificate was refused, and what to do (OpenSSL's codes)."""
    code = getattr(err, "verify_code", None)
    if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        return (f"the SuperLink at {superlink} presents an expired certificate: the coordinator "
                "issues new certificates (`fedface deploy init --force`) and hands out the "
                "folders again")
    if code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
        return (f"the SuperLink's certificate is not for {host!r} ({err.verify_message}): "
                "connect to one of the names in `fedface deploy show` (--superlink), or "
                "re-provision with that name in --coordinator")
    return (f"the SuperLink at {superlink} presents a certificate that this site's CA ({ca}) "
            f"does not accept ({err.verify_message}): the site and the coordinator hold "
            "folders of different provisionings, or the address points at another server; "
            "copy tls/ca.crt from the same `fedface deploy init` as the coordinator's")


def preflight(superlink: str, ca: Path | None, max_retries: int = 10, max_wait: float = 120.0,
              sleep: Callable[[float], None] = time.sleep) -> None:
    """Try the SuperLink before the node starts.

    Retries a refused or unanswered connection until ``max_retries`` tries or ``max_wait``
    seconds are spent, then raises :class:`DeployError` saying what to check; with
    ``ca``, the TLS handshake must verify the SuperLink's certificate against it (a
    certificate of another CA is refused at once, naming both).
    """
    host, port = split_address(superlink)
    start, tries, delay, last = time.monotonic(), 0, 0.5, ""
    while True:
        tries += 1
        try:
            with socket.create_connection((host, port), timeout=5.0) as sock:
                if ca is None:
                    return
                ctx = ssl.create_default_context(cafile=str(ca))
                with ctx.wrap_socket(sock, server_hostname=host):
                    return
        except ssl.SSLCertVerificationError as err:
            raise DeployError(_cert_refusal(superlink, host, ca, err)) from None
        except ssl.SSLError as err:
            last = f"TLS handshake failed ({err.reason or err})"
            if "WRONG_VERSION_NUMBER" in str(err) or "record layer" in str(err):
                raise DeployError(f"the SuperLink at {superlink} does not speak TLS: it was "
                                  "started with --insecure; start it with TLS (the default of "
                                  "`fedface deploy superlink`), or pass --insecure to this "
                                  "node as well (not for real data)") from None
        except OSError as err:
            last = err.strerror or type(err).__name__
        spent = time.monotonic() - start
        if tries >= max_retries or spent + delay > max_wait:
            raise DeployError(
                f"the SuperLink at {superlink} did not answer after {tries} tries over "
                f"{spent:.0f} s ({last}): check that it runs (`fedface deploy superlink` on "
                "the coordinator), the address (site.json, or --superlink), and that the "
                "firewall lets this machine reach that port; raise --max-retries or "
                "--max-wait to wait longer")
        sleep(delay)
        delay = min(delay * 2, 10.0)


ACTIVATION_REFUSED = "Failed to activate SuperNode"  # Flower's text (exit code 305)


def activation_refused(tail: str) -> bool:
    """Whether the SuperLink refused to activate the node (not a network failure)."""
    return ACTIVATION_REFUSED in tail


def explain_exit(code: int, site: Site, tail: str, waited: float = 0.0) -> str:
    """What a SuperNode's exit means for this site, and what to do.

    Flower exits with the same code for every failure to connect; its text tells a
    refused activation (the SuperLink does not admit this key) from a network failure.
    """
    fp = site.manifest["nodes"][str(site.index)]["fingerprint"]
    if activation_refused(tail):
        return (f"the SuperLink refused to activate site {site.index}'s node key ({fp}) for "
                f"{waited:.0f} s: either the key is not registered there (unknown, or revoked "
                "with `fedface deploy revoke`: ask the coordinator to start `fedface deploy "
                f"superlink` with this site's nodes/site-{site.index}.pub), or another "
                f"SuperNode with this site's key is already connected (two nodes claiming site "
                f"{site.index}: stop the other one; a node restarted within about a minute is "
                "refused until its previous session's heartbeat lapses)")
    if "secure TLS connection" in tail or code == EXIT_AUTH_NEEDS_TLS:
        return "node authentication needs TLS: drop --insecure"
    if "Failed to initialize the connection" in tail:
        return (f"site {site.index}'s SuperNode could not connect to the SuperLink (it answered "
                "the pre-flight check, then went away or broke the connection); its last "
                f"lines:\n{tail}")
    return f"flower-supernode exited with code {code}; its last lines:\n{tail}"


def run_foreground(cmd: list[str], env: dict[str, str],
                   started: Callable[[subprocess.Popen], None] | None = None,
                   keep: int = 40) -> tuple[int, str]:
    """Run ``cmd`` until it exits, its output copied to ours; returns its exit code and
    last lines. ``started(proc)`` runs once it is launched.

    Ctrl-C or SIGTERM stop it (SIGTERM, then SIGKILL after 10 s). Flower starts helper
    processes in sessions of their own (its SuperExec), which can outlive a node that
    exits on an error and keep our output open: every descendant seen while it ran is
    stopped when it ends, and its exit, not the end of its output, ends the wait.
    """
    import signal
    import threading

    import psutil

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", bufsize=1)
    lines: deque[str] = deque(maxlen=keep)
    seen: dict[int, psutil.Process] = {}

    def copy() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # drained to the end, whatever happens to our output
            lines.append(line.rstrip("\n"))
            try:
                print(line, end="", flush=True)
            except (OSError, ValueError):
                pass

    def leftovers() -> None:
        alive = [p for p in list(seen.values()) if p.is_running()]
        for p in alive:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, left = psutil.wait_procs(alive, timeout=5)
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    def stop(*_):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        leftovers()
        raise SystemExit(143)  # 128 + SIGTERM

    def watch() -> None:  # every descendant, while the child runs
        while proc.poll() is None:
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    seen.setdefault(child.pid, child)
            except psutil.Error:
                pass
            time.sleep(0.5)

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    threading.Thread(target=watch, daemon=True).start()
    old = signal.signal(signal.SIGTERM, stop)
    try:
        if started is not None:
            started(proc)
        while proc.poll() is None:
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                pass
        leftovers()
        reader.join(2.0)
        return proc.returncode, "\n".join(lines)
    except KeyboardInterrupt:
        stop()
        raise
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        leftovers()
        raise
    finally:
        signal.signal(signal.SIGTERM, old)


def read_nodes(coord: Coordinator) -> dict[str, int]:
    path = coord.path(f"{STATE_DIR}/{NODES_FILE}")
    try:
        return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def write_nodes(coord: Coordinator, nodes: dict[str, int]) -> None:
    from fedface.io import atomic_write_text

    atomic_write_text(coord.path(f"{STATE_DIR}/{NODES_FILE}"), json.dumps(nodes, indent=1))


def flwr_json(stdout: str) -> dict:
    """The JSON document a ``flwr ... --format json`` command printed (after any banner)."""
    try:
        doc = json.loads(stdout[stdout.index("{"):])
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _flwr(args: list[str], env: dict[str, str], what: str) -> dict:
    try:
        out = subprocess.run([tool("flwr"), *args, "--format", "json"], env=env,
                             capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise DeployError(f"{what}: the SuperLink did not answer in 60 s") from None
    return flwr_json(out.stdout) or {"success": False,
                                     "error-message": (out.stdout + out.stderr).strip()}


def register_nodes(coord: Coordinator, env: dict[str, str],
                   say: Callable[[str], None] = print) -> dict[str, int]:
    """Register every provisioned site key with the running SuperLink (a key already
    registered is left as it is) and unregister revoked ones; returns site -> node id
    (``state/nodes.json``)."""
    nodes = read_nodes(coord)
    for k, pub in sorted(coord.node_keys.items()):
        doc = _flwr(["supernode", "register", str(Path(pub).resolve()), CONNECTION], env,
                    f"registering site {k}")
        if doc.get("success"):
            nodes[str(k)] = int(doc["node-id"])
            write_nodes(coord, nodes)  # at once: a later failure must not lose this id
            say(f"registered site {k}: node {doc['node-id']}")
        elif "already in use" in str(doc.get("error-message", "")):
            say(f"site {k}: already registered" + (f" (node {nodes[str(k)]})"
                                                   if str(k) in nodes else ""))
        else:
            raise DeployError(f"registering site {k}'s key {pub} failed: "
                              f"{str(doc.get('error-message', '')).strip()}")
    revoked_dir = coord.path(REVOKED_DIR)
    for pub in sorted(revoked_dir.glob("site-*.pub")) if revoked_dir.is_dir() else []:
        k = pub.stem.split("-", 1)[1]
        if k in nodes:
            unregister(env, int(nodes[k]))
            say(f"site {k}: revoked, unregistered node {nodes[k]}")
            nodes.pop(k)
    write_nodes(coord, nodes)
    return nodes


def unregister(env: dict[str, str], node_id: int) -> None:
    """Unregister node ``node_id`` from the running SuperLink (refused from then on)."""
    doc = _flwr(["supernode", "unregister", str(node_id), CONNECTION], env,
                f"unregistering node {node_id}")
    if not doc.get("success"):
        raise DeployError(f"unregistering node {node_id} failed: "
                          f"{str(doc.get('error-message', '')).strip()}")


def flwr_home(folder: Path) -> Path:
    return Path(folder) / FLWR_DIR
