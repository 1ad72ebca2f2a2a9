"""Key files: the one way fedface makes, saves, fingerprints and loads a secret it keeps.

Every secret of the project goes through this module: the HE key ceremony's bundles
(:mod:`crypto.keys`), an institution's private randomness (:mod:`crypto.seeds`), the
scramble keys of the anonymizer (:mod:`crypto.scramble`), the tokens of cancelable
templates and the CKKS matching keys (:mod:`crypto.match`).

- :func:`write_private` creates a file owner-only (0600; its folder 0700), never
  following a symbolic link.
- :func:`read_private` reads one descriptor that was checked first: a regular file (not
  a link, not a FIFO that would block), owned by the current user, readable by nobody
  else; anything else is refused, naming the file and the command that fixes it.
- :func:`new_key_file` / :func:`load_key_file`: a 32-byte key from the OS CSPRNG in a
  two-line text file (``fedface-<kind>-key v1`` and the hex), created exclusively (a key
  is never overwritten: what was protected with it would be lost) and atomically (a
  crash or a concurrent writer never leaves a torn or replaced key).
- :func:`fingerprint`: a short public id of key material (HKDF-SHA256 under a label),
  which tells which data were protected with the same key and reveals nothing of it.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["KEY_BYTES", "KeyFileError", "fingerprint", "key_header", "load_key_file",
           "new_key_file", "read_private", "write_private"]

KEY_BYTES = 32
_MAX_KEY_FILE = 4096  # a key file is ~90 bytes; anything far larger is the wrong file


class KeyFileError(ValueError):
    """A key file that is missing, insecure, malformed or of the wrong size."""


def write_private(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` owner-only (0600), its folder created 0700.

    A symbolic link at ``path`` is refused (``O_NOFOLLOW``), so the write cannot be
    redirected to a file elsewhere.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


def read_private(path: str | Path, what: str, error: type[Exception] = KeyFileError,
                 missing: str = "") -> bytes:
    """The bytes of the key file ``path``, checked before they are read.

    Parameters
    ----------
    path : str or Path
        The key file.
    what : str
        What the file is, for messages ("secret key", "template token", ...).
    error : exception class (default: :class:`KeyFileError`)
        Raised, with a message naming ``path`` and what to do, when the file is missing,
        a symbolic link, not a regular file, owned by another user or readable by others.
    missing : str
        What to do when the file does not exist (appended to the message).
    """
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO in place of a key file is refused below instead of blocking.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise error(f"{what} {path} is missing" + (f": {missing}" if missing else "")) from None
    except OSError as err:
        if path.is_symlink():
            raise error(f"{what} {path} is a symbolic link (to {os.readlink(path)}): key files "
                        "must be regular files; copy the file itself") from None
        raise error(f"{what} {path} cannot be read ({err.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {path} is not a regular file: copy the file itself")
        uid = os.getuid()
        if st.st_uid != uid:
            raise error(f"{what} {path} is owned by uid {st.st_uid}, not by the current user "
                        f"(uid {uid}): another user could replace it; run `chown {uid} {path}` "
                        "or copy it into a folder of yours")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise error(f"{what} {path} is readable by other users (mode {oct(mode)}): run "
                        f"`chmod 600 {path}`")
        return f.read()


def fingerprint(material: bytes, label: str, nbytes: int = 8) -> str:
    """A public fingerprint of ``material``: ``nbytes`` of HKDF-SHA256 under ``label``, hex.

    One-way and bound to its label: it tells whether two files hold the same key, and
    lets someone holding a key test whether it is the one, but reveals nothing else.
    """
    return HKDF(algorithm=hashes.SHA256(), length=nbytes, salt=None,
                info=label.encode()).derive(bytes(material)).hex()


def key_header(kind: str) -> str:
    """The first line of a key file of ``kind``: ``fedface-<kind>-key v1``."""
    return f"fedface-{kind}-key v1"


def _encode(kind: str, key: bytes) -> bytes:
    return f"{key_header(kind)}\n{key.hex()}\n".encode("ascii")


def new_key_file(path: str | Path, kind: str, *, error: type[Exception] = KeyFileError,
                 why: str = "what was protected with it would be lost") -> bytes:
    """Draw a new 32-byte key from the OS CSPRNG and write it to ``path``, owner-only.

    Parameters
    ----------
    path : str or Path
        Where the key file goes; its folder is created (0700) if missing.
    kind : str
        The key's kind, written in its header (``scramble``, ``template``, ...).
    error : exception class
        Raised when ``path`` already exists (even as a dangling link): a key is never
        overwritten.
    why : str
        Why overwriting would hurt, for that message.

    Returns
    -------
    bytes
        The key.

    Notes
    -----
    The file is written and synced under a temporary name, then hard-linked to ``path``
    (which fails if ``path`` exists), so neither a crash nor a concurrent writer leaves
    a torn or replaced key. Where the file system has no hard links it is created with
    ``O_EXCL`` instead.
    """
    p = Path(path)
    exists = error(f"{kind} key {p} already exists: refusing to overwrite it ({why}); choose "
                   "another path")
    if p.exists() or p.is_symlink():
        raise exists
    key = secrets.token_bytes(KEY_BYTES)
    data = _encode(kind, key)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")

    def fill(fd: int) -> None:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    try:
        fill(fd)
        try:
            os.link(tmp, p)
        except FileExistsError:
            raise exists from None
        except OSError:  # no hard links here (some network or FUSE file systems)
            try:
                out = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                              0o600)
            except FileExistsError:
                raise exists from None
            fill(out)
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return key


def load_key_file(path: str | Path, kind: str, *, error: type[Exception] = KeyFileError,
                  missing: str = "pass the key file fedface wrote",
                  lost: str = "restore it from a backup") -> bytes:
    """The 32-byte key in the key file ``path`` of ``kind``.

    Raises ``error`` naming ``path`` and what to do when the file is missing (``missing``
    says what to do), insecure (:func:`read_private`), of another kind or not a key file,
    or truncated or edited (``lost`` says what to do).
    """
    p = Path(path)
    what = f"{kind} key"
    if not p.exists() and not p.is_symlink():
        raise error(f"{what} {p} does not exist: {missing}")
    raw = read_private(p, what, error)
    header = key_header(kind)
    if len(raw) > _MAX_KEY_FILE:
        raise error(f"{p} is not a fedface {kind} key ({len(raw)} bytes, a key file has two "
                    "short lines): pass the key file fedface wrote")
    try:
        lines = raw.decode("ascii").split()
    except UnicodeDecodeError:
        lines = []
    if not lines or " ".join(lines[:2]) != header:
        found = " ".join(lines[:2]) if len(lines) >= 2 and lines[0].startswith("fedface-") else ""
        raise error(f"{p} is not a fedface {kind} key (its first line should be {header!r}"
                    + (f", it is {found!r}" if found else "") + "): pass the key file fedface wrote")
    try:
        key = bytes.fromhex(lines[2]) if len(lines) == 3 else b""
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise error(f"{what} {p} does not hold {KEY_BYTES} bytes in hex (truncated or edited): {lost}")
    return key
