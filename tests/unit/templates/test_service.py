"""Enrol / verify / identify / revoke / renew through the service and the CLI, on SQLite and a
real PostgreSQL, with embeddings from .npy files; and the scan for raw embeddings."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from crypto.tokens import Token, new_token
from fedface.cli.app import app
from fedface.templates.cancelable import BioHash, Projection
from fedface.templates.schemes import TemplateError, check_embeddings
from fedface.templates.service import TemplateService
from fedface.templates.store import Revoked, TamperedRow, WrongKey, open_store
from tests.unit.templates.scan import find_embedding_bytes

runner = CliRunner()


def _people(n=30, d=128, seed=0):
    """Two views of ``n`` people (enrolment, probe), as a matcher would give them."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((n, d))
    return (check_embeddings(c + 0.5 * rng.standard_normal((n, d))),
            check_embeddings(c + 0.5 * rng.standard_normal((n, d))))


@pytest.fixture(scope="module")
def he_keys(tmp_path_factory):
    """Two matching key ceremonies (CKKS, ring 8192: ~0.5 s each)."""
    from crypto.match import init_match_keys

    root = tmp_path_factory.mktemp("he")
    for name in ("k1", "k2"):
        init_match_keys(root / name)
    return root


def _scheme(kind, he_keys, which="k1"):
    if kind == "he":
        from fedface.templates.encrypted import EncryptedScheme

        return EncryptedScheme.load(he_keys / which)
    return {"projection": Projection, "biohash": BioHash}[kind](Token.random())


SCHEMES = {"projection": 0.5, "biohash": 0.65, "he": 0.5}


@pytest.mark.parametrize("kind", list(SCHEMES))
def test_enrol_verify_identify_revoke_renew(store_url, kind, he_keys):
    thr = SCHEMES[kind]
    enrol, probe = _people()
    with open_store(store_url) as store:
        svc = TemplateService(store, _scheme(kind, he_keys), thr)
        svc.enroll_many([(f"P{i:03d}", enrol[i]) for i in range(len(enrol))])
        assert svc.verify("P007", probe[7]).match
        assert not svc.verify("P007", probe[8]).match
        res = svc.identify(probe[12], k=3)
        assert res["candidates"][0].subject == "P012" and res["searched"] == 30
        assert res["candidates"][0].score > res["candidates"][1].score
        ranks = [svc.identify(probe[i], k=1)["candidates"][0].subject for i in range(30)]
        assert ranks == [f"P{i:03d}" for i in range(30)]
        svc.revoke("P012")
        with pytest.raises(Revoked, match="P012"):
            svc.verify("P012", probe[12])
        assert "P012" not in [c.subject for c in svc.identify(probe[12], k=30)["candidates"]]
        # renewal: a new token; the old one is refused by name, the new one matches
        new = TemplateService(store, _scheme(kind, he_keys, "k2"), thr)
        before = store.records(subject="P007")
        with pytest.raises(WrongKey, match="--old-key"):  # a key alone cannot take it over
            new.renew("P007", enrol[3])
        assert store.records(subject="P007") == before
        rec = new.renew("P007", enrol[7], old=svc.scheme)
        assert rec.key_id == new.scheme.key_id and rec.version > 1
        with pytest.raises(WrongKey, match="stored under key.*not under the key given"):
            svc.verify("P007", probe[7])
        assert new.verify("P007", probe[7]).match
        assert len(new.identify(probe[7], k=1)["other_keys"]) == 28
        if kind == "he":  # the old key's gallery killed the slot (its score is never decrypted)
            from crypto.match import Gallery
            from fedface.templates.encrypted import slot_id

            parts = store.index_parts("he", svc.scheme.key_id, svc.scheme.mac_key)
            old_gallery = Gallery.from_bytes(svc.scheme.server, [parts[k] for k in sorted(parts)])
            assert slot_id(rec.id, rec.version - 1) not in old_gallery.ids
            assert slot_id(rec.id - 1, 1) in old_gallery.ids  # P006 is still there


