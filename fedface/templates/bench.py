"""``fedface bench templates``: every template scheme on LFW View 2, protected vs unprotected.

For each embedder (dlib's 128-d matcher; a fedface model when given) and each scheme:

- recognition on ``pairs.txt`` (10 folds): EER, FNMR at FMR 0.1%; cancelable schemes under
  three key settings: one secret application key (``protected``), one token per person with
  the impostor using his own (``per_person_token``), and the impostor holding the victim's
  token (``stolen_token``);
- unlinkability D_sys between enrolments of the same faces under two keys, with a
  bootstrap 95% interval, for five independent pairs of keys (``dsys_upper``: the largest
  upper bound of the five), beside the same-key figure and the finite-sample floor;
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
    as ``(k, 2)`` index arrays; mated pairs are spread over people (at most 100 each)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    mated = []
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)
        if idx.size < 2:
            continue
        a, b = np.triu_indices(idx.size, 1)
        pick = rng.permutation(a.size)[:100]
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
def _pair_scores(fa: np.ndarray, fb: np.ndarray, kind: str) -> np.ndarray:
    dot = np.einsum("ij,ij->i", fa, fb)
    return dot if kind == "projection" else 0.5 + 0.5 * dot / fa.shape[1]  # 1 - Hamming/m


def _features(kind: str, token: Token, x: np.ndarray) -> np.ndarray:
    """Protected features: the projection, or BioHash bits as +-1 (dot = m - 2 Hamming)."""
    if kind == "projection":
        return Projection(token).transform(x)
    return np.where(BioHash(token).signs(x), 1.0, -1.0)


def _per_person(kind: str, x: np.ndarray, labels: np.ndarray, idx: np.ndarray,
                owners: np.ndarray, tokens: dict) -> np.ndarray:
    """Features of images ``idx``, each under the token of the person in ``owners``."""
    width = x.shape[1] if kind == "projection" else BioHash(Token.random()).n_bits(x.shape[1])
    out = np.zeros((idx.size, width))
    for owner in np.unique(owners):
        sel = owners == owner
        if owner not in tokens:
            tokens[owner] = Token.random()
        out[sel] = _features(kind, tokens[owner], x[idx[sel]])
    return out


def _cancelable(kind: str, x: np.ndarray, labels: np.ndarray, pairs, ident: dict,
                dsys_n: int, n_boot: int, seed: int, key_pairs: int = 5) -> dict:
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
    # unlinkability: the same faces enrolled under two keys, for several key pairs (with
    # one fixed pair of keys the cross-key scores of mated pairs carry a small key-dependent
    # shift, so the figure varies from one pair of keys to the next)
    mated, non = mated_nonmated(labels, dsys_n, seed)
    per_pair = []
    for _ in range(key_pairs):
        k1, k2 = Token.random(), Token.random()
        f1, f2 = _features(kind, k1, x), _features(kind, k2, x)
        per_pair.append({
            **dsys_bootstrap(_pair_scores(f1[mated[:, 0]], f2[mated[:, 1]], kind),
                             _pair_scores(f1[non[:, 0]], f2[non[:, 1]], kind), n_boot, seed),
            "floor": dsys_floor(_pair_scores(f1[non[:, 0]], f2[non[:, 1]], kind), seed)})
    same_m = _pair_scores(f1[mated[:, 0]], f1[mated[:, 1]], kind)
    same_n = _pair_scores(f1[non[:, 0]], f1[non[:, 1]], kind)
    out["unlinkability"] = {
        "dsys": float(np.mean([r["dsys"] for r in per_pair])),
        "dsys_lower": float(min(r["dsys_lower"] for r in per_pair)),
        "dsys_upper": float(max(r["dsys_upper"] for r in per_pair)),
        "dsys_upper_mean": float(np.mean([r["dsys_upper"] for r in per_pair])),
        "floor": float(np.mean([r["floor"] for r in per_pair])),
        "key_pairs": per_pair, "mated": int(len(mated)), "nonmated": int(len(non)),
        "same_key": dsys_bootstrap(same_m, same_n, n_boot, seed)}
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


def bench_embedder(x: np.ndarray, labels: np.ndarray, pairs, *, dsys_n: int = 40000,
                   n_boot: int = 100, key_pairs: int = 5, seed: int = 0, he: bool = True, he_pairs: int = 0,
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
        out[kind] = _cancelable(kind, xs, labels, pairs, ident, dsys_n, n_boot, seed, key_pairs)
        out[kind]["enrol_per_s"] = _throughput(kind, u[valid], enrol_n)
    if he:
        say("he")
        from fedface.templates.he_bench import he_recognition

        out["he"] = he_recognition(u, labels, pairs, ident, max_pairs=he_pairs,
                                   max_probes=he_probes, seed=seed)
    return out


def dlib_embeddings(paths: list[Path], cache_dir: Path, log=print) -> np.ndarray:
    """dlib's 128-d descriptors of every image (cached in ``cache_dir``)."""
    from fedface.anonymize.evaluate import DlibMatcher

    t0 = time.time()
    clean = DlibMatcher().describe_clean(
        paths, cache_dir=cache_dir,
        progress=lambda i, n: log(f"dlib: {i}/{n} images ({time.time() - t0:.0f} s)"))
    return clean.descriptors


