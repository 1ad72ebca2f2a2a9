"""Provisioning a deployment: ``fedface deploy init --out DIR --sites N``.

One run makes every secret and certificate a deployment needs and lays them out by who
receives them::

    DIR/deployment.json            the public manifest (fingerprints, expiry dates, sites,
                                   the coordinator's address); a copy is in every folder
    DIR/ca/                        the CA (ca.crt, ca.key): keep it offline; it is needed
                                   only to issue new certificates
    DIR/coordinator/               for the machine that runs the SuperLink
        tls/ca.crt, tls/server.crt, tls/server.key (secret)
        nodes/site-K.pub           every site's node public key (registered at start)
        he/                        the server's HE bundle: its signing key, no secret key
        flwr/config.toml           Flower's connection ``fedface`` (for ``flwr run``)
        state/                     the SuperLink's database (made when it runs)
    DIR/site-K/                    for site K (K = 0 .. N-1; its index in the key ceremony)
        site.json                  its index and the coordinator's address
        tls/ca.crt                 the root it trusts
        node/auth.key (secret), node/auth.pub   its node authentication key pair
        he/                        its HE bundle (the shared secret key, its own signing key)
        state/                     its privacy ledger and saved heads (made when it runs)
    DIR/querier/                   for the analyst who asks encrypted analytics queries:
        sign.key (secret), key.json   the querier's signing key and the ceremony's
                                   public description (`fedface query-request --keys`)

Each folder is self-contained and has a README saying what it holds and what must stay
secret. Secrets are written owner-only (0600, folders 0700) through
:mod:`crypto.keyfile`; the HE bundles are the ones of :func:`crypto.keys.init_keys`; the
certificates and node keys are made by :mod:`crypto.pki`; every public file is written
atomically (:func:`fedface.io.atomic_write_text`). A second ``init`` into a folder that
holds a deployment, or the leftovers of an interrupted one (``ca/``, ``coordinator/``, a
``site-K/``), is refused unless ``force``; ``deployment.json`` in ``DIR`` is written last,
so it marks a finished provisioning.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from crypto import pki
from crypto.keyfile import KeyFileError
from crypto.keys import (
    KEY_FILE,
    QUERIER_DIR,
    SERVER_DIR,
    describe_keys,
    init_keys,
    institution_dir,
)
from fedface.io import atomic_write_text

MANIFEST = "deployment.json"
FORMAT = "fedface-deployment/1"
SITE_FILE = "site.json"
CONNECTION = "fedface"  # the Flower connection name written into flwr/config.toml
DEFAULT_PORT = 9092
DEFAULT_HOSTS = ("localhost", "127.0.0.1")

# Paths inside the folders (one place: provisioning, checks and commands all use these).
CA_DIR, COORDINATOR_DIR = "ca", "coordinator"
TLS_CA, TLS_CERT, TLS_KEY = "tls/ca.crt", "tls/server.crt", "tls/server.key"
NODES_DIR, REVOKED_DIR = "nodes", "nodes/revoked"
NODE_KEY, NODE_PUB = "node/auth.key", "node/auth.pub"
HE_DIR, STATE_DIR, FLWR_DIR = "he", "state", "flwr"


class DeployError(ValueError):
    """A deployment folder, certificate, key or setting that is wrong, with what to do."""


def site_dir(root: str | Path, k: int) -> Path:
    return Path(root) / f"site-{int(k)}"


_HOST = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                   r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def canonical_host(host: str) -> str:
    """``host`` as it goes into the certificate and the manifest: an IP address in its
    canonical form (``0:0:0:0:0:0:0:1`` -> ``::1``), a DNS name lower-cased.

    Raises
    ------
    DeployError
        ``host`` is neither an IP address nor a DNS name, or its labels are all numeric
        without it being a valid IP address (``10.0.0.256``).
    """
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOST.match(host):
        raise DeployError(f"--coordinator {host!r} is neither a host name nor an IP address "
                          "(no scheme or port: `hospital-a.example.org` or `10.0.0.5`; the "
                          "port is --port)")
    if all(label.isdigit() for label in host.split(".")):
        raise DeployError(f"--coordinator {host!r} is not a valid IP address (an IPv4 address "
                          "is four numbers 0-255, `10.0.0.5`) and not a host name (its labels "
                          "are all numeric): correct it")
    return host.lower()


def parse_hosts(text: str | list[str] | None) -> list[str]:
    """The coordinator's host names and addresses (comma-separated), checked and in the
    canonical form of :func:`canonical_host`, without duplicates."""
    if text is None:
        return list(DEFAULT_HOSTS)
    items = text if isinstance(text, list) else text.split(",")
    hosts = [h.strip() for h in items if h.strip()]
    if not hosts:
        raise DeployError("--coordinator is empty: give the SuperLink's host name or address "
                          "(several separated by commas)")
    return list(dict.fromkeys(canonical_host(h) for h in hosts))


def address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def _mkdir(path: Path, private: bool = True) -> Path:
    """Create ``path`` (and its parents); ``private``: ``path`` made 0700."""
    path.mkdir(parents=True, exist_ok=True)
    if private:
        os.chmod(path, 0o700)
    return path


def write_flwr_config(coordinator: Path, superlink: str, ca_path: Path | None) -> Path:
    """``coordinator/flwr/config.toml``: Flower's connection ``fedface`` to the SuperLink
    (``flwr run . fedface`` with ``FLWR_HOME=coordinator/flwr``). Flower needs the CA's
    absolute path; ``fedface deploy superlink`` rewrites it where the folder now is."""
    conn: dict = {"address": superlink}
    if ca_path is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(ca_path).resolve())
    doc = {"superlink": {"default": CONNECTION, CONNECTION: conn}}
    path = _mkdir(Path(coordinator) / FLWR_DIR) / "config.toml"
    atomic_write_text(path, tomli_w.dumps(doc))
    return path


def _iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(rows: list[tuple[str, str, str]]) -> str:
    """A Markdown table of (file, what, secret?) rows, for the READMEs."""
    lines = ["| file | what | secret? |", "|---|---|---|"]
    return "\n".join(lines + [f"| {f} | {what} | {secret} |" for f, what, secret in rows])


_COORDINATOR_README = """# fedface coordinator ({id})

