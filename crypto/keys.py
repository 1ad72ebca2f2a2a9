"""The key ceremony: one secret key shared by the institutions, nothing secret on the server.

``fedface keys init --out DIR --clients N`` writes::

    DIR/key.json                               public description: parameters,
                                               generation, fingerprint, institutions,
                                               every public signing key
    DIR/institutions/client_K/bundle.json      institution K's bundle: parameters,
                                               fingerprint, its index K, every public
                                               signing key (the institutions' and the server's)
    DIR/institutions/client_K/secret.key       the BFV secret key (shared by the institutions)
    DIR/institutions/client_K/sign.key         institution K's own Ed25519 private key
    DIR/server/bundle.json                     server bundle: parameters, fingerprint,
                                               every public signing key, and no secret
                                               key: the server can add, never decrypt
    DIR/server/sign.key                        the server's own Ed25519 private key
    DIR/querier/sign.key                       the analytics querier's Ed25519 private key:
                                               sites answer only queries it signed

(K = 000 .. N-1, three digits.) Institution K is handed ``DIR/institutions/client_K/``
and nothing else; the server ``DIR/server/``; the analyst who asks encrypted analytics
queries ``DIR/querier/`` (not the server: a query names the key its answer is encrypted
under, so whoever signs queries can read answers). In simulation both sides read DIR itself
(:func:`load_client_keys` picks ``institutions/client_K``); in a deployment a node's
``he-keys`` names its own folder.

Key files are created owner-only (0600, folders 0700) and refused when they are
symbolic links, are not owned by the current user, or others can read them. The
fingerprint (a hash of the parameters, the secret key and the generation) is in every
bundle and in every envelope, so a node holding another ceremony's keys is named at
once. ``fedface keys rotate DIR`` retires the current generation to
``DIR/retired/gen-G`` and makes generation G+1 with the same parameters and new signing
key pairs.

Signatures (:mod:`crypto.signing`, Ed25519) authenticate envelopes: institution K signs
its updates (and its join, which binds its Flower node to index K) with its own private
key, which everyone checks with K's public key; the server signs aggregates with its
own private key. Every private key is held by its owner alone, so the server cannot
forge an institution's update, nor an institution the server's aggregate or another
institution's update. The former layout (HMAC keys: ``mac.key`` files, and a server
bundle holding every institution's MAC key) is refused, saying to rotate.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from crypto.context import HEContext, HEParams
from crypto.keyfile import KeyFileError, read_private, write_private
from crypto.signing import (
    key_fingerprint,
    new_signing_key,
    public_from_hex,
    public_hex,
    read_signing_key,
    write_signing_key,
)

KEY_FILE = "key.json"
INSTITUTIONS_DIR = "institutions"
CLIENT_DIR = "client"  # the layout before per-institution folders (rotated away)
SERVER_DIR = "server"
SECRET_FILE = "secret.key"
BUNDLE_FILE = "bundle.json"
SIGN_FILE = "sign.key"
SIGN_PUBLIC = "sign_public"  # bundle field: {"0": hex, ..., "server": hex}
SERVER = "server"  # the server's entry in SIGN_PUBLIC (and an aggregate's sender)
QUERIER = "querier"  # the analytics querier's entry in SIGN_PUBLIC
QUERIER_DIR = "querier"
MAC_FILE = "mac.key"  # the former HMAC layout (refused: rotate)
_MAC_FIELDS = ("server_mac", "client_macs")  # its bundle fields


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


def _refuse_mac_layout(d: Path, bundle: dict | None, ceremony: Path) -> None:
    """Refuse a bundle folder of the former HMAC layout, saying to rotate."""
    old = (bundle is not None and any(f in bundle for f in _MAC_FIELDS)) or (
        os.path.lexists(d / MAC_FILE) and not os.path.lexists(d / SIGN_FILE))
    if old:
        where = str(ceremony) if (ceremony / KEY_FILE).exists() else "DIR"
        raise KeyBundleError(f"{d} holds keys of the former layout (symmetric MAC keys, with "
                             "which the server could sign any institution's update): run "
                             f"`fedface keys rotate {where}` on the key ceremony's folder and hand "
                             "out its new folders (each signs with its own Ed25519 key)")


def _public_keys(bundle: dict, path: Path) -> tuple[dict[int, Ed25519PublicKey], Ed25519PublicKey]:
    """The institutions' and the server's public signing keys of a bundle."""
    table = bundle.get(SIGN_PUBLIC)
    if not isinstance(table, dict) or SERVER not in table:
        raise KeyBundleError(f"{path} lists no public signing keys ({SIGN_PUBLIC!r}): copy it "
                             "again from the key ceremony's folder")
    keys: dict[int, Ed25519PublicKey] = {}
    for name, text in table.items():
        if name in (SERVER, QUERIER):
            continue
        if not name.isdigit():
            raise KeyBundleError(f"{path}: {SIGN_PUBLIC} entry {name!r} is neither an "
                                 "institution's index nor 'server'")
        keys[int(name)] = public_from_hex(text, f"{path} public signing key of institution {name}",
                                          error=KeyBundleError)
    return keys, public_from_hex(table[SERVER], f"{path} public signing key of the server",
                                 error=KeyBundleError)


def _own_key(path: Path, public: Ed25519PublicKey, who: str) -> Ed25519PrivateKey:
    """The private signing key in ``path``, which must match ``who``'s public key."""
    key = read_signing_key(path, error=KeyBundleError,
                           missing="copy it from the key ceremony's folder with its bundle")
    if public_hex(key) != public_hex(public):
        raise KeyBundleError(f"{path} is not the signing key of {who} in this bundle (key "
                             f"{key_fingerprint(key)}, the bundle lists {key_fingerprint(public)}):"
                             " copy both files from one ceremony")
    return key


