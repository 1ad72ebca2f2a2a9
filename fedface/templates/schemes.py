"""What every template-protection scheme shares: the checks on embeddings, the template
header, the scheme interface and the registry by name.

A scheme turns L2-normalised embeddings into protected templates (bytes, what the store
keeps) and compares a probe embedding with stored templates. It never returns or stores
the raw embedding. Schemes:

- ``biohash`` and ``projection`` (:mod:`fedface.templates.cancelable`), keyed by a token
  file (:mod:`crypto.tokens`);
- ``he`` (:mod:`fedface.templates.encrypted`), CKKS-encrypted templates matched under
  encryption (:mod:`crypto.match`), keyed by a key folder.

Every template starts with an 8-byte header: ``b"FFT1"``, a scheme code and the embedding
dimension, so a probe of another embedder (another dimension) or a template of another
scheme is named before any comparison.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np

__all__ = ["SCHEMES", "Scheme", "TemplateError", "check_embeddings", "load_scheme"]

_MAGIC = b"FFT1"
_HEADER = struct.Struct(">4sBxH")  # magic, scheme code, pad, dimension
MAX_DIM = 4096


class TemplateError(ValueError):
    """Bad input to template protection (embedding, template, key), saying what to do."""


def check_embeddings(emb, dim: int | None = None, what: str = "embedding") -> np.ndarray:
    """``emb`` as a float64 ``(n, d)`` array of unit rows, or :class:`TemplateError`.

    A 1-d array is one embedding. Refused: empty input, more than two dimensions, NaN or
    infinite values, an all-zero row (no direction), and ``d != dim`` when ``dim`` is given.
    """
    a = np.asarray(emb, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise TemplateError(f"{what} of shape {np.shape(emb)}: expected a vector (d,) or "
                            "rows (n, d) of an embedder's output")
    if a.shape[1] > MAX_DIM:
        raise TemplateError(f"{what} of dimension {a.shape[1]}: more than {MAX_DIM}, not a "
                            "face embedding (pass the embedder's output, e.g. 128 values)")
    if dim is not None and a.shape[1] != dim:
        raise TemplateError(f"{what} of dimension {a.shape[1]}, but the templates were enrolled "
                            f"at dimension {dim}: use the same embedder (--embedder/--model) "
                            "as at enrolment")
    if not np.isfinite(a).all():
        raise TemplateError(f"{what} holds NaN or infinite values: the embedder failed on "
                            "this input; embed it again")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    if (norms == 0).any():
        raise TemplateError(f"{what} is all zeros: not an embedding")
    return a / norms


class Scheme(ABC):
    """A template-protection scheme bound to one key.

    Attributes
    ----------
    name : str
        Registry name (``biohash``, ``projection``, ``he``).
    code : int
        The scheme's byte in the template header.
    key_id : str
        Public fingerprint of the key, stored with every template.
    mac_key : bytes
        Key of the store's integrity tags for this scheme's rows.
    higher_is_closer : bool
        Scores are similarities (cosine, 1 - normalised Hamming distance).
    """

    name: ClassVar[str]
    code: ClassVar[int]
    key_id: str
    mac_key: bytes

    # -- template bytes ---------------------------------------------------------------
    def wrap(self, dim: int, payload: bytes) -> bytes:
        return _HEADER.pack(_MAGIC, self.code, int(dim)) + payload

    def unwrap(self, blob: bytes) -> tuple[int, bytes]:
        """``(dimension, payload)`` of a template of this scheme, or :class:`TemplateError`."""
        if not isinstance(blob, (bytes, bytearray, memoryview)) or len(blob) < _HEADER.size:
            raise TemplateError("not a fedface template (too short): the row is damaged")
        magic, code, dim = _HEADER.unpack_from(bytes(blob[:_HEADER.size]))
        if magic != _MAGIC:
            raise TemplateError("not a fedface template (bad header): the row is damaged")
        if code != self.code:
            other = next((s for s, c in SCHEME_CODES.items() if c == code), f"code {code}")
            raise TemplateError(f"a template of scheme {other!r}, not {self.name!r}: pass "
                                f"--scheme {other}")
        return int(dim), bytes(blob[_HEADER.size:])

    # -- the scheme -------------------------------------------------------------------
    @abstractmethod
    def protect(self, emb) -> list[bytes]:
        """Protected templates of the rows of ``emb`` (normalised first)."""

    @abstractmethod
    def scores(self, templates: list[bytes], probe) -> np.ndarray:
        """Similarity of one probe embedding to each stored template (float64)."""

    def dims(self, templates: list[bytes]) -> set[int]:
        return {self.unwrap(t)[0] for t in templates}

    def describe(self) -> dict:
        """Public settings (no secret) for reports."""
        return {"scheme": self.name, "key_id": self.key_id}


SCHEME_CODES = {"biohash": 1, "projection": 2, "he": 3}
SCHEMES = tuple(SCHEME_CODES)


def load_scheme(name: str, key: str | Path, **options) -> Scheme:
    """The scheme ``name`` bound to the key file (token) or key folder ``key``."""
    if name in ("biohash", "projection"):
        from crypto.tokens import load_token
        from fedface.templates.cancelable import BioHash, Projection

        cls = BioHash if name == "biohash" else Projection
        return cls(load_token(key), **options)
    if name == "he":
        from fedface.templates.encrypted import EncryptedScheme

        return EncryptedScheme.load(key, **options)
    raise TemplateError(f"unknown scheme {name!r}: choose one of {', '.join(SCHEMES)}")