def model_embeddings(model: Path, lfw_root: Path, paths: list[Path], log=print) -> np.ndarray:
    """A fedface model's embeddings of every image, aligned the way training aligns them
    (the training pipeline's aligner and cache)."""
    from fedface.config import RunConfig
    from fedface.data.prepare import make_aligner
    from fedface.eval import embed
    from fedface.models.io import load_backbone

    backbone, meta = load_backbone(model)
    aligner = make_aligner(RunConfig(image_size=int(meta["image_size"])), Path(lfw_root))
    chips, keep, _status = aligner.align_files(paths)
    log(f"model: {int(keep.sum())} of {len(paths)} images aligned at {meta['image_size']} px")
    out = np.full((len(paths), int(meta["embedding_size"])), np.nan)
    out[keep] = embed(backbone, chips[keep])
    return out


def _shown(path: str | Path) -> str:
    """``path`` relative to the working folder when it is below it (results hold no
    machine-specific absolute paths)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return p.name


def run(lfw_root: str | Path, work: str | Path, model: str | Path | None = None,
        quick: bool = False, log=print) -> dict:
    """Every figure of the benchmark (see the module docstring) as one JSON document.

    Top-level keys name the figures for dlib's embedder (``eer``, ``eer_stolen_token``,
    ``dsys_upper``, ``rank1``, ``he_1to1_ms``, ``he_1n_us_per_match``, ...); ``embedders``
    holds every figure of every embedder. ``quick``: folds 1-2 of the pairs, smaller
    unlinkability samples, a 1,000-template encrypted gallery only (a few minutes).
    """
    from fedface.templates.evaluate import lfw_template_images
    from fedface.templates.he_bench import benchmark

    lfw_root, work = Path(lfw_root), Path(work)
    paths, pairs, _extra = lfw_template_images(lfw_root)
    labels = np.array([p.parent.name for p in paths])
    if quick:
        keep = pairs.fold < 2
        pairs = type(pairs)(a=pairs.a[keep], b=pairs.b[keep], same=pairs.same[keep],
                            labels=pairs.labels, fold=pairs.fold[keep])
    opts = dict(dsys_n=4000 if quick else 40000, n_boot=50 if quick else 100,
                key_pairs=2 if quick else 5,
                he_pairs=300 if quick else 0, he_probes=50 if quick else 300)
    embedders = {"dlib": dlib_embeddings(paths, work, log)}
    if model:
        embedders["model"] = model_embeddings(Path(model), lfw_root, paths, log)
    res: dict = {"protocol": "LFW View 2 pairs.txt (10 folds)" + (" folds 1-2" if quick else ""),
                 "fmr": FMR, "quick": quick, "model": _shown(model) if model else None,
                 "embedders": {}}
    for name, x in embedders.items():
        log(f"{name}: recognition, unlinkability, irreversibility, identification ...")
        res["embedders"][name] = bench_embedder(x, labels, pairs, **opts,
                                                progress=lambda w, n=name: log(f"{n}: {w}"))
    log("encrypted matching: timings ...")
    res["he_timing"] = benchmark(n_gallery=(1000,) if quick else (1000, 10000))
    d = res["embedders"]["dlib"]
    schemes = ("projection", "biohash", "he")
    res["eer"] = {"unprotected": d["unprotected"]["eer"],
                  **{k: d[k]["protected"]["eer"] if k != "he" else d[k]["eer"] for k in schemes}}
    res["fnmr_at_fmr"] = {"unprotected": d["unprotected"]["fnmr_at_fmr"],
                          **{k: (d[k]["protected"] if k != "he" else d[k])["fnmr_at_fmr"]
                             for k in schemes}}
    res["eer_per_person_token"] = {k: d[k]["per_person_token"]["eer"] for k in schemes[:2]}
    res["eer_stolen_token"] = {k: d[k]["stolen_token"]["eer"] for k in schemes[:2]}
    res["dsys"] = {k: d[k]["unlinkability"]["dsys"] for k in schemes[:2]}
    res["dsys_upper"] = {k: d[k]["unlinkability"]["dsys_upper"] for k in schemes[:2]}
    res["dsys_upper_mean"] = {k: d[k]["unlinkability"]["dsys_upper_mean"] for k in schemes[:2]}
    res["dsys_same_key"] = {k: d[k]["unlinkability"]["same_key"]["dsys"] for k in schemes[:2]}
    res["inverted_accepted"] = {k: d[k]["irreversibility"]["inverted_accepted_unprotected"]
                                for k in schemes[:2]}
    res["rank1"] = {"unprotected": d["unprotected"]["identification"]["rank1"],
                    **{k: d[k]["identification"]["rank1"] for k in schemes}}
    res["rank5"] = {"unprotected": d["unprotected"]["identification"]["rank5"],
                    **{k: d[k]["identification"]["rank5"] for k in schemes}}
    res["template_bytes"] = {"unprotected": d["unprotected"]["template_bytes"],
                             **{k: d[k]["template_bytes"] for k in schemes}}
    t = res["he_timing"]
    res["he_1to1_ms"] = t["one_to_one"]["server_ms_per_match"]
    sizes = sorted(t["one_to_n"], key=int)
    res["he_1n_us_per_match"] = {n: t["one_to_n"][n]["search_us_per_match"] for n in sizes}
    res["he_1n_us_per_match_with_key_holder"] = {
        n: t["one_to_n"][n]["us_per_match_with_key_holder"] for n in sizes}
    res["plain_1n_us_per_match"] = {n: t["one_to_n"][n]["plaintext_us_per_match"] for n in sizes}
    res["thresholds"] = {"dlib": {"projection": d["projection"]["threshold"],
                                  "biohash": d["biohash"]["threshold"],
                                  "he": d["unprotected"]["threshold"]}}
    return res


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def markdown(res: dict) -> str:
    """The benchmark's tables."""
    lines = [f"# Template protection on {res['protocol']}", "",
             f"FMR operating point {res['fmr']:g}. Scores: cosine (projection, he), 1 - normalised "
             "Hamming distance (biohash, 2,048 bits).", ""]
    for name, e in res["embedders"].items():
        u = e["unprotected"]
        lines += [f"## {name} embedder ({e['dim']}-d; {e['described']} of {e['images']} images, "
                  f"{e['pairs']} pairs)", "",
                  "| scheme | key setting | EER % | FNMR@FMR0.1% % | rank-1 % | rank-5 % | bytes/template |",
                  "|---|---|---|---|---|---|---|",
                  f"| unprotected | - | {_pct(u['eer'])} | {_pct(u['fnmr_at_fmr'])} | "
                  f"{_pct(u['identification']['rank1'])} | {_pct(u['identification']['rank5'])} | "
                  f"{u['template_bytes']} |"]
        for k in ("projection", "biohash"):
            c = e[k]
            for setting, label in (("protected", "application key (secret)"),
                                   ("per_person_token", "one token per person (secret)"),
                                   ("stolen_token", "stolen token (impostor has the victim's)")):
                ident = c["identification"] if setting == "protected" else None
                lines.append(f"| {k} | {label} | {_pct(c[setting]['eer'])} | "
                             f"{_pct(c[setting]['fnmr_at_fmr'])} | "
                             f"{_pct(ident['rank1']) if ident else '-'} | "
                             f"{_pct(ident['rank5']) if ident else '-'} | "
                             f"{c['template_bytes'] if ident else '-'} |")
        if "he" in e:
            h = e["he"]
            lines.append(f"| he | CKKS (key holder decrypts scores) | {_pct(h['eer'])} | "
                         f"{_pct(h['fnmr_at_fmr'])} | {_pct(h['identification']['rank1'])} (*) | "
                         f"{_pct(h['identification']['rank5'])} (*) | {h['template_bytes']} |")
            lines += ["", f"(*) he identification on {h['identification_probes']} sampled probes "
                      f"(plaintext on the same probes: rank-1 "
                      f"{_pct(h['identification_plaintext_same_probes']['rank1'])} %); max "
                      f"|encrypted - plaintext score| {h['max_abs_score_error']:.1e}."]
        lines += ["", "| scheme | D_sys two keys, mean of 5 key pairs [lowest lower, highest upper "
                  "95% bound] | D_sys same key | finite-sample floor | "
                  "inverted accepted (unprotected) | inverted replayed | genuine accepted | "
                  "cosine inverted-enrolled |", "|---|---|---|---|---|---|---|---|"]
        for k in ("projection", "biohash"):
            un, ir = e[k]["unlinkability"], e[k]["irreversibility"]
            lines.append(f"| {k} | {un['dsys']:.3f} [{un['dsys_lower']:.3f}, {un['dsys_upper']:.3f}] | "
                         f"{un['same_key']['dsys']:.3f} | {un['floor']:.3f} | "
                         f"{_pct(ir['inverted_accepted_unprotected'])} % | "
                         f"{_pct(ir['inverted_accepted_replayed'])} % | "
                         f"{_pct(ir['genuine_accepted'])} % | {ir['cosine_to_enrolled']:.3f} |")
        lines += ["", f"Enrolment into SQLite: projection {e['projection']['enrol_per_s']:.0f}/s, "
                  f"biohash {e['biohash']['enrol_per_s']:.0f}/s.", ""]
    t = res["he_timing"]
    lines += ["## Encrypted matching (CKKS, ring 8192, fold 4)", "",
              "| gallery | search µs/match | with key holder µs/match | plaintext µs/match | "
              "bytes/template |", "|---|---|---|---|---|"]
    for n, v in sorted(t["one_to_n"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {int(n):,} | {v['search_us_per_match']:.1f} | "
                     f"{v['us_per_match_with_key_holder']:.1f} | {v['plaintext_us_per_match']:.3f} | "
                     f"{v['bytes_per_template']} |")
    o = t["one_to_one"]
    lines += ["", f"1:1: {o['server_ms_per_match']:.1f} ms per match on the server, "
              f"{o['ms_per_match_with_key_holder']:.1f} ms with the key holder's probe encryption "
              f"and decryption; template {o['template_bytes']:,} bytes; public key bundle "
              f"{t['key_bundle_bytes']['public']:,} bytes.", ""]
    return "\n".join(lines)