def test_a_tampered_row_is_reported_and_never_matched(sqlite_url, tmp_path):
    """The adversary writes to the database but holds no token."""
    enrol, probe = _people(10)
    with open_store(sqlite_url) as store:
        svc = TemplateService(store, Projection(Token.random()), 0.5)
        svc.enroll_many([(f"P{i}", enrol[i]) for i in range(10)])
        victim = store.get("P3", "projection", svc.scheme.mac_key)
        attacker = store.get("P4", "projection", svc.scheme.mac_key)
    # swap P4's template into P3's row
    _edit(tmp_path, "SET template = ? WHERE id = ?", (attacker.template, victim.id))
    with open_store(sqlite_url) as store:
        svc = TemplateService(store, svc.scheme, 0.5)
        with pytest.raises(TamperedRow, match="P3"):
            svc.verify("P3", probe[4])
        res = svc.identify(probe[4], k=10)
        assert res["tampered"] == ["P3"]
        assert "P3" not in [c.subject for c in res["candidates"]]
        assert res["candidates"][0].subject == "P4"
    # an edited key id cannot hide a row: it is named, never silently dropped
    _edit(tmp_path, "SET key_id = 'deadbeefdeadbeef' WHERE subject = 'P5'")
    with open_store(sqlite_url) as store:
        svc = TemplateService(store, svc.scheme, 0.5)
        with pytest.raises(WrongKey, match="key id was edited: treat the row as tampered"):
            svc.verify("P5", probe[5])
        res = svc.identify(probe[5], k=10)
        assert res["other_keys"] == ["P5"] and "P5" not in [c.subject for c in res["candidates"]]


def _edit(tmp_path, sql: str, params: tuple = ()) -> None:
    """An attacker with write access edits the store's table directly: ``UPDATE <table> sql``."""
    con = sqlite3.connect(tmp_path / "templates.db")
    con.execute(f"UPDATE {_table(con)} {sql}", params)
    con.commit()
    con.close()


def _table(con) -> str:
    names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    return next(n for n in names if "template" in n)


def test_probe_of_another_embedder_or_nan_is_refused(sqlite_url):
    enrol, _ = _people(3)
    with open_store(sqlite_url) as store:
        svc = TemplateService(store, BioHash(Token.random()), 0.6)
        svc.enroll("P0", enrol[0])
        with pytest.raises(TemplateError, match="dimension 512.*enrolled at dimension 128"):
            svc.verify("P0", np.ones(512))
        with pytest.raises(TemplateError, match="NaN"):
            svc.verify("P0", np.full(128, np.nan))
        with pytest.raises(TemplateError, match="NaN"):
            svc.enroll("P1", np.full(128, np.inf))
        assert [r.subject for r in store.records()] == ["P0"]  # nothing else written


@pytest.mark.parametrize("kind", list(SCHEMES))
def test_no_raw_embedding_is_ever_written(store_url, kind, tmp_path, request, he_keys):
    """Enrol through the scheme, then scan the database (file, WAL; or pg_dump) for the raw
    embeddings' bytes and for runs of values close to them."""
    enrol, _ = _people(8)
    with open_store(store_url) as store:
        svc = TemplateService(store, _scheme(kind, he_keys), 0.5)
        for i in range(8):
            svc.enroll(f"P{i}", enrol[i])
        svc.renew("P1", enrol[1])
        svc.revoke("P2")
    if store_url.startswith("sqlite"):
        blob = b"".join(p.read_bytes() for p in tmp_path.glob("templates.db*"))
    else:
        server = request.getfixturevalue("pg_server")
        blob = server.dump(store_url.rsplit("/", 1)[1]).encode()
    assert len(blob) > 1000
    # all eight at once (runs across two embeddings' boundary are only extra candidates);
    # the scan reads the blob as float32 and float64 in both byte orders itself
    assert find_embedding_bytes(blob, np.concatenate(enrol)) == [], kind
    # negative control: the scan does find an embedding written raw
    assert find_embedding_bytes(blob + enrol[5].astype("<f4").tobytes(), enrol[5])


