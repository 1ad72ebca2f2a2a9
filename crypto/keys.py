"""The key ceremony: one secret key shared by the institutions, nothing secret on the server.

``fedface keys init --out DIR --clients N`` writes::

    DIR/key.json                               public description: parameters,
                                               generation, fingerprint, institutions
    DIR/institutions/client_K/bundle.json      institution K's bundle: parameters,
                                               fingerprint, its index K, server MAC key
    DIR/institutions/client_K/secret.key       the BFV secret key (shared by the institutions)
    DIR/institutions/client_K/mac.key          institution K's own MAC key, and no other
    DIR/server/bundle.json                     server bundle: parameters, fingerprint,
                                               every institution's MAC key, and no secret
                                               key: the server can add, never decrypt

(K = 000 .. N-1, three digits.) Institution K is handed ``DIR/institutions/client_K/``
and nothing else; the server ``DIR/server/``. An institution therefore holds no other
institution's MAC key and cannot sign an update in another's name. In simulation both
sides read DIR itself (:func:`load_client_keys` picks ``institutions/client_K``); in a
deployment a node's ``he-keys`` names its own folder.

Key files are created owner-only (0600, folders 0700) and refused when they are
symbolic links, are not owned by the current user, or others can read them. The
fingerprint (a hash of the parameters, the secret key and the generation) is in every
bundle and in every envelope, so a node holding another ceremony's keys is named at
once. ``fedface keys rotate DIR`` retires the current generation to
``DIR/retired/gen-G`` and makes generation G+1 with the same parameters.

The MAC keys authenticate envelopes (HMAC-SHA256): institution K signs its updates (and
its join, which binds its Flower node to index K) with its own key, which the server
checks; the server signs aggregates with the server key, which institutions check.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from crypto.context import HEContext, HEParams
from crypto.keyfile import KeyFileError, read_private, write_private

KEY_FILE = "key.json"
INSTITUTIONS_DIR = "institutions"
CLIENT_DIR = "client"  # the layout before per-institution folders (rotated away)
SERVER_DIR = "server"
SECRET_FILE = "secret.key"
BUNDLE_FILE = "bundle.json"
MAC_FILE = "mac.key"


def institution_dir(folder: str | Path, sender: int) -> Path:
    """Institution ``sender``'s folder in a ceremony folder: ``institutions/client_K``."""
    return Path(folder) / INSTITUTIONS_DIR / f"client_{int(sender):03d}"


class KeyBundleError(KeyFileError):
    """A key bundle that is missing, unreadable, insecure or from another ceremony."""


def _write_private(path: Path, data: bytes) -> None:
    write_private(path, data)