This folder runs the federation's SuperLink: `fedface deploy superlink {folder}`.

""" + _table([
    ("`tls/server.key`", "the SuperLink's TLS private key",
     "**yes**: owner-only, never copy it elsewhere"),
    ("`tls/server.crt`", "its certificate, for {names}", "no"),
    ("`tls/ca.crt`", "the deployment's CA certificate", "no"),
    ("`nodes/site-K.pub`", "each site's node authentication public key, registered at start",
     "no"),
    ("`he/sign.key`", "the server's own signing key (Ed25519): signs the aggregates the sites "
     "decrypt", "**yes**: owner-only, never copy it elsewhere"),
    ("`he/bundle.json`", "the server's HE bundle: parameters and every site's public signing "
     "key; no secret key (the server can add encrypted updates, never decrypt them, and "
     "cannot sign one in a site's name)", "keep it owner-only (public keys only)"),
    ("`flwr/config.toml`",
     "Flower's connection `fedface`: `FLWR_HOME={folder}/flwr flwr run . fedface`", "no"),
    ("`deployment.json`", "the public manifest: fingerprints and expiry dates", "no"),
    ("`state/`", "the SuperLink's database (node registrations, runs), made at start",
     "keep it"),
]) + """

A site's key is revoked with `fedface deploy revoke {folder} --site K`.
"""

_SITE_README = """# fedface site {k} ({id})

This folder runs site {k}'s SuperNode: `fedface deploy supernode {folder} --data PATH`.

