"""Key material and keyed streams for key-reversible face scrambling.

The anonymizer :mod:`fedface.anonymize.scramble` turns every face box of an image into
noise with a secret key and can turn it back, bit for bit, with the same key. This
module holds the cryptography it rests on; it knows nothing of images or boxes beyond
integer tuples and counts (``crypto`` is a leaf package).

Adversary
---------
Someone who holds scrambled files (and their metadata) but not the key. To them the
pixels inside each box are AES-256-CTR keystream added to a keyed permutation of the
original pixels: computationally indistinguishable from uniform noise, whatever the face.
What is *not* hidden: everything the metadata and the image carry in the clear (the
image size, the number, positions and sizes of the boxes, and every pixel outside them),
and :func:`key_id`, a public fingerprint that tells which files were scrambled with the
same key (and lets anyone holding a key test whether it is the one). A wrong key
restores noise, not some other face.

Key file
--------
Two text lines, created owner-only (0600) and never overwritten::

    fedface-scramble-key v1
    <64 hex digits: 32 bytes from the OS CSPRNG (secrets.token_bytes)>

It is read through one descriptor that is checked first (a regular file, not a link,
owned by the current user, readable by nobody else; :mod:`crypto.keyfile`).
Losing it means the scrambled faces can never be restored; anyone who has it can
restore every image scrambled with it.

Streams
-------
Each face gets its own subkeys: HKDF-SHA256 (RFC 5869) of the key, salted with the
image's random 128-bit nonce, bound to a purpose label, the face's index, its integer
box and the length asked for. :func:`permutation` sorts AES-256-CTR output (64 bits per
element) to a uniformly random permutation; :func:`keystream` is AES-256-CTR output
itself. Fresh nonces mean two scrambles of the same image share no stream.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from crypto.keyfile import KEY_BYTES, fingerprint, key_header, load_key_file, new_key_file

__all__ = [
    "KEY_BYTES", "KEY_HEADER", "NONCE_BYTES", "ScrambleKeyError", "key_id", "keystream",
    "load_key", "new_key", "new_nonce", "permutation", "same_tag", "tag",
]

NONCE_BYTES = 16
KEY_HEADER = key_header("scramble")
_INFO = b"fedface/scramble/v1|"
_ZERO_BLOCK = bytes(16)


class ScrambleKeyError(ValueError):
    """A scramble key (file) that is missing, malformed, insecure or of the wrong size."""


# -- key files ---------------------------------------------------------------------------


def new_key(path: str | Path) -> bytes:
    """Draw a new scramble key from the OS CSPRNG and write it to ``path``, owner-only
    (:func:`crypto.keyfile.new_key_file`: never overwritten, written atomically).

    Raises
    ------
    ScrambleKeyError
        When ``path`` already exists (even as a dangling link): images scrambled with
        the old key could then never be restored.
    """
    return new_key_file(path, "scramble", error=ScrambleKeyError,
                        why="images scrambled with it could never be restored")


def load_key(path: str | Path) -> bytes:
    """The 32-byte key in the scramble key file ``path``.

    Raises
    ------
    ScrambleKeyError
        Naming ``path`` and what to do, when the file is missing, is a symbolic link or
        not a regular file, is owned by another user or readable by others, or is not a
        scramble key file (wrong header, truncated or edited hex).
    """
    return load_key_file(path, "scramble", error=ScrambleKeyError,
                         missing="pass the key file the images were scrambled with (a new key "
                         "cannot restore them)",
                         lost="restore it from a backup; a new key cannot restore images "
                         "scrambled with this one")


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise ScrambleKeyError(f"a scramble key has {KEY_BYTES} bytes, got "
                               f"{len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__}")
    return bytes(key)


def key_id(key: bytes) -> str:
    """A short public fingerprint of ``key`` (16 hex digits, 64 bits).

    HKDF-SHA256 of the key under its own label, so it reveals nothing about the key or
    the streams; it tells which files were scrambled with the same key.
    """
    return fingerprint(_check_key(key), (_INFO + b"key-id").decode())


# -- per-image, per-face streams ---------------------------------------------------------


def new_nonce() -> bytes:
    """A fresh random 128-bit per-image nonce (OS CSPRNG)."""
    return secrets.token_bytes(NONCE_BYTES)


def _subkey(key: bytes, nonce: bytes, purpose: str, index: int, box: Sequence[int], n: int) -> bytes:
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != NONCE_BYTES:
        raise ValueError(f"a scramble nonce has {NONCE_BYTES} bytes")
    if len(box) != 4:
        raise ValueError("a box is four integers (x0, y0, x1, y1)")
    geometry = ",".join(str(int(v)) for v in box)
    info = _INFO + f"{purpose}|{int(index)}|{geometry}|{int(n)}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=bytes(nonce), info=info).derive(_check_key(key))


def _aes_ctr(subkey: bytes, nbytes: int) -> bytes:
    # The subkey is unique to (key, nonce, purpose, face, box, length): one counter
    # block sequence per subkey, starting at zero, never repeats a (key, counter) pair.
    enc = Cipher(algorithms.AES(subkey), modes.CTR(_ZERO_BLOCK)).encryptor()
    return enc.update(bytes(nbytes)) + enc.finalize()


def permutation(key: bytes, nonce: bytes, index: int, box: Sequence[int], n: int) -> np.ndarray:
    """A keyed, uniformly random permutation of ``range(n)``.

    Parameters
    ----------
    key : bytes
        The 32-byte scramble key.
    nonce : bytes
        The image's 16-byte nonce (:func:`new_nonce`).
    index : int
        The face's position in the image's list of boxes.
    box : sequence of 4 int
        The face's integer box ``(x0, y0, x1, y1)``.
    n : int
        How many elements (pixels) to permute.

    Returns
    -------
    numpy.ndarray
        ``int64`` array, a permutation of ``0 .. n-1``: the argsort of ``n`` 64-bit
        AES-256-CTR words (a stable sort, so ties, probability < n^2 / 2^65, are
        deterministic too).
    """
    n = int(n)
    if n < 0:
        raise ValueError("n must be >= 0")
    words = np.frombuffer(_aes_ctr(_subkey(key, nonce, "perm", index, box, n), 8 * n), dtype="<u8")
    return np.argsort(words, kind="stable").astype(np.int64, copy=False)


def keystream(key: bytes, nonce: bytes, index: int, box: Sequence[int], n: int) -> np.ndarray:
    """``n`` keyed pseudorandom bytes (AES-256-CTR) as a ``uint8`` array.

    Same parameters as :func:`permutation`, with ``n`` counting bytes; the subkey is
    derived under another label, so the two are independent.
    """
    n = int(n)
    if n < 0:
        raise ValueError("n must be >= 0")
    return np.frombuffer(_aes_ctr(_subkey(key, nonce, "mask", index, box, n), n), dtype=np.uint8).copy()


def tag(key: bytes, nonce: bytes, *parts: bytes) -> str:
    """HMAC-SHA256 (hex, 32 digits) of ``parts`` under a key derived for ``nonce``.

    Used to check that a restore reproduced the original exactly; it reveals nothing
    about the parts to someone without the key.
    """
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != NONCE_BYTES:
        raise ValueError(f"a scramble nonce has {NONCE_BYTES} bytes")
    mac_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=bytes(nonce),
                   info=_INFO + b"tag").derive(_check_key(key))
    h = crypto_hmac.HMAC(mac_key, hashes.SHA256())
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.finalize()[:16].hex()


def same_tag(a: str, b: str) -> bool:
    """Constant-time comparison of two :func:`tag` values."""
    return hmac.compare_digest(str(a).encode(), str(b).encode())
