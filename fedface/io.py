"""Files: atomic writes and reading a torch file with a message that says what to do.

Every file fedface writes (metrics, models, checkpoints, ledgers, prepared data,
aligned chips, manifests) goes through :func:`atomic_write`: a temporary file in the
same folder, flushed and synced, then renamed over the target, so a run stopped at any
moment leaves the previous file or the new one, never a torn one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], *, sync: bool = True,
                 suffix: str = ".tmp") -> Path:
    """Write ``path`` atomically: ``write(fh)`` fills a temporary binary file in the same
    folder, which then replaces ``path``. The temporary file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def hash_file(path: str | Path, h=None):
    """``h`` (default a new SHA-256) updated with the bytes of ``path``, read in 1 MiB blocks."""
    import hashlib

    h = h if h is not None else hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def load_torch(path: str | Path, what: str, remedy: str) -> Any:
    """``torch.load`` (CPU, weights only) of a fedface file; an unreadable one raises a
    ``ValueError`` naming the file, what it should be and ``remedy`` (what to do)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f"{path} is not a readable {what} ({reason}): {remedy}") from None