""" + _table([
    ("`node/auth.key`", "this site's node authentication private key (the SuperLink admits "
     "only registered keys)", "**yes**: owner-only, never copy it elsewhere"),
    ("`node/auth.pub`", "its public key (the coordinator holds a copy)", "no"),
    ("`he/secret.key`", "the HE secret key shared by the sites: decrypts the aggregates",
     "**yes**: owner-only"),
    ("`he/sign.key`", "this site's own signing key (Ed25519): signs its encrypted updates; "
     "nobody else, the coordinator included, holds it", "**yes**: owner-only"),
    ("`he/bundle.json`", "this site's HE bundle: parameters, its index {k}, every site's and "
     "the server's public signing key", "keep it owner-only (public keys only)"),
    ("`tls/ca.crt`", "the deployment's CA: the only root this node trusts for the SuperLink",
     "no"),
    ("`site.json`", "this site's index and the coordinator's address", "no"),
    ("`deployment.json`", "the public manifest: fingerprints and expiry dates", "no"),
    ("`state/`", "the privacy ledger and this site's saved heads, made when it runs",
     "keep it: the ledger is the site's record of the privacy it spent"),
]) + """

The face data never enters this folder: `--data` names the site's prepared data file
(`fedface prepare --data FOLDER --clients 1` writes it).
"""

_CA_README = """# fedface deployment CA ({id})

