"""Timing and sizes of encrypted template matching (:mod:`crypto.match`).

``benchmark()`` runs a key ceremony in a temporary folder and measures, with the roles
kept apart (the matching server and the enrolment station hold ``public/``, the key
holder ``secret/``):

- 1:1: the server's scoring of one encrypted probe against one encrypted template
  (deserialization of both, multiplication, rescale, mask, serialization), median;
  the key holder's probe encryption and score decryption apart;
- 1:N at each gallery size: the server's search (the probe's ``d`` ciphertexts loaded,
  every block scored) divided by the number of templates, and the same with the key
  holder's probe encryption and decryption of every score added; plaintext numpy
  search for comparison (float32, one thread like the encrypted search: ``np.einsum``;
  BLAS's threads on the shared cores made ``g @ q`` swing from 0.05 to 8 ms);
- sizes: the 1:1 template, the gallery's blobs per template, probes, scores, key folders;
- enrolment rates: a whole gallery in batches, and one template at a time;
- the largest |decrypted score - plaintext dot product| seen.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from crypto.match import (
    Gallery,
    MatchParams,
    decrypt_score,
    decrypt_scores,
    encrypt_batch,
    encrypt_probe,
    encrypt_template,
    init_match_keys,
    load_match_keys,
    score_1to1,
)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def benchmark(n_gallery=(1000, 10000), dim: int = 128, repeats: int = 3,
              params: MatchParams | None = None, seed: int = 0) -> dict:
    """Measure encrypted 1:1 and 1:N matching on this machine.

    Parameters
    ----------
    n_gallery : sequence of int
        Gallery sizes for 1:N.
    dim : int
        Embedding dimension.
    repeats : int
        Searches per gallery size (medians reported); 1:1 runs ``max(10, 3 * repeats)``.
    params : MatchParams, optional
        Defaults to ``MatchParams()``.
    seed : int
        Seed of the random unit embeddings.

    Returns
    -------
    dict
        Times in ms (1:1), s and us per match (1:N), sizes in bytes; JSON-serializable.
    """
    rng = np.random.default_rng(seed)
    params = params or MatchParams()
    out: dict = {"params": params.to_dict(), "dim": dim, "cpu_count": os.cpu_count(),
                 "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="fedface-he-bench-") as tmp:
        desc = init_match_keys(tmp, params)
        server = load_match_keys(desc["public"])  # matching server and enrolment station
        holder = load_match_keys(desc["secret"], public=desc["public"])
        out["key_id"] = server.key_id
        out["key_bundle_bytes"] = {"public": _folder_bytes(Path(desc["public"])),
                                   "secret": _folder_bytes(Path(desc["secret"]))}

        # ---------------------------------------------------------------- 1:1
        trials = max(10, 3 * repeats)
        enrolled = _unit(rng.normal(size=(trials, dim)))
        probes = _unit(enrolled + rng.normal(size=(trials, dim)) * 0.7 / np.sqrt(dim))
        server_s, probe_s, dec_s, tmpl_s, errors = [], [], [], [], []
        for x, p in zip(enrolled, probes):
            template, dt = _timed(encrypt_template, server, x)
            tmpl_s.append(dt)
            probe, dt = _timed(encrypt_probe, holder, p)
            probe_s.append(dt)
            score, dt = _timed(score_1to1, server, template, probe)
            server_s.append(dt)
            value, dt = _timed(decrypt_score, holder, score)
            dec_s.append(dt)
            errors.append(abs(value - float(x @ p)))
        med = statistics.median
        out["one_to_one"] = {
            "trials": trials,
            "server_ms_per_match": round(med(server_s) * 1e3, 3),
            "probe_encrypt_ms": round(med(probe_s) * 1e3, 3),
            "decrypt_ms": round(med(dec_s) * 1e3, 3),
            "ms_per_match_with_key_holder": round((med(server_s) + med(probe_s) + med(dec_s)) * 1e3, 3),
            "template_encrypt_ms": round(med(tmpl_s) * 1e3, 3),
            "template_bytes": len(template), "probe_bytes": len(probe), "score_bytes": len(score),
            "max_abs_error": float(max(errors)),
        }

        # ---------------------------------------------------------------- 1:N
        out["one_to_n"] = {}
        worst = max(errors)
        for n in n_gallery:
            gallery_x = _unit(rng.normal(size=(n, dim)))
            ids = [f"t{i}" for i in range(n)]
            gallery = Gallery(server, dim)
            _, enrol_s = _timed(gallery.enroll, gallery_x, ids)
            blobs, dump_s = _timed(gallery.to_bytes)
            _, load_s = _timed(Gallery.from_bytes, server, blobs)
            search_s, query_s, dec_n_s, plain_s, errs = [], [], [], [], []
            g32 = gallery_x.astype(np.float32)
            for _ in range(repeats):
                target = gallery_x[rng.integers(n)]
                q = _unit(target + rng.normal(size=dim) * 0.7 / np.sqrt(dim))
                query, dt = _timed(encrypt_probe, holder, q, "1:N")
                query_s.append(dt)
                scores, dt = _timed(gallery.search, query)
                search_s.append(dt)
                got, dt = _timed(decrypt_scores, holder, scores)
                dec_n_s.append(dt)
                ref = gallery_x @ q
                errs.append(max(abs(got[i] - ref[k]) for k, i in enumerate(ids)))
                q32 = q.astype(np.float32)
                for _ in range(50):
                    plain_s.append(_timed(np.einsum, "ij,j->i", g32, q32)[1])
            s, qe, de = med(search_s), med(query_s), med(dec_n_s)
            worst = max(worst, max(errs))
            gallery_bytes = sum(len(b) for b in blobs)
            out["one_to_n"][str(n)] = {
                "blocks": gallery.blocks,
                "search_s": round(s, 4),
                "search_us_per_match": round(s / n * 1e6, 2),
                "probe_encrypt_s": round(qe, 4),
                "decrypt_s": round(de, 4),
                "us_per_match_with_key_holder": round((s + qe + de) / n * 1e6, 2),
                "plaintext_us_per_match": round(med(plain_s) / n * 1e6, 5),
                "query_bytes": len(query),
                "scores_bytes": sum(len(b) for b in scores),
                "gallery_bytes": gallery_bytes,
                "bytes_per_template": round(gallery_bytes / n),
                "enrol_s": round(enrol_s, 3),
                "enrol_templates_per_s": round(n / enrol_s, 1),
                "gallery_to_bytes_s": round(dump_s, 3),
                "gallery_from_bytes_s": round(load_s, 3),
                "max_abs_error": float(max(errs)),
            }

        # one template at a time: d encryptions each, however small the batch
        single = Gallery(server, dim)
        one = _unit(rng.normal(size=(repeats, dim)))
        t = time.perf_counter()
        for k in range(repeats):
            (block, slots), = single.placements(1)
            single.add(encrypt_batch(server, one[k:k + 1], [f"s{k}"], block, slots))
        out["enrol_single_templates_per_s"] = round(repeats / (time.perf_counter() - t), 2)
        out["max_abs_error"] = float(worst)
    out["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    return out


if __name__ == "__main__":
    import json
    import sys

    sizes = tuple(int(a) for a in sys.argv[1:]) or (1000, 10000)
    print(json.dumps(benchmark(sizes), indent=1))


def he_recognition(u: np.ndarray, labels: np.ndarray, pairs, ident: dict, *,
                   max_pairs: int = 0, max_probes: int = 300, seed: int = 0) -> dict:
    """Recognition through encrypted matching: LFW pairs scored 1:1 under encryption, and
    rank-1 / rank-5 of a probe sample searched 1:N in the encrypted gallery.

    Parameters
    ----------
    u : ndarray (n, d)
        Unit embeddings of every image (rows without a face are never indexed).
    labels : ndarray (n,)
        Person of every row.
    pairs : PairSet-like
        ``a``, ``b``, ``same``, ``fold`` index arrays of the verification pairs.
    ident : dict
        ``gallery`` and ``probes`` row indices (one gallery image per person).
    max_pairs : int
        Score at most this many pairs (0: all; a random, class-balanced sample otherwise).
    max_probes : int
        Search at most this many probes (a random sample), beside the plaintext ranks of
        the same probes.
    """
    from fedface.templates.evaluate import rank_k, recognition

    rng = np.random.default_rng(seed)
    sel = np.arange(len(pairs.a))
    if max_pairs and max_pairs < sel.size:
        sel = np.sort(rng.choice(sel, max_pairs, replace=False))
    with tempfile.TemporaryDirectory(prefix="fedface-he-rec-") as tmp:
        init_match_keys(Path(tmp) / "k")
        server = load_match_keys(Path(tmp) / "k" / "public")
        holder = load_match_keys(Path(tmp) / "k" / "secret", public=Path(tmp) / "k" / "public")
        scores, t_score = [], 0.0
        enrolled: dict[int, bytes] = {}
        for i in sel:
            a, b = int(pairs.a[i]), int(pairs.b[i])
            if a not in enrolled:
                enrolled[a] = encrypt_template(server, u[a])
            query = encrypt_probe(holder, u[b], "1:1")
            t = time.perf_counter()
            sc = score_1to1(server, enrolled[a], query)
            t_score += time.perf_counter() - t
            scores.append(decrypt_score(holder, sc))
        scores = np.asarray(scores)
        plain = np.einsum("ij,ij->i", u[pairs.a[sel]], u[pairs.b[sel]])
        out = {**recognition(scores, pairs.same[sel], pairs.fold[sel]),
               "pairs_scored": int(sel.size),
               "max_abs_score_error": float(np.abs(scores - plain).max()),
               "one_to_one_server_ms": 1e3 * t_score / max(1, sel.size)}
        gal, probes = ident["gallery"], ident["probes"]
        if max_probes and max_probes < probes.size:
            probes = np.sort(rng.choice(probes, max_probes, replace=False))
        gallery = Gallery(server, u.shape[1])
        t = time.perf_counter()
        gallery.enroll(u[gal], [str(int(g)) for g in gal])
        enrol_s = time.perf_counter() - t
        mat, t_search = np.zeros((probes.size, gal.size)), 0.0
        col = {str(int(g)): k for k, g in enumerate(gal)}
        for r, p in enumerate(probes):
            query = encrypt_probe(holder, u[p], "1:N")
            t = time.perf_counter()
            enc = gallery.search(query)
            t_search += time.perf_counter() - t
            for sid, s in decrypt_scores(holder, enc).items():
                mat[r, col[sid]] = s
        out["identification"] = rank_k(gal, labels[gal], mat, labels[probes])
        out["identification_plaintext_same_probes"] = rank_k(
            gal, labels[gal], u[probes] @ u[gal].T, labels[probes])
        out["identification_probes"] = int(probes.size)
        out["gallery_enrol_s"] = enrol_s
        out["search_us_per_match"] = 1e6 * t_search / max(1, probes.size * gal.size)
        out["template_bytes"] = len(next(iter(enrolled.values())))
    return out
