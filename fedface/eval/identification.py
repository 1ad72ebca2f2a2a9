"""Closed-set face identification (1:N) metrics. Pure numpy."""

from __future__ import annotations

import numpy as np

__all__ = ["gallery_probe_split", "rank1"]

_EPS = 1e-12
_CHUNK = 4096  # probes per similarity block, bounds memory to CHUNK x gallery


def _as_embeddings(x, name: str) -> np.ndarray:
    e = np.asarray(x, dtype=np.float64)
    if e.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, dim), got shape {e.shape}")
    if e.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(e).all():
        raise ValueError(f"{name} contains NaN or inf")
    norm = np.linalg.norm(e, axis=1, keepdims=True)
    return e / np.maximum(norm, _EPS)


def rank1(gallery_emb, gallery_labels, probe_emb, probe_labels) -> float:
    """Rank-1 identification rate with cosine similarity.

    Each probe is assigned the label of its most similar gallery embedding
    (cosine similarity; ties go to the lowest gallery index). Zero vectors
    have similarity 0 to everything.

    Parameters
    ----------
    gallery_emb : array_like, shape (g, d)
    gallery_labels : array_like, shape (g,)
    probe_emb : array_like, shape (p, d)
    probe_labels : array_like, shape (p,)

    Returns
    -------
    float
        Fraction of probes whose nearest gallery entry has the probe's label.

    Raises
    ------
    ValueError
        On shape mismatches, empty inputs, non-finite embeddings, or when a
        probe's label does not occur in the gallery (closed-set protocol).
    """
    g = _as_embeddings(gallery_emb, "gallery_emb")
    p = _as_embeddings(probe_emb, "probe_emb")
    gl = np.asarray(gallery_labels)
    pl = np.asarray(probe_labels)
    if gl.ndim != 1 or gl.shape[0] != g.shape[0]:
        raise ValueError(
            f"gallery_labels must have one label per gallery embedding: "
            f"shape {gl.shape} vs {g.shape[0]} embeddings"
        )
    if pl.ndim != 1 or pl.shape[0] != p.shape[0]:
        raise ValueError(
            f"probe_labels must have one label per probe embedding: "
            f"shape {pl.shape} vs {p.shape[0]} embeddings"
        )
    if g.shape[1] != p.shape[1]:
        raise ValueError(
            f"embedding dimensions differ: gallery {g.shape[1]} vs probe {p.shape[1]}"
        )
    missing = ~np.isin(pl, gl)
    if missing.any():
        absent = np.unique(pl[missing])
        raise ValueError(
            f"{int(missing.sum())} probe(s) have labels absent from the gallery "
            f"(closed-set identification), e.g. {absent[:5].tolist()}"
        )
    correct = 0
    for start in range(0, p.shape[0], _CHUNK):
        sims = p[start:start + _CHUNK] @ g.T
        pred = gl[np.argmax(sims, axis=1)]
        correct += int(np.sum(pred == pl[start:start + _CHUNK]))
    return correct / p.shape[0]


def gallery_probe_split(labels, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split image indices into a one-shot gallery and a probe set.

    For every identity with at least two images, one image (chosen with
    ``numpy.random.default_rng(seed)``) goes to the gallery and the others
    become probes. Identities with a single image are dropped, since they
    could only be a gallery entry without probes or a probe without a match.

    Parameters
    ----------
    labels : array_like, shape (n,)
        Identity label per image (any sortable dtype).
    seed : int, default 0
        Seed of the random choice; the split is deterministic given
        ``labels`` and ``seed``.

    Returns
    -------
    gallery_idx : ndarray of int64
        Sorted indices of gallery images (one per kept identity).
    probe_idx : ndarray of int64
        Sorted indices of probe images.
    """
    lab = np.asarray(labels)
    if lab.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {lab.shape}")
    rng = np.random.default_rng(seed)
    _, inv, counts = np.unique(lab, return_inverse=True, return_counts=True)
    order = np.argsort(inv, kind="stable")  # indices grouped by identity, ascending
    ends = np.cumsum(counts)
    starts = ends - counts
    keep = counts >= 2
    # one random offset per kept identity, drawn in sorted-label order
    offsets = rng.integers(0, counts[keep])
    gallery = order[starts[keep] + offsets]
    in_kept = keep[inv]
    is_gallery = np.zeros(lab.shape[0], dtype=bool)
    is_gallery[gallery] = True
    probe = np.flatnonzero(in_kept & ~is_gallery)
    return np.sort(gallery).astype(np.int64), probe.astype(np.int64)