`ca.key` signs the SuperLink's certificate. **Keep it offline** (it is needed only to
issue new certificates, with `fedface deploy init --force`); anyone holding it can
impersonate the SuperLink to every site. `ca.crt` is public: every folder has a copy.
"""


@dataclass
class Provisioned:
    """What :func:`init_deployment` wrote."""

    root: Path
    manifest: dict

    @property
    def coordinator(self) -> Path:
        return self.root / COORDINATOR_DIR

    def site(self, k: int) -> Path:
        return site_dir(self.root, k)


def _is_site_leftover(p: Path) -> bool:
    """Whether ``p`` (a ``site-*`` entry of ``--out``) is, or may be, a site folder of a
    previous (possibly interrupted) ``init``: a link (never followed), or a folder holding
    what ``init`` writes there (``site.json``, ``deployment.json``, ``node/``, ``he/``,
    ``tls/``)."""
    if p.is_symlink():
        return True
    return p.is_dir() and any(os.path.lexists(p / f)
                              for f in (SITE_FILE, MANIFEST, "node", HE_DIR, "tls"))


def _leftovers(out: Path) -> list[str]:
    """What a previous ``init`` left in ``out`` besides its manifest (sorted names)."""
    if not out.is_dir():
        return []
    found = [n for n in (CA_DIR, COORDINATOR_DIR, QUERIER_DIR) if os.path.lexists(out / n)]
    return found + sorted(p.name for p in out.glob("site-*") if _is_site_leftover(p))


def _clear(out: Path) -> None:
    """Remove a previous provisioning's folders (those ``init`` makes, nothing else); a
    link is removed itself, never followed."""
    names = [CA_DIR, COORDINATOR_DIR, QUERIER_DIR, MANIFEST, ".ceremony"]
    names += [p.name for p in out.glob("site-*") if _is_site_leftover(p)]
    for name in names:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif os.path.lexists(p):
            p.unlink()


def init_deployment(out: str | Path, sites: int, hosts: list[str] | str | None = None,
                    port: int = DEFAULT_PORT, days: int = 365, force: bool = False,
                    he_params=None) -> Provisioned:
    """Provision a deployment of ``sites`` sites into ``out``.

    Parameters
    ----------
    out : path
        The folder to write: created 0700 if it does not exist (an existing folder keeps
        its mode); ``ca/``, ``coordinator/`` and the ``site-K/`` are 0700.
    sites : int
        Number of sites (SuperNodes); at least 2.
    hosts : list of str or comma-separated str, optional
        The coordinator's host names and addresses: they go into the SuperLink's
        certificate, the first one into every site's SuperLink address. Default
        ``localhost,127.0.0.1``.
    port : int
        The SuperLink's port (Flower's Fleet, Control and Runtime APIs share it).
    days : int
        Validity of the CA and the SuperLink certificate.
    force : bool
        Replace a deployment already in ``out`` (its keys and certificates are lost).
    he_params : crypto.context.HEParams, optional
        Parameters of the HE key ceremony (its defaults otherwise).
    """
    out = Path(out)
    if isinstance(sites, bool) or not isinstance(sites, int) or sites < 2:
        raise DeployError(f"--sites {sites!r}: a federation needs at least 2 sites")
    if not 1 <= int(port) <= 65535:
        raise DeployError(f"--port {port}: not a TCP port (1-65535)")
    if not 1 <= int(days) <= 3650:
        raise DeployError(f"--days {days}: certificates are issued for 1 to 3650 days")
    hosts = parse_hosts(hosts)
    if (out / MANIFEST).exists() and not force:
        try:
            old = json.loads((out / MANIFEST).read_text())
            what = f" (deployment {old.get('id')}, created {old.get('created')})"
        except (OSError, ValueError):
            what = ""
        raise DeployError(f"{out} already holds a deployment{what}: refusing to overwrite its "
                          "keys and certificates; pass --force to replace it (every site then "
                          "needs its new folder), or choose another --out")
    if out.exists() and not out.is_dir():
        raise DeployError(f"--out {out} is a file, not a folder")
    left = _leftovers(out)
    if left and not force:
        raise DeployError(f"{out} is already provisioned (possibly interrupted: "
                          f"{', '.join(left)} without a complete {MANIFEST}): refusing to "
                          "write over it; pass --force to replace it, or choose another --out")
    _mkdir(out, private=not out.exists())  # an existing folder (`--out .`) keeps its mode
    if force:
        _clear(out)
    dep_id = secrets.token_hex(4)
    superlink = address(hosts[0], int(port))
    ca_dir = _mkdir(out / CA_DIR)
    ca = pki.make_ca(ca_dir / "ca.crt", ca_dir / "ca.key", f"fedface deployment {dep_id} CA", days)
    atomic_write_text(ca_dir / "README.md", _CA_README.format(id=dep_id))
    coord = _mkdir(out / COORDINATOR_DIR)
    _mkdir(coord / "tls")
    shutil.copyfile(ca_dir / "ca.crt", coord / TLS_CA)
    server = pki.issue_server_cert(ca_dir / "ca.crt", ca_dir / "ca.key", coord / TLS_CERT,
                                   coord / TLS_KEY, hosts, days)
    _mkdir(coord / NODES_DIR, private=False)
    _mkdir(coord / STATE_DIR)  # the SuperLink's database: the printed lines run by hand
    # The HE key ceremony, then each bundle moved to its recipient's folder.
    ceremony = out / ".ceremony"
    shutil.rmtree(ceremony, ignore_errors=True)
    try:
        he_desc = init_keys(ceremony, sites, he_params)
        shutil.move(str(ceremony / SERVER_DIR), str(coord / HE_DIR))
        shutil.move(str(ceremony / QUERIER_DIR), str(out / QUERIER_DIR))  # the analyst's
        shutil.copyfile(ceremony / KEY_FILE, out / QUERIER_DIR / KEY_FILE)
        nodes = {}
        for k in range(sites):
            site = _mkdir(site_dir(out, k))
            _mkdir(site / "tls", private=False)
            _mkdir(site / STATE_DIR)  # the privacy ledger, saved heads
            shutil.copyfile(ca_dir / "ca.crt", site / TLS_CA)
            fp = pki.make_node_key(site / NODE_KEY, site / NODE_PUB)
            shutil.copyfile(site / NODE_PUB, coord / NODES_DIR / f"site-{k}.pub")
            shutil.move(str(institution_dir(ceremony, k)), str(site / HE_DIR))
            nodes[str(k)] = {"fingerprint": fp, "folder": f"site-{k}"}
    finally:
        shutil.rmtree(ceremony, ignore_errors=True)
    ca_info, server_info = pki.cert_info(ca), pki.cert_info(server)
    manifest = {
        "format": FORMAT, "id": dep_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sites": sites,
        "coordinator": {"hosts": hosts, "port": int(port), "superlink": superlink},
        "ca": {"fingerprint": ca_info.fingerprint, "subject": ca_info.subject,
               "not_after": _iso(ca_info.not_after)},
        "superlink_cert": {"fingerprint": server_info.fingerprint, "names": list(server_info.names),
                           "not_after": _iso(server_info.not_after)},
        "nodes": nodes,
        "he": {k: he_desc[k] for k in ("fingerprint", "generation", "clients", "scheme")},
    }
    text = json.dumps(manifest, indent=1)
    for folder in [coord] + [site_dir(out, k) for k in range(sites)]:
        atomic_write_text(folder / MANIFEST, text)
    write_flwr_config(coord, superlink, coord / TLS_CA)
    atomic_write_text(coord / "README.md", _COORDINATOR_README.format(
        id=dep_id, folder=coord, names=", ".join(hosts)))
    for k in range(sites):
        site = site_dir(out, k)
        atomic_write_text(site / SITE_FILE, json.dumps({"site": k, "superlink": superlink,
                                                        "deployment": dep_id}, indent=1))
        atomic_write_text(site / "README.md", _SITE_README.format(k=k, id=dep_id, folder=site))
    atomic_write_text(out / QUERIER_DIR / "README.md", _QUERIER_README.format(id=dep_id))
    atomic_write_text(out / MANIFEST, text)  # last: it marks a finished provisioning
    return Provisioned(out, manifest)


_QUERIER_README = """# Analytics querier of deployment {id}

