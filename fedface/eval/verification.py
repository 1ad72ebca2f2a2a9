"""Face-verification metrics for pair scores.

Every function takes ``scores`` (one similarity per pair; higher means "more
likely the same identity") and ``issame`` (the ground-truth label per pair).
A pair is *accepted* (predicted "same") when ``score >= threshold``.

Terminology
-----------
TAR / TPR
    True accept rate: fraction of genuine (same-identity) pairs accepted.
FAR / FPR
    False accept rate: fraction of impostor (different-identity) pairs accepted.
FRR
    False reject rate, ``1 - TAR``.

All functions are pure and use numpy only.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "eer",
    "kfold_accuracy",
    "roc_auc",
    "roc_curve",
    "tar_at_far",
    "verification_report",
]


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #
def _validate(scores, issame) -> tuple[np.ndarray, np.ndarray]:
    """Check and convert ``scores``/``issame`` to float64 / bool 1-D arrays.

    Raises
    ------
    ValueError
        On shape mismatch, empty input, non-finite scores, labels that are not
        boolean (or 0/1), or when either class (genuine / impostor) is absent.
    """
    s = np.asarray(scores)
    y = np.asarray(issame)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(
            f"scores and issame must be 1-D, got shapes {s.shape} and {y.shape}"
        )
    if s.shape[0] != y.shape[0]:
        raise ValueError(
            f"scores and issame have different lengths: {s.shape[0]} != {y.shape[0]}"
        )
    if s.shape[0] == 0:
        raise ValueError("scores and issame are empty: need at least one pair of each kind")
    if not (np.issubdtype(s.dtype, np.integer) or np.issubdtype(s.dtype, np.floating)
            or s.dtype == np.bool_):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    bad = ~np.isfinite(s)
    if bad.any():
        n_nan = int(np.isnan(s).sum())
        raise ValueError(
            f"scores contain {int(bad.sum())} non-finite value(s) ({n_nan} NaN), "
            f"first at index {int(np.flatnonzero(bad)[0])}"
        )
    if y.dtype != np.bool_:
        if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
            raise ValueError(f"issame must be boolean or 0/1, got dtype {y.dtype}")
        if not np.isin(y, (0, 1)).all():
            raise ValueError("issame must contain only booleans or 0/1 values")
        y = y.astype(bool)
    n_pos = int(y.sum())
    n_neg = int(y.shape[0] - n_pos)
    if n_pos == 0:
        raise ValueError(
            f"issame has no positive (same-identity) pairs among {y.shape[0]}: "
            "verification metrics need both genuine and impostor pairs"
        )
    if n_neg == 0:
        raise ValueError(
            f"issame has no negative (different-identity) pairs among {y.shape[0]}: "
            "verification metrics need both genuine and impostor pairs"
        )
    return s, y


def _roc_counts(s: np.ndarray, y: np.ndarray):
    """Cumulative (tp, fp) counts at each distinct threshold, descending.

    Returns ``tp, fp, thresholds`` with a leading ``(0, 0, +inf)`` point.
    """
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    tp = np.cumsum(y_sorted, dtype=np.int64)
    fp = np.cumsum(~y_sorted, dtype=np.int64)
    # last index of every run of equal scores
    idx = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.shape[0] - 1]
    tp = np.r_[0, tp[idx]]
    fp = np.r_[0, fp[idx]]
    thr = np.r_[np.inf, s_sorted[idx]]
    return tp, fp, thr


# --------------------------------------------------------------------------- #
# threshold-free metrics
# --------------------------------------------------------------------------- #
def roc_auc(scores, issame) -> float:
    """Area under the ROC curve, computed from ranks (Mann-Whitney U).

    Equals ``P(s_genuine > s_impostor) + 0.5 * P(s_genuine == s_impostor)``;
    tied scores receive their average rank, so all-equal scores give 0.5.

    Parameters
    ----------
    scores : array_like, shape (n,)
        Similarity per pair.
    issame : array_like of bool, shape (n,)
        True for genuine (same-identity) pairs.

    Returns
    -------
    float
        AUC in [0, 1].

    Raises
    ------
    ValueError
        See :func:`verification_report`.
    """
    s, y = _validate(scores, issame)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    starts = ends - counts
    avg_rank = (starts + 1 + ends) / 2.0  # 1-based average rank of each tie group
    ranks = avg_rank[inverse]
    n_pos = int(y.sum())
    n_neg = y.shape[0] - n_pos
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(scores, issame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve at every distinct score used as a threshold.

    Parameters
    ----------
    scores : array_like, shape (n,)
        Similarity per pair.
    issame : array_like of bool, shape (n,)
        True for genuine pairs.

    Returns
    -------
    far : ndarray of float64
        False accept rate at each threshold (non-decreasing, from 0 to 1).
    tar : ndarray of float64
        True accept rate at each threshold (non-decreasing, from 0 to 1).
    thresholds : ndarray of float64
        Decreasing thresholds; a pair is accepted when ``score >= threshold``.
        The first entry is ``+inf`` (nothing accepted, FAR = TAR = 0); the last
        is the minimum score (everything accepted, FAR = TAR = 1).
    """
    s, y = _validate(scores, issame)
    tp, fp, thr = _roc_counts(s, y)
    return fp / fp[-1], tp / tp[-1], thr


