"""Look for a raw face embedding in a byte blob (a database file, a ``pg_dump``, a log).

:func:`find_embedding_bytes` reports every way the embedding may hide in the blob:

- its exact bytes as float32 or float64, little- or big-endian;
- ``run`` consecutive embedding values appearing consecutively (each within ``tol``) when
  the blob is read as float32 / float64, either byte order, at every byte alignment
  (catches a slice, a rounded copy, an embedding stored inside a larger record);
- the same inside hex or base64 text found in the blob (how ``pg_dump`` prints ``bytea``,
  how JSON carries bytes);
- decimal text: ``run`` consecutive numbers in the blob (``repr``, ``%.6f``, JSON, CSV ...)
  within ``tol`` of consecutive embedding values.

Windows whose values are all within ``tol`` of zero are skipped: they match any zero
padding and carry nothing of the face.
"""

from __future__ import annotations

import base64
import binascii
import re

import numpy as np

_DTYPES = (("float32", "<f4"), ("float32", ">f4"), ("float64", "<f8"), ("float64", ">f8"))
_NUMBER = re.compile(rb"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
_HEX = re.compile(rb"[0-9a-fA-F]{16,}")
_LONG_HEX = re.compile(rb"[0-9a-fA-F]{64,}")  # longer than any number written as text
_B64 = re.compile(rb"[A-Za-z0-9+/]{16,}={0,2}")


def _runs(values: np.ndarray, embedding: np.ndarray, tol: float, run: int) -> list[tuple[int, int]]:
    """``(i, j)`` pairs where ``values[i:i+run]`` is within ``tol`` of ``embedding[j:j+run]``.

    Each window of the embedding is represented by its largest value (its *anchor*); the
    few anchors are sorted and every value of the blob is looked up among them (so a blob
    of millions of values is never sorted), then the candidates are checked value by value.
    """
    n, d = len(values), len(embedding)
    if n < run or d < run:
        return []
    with np.errstate(all="ignore"):
        finite = values.astype(np.float64)
        finite[~np.isfinite(finite)] = np.inf
        windows = np.lib.stride_tricks.sliding_window_view(embedding, run)
        js = np.nonzero(np.any(np.abs(windows) > tol, axis=1))[0]
        if not js.size:
            return []
        anchor = np.argmax(np.abs(windows[js]), axis=1)
        value = windows[js, anchor]
        order = np.argsort(value, kind="stable")
        ordered = value[order]
        lo = np.searchsorted(ordered, finite - tol, side="left")
        hi = np.searchsorted(ordered, finite + tol, side="right")
        counts = np.where(np.isfinite(finite), hi - lo, 0)
        total = int(counts.sum())
        if not total:
            return []
        first = np.repeat(np.cumsum(counts) - counts, counts)
        pick = order[np.repeat(lo, counts) + np.arange(total) - first]
        ii = np.repeat(np.arange(n), counts) - anchor[pick]
        jj = js[pick]
        keep = (ii >= 0) & (ii <= n - run)
        ii, jj = ii[keep], jj[keep]
        ok = np.ones(ii.size, bool)
        for k in range(run):
            ok &= np.abs(finite[ii + k] - embedding[jj + k]) <= tol
    return sorted(zip(ii[ok].tolist(), jj[ok].tolist()))


def _scan_binary(blob: bytes, emb: np.ndarray, tol: float, run: int, where: str) -> list[str]:
    found = []
    for name, dtype in _DTYPES:
        raw = emb.astype(dtype).tobytes()
        order = "little" if dtype[0] == "<" else "big"
        at = blob.find(raw)
        if at >= 0:
            found.append(f"{where}exact {name} {order}-endian embedding at byte {at}")
        size = np.dtype(dtype).itemsize
        for align in range(size):
            usable = (len(blob) - align) // size
            if usable < run:
                continue
            values = np.frombuffer(blob, dtype=dtype, count=usable, offset=align)
            hits = _runs(values, emb, tol, run)
            if hits:
                i, j = hits[0]
                found.append(
                    f"{where}{len(hits)} run(s) of {run} values as {name} {order}-endian, alignment "
                    f"{align}: first at byte {align + i * size} = embedding[{j}:{j + run}]")
    return found


def find_embedding_bytes(blob: bytes, embedding: np.ndarray, tol: float = 1e-4,
                         run: int = 4) -> list[str]:
    """Where ``embedding`` (or ``run`` consecutive values of it) appears in ``blob``.

    Parameters
    ----------
    blob : bytes
        What to search (file contents, a dump's text encoded as bytes ...).
    embedding : numpy.ndarray
        The raw embedding (any float dtype, flattened).
    tol : float
        Largest difference that still counts as the same value.
    run : int
        How many consecutive values make a hit.

    Returns
    -------
    list of str
        One line per finding (empty when nothing was found).
    """
    blob = bytes(blob)
    emb = np.asarray(embedding, dtype=np.float64).ravel()
    found = _scan_binary(blob, emb, tol, run, "")
    for match in _HEX.finditer(blob):
        for nibble in (0, 1):
            digits = match.group()[nibble:]
            digits = digits[:len(digits) // 2 * 2]
            found += _scan_binary(binascii.unhexlify(digits), emb, tol, run,
                                  f"hex text at char {match.start() + nibble}: ")
    for match in _B64.finditer(blob):
        text = match.group().rstrip(b"=")
        text = text[:len(text) // 4 * 4]
        try:
            decoded = base64.b64decode(text, validate=True)
        except binascii.Error:
            continue
        found += _scan_binary(decoded, emb, tol, run, f"base64 text at char {match.start()}: ")
    # decimal text: long hex runs (bytea, digests) are not numbers written as text
    numbers = list(_NUMBER.finditer(_LONG_HEX.sub(lambda m: b" " * len(m.group()), blob)))
    if numbers:
        with np.errstate(all="ignore"):
            values = np.array([float(m.group()) for m in numbers])
        hits = _runs(values, emb, tol, run)
        if hits:
            i, j = hits[0]
            found.append(f"{len(hits)} run(s) of {run} decimal numbers in text: first at char "
                         f"{numbers[i].start()} = embedding[{j}:{j + run}]")
    return found