For the analyst who asks encrypted statistics across the sites, on the analyst's own
machine (not the coordinator: a query names the key its answer is encrypted under, so
whoever signs queries can read answers).

| file | what | secret? |
|---|---|---|
| `sign.key` | the querier's signing key (Ed25519): sites answer only what it signed | **yes** |
| `key.json` | the key ceremony's public description (every public signing key) | no |

`fedface query-request "count group by sex" --schema SCHEMA.json --keys querier --out q`
makes a fresh key pair for one query and the signed `q/request.json` for the coordinator;
`fedface query-open q analytics-total.json` reads the answer the query job wrote.
"""


def read_manifest(folder: str | Path) -> dict:
    """The ``deployment.json`` of a provisioning root, coordinator or site folder."""
    path = Path(folder) / MANIFEST
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise DeployError(f"{folder} is not a fedface deployment folder (no {MANIFEST}): pass "
                          "the folder `fedface deploy init` wrote (DIR, DIR/coordinator or "
                          "DIR/site-K)") from None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise DeployError(f"{path} cannot be read as JSON ({err}): copy it again from the "
                          "provisioning folder") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DeployError(f"{path} is not a {FORMAT} manifest: copy it again from the "
                          "provisioning folder")
    return doc


def folder_kind(folder: str | Path) -> str:
    """``root``, ``coordinator`` or ``site`` (what ``fedface deploy init`` made there)."""
    folder = Path(folder)
    read_manifest(folder)
    if (folder / SITE_FILE).exists():
        return "site"
    if (folder / TLS_KEY).exists() or (folder / NODES_DIR).is_dir():
        return "coordinator"
    return "root"


def read_site(folder: str | Path) -> int:
    """A site folder's index (``site.json``)."""
    path = Path(folder) / SITE_FILE
    try:
        k = json.loads(path.read_text())["site"]
    except FileNotFoundError:
        raise DeployError(f"{folder} is not a site folder (no {SITE_FILE}): pass DIR/site-K "
                          "from `fedface deploy init`") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DeployError(f"{path} is damaged ({err}): copy the site folder again") from None
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise DeployError(f"{path}: 'site' must be a non-negative integer, found {k!r}")
    return k