# --------------------------------------------------------------------------- CLI
def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_enrol_verify_identify_revoke_list_with_npy(tmp_path, pg_url):
    enrol, probe = _people(5)
    for i in range(5):
        np.save(tmp_path / f"e{i}.npy", enrol[i])
        np.save(tmp_path / f"p{i}.npy", probe[i])
    key = tmp_path / "app.token"
    assert _cli("keys", "token", key).exit_code == 0
    for db in (tmp_path / "t.db", pg_url):
        common = ["--db", db, "--scheme", "projection", "--key", key]
        for i in range(5):
            r = _cli("templates", "enroll", *common, "--subject", f"P{i}", tmp_path / f"e{i}.npy")
            assert r.exit_code == 0, r.output
        r = _cli("templates", "verify", *common, "--threshold", "0.5", "--subject", "P2",
                 tmp_path / "p2.npy", "--json")
        doc = json.loads(r.output)
        assert r.exit_code == 0 and set(doc) == {"subject", "score", "match"}
        assert doc["subject"] == "P2" and doc["match"] is True and doc["score"] > 0.5
        r = _cli("templates", "verify", *common, "--threshold", "0.5", "--subject", "P2",
                 tmp_path / "p3.npy", "--json")
        assert r.exit_code == 1 and json.loads(r.output)["match"] is False
        r = _cli("templates", "identify", *common, "--threshold", "0.5", "--top", "2",
                 tmp_path / "p4.npy", "--json")
        cands = json.loads(r.output)["candidates"]
        assert r.exit_code == 0 and len(cands) == 2 and cands[0]["subject"] == "P4"
        assert _cli("templates", "revoke", *common, "--subject", "P4").exit_code == 0
        r = _cli("templates", "verify", *common, "--threshold", "0.5", "--subject", "P4",
                 tmp_path / "p4.npy")
        assert r.exit_code == 2 and "revoked" in r.output
        r = _cli("templates", "list", "--db", db, "--json", "--all")
        rows = json.loads(r.output)
        assert {d["subject"]: d["status"] for d in rows}["P4"] == "revoked" and len(rows) == 5
        assert all("template" not in d for d in rows)


def test_cli_bad_input_is_named_and_loses_nothing(tmp_path):
    enrol, _ = _people(2)
    np.save(tmp_path / "e0.npy", enrol[0])
    np.save(tmp_path / "bad.npy", np.full(128, np.nan))
    np.save(tmp_path / "short.npy", np.ones(64))
    key, other = tmp_path / "app.token", tmp_path / "other.token"
    new_token(key)
    new_token(other)
    db = tmp_path / "t.db"
    common = ["--db", db, "--scheme", "biohash"]
    check = [*common, "--threshold", "0.6"]
    assert _cli("templates", "enroll", *common, "--key", key, "--subject", "P0",
                tmp_path / "e0.npy").exit_code == 0
    cases = [
        (["verify", *check, "--key", other, "--subject", "P0", tmp_path / "e0.npy"],
         "stored under key"),
        (["enroll", *common, "--key", key, "--subject", "P0", tmp_path / "e0.npy"],
         "already has an active"),
        (["verify", *check, "--key", key, "--subject", "P0", tmp_path / "bad.npy"], "NaN"),
        (["verify", *check, "--key", key, "--subject", "P0", tmp_path / "short.npy"],
         "dimension 64"),
        (["verify", *check, "--key", key, "--subject", "P9", tmp_path / "e0.npy"], "P9"),
        (["verify", *check, "--key", tmp_path / "nokey", "--subject", "P0",
          tmp_path / "e0.npy"], "does not exist"),
        (["verify", *check, "--key", key, "--subject", "P0", tmp_path / "none.npy"],
         "does not exist"),
        (["enroll", "--db", "postgresql+psycopg://u:secret@127.0.0.1:1/x", "--scheme", "biohash",
          "--key", key, "--subject", "P1", tmp_path / "e0.npy"], "127.0.0.1"),
        (["enroll", *common, "--subject", "P1", tmp_path / "e0.npy"], "--key is needed"),
    ]
    for args, match in cases:
        r = _cli("templates", *args)
        assert r.exit_code == 2, (args, r.output)
        assert match in r.output.replace("\n", " "), (args, r.output)
        assert "secret" not in r.output  # a password in a URL is never printed
    with open_store(db) as store:
        recs = store.records()
    assert [(r.subject, r.status) for r in recs] == [("P0", "active")]
    assert _cli("templates", "verify", *common, "--threshold", "0.6", "--key", key, "--subject",
                "P0", tmp_path / "e0.npy").exit_code == 0