def fingerprint_of(params: HEParams, secret: bytes, generation: int) -> str:
    h = hashlib.sha256(f"{params.digest()}|{generation}|".encode() + hashlib.sha256(secret).digest())
    hexd = h.hexdigest()[:16]
    return ":".join(hexd[i:i + 4] for i in range(0, 16, 4))


@dataclass
class ClientKeys:
    """What an institution holds: the secret context, its own private signing key and
    every public signing key.

    Attributes
    ----------
    sign_key : Ed25519PrivateKey
        Its own private key: signs its updates and its join proof.
    verify_keys : dict of int to Ed25519PublicKey
        Every institution's public key, by index (its own included).
    server_verify_key : Ed25519PublicKey
        The server's public key: aggregates must carry its signature.
    """

    context: HEContext
    fingerprint: str
    generation: int
    sender: int
    sign_key: Ed25519PrivateKey
    verify_keys: dict[int, Ed25519PublicKey]
    server_verify_key: Ed25519PublicKey
    clients: int = 0  # institutions in the ceremony (its key.json's ``clients``)
    querier_verify_key: Ed25519PublicKey | None = None  # None: a ceremony without a querier


@dataclass
class ServerKeys:
    """What the server holds: parameters (no secret key), its own private signing key and
    the institutions' public keys.

    Attributes
    ----------
    sign_key : Ed25519PrivateKey
        The server's private key: signs aggregates.
    verify_keys : dict of int to Ed25519PublicKey
        Every institution's public key, by index: updates and join proofs are checked
        with them. The server holds no institution's private key.
    """

    context: HEContext
    fingerprint: str
    generation: int
    sign_key: Ed25519PrivateKey
    verify_keys: dict[int, Ed25519PublicKey]


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
    if force:  # the previous ceremony's folders must not survive next to the new
        for name in (INSTITUTIONS_DIR, CLIENT_DIR, SERVER_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        HEContext.generate_secret_key(params, Path(tmp) / SECRET_FILE)
        secret = (Path(tmp) / SECRET_FILE).read_bytes()
    fp = fingerprint_of(params, secret, generation)
    signers = {str(k): new_signing_key() for k in range(clients)}
    signers[SERVER] = new_signing_key()
    signers[QUERIER] = new_signing_key()
    public = {"scheme": params.scheme, "params": params.to_dict(), "generation": generation,
              "fingerprint": fp, "clients": clients,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              SIGN_PUBLIC: {name: public_hex(key) for name, key in signers.items()}}
    for k in range(clients):
        d = institution_dir(out, k)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(d.parent, 0o700)
        os.chmod(d, 0o700)
        bundle = {**public, "role": "institution", "sender": k}
        _write_private(d / BUNDLE_FILE, json.dumps(bundle, indent=1).encode())
        _write_private(d / SECRET_FILE, secret)
        write_signing_key(d / SIGN_FILE, signers[str(k)])
    server_bundle = {**public, "role": SERVER}
    _write_private(out / SERVER_DIR / BUNDLE_FILE, json.dumps(server_bundle, indent=1).encode())
    write_signing_key(out / SERVER_DIR / SIGN_FILE, signers[SERVER])
    os.chmod(out / SERVER_DIR, 0o700)
    (out / QUERIER_DIR).mkdir(exist_ok=True, mode=0o700)
    write_signing_key(out / QUERIER_DIR / SIGN_FILE, signers[QUERIER])
    os.chmod(out / QUERIER_DIR, 0o700)
    (out / KEY_FILE).write_text(json.dumps(public, indent=1))
    return public


def handout(folder: str | Path) -> list[tuple[str, Path]]:
    """Who gets which folder of a ceremony: ``[(recipient, folder), ...]``."""
    folder = Path(folder)
    n = int(describe_keys(folder)["clients"])
    return ([(f"institution {k} (he-sender={k})", institution_dir(folder, k)) for k in range(n)]
            + [("the server (no secret key)", folder / SERVER_DIR)]
            + ([("the analytics querier (signs queries; no secret key)", folder / QUERIER_DIR)]
               if (folder / QUERIER_DIR).is_dir() else []))


def signers(desc: dict) -> list[tuple[str, str, str]]:
    """Who signs with which key in a ceremony: ``[(signer, key fingerprint, private key
    file), ...]``, the institutions' then the server's; public (from :func:`describe_keys`).
    Empty for a description without public signing keys (the former layout)."""
    table = desc.get(SIGN_PUBLIC)
    if not isinstance(table, dict):
        return []
    rows = []
    for name in sorted((n for n in table if n not in (SERVER, QUERIER)), key=int) + [SERVER,
                                                                                     QUERIER]:
        if name not in table:
            continue
        fp = key_fingerprint(public_from_hex(table[name], f"{SIGN_PUBLIC}[{name!r}]",
                                             error=KeyBundleError))
        if name == SERVER:
            rows.append(("the server", fp, f"{SERVER_DIR}/{SIGN_FILE}"))
        elif name == QUERIER:
            rows.append(("the analytics querier", fp, f"{QUERIER_DIR}/{SIGN_FILE}"))
        else:
            rows.append((f"institution {name}", fp,
                         f"{INSTITUTIONS_DIR}/client_{int(name):03d}/{SIGN_FILE}"))
    return rows


def rotate_keys(folder: str | Path) -> dict:
    """Retire the current generation and make the next one (same parameters, clients,
    new signing key pairs)."""
    folder = Path(folder)
    current = describe_keys(folder)
    gen = int(current["generation"])
    retired = folder / "retired" / f"gen-{gen}"
    retired.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in (KEY_FILE, INSTITUTIONS_DIR, CLIENT_DIR, SERVER_DIR, QUERIER_DIR):
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
            return {k: v for k, v in doc.items() if k not in _MAC_FIELDS}  # (former layout)
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
    _refuse_mac_layout(d, None, folder)
    bundle = _read_json(d / BUNDLE_FILE, "client bundle")
    _refuse_mac_layout(d, bundle, folder)
    if bundle.get("role") == SERVER or "sender" not in bundle:
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
    verify_keys, server_key = _public_keys(bundle, d / BUNDLE_FILE)
    if sender not in verify_keys:
        raise KeyBundleError(f"{d / BUNDLE_FILE} lists no public signing key of institution "
                             f"{sender}: copy it again from the key ceremony's folder")
    own = _own_key(d / SIGN_FILE, verify_keys[sender], f"institution {sender}")
    return ClientKeys(context=HEContext(params, secret_key=secret), fingerprint=fp,
                      generation=int(bundle["generation"]), sender=sender, sign_key=own,
                      verify_keys=verify_keys, server_verify_key=server_key,
                      clients=int(bundle.get("clients", 0)),
                      querier_verify_key=_querier_public(bundle, d / BUNDLE_FILE))


def _querier_public(bundle: dict, path: Path) -> Ed25519PublicKey | None:
    text = bundle.get(SIGN_PUBLIC, {}).get(QUERIER)
    if text is None:
        return None
    return public_from_hex(text, f"{path} public signing key of the querier", error=KeyBundleError)


def load_querier_key(folder: str | Path) -> Ed25519PrivateKey:
    """The analytics querier's private signing key (``DIR/querier/sign.key``, or a copy of
    that folder beside its ``key.json``), checked against the ceremony's public key."""
    folder = Path(folder)
    desc = describe_keys(folder)
    public = _querier_public(desc, folder / KEY_FILE)
    if public is None:
        raise KeyBundleError(f"the key ceremony in {folder} names no analytics querier (made "
                             f"before queries existed): run `fedface keys rotate {folder}` and "
                             "hand out the new folders")
    d = folder / QUERIER_DIR if (folder / QUERIER_DIR).is_dir() else folder
    return _own_key(d / SIGN_FILE, public, "the analytics querier")


def load_server_keys(folder: str | Path) -> ServerKeys:
    """The server's keys: parameters, its own signing key and the institutions' public
    keys; a secret key is never read."""
    d = _bundle_dir(Path(folder), SERVER_DIR)
    bundle = _read_json(d / BUNDLE_FILE, "server bundle")
    _refuse_mac_layout(d, bundle, Path(folder))
    if bundle.get("role") != SERVER or "sender" in bundle:
        raise KeyBundleError(f"{d} holds a client bundle: the server needs the ceremony's server/ "
                             "folder (it must never hold the secret key)")
    params = HEParams(**bundle["params"])
    verify_keys, server_key = _public_keys(bundle, d / BUNDLE_FILE)
    return ServerKeys(context=HEContext(params), fingerprint=bundle["fingerprint"],
                      generation=int(bundle["generation"]),
                      sign_key=_own_key(d / SIGN_FILE, server_key, "the server"),
                      verify_keys=verify_keys)