def describe(folder: str | Path, now: dt.datetime | None = None) -> dict:
    """What ``fedface deploy show`` prints: every certificate and key in reach of
    ``folder`` with its fingerprint, expiry and holder; nothing secret.

    Raises
    ------
    DeployError
        ``folder`` is not a deployment folder, or a certificate, public key or HE bundle
        in it is damaged (the message names the file).
    """
    try:
        return _describe(Path(folder), now)
    except KeyFileError as err:  # PKIError, KeyBundleError: they name the file
        raise DeployError(str(err)) from None


def _describe(folder: Path, now: dt.datetime | None) -> dict:
    manifest = read_manifest(folder)
    kind = folder_kind(folder)
    now = now or dt.datetime.now(dt.UTC)
    rows: list[dict] = []

    def row(item: str, holder: str, path: Path, fingerprint: str, secret: str,
            info: pki.CertInfo | None = None) -> None:
        rows.append({"item": item, "holder": holder, "file": str(path.relative_to(folder)),
                     "fingerprint": fingerprint, "secret": secret,
                     "expires": _iso(info.not_after) if info else "",
                     "days_left": round(info.days_left(now), 1) if info else None,
                     "names": ", ".join(info.names) if info else ""})

    def cert_row(item: str, holder: str, path: Path, secret: str) -> None:
        if path.exists():
            info = pki.cert_info(pki.load_cert(path))
            row(item, holder, path, info.fingerprint, secret, info)

    def node_row(k: str, path: Path, holder: str, secret: str, status: str = "") -> None:
        fp = pki.public_key_fingerprint(pki.node_public_key(path))
        row(f"node key, site {k}" + (f" ({status})" if status else ""), holder, path, fp, secret)

    def he_row(path: Path, holder: str, secret: str) -> None:
        if path.exists():
            desc = describe_keys(path)
            row(f"HE bundle, generation {desc['generation']}", holder, path, desc["fingerprint"],
                secret)

    if kind == "root":
        cert_row("CA certificate", "provisioner", folder / CA_DIR / "ca.crt", "ca/ca.key (offline)")
    coords = [folder] if kind == "coordinator" else ([folder / COORDINATOR_DIR]
                                                      if kind == "root" else [])
    for c in coords:
        if kind == "coordinator":
            cert_row("CA certificate", "coordinator", c / TLS_CA, "")
        cert_row("SuperLink certificate", "coordinator", c / TLS_CERT, "tls/server.key")
        he_row(c / HE_DIR, "coordinator", "he/sign.key (its own), no HE secret key")
        for pub in sorted((c / NODES_DIR).glob("site-*.pub")):
            node_row(pub.stem.split("-", 1)[1], pub, "coordinator", "", status="active")
        for pub in sorted((c / REVOKED_DIR).glob("site-*.pub")):
            node_row(pub.stem.split("-", 1)[1], pub, "coordinator", "", status="revoked")
    sites = ([folder] if kind == "site" else
             sorted(folder.glob("site-*"), key=lambda p: p.name) if kind == "root" else [])
    for s in sites:
        if not (s / SITE_FILE).exists():
            continue
        k = read_site(s)
        holder = f"site {k}"
        if kind == "site":
            cert_row("CA certificate", holder, s / TLS_CA, "")
        if (s / NODE_PUB).exists():
            node_row(str(k), s / NODE_PUB, holder, "node/auth.key")
        he_row(s / HE_DIR, holder, "he/secret.key (shared), he/sign.key (its own)")
    return {"kind": kind, "manifest": manifest, "rows": rows}