def test_cli_prints_subjects_and_urls_safely(tmp_path):
    """A subject that looks like markup is printed as text; a password never is."""
    enrol, _ = _people(1)
    np.save(tmp_path / "e0.npy", enrol[0])
    key = tmp_path / "app.token"
    new_token(key)
    r = _cli("templates", "enroll", "--db", tmp_path / "t.db", "--scheme", "projection", "--key",
             key, "--subject", "[/x]bold", tmp_path / "e0.npy")
    assert r.exit_code == 0 and "[/x]bold" in r.output
    r = _cli("templates", "list", "--db", tmp_path / "t.db")
    assert r.exit_code == 0 and "[/x]bold" in r.output


def test_cli_batch_enrolment_goes_on_past_a_bad_subject(tmp_path):
    enrol, _ = _people(4)
    for i in range(4):
        (tmp_path / "batch" / f"P{i}").mkdir(parents=True)
        np.save(tmp_path / "batch" / f"P{i}" / "a.npy", enrol[i] if i != 2 else np.zeros(128))
    key = tmp_path / "app.token"
    new_token(key)
    r = _cli("templates", "enroll", "--db", tmp_path / "t.db", "--scheme", "projection",
             "--key", key, "--batch", tmp_path / "batch", "--json")
    assert r.exit_code == 1
    doc = json.loads(r.output)
    assert [d["subject"] for d in doc["enrolled"]] == ["P0", "P1", "P3"]
    assert doc["failed"][0]["subject"] == "P2" and "zeros" in doc["failed"][0]["error"]


def test_cli_images_enrol_with_dlib_and_refuse_no_face_or_several(tmp_path, lfw_root):
    """Real photos: dlib's matcher, one face per image; several faces need --pick largest."""
    folder = lfw_root / "lfw-deepfunneled" / "Aaron_Peirsol"
    multi = Path(lfw_root).parent / "faces-multi" / "2007_007763.jpg"
    key = tmp_path / "app.token"
    new_token(key)
    common = ["--db", tmp_path / "t.db", "--scheme", "biohash", "--key", key]
    r = _cli("templates", "enroll", *common, "--subject", "P1", folder / "Aaron_Peirsol_0001.jpg",
             folder / "Aaron_Peirsol_0002.jpg")
    assert r.exit_code == 0, r.output
    r = _cli("templates", "verify", *common, "--subject", "P1", folder / "Aaron_Peirsol_0003.jpg",
             "--json")
    assert r.exit_code == 0 and json.loads(r.output)["match"] is True
    blank = tmp_path / "blank.png"
    from PIL import Image

    Image.new("RGB", (200, 200), (128, 128, 128)).save(blank)
    r = _cli("templates", "verify", *common, "--subject", "P1", blank)
    assert r.exit_code == 2 and "no face found" in r.output
    if multi.exists():
        r = _cli("templates", "verify", *common, "--subject", "P1", multi)
        assert r.exit_code == 2 and "faces found" in r.output and "--pick largest" in r.output
        r = _cli("templates", "verify", *common, "--subject", "P1", multi, "--pick", "largest")
        assert r.exit_code == 1  # a stranger's face: compared, no match


def _he_worker(url, keys, worker, count, barrier, results):
    from fedface.templates.encrypted import EncryptedScheme

    enrol, _ = _people(12)
    with open_store(url) as store:
        svc = TemplateService(store, EncryptedScheme.load(keys), 0.5)
        barrier.wait()
        for i in range(count):
            k = worker * count + i
            svc.enroll(f"P{k:02d}", enrol[k])
    results.put(worker)


