"""The institution's private randomness: a secret that never leaves it, and seeds from it.

Every random draw a privacy guarantee rests on (DP-SGD's Poisson sampling and noise,
the ``client-fixed`` central-DP noise share, the stochastic rounding of an encrypted
update) is seeded from a 256-bit secret drawn from the operating system's CSPRNG
(:func:`secrets.token_bytes`) the first time the institution needs it, and kept
owner-only in its state folder. Seeds are derived with HKDF-SHA256 (RFC 5869) from the
secret, a purpose label and the round, so:

- nothing public (the run config's ``seed``, partition or node ids, the round) determines
  them: the server and other institutions cannot recompute or subtract the noise;
- two institutions, or two runs with fresh state folders, draw independent noise even
  with identical run configs;
- a resumed run reads the same secret and replays a round bit for bit.

The seeds drive PyTorch's and NumPy's generators (Mersenne Twister, PCG64), which are not
cryptographic generators, and the Gaussian noise is sampled in floating point; see the
README's threat model for what that leaves open (Mironov 2012) and why secure mode is not
used.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from crypto.keyfile import KeyFileError, read_private

SECRET_BYTES = 32
_INFO = b"fedface/private-randomness/v1|"


class SecretFileError(KeyFileError):
    """A secret file that is unreadable, insecure, or of the wrong size."""


def _read_private(path: Path) -> bytes:
    """The secret's bytes, read from one descriptor that was checked first
    (:func:`crypto.keyfile.read_private`)."""
    return read_private(path, "private-randomness secret", SecretFileError)


def load_or_create_secret(path: str | Path | None, kept: bytes | None = None) -> bytes:
    """The institution's secret: read from ``path``, else ``kept`` (e.g. from the node's
    in-memory state), else drawn fresh from the OS CSPRNG and written to ``path``
    owner-only (0600, created exclusively, so two processes never hold different ones).

    Never delete the file of a running federation: a new secret is harmless for privacy
    (fresh noise) but a resumed run would no longer replay its rounds bit for bit.
    """
    if path:
        p = Path(path)
        if p.exists() or p.is_symlink():
            data = _read_private(p)
            if len(data) != SECRET_BYTES:
                raise SecretFileError(f"private-randomness secret {p} holds {len(data)} bytes, "
                                      f"expected {SECRET_BYTES} (truncated or edited): restore "
                                      "it from a backup, or remove it to draw a new one")
            return data
    if kept is not None and len(kept) == SECRET_BYTES:
        secret = bytes(kept)
    else:
        secret = secrets.token_bytes(SECRET_BYTES)
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process of this institution was first: use its
            return load_or_create_secret(p)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
        os.chmod(p, 0o600)
    return secret


def input_digest(*parts: Any) -> bytes:
    """SHA-256 over everything a random draw protects (the exact inputs of the step).

    Takes numpy arrays and tensors (shape, dtype and bytes), mappings (sorted by key),
    sequences, strings, bytes, numbers, booleans and None. Two calls agree exactly when
    their inputs are bit for bit the same.
    """
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
            x = x.detach().cpu().numpy()
        if isinstance(x, np.ndarray):
            a = np.ascontiguousarray(x)
            h.update(f"A{a.dtype.str}{a.shape}|".encode())
            h.update(a.tobytes())
        elif isinstance(x, Mapping):
            h.update(f"M{len(x)}|".encode())
            for k in sorted(x, key=str):
                feed(str(k))
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}|".encode())
            for v in x:
                feed(v)
        elif isinstance(x, bytes):
            h.update(b"B%d|" % len(x) + x)
        elif isinstance(x, (str, int, float, bool, np.generic)) or x is None:
            h.update(f"S{type(x).__name__}:{x!r}|".encode())
        else:
            raise TypeError(f"input_digest cannot digest {type(x).__name__}")

    for part in parts:
        feed(part)
    return h.digest()


def derive_seed(secret: bytes, purpose: str, server_round: int, inputs: bytes = b"") -> int:
    """A 63-bit seed for ``purpose`` in ``server_round``: HKDF-SHA256 of the secret, bound
    to ``inputs`` (an :func:`input_digest` of what the draw protects).

    Binding the draw to its inputs means noise is never reused on *different* data: a
    second run with the same secret but another start model, config or data snapshot
    draws independent noise, while the very same inputs (a resumed round) give the very
    same output, which releases nothing new.
    """
    if len(secret) != SECRET_BYTES:
        raise SecretFileError(f"a private-randomness secret has {SECRET_BYTES} bytes, got "
                              f"{len(secret)}")
    okm = HKDF(algorithm=hashes.SHA256(), length=8, salt=None,
               info=_INFO + f"{purpose}|{int(server_round)}|".encode() + inputs).derive(secret)
    return int.from_bytes(okm, "big") >> 1