def _read_private(path: Path, what: str) -> bytes:
    """The bytes of a key file, checked first (:func:`crypto.keyfile.read_private`)."""
    return read_private(path, what, KeyBundleError,
                        missing="run `fedface keys init --out DIR` and point he-keys at DIR (or, on "
                        "a node, at its own folder DIR/institutions/client_K)")


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
    clients: int = 0  # institutions in the ceremony (its key.json's ``clients``)


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
    if force:  # the previous ceremony's institution folders must not survive next to the new
        shutil.rmtree(out / INSTITUTIONS_DIR, ignore_errors=True)
        shutil.rmtree(out / CLIENT_DIR, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        HEContext.generate_secret_key(params, Path(tmp) / SECRET_FILE)
        secret = (Path(tmp) / SECRET_FILE).read_bytes()
    fp = fingerprint_of(params, secret, generation)
    macs = {k: secrets.token_bytes(32) for k in range(clients)}
    server_mac = secrets.token_bytes(32)
    public = {"scheme": params.scheme, "params": params.to_dict(), "generation": generation,
              "fingerprint": fp, "clients": clients,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for k, key in macs.items():
        d = institution_dir(out, k)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(d.parent, 0o700)
        os.chmod(d, 0o700)
        bundle = {**public, "sender": k, "server_mac": server_mac.hex()}
        _write_private(d / BUNDLE_FILE, json.dumps(bundle, indent=1).encode())
        _write_private(d / SECRET_FILE, secret)
        _write_private(d / MAC_FILE, key.hex().encode())
    server_bundle = {**public, "server_mac": server_mac.hex(),
                     "client_macs": {str(k): v.hex() for k, v in macs.items()}}
    _write_private(out / SERVER_DIR / BUNDLE_FILE, json.dumps(server_bundle, indent=1).encode())
    os.chmod(out / SERVER_DIR, 0o700)
    (out / KEY_FILE).write_text(json.dumps(public, indent=1))
    return public


def handout(folder: str | Path) -> list[tuple[str, Path]]:
    """Who gets which folder of a ceremony: ``[(recipient, folder), ...]``."""
    folder = Path(folder)
    n = int(describe_keys(folder)["clients"])
    return ([(f"institution {k} (he-sender={k})", institution_dir(folder, k)) for k in range(n)]
            + [("the server (no secret key)", folder / SERVER_DIR)])


def rotate_keys(folder: str | Path) -> dict:
    """Retire the current generation and make the next one (same parameters, clients)."""
    folder = Path(folder)
    current = describe_keys(folder)
    gen = int(current["generation"])
    retired = folder / "retired" / f"gen-{gen}"
    retired.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in (KEY_FILE, INSTITUTIONS_DIR, CLIENT_DIR, SERVER_DIR):
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
            if not isinstance(doc, dict):
                raise KeyBundleError(f"{path} is not a fedface key description")
            return {k: v for k, v in doc.items() if k not in ("server_mac", "client_macs")}
    raise KeyBundleError(f"no keys in {folder}: run `fedface keys init --out {folder}`")


def _bundle_dir(folder: Path, sub: str) -> Path:
    return folder / sub if os.path.lexists(folder / sub / BUNDLE_FILE) else folder


def load_client_keys(folder: str | Path, sender: int) -> ClientKeys:
    """Institution ``sender``'s keys.

    ``folder`` is the ceremony folder (simulation: ``institutions/client_K`` is read) or
    the institution's own folder, a copy of ``DIR/institutions/client_K`` (deployment),
    whose bundle must name the same index.
    """
    folder, sender = Path(folder), int(sender)
    d = institution_dir(folder, sender)
    if not os.path.lexists(d / BUNDLE_FILE):  # (a link is refused when read, saying so)
        if os.path.lexists(folder / BUNDLE_FILE):
            d = folder  # a node's own folder
        elif (folder / INSTITUTIONS_DIR).is_dir():
            raise KeyBundleError(f"no keys of institution {sender} in {folder / INSTITUTIONS_DIR}: "
                                 "check he-sender against the ceremony's --clients")
        elif (folder / CLIENT_DIR / BUNDLE_FILE).exists():
            raise KeyBundleError(f"{folder} holds keys of the former layout (every institution's "
                                 "MAC key in client/mac/, readable by every institution): run "
                                 f"`fedface keys rotate {folder}` and hand each institution its "
                                 "own institutions/client_K folder")
    bundle = _read_json(d / BUNDLE_FILE, "client bundle")
    if "client_macs" in bundle:
        raise KeyBundleError(f"{d} holds the server bundle: point the client's he-keys at the "
                             "ceremony folder or at its own institutions/client_K folder")
    owner = bundle.get("sender")
    if not isinstance(owner, int) or isinstance(owner, bool) or owner != sender:
        raise KeyBundleError(f"{d} holds the keys of institution {owner!r}, not of institution "
                             f"{sender}: set he-sender={owner} or use institution {sender}'s folder")
    params = HEParams(**bundle["params"])
    secret = _read_private(d / SECRET_FILE, "secret key")
    fp = fingerprint_of(params, secret, int(bundle["generation"]))
    if fp != bundle["fingerprint"]:
        raise KeyBundleError(f"{d / SECRET_FILE} does not belong to this bundle (fingerprint {fp}, "
                             f"bundle says {bundle['fingerprint']}): copy both files from one "
                             "ceremony")
    mac_path = d / MAC_FILE
    mac = _hex_key(_read_private(mac_path, f"MAC key of institution {sender}"), str(mac_path))
    return ClientKeys(context=HEContext(params, secret_key=secret), fingerprint=fp,
                      generation=int(bundle["generation"]), sender=sender, mac_key=mac,
                      server_mac_key=_hex_key(bundle["server_mac"], f"{d / BUNDLE_FILE} server_mac"),
                      clients=int(bundle.get("clients", 0)))


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
