"""``fedface bench templates``: every template scheme on LFW View 2, protected vs unprotected.

For each embedder (dlib's 128-d matcher; a fedface model when given) and each scheme:

- recognition on ``pairs.txt`` (10 folds): EER, FNMR at FMR 0.1%; cancelable schemes under
  three key settings: one secret application key (``protected``), one token per person with
  the impostor using his own (``per_person_token``), and the impostor holding the victim's
  token (``stolen_token``);
- unlinkability D_sys between enrolments of the same faces under two keys, with a
  bootstrap 95% interval, beside the same-key figure and the finite-sample floor;
- irreversibility: the attacker holds the token, inverts every mated pair's first
  template and presents the estimate; the share accepted at FMR 0.1% (against the other
  image in the unprotected system, and replayed through the protected one), beside the
  genuine acceptance rate;
- identification rank-1 / rank-5 (identities with at least two images: one gallery image
  each, the others probes);
- storage bytes per template, enrolment throughput into a SQLite store;
- encrypted matching: 1:1 ms per match, 1:N µs per match at 1,000 and 10,000 templates
  beside the plaintext search (:mod:`fedface.templates.he_bench`).

Embeddings are computed once and cached (dlib: ``DlibMatcher.describe_clean``; a model:
the training pipeline's aligner cache).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from crypto.tokens import Token
from fedface.templates.cancelable import BioHash, Projection
from fedface.templates.evaluate import (
    acceptance,
    dsys_bootstrap,
    dsys_floor,
    invert_biohash,
    invert_projection,
    rank_k,
    recognition,
    threshold_at_fmr,
)
from fedface.templates.schemes import check_embeddings

__all__ = ["bench_embedder", "mated_nonmated", "run"]

FMR = 1e-3


def _unit(x: np.ndarray) -> np.ndarray:
    return check_embeddings(x)


def mated_nonmated(labels: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` mated pairs (two images of one person) and ``n`` non-mated pairs,
    as ``(k, 2)`` index arrays; mated pairs are spread over people (at most 20 each)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    mated = []
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        if idx.size < 2:
            continue
        a, b = np.triu_indices(idx.size, 1)
        pick = rng.permutation(a.size)[:20]
        mated.extend(zip(idx[a[pick]], idx[b[pick]], strict=True))
    mated = np.array(mated, np.int64)
    mated = mated[rng.permutation(len(mated))[:n]]
    i = rng.integers(0, labels.size, 4 * n)
    j = rng.integers(0, labels.size, 4 * n)
    keep = labels[i] != labels[j]
    non = np.stack([i[keep], j[keep]], 1)[:n]
    return mated, non


# --------------------------------------------------------------------------- #
# scores of each scheme on index pairs
# --------------------------------------------------------------------------- #
def _proj_features(scheme: Projection, x: np.ndarray) -> np.ndarray:
    return scheme.transform(x)


def _bio_features(scheme: BioHash, x: np.ndarray) -> np.ndarray:
    return np.where(scheme.signs(x), 1.0, -1.0)


def _pair_scores(fa: np.ndarray, fb: np.ndarray, kind: str) -> np.ndarray:
    dot = np.einsum("ij,ij->i", fa, fb)
    return dot if kind == "projection" else 0.5 + 0.5 * dot / fa.shape[1]  # 1 - Hamming/m


def _features(kind: str, token: Token, x: np.ndarray) -> np.ndarray:
    return _proj_features(Projection(token), x) if kind == "projection" else \
        _bio_features(BioHash(token), x)


def _per_person(kind: str, x: np.ndarray, labels: np.ndarray, idx: np.ndarray,
                owners: np.ndarray, tokens: dict) -> np.ndarray:
    """Features of images ``idx``, each under the token of the person in ``owners``."""
    out = np.zeros((idx.size, x.shape[1] if kind == "projection" else 4 * x.shape[1]))
    for owner in np.unique(owners):
        sel = owners == owner
        if owner not in tokens:
            tokens[owner] = Token.random()
        out[sel] = _features(kind, tokens[owner], x[idx[sel]])
    return out


def _cancelable(kind: str, x: np.ndarray, labels: np.ndarray, pairs, ident: dict,
                dsys_n: int, n_boot: int, seed: int) -> dict:
    a, b, same, folds = pairs.a, pairs.b, pairs.same, pairs.fold
    app = Token.random()
    scheme = Projection(app) if kind == "projection" else BioHash(app)
    feats = _features(kind, app, x)
    s_app = _pair_scores(feats[a], feats[b], kind)
    out: dict = {"protected": recognition(s_app, same, folds, FMR)}
    # one token per person: the probe is protected with its own person's token
    tokens: dict = {}
    fa = _per_person(kind, x, labels, a, labels[a], tokens)
    fb = _per_person(kind, x, labels, b, labels[b], tokens)
    out["per_person_token"] = recognition(_pair_scores(fa, fb, kind), same, folds, FMR)
    # stolen token: the impostor protects his probe with the victim's (a's) token
    fb_stolen = _per_person(kind, x, labels, b, labels[a], tokens)
    out["stolen_token"] = recognition(_pair_scores(fa, fb_stolen, kind), same, folds, FMR)
    # unlinkability: the same faces enrolled under two keys
    mated, non = mated_nonmated(labels, dsys_n, seed)
    k1, k2 = Token.random(), Token.random()
    f1, f2 = _features(kind, k1, x), _features(kind, k2, x)
    cross_m = _pair_scores(f1[mated[:, 0]], f2[mated[:, 1]], kind)
    cross_n = _pair_scores(f1[non[:, 0]], f2[non[:, 1]], kind)
    same_m = _pair_scores(f1[mated[:, 0]], f1[mated[:, 1]], kind)
    same_n = _pair_scores(f1[non[:, 0]], f1[non[:, 1]], kind)
    out["unlinkability"] = {**dsys_bootstrap(cross_m, cross_n, n_boot, seed),
                            "same_key": dsys_bootstrap(same_m, same_n, n_boot, seed),
                            "floor": dsys_floor(cross_n, seed)}
    # irreversibility: the attacker holds the application token
    thr_plain = threshold_at_fmr(np.einsum("ij,ij->i", _unit(x[a]), _unit(x[b])), same, FMR)
    gm = same
    if kind == "projection":
        inv = invert_projection(feats[a[gm]], scheme.matrix(x.shape[1]))
    else:
        inv = invert_biohash(feats[a[gm]] > 0, scheme.matrix(x.shape[1]))
    inv = _unit(inv)
    thr_prot = threshold_at_fmr(s_app, same, FMR)
    replay = _pair_scores(_features(kind, app, inv), feats[b[gm]], kind)
    genuine_plain = np.einsum("ij,ij->i", _unit(x[a[gm]]), _unit(x[b[gm]]))
    out["irreversibility"] = {
        "inverted_accepted_unprotected": acceptance(np.einsum("ij,ij->i", inv, _unit(x[b[gm]])),
                                                    thr_plain),
        "inverted_accepted_replayed": acceptance(replay, thr_prot),
        "genuine_accepted": acceptance(genuine_plain, thr_plain),
        "cosine_to_enrolled": float(np.mean(np.einsum("ij,ij->i", inv, _unit(x[a[gm]])))),
        "attempts": int(gm.sum()),
    }
    # identification
    gal, probes = ident["gallery"], ident["probes"]
    fg, fp = feats[gal], feats[probes]
    sc = fp @ fg.T if kind == "projection" else 0.5 + 0.5 * (fp @ fg.T) / fg.shape[1]
    out["identification"] = rank_k(gal, labels[gal], sc, labels[probes])
    tpl = scheme.protect(x[:1])[0]
    out["template_bytes"] = len(tpl)
    out["threshold"] = thr_prot
    return out


def _throughput(kind: str, x: np.ndarray, n: int) -> float:
    """Templates per second: protect and enrol ``n`` subjects into a fresh SQLite store."""
    from fedface.templates.service import TemplateService
    from fedface.templates.store import open_store

    token = Token.random()
    scheme = Projection(token) if kind == "projection" else BioHash(token)
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(Path(tmp) / "t.db")
        try:
            svc = TemplateService(store, scheme, 0.0)
            t0 = time.perf_counter()
            for i in range(n):
                svc.enroll(f"S{i:05d}", x[i % len(x)])
            return n / (time.perf_counter() - t0)
        finally:
            store.close()


def bench_embedder(x: np.ndarray, labels: np.ndarray, pairs, *, dsys_n: int = 20000,
                   n_boot: int = 200, seed: int = 0, he: bool = True, he_pairs: int = 0,
                   he_probes: int = 300, enrol_n: int = 300, progress=None) -> dict:
    """Every figure for one embedder's embeddings ``x`` (rows = images, ``labels`` = person).

    ``pairs`` indexes ``x`` (``a``, ``b``, ``same``, ``fold``). ``he_pairs`` > 0 limits the
    encrypted 1:1 recognition to that many pairs (0: all).
    """
    def say(what):
        if progress is not None:
            progress(what)

    ok = np.isfinite(x).all(axis=1)
    keep = ok[pairs.a] & ok[pairs.b]
    pairs = type(pairs)(a=pairs.a[keep], b=pairs.b[keep], same=pairs.same[keep],
                        labels=pairs.labels, fold=pairs.fold[keep])
    xs = np.where(ok[:, None], x, 1.0)  # rows without a face are never used below
    from fedface.eval import gallery_probe_split

    valid = np.flatnonzero(ok)
    g, p = gallery_probe_split(labels[valid], seed=seed)
    ident = {"gallery": valid[g], "probes": valid[p]}
    u = _unit(xs)
    plain = np.einsum("ij,ij->i", u[pairs.a], u[pairs.b])
    out: dict = {"images": int(x.shape[0]), "described": int(ok.sum()), "dim": int(x.shape[1]),
                 "pairs": int(keep.sum()), "pairs_dropped": int((~keep).sum()),
                 "unprotected": {**recognition(plain, pairs.same, pairs.fold, FMR),
                                 "threshold": threshold_at_fmr(plain, pairs.same, FMR),
                                 "identification": rank_k(
                                     ident["gallery"], labels[ident["gallery"]],
                                     u[ident["probes"]] @ u[ident["gallery"]].T,
                                     labels[ident["probes"]]),
                                 "template_bytes": 4 * x.shape[1]},
                 "identification_setup": {"gallery": int(ident["gallery"].size),
                                          "probes": int(ident["probes"].size)}}
    for kind in ("projection", "biohash"):
        say(kind)
        out[kind] = _cancelable(kind, xs, labels, pairs, ident, dsys_n, n_boot, seed)
        out[kind]["enrol_per_s"] = _throughput(kind, u[valid], enrol_n)
    if he:
        say("he")
        from fedface.templates.he_bench import he_recognition

        out["he"] = he_recognition(u, labels, pairs, ident, max_pairs=he_pairs,
                                   max_probes=he_probes, seed=seed)
    return out


def run(*args, **kwargs) -> dict:  # filled in with the CLI (data loading, JSON, markdown)
    raise NotImplementedError
