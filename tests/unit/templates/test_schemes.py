"""Cancelable schemes, tokens and the evaluation metrics (no store, no images)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from crypto.tokens import Token, TokenError, load_token, new_token
from fedface.templates.cancelable import BioHash, Projection, orthonormal_rows
from fedface.templates.evaluate import (
    dsys,
    dsys_bootstrap,
    dsys_floor,
    invert_biohash,
    invert_projection,
    rank_k,
    recognition,
    threshold_at_fmr,
)
from fedface.templates.schemes import TemplateError, check_embeddings


def _faces(n=200, d=128, noise=0.6, seed=0):
    """``n`` people, two noisy views each (unit rows): a stand-in for embeddings."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((n, d))
    a = c + noise * rng.standard_normal((n, d))
    b = c + noise * rng.standard_normal((n, d))
    return check_embeddings(a), check_embeddings(b)


# --------------------------------------------------------------------------- tokens
def test_token_file_is_owner_only_fingerprinted_and_never_overwritten(tmp_path):
    path = tmp_path / "keys" / "app.token"
    tok = new_token(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert path.read_text().splitlines()[0] == "fedface-template-key v1"
    again = load_token(path)
    assert again.key == tok.key and again.key_id == tok.key_id and len(tok.key_id) == 16
    assert tok.key.hex() not in tok.key_id and tok.mac_key != tok.key
    with pytest.raises(TokenError, match="already exists.*refusing to overwrite"):
        new_token(path)
    assert load_token(path).key == tok.key  # untouched


def test_token_refusals_name_the_file_and_what_to_do(tmp_path):
    with pytest.raises(TokenError, match="does not exist.*fedface keys token"):
        load_token(tmp_path / "missing.token")
    loose = tmp_path / "loose.token"
    new_token(loose)
    os.chmod(loose, 0o644)
    with pytest.raises(TokenError, match="readable by other users.*chmod 600"):
        load_token(loose)
    other = tmp_path / "scramble.key"
    other.write_text("fedface-scramble-key v1\n" + "ab" * 32 + "\n")
    os.chmod(other, 0o600)
    with pytest.raises(TokenError, match="not a fedface template key.*scramble"):
        load_token(other)
    short = tmp_path / "short.token"
    short.write_text("fedface-template-key v1\nabcd\n")
    os.chmod(short, 0o600)
    with pytest.raises(TokenError, match="does not hold 32 bytes.*renew"):
        load_token(short)


# --------------------------------------------------------------------------- schemes
def test_orthonormal_rows_are_orthonormal_per_block():
    w = orthonormal_rows(np.random.default_rng(0), 300, 128)
    assert w.shape == (300, 128)
    np.testing.assert_allclose(w[:128] @ w[:128].T, np.eye(128), atol=1e-10)
    np.testing.assert_allclose(w[128:256] @ w[128:256].T, np.eye(128), atol=1e-10)


def test_projection_preserves_cosine_and_never_stores_the_embedding():
    a, b = _faces(20)
    s = Projection(Token.random())
    templates = s.protect(a)
    np.testing.assert_allclose(s.scores(templates, b[3]), a @ b[3], atol=1e-5)
    raw = np.frombuffer(templates[0][8:], "<f4")
    assert np.abs(raw - a[0]).max() > 0.05  # values differ from the embedding


def test_biohash_hamming_similarity_tracks_the_angle():
    a, b = _faces(100)
    s = BioHash(Token.random())
    templates = s.protect(a)
    assert len(templates[0]) == 8 + 2048 // 8
    got = np.array([s.scores([t], b[i])[0] for i, t in enumerate(templates)])
    want = 1 - np.arccos(np.clip(np.sum(a * b, 1), -1, 1)) / np.pi
    assert np.abs(got - want).mean() < 0.03
    assert BioHash(Token.random(), bits=256).protect(a[:1])[0].__len__() == 8 + 32


def test_same_token_same_template_other_token_unrelated():
    a, _ = _faces(50)
    t1, t2 = Token.random(), Token.random()
    assert Projection(t1).protect(a[:1]) == Projection(Token(t1.key)).protect(a[:1])
    # the store reader without the token: templates of the same faces under two tokens
    # score like strangers (cosine ~ N(0, 1/d))
    p1, p2 = Projection(t1).transform(a), Projection(t2).transform(a)
    assert np.abs(np.sum(p1 * p2, 1)).mean() < 0.15
    b1, b2 = BioHash(t1).signs(a), BioHash(t2).signs(a)
    assert abs((b1 == b2).mean() - 0.5) < 0.03


@pytest.mark.parametrize("bad, match", [
    (np.full(128, np.nan), "NaN or infinite"),
    (np.zeros(128), "all zeros"),
    (np.ones((2, 2, 2)), "expected a vector"),
    (np.ones(64), "dimension 64.*enrolled at dimension 128"),
])
def test_bad_probe_embeddings_are_refused(bad, match):
    a, _ = _faces(3)
    for s in (Projection(Token.random()), BioHash(Token.random())):
        with pytest.raises(TemplateError, match=match):
            s.scores(s.protect(a), bad)


def test_template_of_another_scheme_or_damaged_is_named():
    a, _ = _faces(2)
    tok = Token.random()
    bio = BioHash(tok).protect(a)
    with pytest.raises(TemplateError, match="scheme 'biohash', not 'projection'.*--scheme biohash"):
        Projection(tok).scores(bio, a[0])
    with pytest.raises(TemplateError, match="damaged"):
        Projection(tok).scores([b"junk"], a[0])
    with pytest.raises(TemplateError, match="another length than 2048 bits"):
        BioHash(tok).scores([bio[0][:-1]], a[0])


# --------------------------------------------------------------------------- attacks
def test_stolen_token_inverts_projection_exactly_and_biohash_approximately():
    """The attacker holds the token and the stored templates."""
    a, _ = _faces(100)
    tok = Token.random()
    proj = Projection(tok)
    inv = invert_projection(proj.transform(a), proj.matrix(128))
    np.testing.assert_allclose(inv, a, atol=1e-10)
    bio = BioHash(tok)
    est = check_embeddings(invert_biohash(bio.signs(a), bio.matrix(128)))
    cos = np.sum(est * a, 1)
    assert 0.85 < cos.mean() < 0.999  # close, not exact: binarisation loses magnitudes
    assert (bio.signs(est) == bio.signs(a)).mean() > 0.95  # and it replays the bits
    # without the token (a random one), the estimate is a stranger
    wrong = check_embeddings(invert_biohash(bio.signs(a), BioHash(Token.random()).matrix(128)))
    assert np.abs(np.sum(wrong * a, 1)).mean() < 0.15


# --------------------------------------------------------------------------- metrics
def test_dsys_is_near_zero_for_identical_and_near_one_for_separated_scores():
    rng = np.random.default_rng(0)
    assert dsys(rng.normal(0, 1, 20000), rng.normal(0, 1, 20000)) < 0.05
    assert dsys(rng.normal(6, 1, 5000), rng.normal(0, 1, 5000)) > 0.95
    mid = dsys(rng.normal(1, 1, 20000), rng.normal(0, 1, 20000))
    assert 0.2 < mid < 0.6
    boot = dsys_bootstrap(rng.normal(0, 1, 5000), rng.normal(0, 1, 5000), n_boot=30)
    assert boot["dsys_lower"] <= boot["dsys_upper"] < 0.1
    assert dsys_floor(rng.normal(0, 1, 20000)) < 0.05
    with pytest.raises(ValueError, match="at least two"):
        dsys([1.0], [0.0, 1.0])


def test_threshold_recognition_and_rank_k():
    rng = np.random.default_rng(1)
    s = np.r_[rng.normal(1, 0.3, 3000), rng.normal(0, 0.3, 3000)]
    y = np.r_[np.ones(3000, bool), np.zeros(3000, bool)]
    t = threshold_at_fmr(s, y, 1e-3)
    assert (s[~y] >= t).sum() <= 3 and (s[~y] >= np.nextafter(t, -np.inf)).sum() >= 3
    rep = recognition(s, y, np.tile(np.repeat(np.arange(10), 300), 2), 1e-3)
    assert 0.03 < rep["eer"] < 0.07 and 0 < rep["fnmr_at_fmr"] < 0.6
    assert rep["eer_folds_std"] >= 0
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8], [0.7, 0.6, 0.1]])
    assert rank_k(np.arange(3), np.array([0, 1, 2]), scores, np.array([0, 1, 2]), ks=(1, 2)) == \
        {"rank1": 1 / 3, "rank2": 2 / 3}
