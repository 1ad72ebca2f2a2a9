"""The key ceremony: one secret key shared by the institutions, nothing secret on the server.

``fedface keys init --out DIR --clients N`` writes::

    DIR/key.json                 public description: parameters, generation, fingerprint
    DIR/client/bundle.json       client bundle: parameters, fingerprint, server MAC key
    DIR/client/secret.key        the BFV secret key (every institution gets a copy)
    DIR/client/mac/client_K.key  institution K's own MAC key (K = 0 .. N-1)
    DIR/server/bundle.json       server bundle: parameters, fingerprint, all MAC keys,
                                 and no secret key: the server can add, never decrypt

Key files are created owner-only (0600, folders 0700) and refused when others can read
them. The fingerprint (a hash of the parameters, the secret key and the generation)
is in both bundles and in every envelope, so a node holding another ceremony's keys is
named at once. ``fedface keys rotate DIR`` retires the current generation to
``DIR/retired/gen-G`` and makes generation G+1 with the same parameters.

The MAC keys authenticate envelopes (HMAC-SHA256): institution K signs its updates with
its own key, which the server checks; the server signs aggregates with the server key,
which institutions check.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from crypto.context import HEContext, HEParams

KEY_FILE = "key.json"
CLIENT_DIR = "client"
SERVER_DIR = "server"
SECRET_FILE = "secret.key"
BUNDLE_FILE = "bundle.json"


class KeyBundleError(ValueError):
    """A key bundle that is missing, unreadable, insecure or from another ceremony."""


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _read_private(path: Path, what: str) -> bytes:
    if not path.exists():
        raise KeyBundleError(f"{what} {path} is missing: run `fedface keys init --out DIR` and point "
                        "he-keys at DIR (or, on a node, at its copy of DIR/client)")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyBundleError(f"{what} {path} is readable by other users (mode {oct(mode)}): run "
                        f"`chmod 600 {path}`")
    return path.read_bytes()


def _read_json(path: Path, what: str) -> dict:
    raw = _read_private(path, what)  # missing or insecure: its own message
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise KeyBundleError(f"{what} {path} is not valid JSON (truncated or edited): copy "
                             "it again from the key ceremony's folder") from None
    if not isinstance(doc, dict) or "params" not in doc or "fingerprint" not in doc:
        raise KeyBundleError(f"{what} {path} is not a fedface key bundle")
    return doc


def _hex_key(text: str | bytes, where: str) -> bytes:
    try:
        key = bytes.fromhex(text.decode() if isinstance(text, bytes) else text)
    except (ValueError, UnicodeDecodeError):
        key = b""
    if len(key) != 32:
        raise KeyBundleError(f"{where} is not a 32-byte hex MAC key (truncated or edited): copy "
                             "it again from the key ceremony's folder")
    return key


def fingerprint_of(params: HEParams, secret: bytes, generation: int) -> str:
    h = hashlib.sha256(f"{params.digest()}|{generation}|".encode() + hashlib.sha256(secret).digest())
    hexd = h.hexdigest()[:16]
    return ":".join(hexd[i:i + 4] for i in range(0, 16, 4))


@dataclass
class ClientKeys:
    """What an institution holds: the secret context and its own MAC key."""

    context: HEContext
    fingerprint: str
    generation: int
    sender: int
    mac_key: bytes
    server_mac_key: bytes


@dataclass
class ServerKeys:
    """What the server holds: parameters (no secret key) and the MAC keys."""

    context: HEContext
    fingerprint: str
    generation: int
    mac_keys: dict[int, bytes]
    server_mac_key: bytes


def init_keys(out: str | Path, clients: int, params: HEParams | None = None,
              generation: int = 1, force: bool = False) -> dict:
    """Run the ceremony into ``out``; returns the public description (``key.json``)."""
    out = Path(out)
    params = params or HEParams()
    if clients < 1:
        raise KeyBundleError(f"--clients {clients}: the ceremony needs at least one institution")
    if (out / KEY_FILE).exists() and not force:
        raise KeyBundleError(f"{out} already holds keys (generation "
                        f"{json.loads((out / KEY_FILE).read_text())['generation']}): use "
                        "`fedface keys rotate` for a new generation, or another folder")
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    sk_path = out / CLIENT_DIR / SECRET_FILE
    sk_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = sk_path.with_name("secret.tmp")
    HEContext.generate_secret_key(params, tmp)
    _write_private(sk_path, tmp.read_bytes())
    tmp.unlink()
    secret = sk_path.read_bytes()
    fp = fingerprint_of(params, secret, generation)
    macs = {k: secrets.token_bytes(32) for k in range(clients)}
    server_mac = secrets.token_bytes(32)
    public = {"scheme": params.scheme, "params": params.to_dict(), "generation": generation,
              "fingerprint": fp, "clients": clients,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    client_bundle = {**public, "server_mac": server_mac.hex()}
    _write_private(out / CLIENT_DIR / BUNDLE_FILE, json.dumps(client_bundle, indent=1).encode())
    for k, key in macs.items():
        _write_private(out / CLIENT_DIR / "mac" / f"client_{k:03d}.key", key.hex().encode())
    server_bundle = {**public, "server_mac": server_mac.hex(),
                     "client_macs": {str(k): v.hex() for k, v in macs.items()}}
    _write_private(out / SERVER_DIR / BUNDLE_FILE, json.dumps(server_bundle, indent=1).encode())
    (out / KEY_FILE).write_text(json.dumps(public, indent=1))
    return public


def rotate_keys(folder: str | Path) -> dict:
    """Retire the current generation and make the next one (same parameters, clients)."""
    folder = Path(folder)
    current = describe_keys(folder)
    gen = int(current["generation"])
    retired = folder / "retired" / f"gen-{gen}"
    retired.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in (KEY_FILE, CLIENT_DIR, SERVER_DIR):
        if (folder / name).exists():
            shutil.move(str(folder / name), str(retired / name))
    return init_keys(folder, int(current["clients"]), HEParams(**current["params"]),
                     generation=gen + 1)


def describe_keys(folder: str | Path) -> dict:
    """The public description of the keys in ``folder`` (``key.json`` or a bundle)."""
    folder = Path(folder)
    for path in (folder / KEY_FILE, folder / BUNDLE_FILE):
        if path.exists():
            try:
                doc = json.loads(path.read_bytes())
            except (ValueError, UnicodeDecodeError):
                raise KeyBundleError(f"{path} is not valid JSON (truncated or edited)") from None
            return {k: v for k, v in doc.items() if k not in ("server_mac", "client_macs")}
    raise KeyBundleError(f"no keys in {folder}: run `fedface keys init --out {folder}`")


def _bundle_dir(folder: Path, sub: str) -> Path:
    return folder / sub if (folder / sub / BUNDLE_FILE).exists() else folder


def load_client_keys(folder: str | Path, sender: int) -> ClientKeys:
    """An institution's keys: ``folder`` is the ceremony folder or its copy of ``client/``."""
    d = _bundle_dir(Path(folder), CLIENT_DIR)
    bundle = _read_json(d / BUNDLE_FILE, "client bundle")
    if "client_macs" in bundle:
        raise KeyBundleError(f"{d} holds the server bundle: point the client's he-keys at the "
                        "ceremony's client/ folder")
    params = HEParams(**bundle["params"])
    secret = _read_private(d / SECRET_FILE, "secret key")
    fp = fingerprint_of(params, secret, int(bundle["generation"]))
    if fp != bundle["fingerprint"]:
        raise KeyBundleError(f"{d / SECRET_FILE} does not belong to this bundle (fingerprint {fp}, "
                        f"bundle says {bundle['fingerprint']}): copy both files from one ceremony")
    mac_path = d / "mac" / f"client_{int(sender):03d}.key"
    if not mac_path.exists() and (d / "mac.key").exists():
        mac_path = d / "mac.key"  # a deployment copy holding only this institution's key
    mac = _hex_key(_read_private(mac_path, f"MAC key of institution {sender}"), str(mac_path))
    return ClientKeys(context=HEContext(params, d / SECRET_FILE), fingerprint=fp,
                      generation=int(bundle["generation"]), sender=int(sender), mac_key=mac,
                      server_mac_key=_hex_key(bundle["server_mac"], f"{d / BUNDLE_FILE} server_mac"))


def load_server_keys(folder: str | Path) -> ServerKeys:
    """The server's keys: parameters and MAC keys only; a secret key is never read."""
    d = _bundle_dir(Path(folder), SERVER_DIR)
    bundle = _read_json(d / BUNDLE_FILE, "server bundle")
    if "client_macs" not in bundle:
        raise KeyBundleError(f"{d} holds a client bundle: the server needs the ceremony's server/ "
                        "folder (it must never hold the secret key)")
    params = HEParams(**bundle["params"])
    return ServerKeys(context=HEContext(params), fingerprint=bundle["fingerprint"],
                      generation=int(bundle["generation"]),
                      mac_keys={int(k): _hex_key(v, f"{d / BUNDLE_FILE} key of client {k}")
                                for k, v in bundle["client_macs"].items()},
                      server_mac_key=_hex_key(bundle["server_mac"], f"{d / BUNDLE_FILE} server_mac"))
