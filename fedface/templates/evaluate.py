"""ISO/IEC 30136 evaluation of protected templates: what ``fedface bench templates`` measures.

- Recognition (ISO/IEC 30136 performance): EER and FNMR at FMR 0.1%, protected vs
  unprotected (:func:`recognition`), per fold of the LFW View 2 protocol.
- Unlinkability: D_sys of Gomez-Barrero et al. 2018 (:func:`dsys`) with a bootstrap 95%
  interval (:func:`dsys_bootstrap`), between templates of the same faces under two keys,
  beside the same-key figure (linkable by design) and the floor a finite sample gives
  two identical distributions (:func:`dsys_floor`).
- Irreversibility: the attacker knows the token and inverts protected templates back to
  embeddings (:func:`invert_projection`, :func:`invert_biohash`); the share of inverted
  embeddings the system accepts as the person at FMR 0.1% (:func:`acceptance`).
- Identification: rank-k among a one-image-per-person gallery (:func:`rank_k`).

Score convention: higher is more similar (cosine, Hamming similarity).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedface.anonymize.evaluate import PairSet, lfw_pair_images
from fedface.data.datasets import find_images_root, natural_key
from fedface.eval.verification import eer, tar_at_far

__all__ = ["acceptance", "dsys", "dsys_bootstrap", "dsys_floor", "invert_biohash",
           "invert_projection", "lfw_template_images", "rank_k", "recognition",
           "threshold_at_fmr"]


# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #
def lfw_template_images(lfw_root: str | Path, pairs_file: str = "pairs.txt"
                        ) -> tuple[list[Path], PairSet, list[Path]]:
    """The images the template benchmark describes, in a fixed order.

    Returns ``(paths, pairs, extra)``: ``paths`` starts with the distinct images of
    ``pairs_file`` (first-seen order; ``pairs`` indexes them) followed by ``extra``, every
    other image of the identities with at least two images (for identification and the
    unlinkability pairs), sorted.
    """
    paths, pairs = lfw_pair_images(lfw_root, pairs_file)
    root = find_images_root(lfw_root)
    seen = set(paths)
    extra: list[Path] = []
    for person in sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: natural_key(d.name)):
        files = sorted((f for f in person.iterdir() if f.suffix.lower() in (".jpg", ".png")),
                       key=lambda f: natural_key(f.name))
        if len(files) >= 2:
            extra.extend(f for f in files if f not in seen)
    return paths + extra, pairs, extra


# --------------------------------------------------------------------------- #
# recognition
# --------------------------------------------------------------------------- #
def threshold_at_fmr(scores, same, fmr: float = 1e-3) -> float:
    """The lowest threshold (``score >= t`` accepts) whose false-match rate is <= ``fmr``."""
    s, y = np.asarray(scores, float), np.asarray(same, bool)
    imp = np.sort(s[~y])[::-1]
    if imp.size == 0:
        raise ValueError("no impostor scores")
    k = int(np.floor(fmr * imp.size + 1e-9))  # false matches allowed
    return float(np.nextafter(imp[k], np.inf)) if k < imp.size else float(imp[-1])


def recognition(scores, same, folds=None, fmr: float = 1e-3) -> dict:
    """EER and FNMR at ``fmr`` over all pairs, and the EER per fold (mean, std).

    Parameters
    ----------
    scores : array_like (n,)
        Similarity per pair.
    same : array_like of bool (n,)
        Mated pairs.
    folds : array_like of int (n,), optional
        Fold of each pair (LFW View 2: 10 folds of 600).
    fmr : float, default 1e-3
        Operating point of the FNMR.
    """
    s, y = np.asarray(scores, float), np.asarray(same, bool)
    out = {"eer": eer(s, y), "fnmr_at_fmr": 1.0 - tar_at_far(s, y, fmr), "fmr": fmr,
           "pairs": int(s.size), "impostors": int((~y).sum())}
    if folds is not None:
        f = np.asarray(folds)
        per = [eer(s[f == k], y[f == k]) for k in np.unique(f)]
        out["eer_folds_mean"] = float(np.mean(per))
        out["eer_folds_std"] = float(np.std(per))
    return out


def acceptance(scores, threshold: float) -> float:
    """Share of ``scores`` at or above ``threshold``."""
    s = np.asarray(scores, float)
    return float((s >= threshold).mean()) if s.size else float("nan")


def rank_k(gallery: np.ndarray, gallery_labels, probe_scores: np.ndarray, probe_labels,
           ks=(1, 5)) -> dict:
    """Rank-k identification rates from a probe x gallery score matrix.

    ``probe_scores[i, j]`` is the similarity of probe ``i`` to gallery entry ``j``; a probe
    counts at rank k when its true identity is among the k highest-scoring entries.
    """
    g = np.asarray(gallery_labels)
    p = np.asarray(probe_labels)
    order = np.argsort(-np.asarray(probe_scores), axis=1, kind="stable")
    hits = g[order] == p[:, None]
    return {f"rank{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}


# --------------------------------------------------------------------------- #
# unlinkability (Gomez-Barrero et al. 2018)
# --------------------------------------------------------------------------- #
def _bins(mated: np.ndarray, nonmated: np.ndarray, bins: int | None) -> np.ndarray:
    lo = min(mated.min(), nonmated.min())
    hi = max(mated.max(), nonmated.max())
    if hi <= lo:
        hi = lo + 1e-9
    n = bins or int(np.clip(min(mated.size, nonmated.size) // 100, 10, 100))
    return np.linspace(lo, hi, n + 1)


def dsys(mated, nonmated, bins: int | None = None, omega: float = 1.0) -> float:
    """Global unlinkability D_sys in [0, 1] (0: unlinkable, 1: fully linkable).

    With LR(s) = p(s | mated) / p(s | non-mated) estimated by histograms on common bins,
    D(s) = 2 omega LR / (1 + omega LR) - 1 where omega LR > 1, else 0, and
    D_sys = sum over bins of p(s | mated) D(s).

    Parameters
    ----------
    mated, nonmated : array_like
        Scores between templates of the same subject under two keys, and of different
        subjects under two keys.
    bins : int, optional
        Histogram bins (default: one per 100 scores of the smaller set, 10 to 100).
    omega : float, default 1
        Prior ratio p(mated) / p(non-mated).
    """
    m, n = np.asarray(mated, float), np.asarray(nonmated, float)
    if m.size < 2 or n.size < 2:
        raise ValueError("D_sys needs at least two mated and two non-mated scores")
    edges = _bins(m, n, bins)
    pm = np.histogram(m, edges)[0] / m.size
    pn = np.histogram(n, edges)[0] / n.size
    with np.errstate(divide="ignore", invalid="ignore"):
        olr = omega * np.where(pn > 0, pm / np.where(pn > 0, pn, 1), np.where(pm > 0, np.inf, 0.0))
        d = np.where(olr > 1, np.where(np.isinf(olr), 1.0, 2 * olr / (1 + olr) - 1), 0.0)
    return float(np.sum(pm * d))


def dsys_bootstrap(mated, nonmated, n_boot: int = 200, seed: int = 0, bins: int | None = None
                   ) -> dict:
    """D_sys with a bootstrap 95% percentile interval (scores resampled with replacement)."""
    m, n = np.asarray(mated, float), np.asarray(nonmated, float)
    rng = np.random.default_rng(seed)
    boots = [dsys(rng.choice(m, m.size), rng.choice(n, n.size), bins) for _ in range(n_boot)]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"dsys": dsys(m, n, bins), "dsys_lower": float(lo), "dsys_upper": float(hi),
            "mated": int(m.size), "nonmated": int(n.size), "bootstrap": n_boot}


def dsys_floor(nonmated, seed: int = 0, bins: int | None = None) -> float:
    """D_sys of two halves of one score set: the value a finite sample gives two
    identical distributions (the "random-key" floor an unlinkable scheme cannot beat)."""
    n = np.asarray(nonmated, float)
    perm = np.random.default_rng(seed).permutation(n.size)
    half = n.size // 2
    return dsys(n[perm[:half]], n[perm[half:]], bins)


# --------------------------------------------------------------------------- #
# irreversibility: the attacker holds the token
# --------------------------------------------------------------------------- #
def invert_projection(templates: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Exact inverse of the keyed orthonormal projection: ``x = R^T t``."""
    return np.asarray(templates, float) @ np.asarray(matrix, float)


def invert_biohash(bits: np.ndarray, matrix: np.ndarray, steps: int = 50, lr: float = 0.5
                   ) -> np.ndarray:
    """Embeddings consistent with BioHash bits, by an attacker holding the token.

    Starts at ``W^T s`` (``s = 2 b - 1``, the least-squares direction), then runs
    projected sub-gradient steps on the hinge loss ``sum max(0, margin - s_i w_i . x)``
    over the unit sphere, so the estimate's own BioHash agrees with the stolen bits.

    Parameters
    ----------
    bits : ndarray of bool, (n, m)
        The stolen templates' bits.
    matrix : ndarray (m, d)
        The token's projection rows (drawn from the stolen token).
    """
    s = np.where(np.asarray(bits, bool), 1.0, -1.0)
    w = np.asarray(matrix, float)
    x = s @ w
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    margin = 0.5 / np.sqrt(w.shape[1])
    for _ in range(steps):
        viol = (s * (x @ w.T)) < margin
        if not viol.any():
            break
        x = x + lr * ((viol * s) @ w) / w.shape[0]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x