def test_concurrent_encrypted_enrolments_lose_no_gallery_slot(store_url, he_keys):
    """3 processes enrol 4 subjects each into one encrypted gallery at the same moment: every
    subject is found 1:N (the gallery is read, changed and written in one transaction)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3, timeout=60), ctx.Queue()
    procs = [ctx.Process(target=_he_worker, args=(store_url, he_keys / "k1", w, 4, barrier, results))
             for w in range(3)]
    for p in procs:
        p.start()
    done = sorted(results.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert done == [0, 1, 2]
    _, probe = _people(12)
    with open_store(store_url) as store:
        svc = TemplateService(store, _scheme("he", he_keys), 0.5)
        found = [svc.identify(probe[k], k=1) for k in range(12)]
    assert [f["candidates"][0].subject for f in found] == [f"P{k:02d}" for k in range(12)]
    assert all(f["searched"] == 12 for f in found)


def test_cli_he_scheme_and_key_commands(tmp_path):
    """`keys match` makes the ceremony; the CLI plays server and key holder in one process;
    `keys show` prints key ids and never a secret."""
    enrol, probe = _people(3)
    for i in range(3):
        np.save(tmp_path / f"e{i}.npy", enrol[i])
        np.save(tmp_path / f"p{i}.npy", probe[i])
    r = _cli("keys", "match", "--out", tmp_path / "mk")
    assert r.exit_code == 0 and "public" in r.output
    assert _cli("keys", "match", "--out", tmp_path / "mk").exit_code == 2  # never overwritten
    common = ["--db", tmp_path / "t.db", "--scheme", "he", "--threshold", "0.5"]
    for i in range(3):
        r = _cli("templates", "enroll", *common[:4], "--key", tmp_path / "mk" / "public",
                 "--subject", f"P{i}", tmp_path / f"e{i}.npy")
        assert r.exit_code == 0, r.output  # enrolment needs the public folder only
    r = _cli("templates", "verify", *common, "--key", tmp_path / "mk" / "public", "--subject",
             "P1", tmp_path / "p1.npy")
    assert r.exit_code == 2 and "no secret key" in r.output
    r = _cli("templates", "verify", *common, "--key", tmp_path / "mk", "--subject", "P1",
             tmp_path / "p1.npy", "--json")
    doc = json.loads(r.output)
    assert r.exit_code == 0 and doc["match"] and abs(doc["score"] - enrol[1] @ probe[1]) < 1e-3
    r = _cli("templates", "identify", *common, "--key", tmp_path / "mk", tmp_path / "p2.npy",
             "--json")
    assert json.loads(r.output)["candidates"][0]["subject"] == "P2"
    shown = _cli("keys", "show", tmp_path / "mk").output
    token = tmp_path / "app.token"
    assert _cli("keys", "token", token).exit_code == 0
    shown += _cli("keys", "show", token).output
    assert "key id" in shown and "public (no secret key)" in shown
    secret = token.read_text().split()[-1]
    assert secret not in shown and (tmp_path / "mk" / "secret" / "store.key").read_bytes().hex() \
        not in shown


def test_cli_with_a_fedface_model_as_embedder(tmp_path, lfw_root):
    """--model: the face aligned as training aligns it, embedded by the saved backbone; its
    dimension is bound to the templates (a dlib probe is refused by name)."""
    import torch

    from fedface.models import build_backbone
    from fedface.models.io import save_backbone

    torch.manual_seed(0)
    model = save_backbone(tmp_path / "model.pt", build_backbone("tinyface", embedding_size=64,
                                                                input_size=64),
                          "tinyface", 64, 64)
    folder = lfw_root / "lfw-deepfunneled" / "Aaron_Peirsol"
    key = tmp_path / "app.token"
    new_token(key)
    common = ["--db", tmp_path / "t.db", "--scheme", "projection", "--key", key]
    r = _cli("templates", "enroll", *common, "--model", model, "--subject", "P1",
             folder / "Aaron_Peirsol_0001.jpg")
    assert r.exit_code == 0, r.output
    r = _cli("templates", "verify", *common, "--model", model, "--subject", "P1",
             folder / "Aaron_Peirsol_0001.jpg", "--json")
    assert r.exit_code == 2 and "--threshold" in r.output  # no calibrated default for a model
    r = _cli("templates", "verify", *common, "--model", model, "--threshold", "0.5",
             "--subject", "P1", folder / "Aaron_Peirsol_0001.jpg", "--json")
    doc = json.loads(r.output)
    assert r.exit_code == 0 and doc["score"] > 0.999  # the same image, the same chip
    r = _cli("templates", "verify", *common, "--subject", "P1", folder / "Aaron_Peirsol_0002.jpg")
    assert r.exit_code == 2 and "dimension 128" in r.output and "enrolled at dimension 64" in r.output