def eer(scores, issame) -> float:
    """Equal error rate: the rate where FAR equals FRR (= 1 - TAR).

    The empirical ROC is a step function, so FAR and FRR rarely coincide at
    an actual threshold. The EER is linearly interpolated between the two
    consecutive ROC points where ``FAR - FRR`` changes sign (the standard
    convex-hull-of-operating-points interpretation).

    Parameters
    ----------
    scores : array_like, shape (n,)
    issame : array_like of bool, shape (n,)

    Returns
    -------
    float
        EER in [0, 1].
    """
    s, y = _validate(scores, issame)
    tp, fp, _ = _roc_counts(s, y)
    far = fp / fp[-1]
    frr = 1.0 - tp / tp[-1]
    d = far - frr  # -1 at the first point, +1 at the last: a crossing exists
    i = int(np.argmax(d >= 0))
    if d[i] == 0:
        return float(far[i])
    t = -d[i - 1] / (d[i] - d[i - 1])
    return float(far[i - 1] + t * (far[i] - far[i - 1]))


def tar_at_far(scores, issame, far: float = 1e-3) -> float:
    """Largest TAR whose FAR does not exceed ``far``.

    Only actual operating points (thresholds at observed scores) are used; no
    interpolation. The FAR resolution is ``1 / num_impostor``: with fewer
    impostor pairs than ``1 / far`` the only admissible operating points have
    FAR = 0, so the value returned is the TAR at FAR = 0 (fraction of genuine
    pairs scoring strictly above every impostor). :func:`verification_report`
    reports that resolution as ``far_resolution``.

    Parameters
    ----------
    scores : array_like, shape (n,)
    issame : array_like of bool, shape (n,)
    far : float, default 1e-3
        Target false accept rate, in (0, 1].

    Returns
    -------
    float
        TAR in [0, 1].
    """
    if not (0.0 < float(far) <= 1.0):
        raise ValueError(f"far must be in (0, 1], got {far}")
    s, y = _validate(scores, issame)
    tp, fp, _ = _roc_counts(s, y)
    max_fp = np.floor(float(far) * fp[-1] + 1e-9)  # integer count, robust to rounding
    ok = fp <= max_fp  # fp is non-decreasing and fp[0] == 0, so ok[0] is True
    return float(tp[ok][-1] / tp[-1])


