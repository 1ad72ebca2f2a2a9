"""Tokens of cancelable face templates: the secret that seeds BioHashing and the keyed
projection (:mod:`fedface.templates.cancelable`).

A token is a key file of kind ``template`` (:mod:`crypto.keyfile`: 32 bytes from the OS
CSPRNG, owner-only, never overwritten). Everything a scheme needs is derived from it with
HKDF-SHA256 under its own label, so the derived values are independent:

- :attr:`Token.key_id`: the public fingerprint stored with every template (which key
  protected it; a wrong token is named before any comparison);
- :attr:`Token.mac_key`: the key of the store's integrity tags;
- :meth:`Token.generator`: a NumPy generator (PCG64, 256-bit seed) that draws the
  scheme's projection matrix for a given purpose and dimension.

Renewal is a new token: templates made with it share nothing with the old ones (the
unlinkability figure of ``fedface bench templates`` measures it). Losing the token makes
the enrolled templates useless (re-enrol); a stolen token is the case the benchmark
reports as "stolen token" (and the inversion attack uses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from crypto.keyfile import KEY_BYTES, KeyFileError, fingerprint, load_key_file, new_key_file

__all__ = ["Token", "TokenError", "load_token", "new_token"]

_LABEL = "fedface/templates/v1|"
KIND = "template"


class TokenError(KeyFileError):
    """A template token that is missing, insecure, malformed or of the wrong kind."""


@dataclass(frozen=True)
class Token:
    """A template token (its 32 bytes) and where it was read from."""

    key: bytes = field(repr=False)
    path: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != KEY_BYTES:
            raise TokenError(f"a template token has {KEY_BYTES} bytes")

    @property
    def key_id(self) -> str:
        """Public fingerprint (16 hex digits) stored with every template it protected."""
        return fingerprint(self.key, _LABEL + "key-id")

    @property
    def mac_key(self) -> bytes:
        """The store's integrity-tag key for templates of this token."""
        return _derive(self.key, "store-mac", 32)

    def generator(self, purpose: str, dim: int) -> np.random.Generator:
        """A generator seeded (256 bits) from the token, the purpose and the dimension."""
        seed = int.from_bytes(_derive(self.key, f"{purpose}|{int(dim)}", 32), "big")
        return np.random.Generator(np.random.PCG64(seed))

    @classmethod
    def random(cls) -> Token:
        """A fresh token kept in memory only (evaluation: one per simulated user)."""
        import secrets

        return cls(secrets.token_bytes(KEY_BYTES))


def _derive(key: bytes, label: str, n: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=None,
                info=(_LABEL + label).encode()).derive(key)


def new_token(path: str | Path) -> Token:
    """A new token written to ``path`` owner-only; an existing file is never overwritten."""
    key = new_key_file(path, KIND, error=TokenError,
                       why="templates enrolled with it could no longer be matched")
    return Token(key, Path(path))


def load_token(path: str | Path) -> Token:
    """The token in ``path`` (checked: regular, owner-only file of kind ``template``)."""
    key = load_key_file(path, KIND, error=TokenError,
                        missing="pass the token the templates were enrolled with, or make one "
                        "with `fedface keys token PATH`",
                        lost="restore it from a backup, or renew every subject under a new token")
    return Token(key, Path(path))
