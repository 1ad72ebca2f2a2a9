"""Ed25519 signatures: who wrote a protocol message, checkable by anyone holding a public key.

Each institution and the server hold their own private signing key; every party holds
every public key (:mod:`crypto.keys`). A signature therefore proves its signer to all,
and nobody can sign in another's name: not the server in an institution's, not an
institution in the server's or another institution's, which a shared MAC key could not
guarantee (whoever checks an HMAC can also make one).

- :func:`new_signing_key`: a key pair from the OS CSPRNG (the private key; its public
  key is ``key.public_key()``).
- :func:`sign` / :func:`verify`: a 64-byte signature over any bytes; :func:`verify`
  raises :class:`SignatureError` naming what did not verify. Messages are the caller's
  canonical bytes (an envelope header, a join message, a mask-key advertisement).
- :func:`public_hex` / :func:`public_from_hex`: the 32-byte raw public key as hex, as
  the bundles carry it.
- :func:`key_fingerprint`: a short public id of a public key (``abcd:ef01:2345:6789``).
- :func:`write_signing_key` / :func:`read_signing_key`: the private key file, owner-only
  through :mod:`crypto.keyfile` (``fedface-signing-key v1`` and the 32-byte raw private
  key in hex).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from crypto.keyfile import KeyFileError, key_header, load_key_file, write_private

__all__ = ["KIND", "SIGNATURE_BYTES", "SignatureError", "key_fingerprint", "new_signing_key",
           "public_from_hex", "public_hex", "read_signing_key", "sign", "verify",
           "write_signing_key"]

KIND = "signing"  # the key file's header: fedface-signing-key v1
SIGNATURE_BYTES = 64


class SignatureError(ValueError):
    """A signature that does not verify, or a public key that cannot be read."""


def new_signing_key() -> Ed25519PrivateKey:
    """A new Ed25519 private key from the OS CSPRNG (its public key: ``.public_key()``)."""
    return Ed25519PrivateKey.generate()


def sign(private_key: Ed25519PrivateKey, message: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``message`` (deterministic: same key and message,
    same signature)."""
    return private_key.sign(bytes(message))


def verify(public_key: Ed25519PublicKey, signature: bytes, message: bytes, what: str) -> None:
    """Check ``signature`` over ``message`` under ``public_key``.

    Parameters
    ----------
    public_key : Ed25519PublicKey
        The signer's public key.
    signature : bytes
        The signature (anything but 64 bytes fails).
    message : bytes
        The exact bytes that were signed.
    what : str
        What is being verified, for the message ("update envelope of sender 2", ...).

    Raises
    ------
    SignatureError
        The signature is not the signer's over these bytes: the message was altered, or
        signed with another key.
    """
    try:
        public_key.verify(bytes(signature), bytes(message))
    except (InvalidSignature, TypeError, ValueError):
        raise SignatureError(f"signature of {what} does not verify (key "
                             f"{key_fingerprint(public_key)}): tampered with, or signed with "
                             "another key") from None


def public_hex(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The raw 32-byte public key as hex (of a private key: its public key's)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def public_from_hex(text: str, where: str = "public signing key", *,
                    error: type[Exception] = SignatureError) -> Ed25519PublicKey:
    """The public key of :func:`public_hex`; raises ``error`` naming ``where`` when
    ``text`` is not 32 bytes of hex."""
    try:
        raw = bytes.fromhex(text) if isinstance(text, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise error(f"{where} is not a 32-byte hex Ed25519 public key (truncated or "
                             "edited): copy it again from the key ceremony's folder")
    return Ed25519PublicKey.from_public_bytes(raw)


def key_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """A short public id of a signing key: the first 16 hex digits of the SHA-256 of the
    raw public key, in groups of four (``abcd:ef01:2345:6789``)."""
    h = hashlib.sha256(bytes.fromhex(public_hex(key))).hexdigest()[:16]
    return ":".join(h[i:i + 4] for i in range(0, 16, 4))


def write_signing_key(path: str | Path, key: Ed25519PrivateKey) -> None:
    """Write the private key to ``path`` owner-only (:func:`crypto.keyfile.write_private`)."""
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    write_private(path, f"{key_header(KIND)}\n{raw.hex()}\n".encode("ascii"))


def read_signing_key(path: str | Path, *, error: type[Exception] = KeyFileError,
                     missing: str = "pass the signing key the key ceremony wrote") -> Ed25519PrivateKey:
    """The private key in ``path``, checked first (:func:`crypto.keyfile.read_private`):
    a missing, insecure, foreign or damaged file raises ``error`` naming it."""
    raw = load_key_file(path, KIND, error=error, missing=missing,
                        lost="copy it again from the key ceremony's folder")
    return Ed25519PrivateKey.from_private_bytes(raw)