# --------------------------------------------------------------------------- #
# k-fold accuracy (LFW protocol)
# --------------------------------------------------------------------------- #
def _best_threshold(s: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Threshold maximizing accuracy of ``score >= thr`` on (s, y).

    Candidates are the midpoints between consecutive sorted unique scores plus
    one threshold below the minimum and one above the maximum (half the
    adjacent gap away, or 0.5 if there is a single unique score). Ties in
    accuracy go to the smallest threshold.
    """
    u, inv = np.unique(s, return_inverse=True)
    m = u.shape[0]
    pos = np.bincount(inv[y], minlength=m)
    neg = np.bincount(inv[~y], minlength=m)
    # candidate k sits just below u[k] (k == m: above the maximum)
    pos_accepted = np.r_[np.cumsum(pos[::-1])[::-1], 0]
    neg_rejected = np.r_[0, np.cumsum(neg)]
    acc = (pos_accepted + neg_rejected) / s.shape[0]
    k = int(np.argmax(acc))
    if m == 1:
        lo_gap = hi_gap = 0.5
    else:
        lo_gap = (u[1] - u[0]) / 2.0
        hi_gap = (u[-1] - u[-2]) / 2.0
    if k == 0:
        thr = u[0] - lo_gap
    elif k == m:
        thr = u[-1] + hi_gap
    else:
        thr = (u[k - 1] + u[k]) / 2.0
    return float(thr), float(acc[k])


def _default_folds(n: int) -> np.ndarray:
    """``min(10, n)`` contiguous, near-equal folds (LFW pairs.txt layout)."""
    k = min(10, n)
    return np.arange(n) * k // n


def _kfold(scores, issame, folds) -> tuple[list[float], list[float]]:
    """Per-fold accuracies and chosen thresholds."""
    s, y = _validate(scores, issame)
    if folds is None:
        f = _default_folds(s.shape[0])
    else:
        f = np.asarray(folds)
        if f.ndim != 1 or f.shape[0] != s.shape[0]:
            raise ValueError(
                f"folds must be a 1-D array with one fold id per pair: got shape {f.shape} "
                f"for {s.shape[0]} pairs"
            )
        if not np.issubdtype(f.dtype, np.integer):
            raise ValueError(f"folds must be integer fold ids, got dtype {f.dtype}")
    fold_ids = np.unique(f)
    if fold_ids.shape[0] == 1:
        thr, acc = _best_threshold(s, y)
        return [acc], [thr]
    accs, thrs = [], []
    for fid in fold_ids:
        test = f == fid
        thr, _ = _best_threshold(s[~test], y[~test])
        accs.append(float(np.mean((s[test] >= thr) == y[test])))
        thrs.append(thr)
    return accs, thrs


def kfold_accuracy(scores, issame, folds=None) -> tuple[float, float, list[float]]:
    """Verification accuracy under the LFW k-fold protocol.

    For each fold, the threshold maximizing accuracy on the *other* folds is
    chosen (candidates: midpoints between consecutive sorted unique training
    scores, plus one below the minimum and one above the maximum) and applied
    to the held-out fold; pairs with ``score >= threshold`` are predicted
    "same".

    Parameters
    ----------
    scores : array_like, shape (n,)
        Similarity per pair.
    issame : array_like of bool, shape (n,)
        True for genuine pairs.
    folds : array_like of int, shape (n,), optional
        Fold id per pair. ``None`` means ``min(10, n)`` contiguous, near-equal
        folds, matching the layout of LFW's ``pairs.txt`` (10 x 600 pairs).

    Returns
    -------
    mean : float
        Mean of the per-fold accuracies.
    std : float
        Population standard deviation (``ddof=0``) of the per-fold accuracies,
        as reported in the LFW literature.
    per_fold : list of float
        Held-out accuracy of each fold, in increasing fold-id order.

    Notes
    -----
    With a single fold (e.g. a development file whose pairs all share one fold
    id) there is no held-out data: the function falls back to the accuracy at
    the best threshold chosen *on that same set*, which is optimistically
    biased; ``std`` is then 0.0 and ``per_fold`` has one entry.
    """
    accs, _ = _kfold(scores, issame, folds)
    arr = np.asarray(accs)
    return float(arr.mean()), float(arr.std()), accs


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #
def verification_report(scores, issame, folds=None) -> dict:
    """All verification metrics in one JSON-serializable dict.

    Parameters
    ----------
    scores : array_like, shape (n,)
        Similarity per pair.
    issame : array_like of bool, shape (n,)
        True for genuine pairs.
    folds : array_like of int, optional
        Fold id per pair, see :func:`kfold_accuracy`.

    Returns
    -------
    dict
        Keys (plain Python ``float``/``int`` values):

        ``accuracy``, ``accuracy_std``
            k-fold accuracy mean and std (:func:`kfold_accuracy`).
        ``auc``
            :func:`roc_auc`.
        ``eer``
            :func:`eer`.
        ``tar_at_far_1e-3``
            :func:`tar_at_far` at FAR = 1e-3.
        ``threshold``
            Mean of the per-fold chosen thresholds.
        ``num_pairs``, ``num_same``
            Number of pairs and of genuine pairs.
        ``far_resolution``
            ``1 / num_impostor``: the smallest non-zero FAR measurable. When it
            exceeds 1e-3, ``tar_at_far_1e-3`` is really the TAR at FAR = 0.

    Raises
    ------
    ValueError
        If ``scores`` and ``issame`` differ in length, are empty or not 1-D,
        scores contain NaN/inf, ``issame`` is not boolean/0-1, or there are no
        genuine or no impostor pairs.
    """
    s, y = _validate(scores, issame)
    accs, thrs = _kfold(s, y, folds)
    arr = np.asarray(accs)
    n_same = int(y.sum())
    n_imp = int(y.shape[0] - n_same)
    return {
        "accuracy": float(arr.mean()),
        "accuracy_std": float(arr.std()),
        "auc": roc_auc(s, y),
        "eer": eer(s, y),
        "tar_at_far_1e-3": tar_at_far(s, y, 1e-3),
        "threshold": float(np.mean(thrs)),
        "num_pairs": int(y.shape[0]),
        "num_same": n_same,
        "far_resolution": 1.0 / n_imp,
    }
