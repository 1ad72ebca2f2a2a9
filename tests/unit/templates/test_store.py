"""The template store against a SQLite file and a real PostgreSQL server (``store_url``)."""

import dataclasses
import multiprocessing
import os
import secrets
import traceback
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from fedface.templates import store as store_module
from fedface.templates.store import (
    AlreadyEnrolled,
    NotEnrolled,
    Revoked,
    SchemaMismatch,
    StoreError,
    StoreReadOnly,
    StoreUnavailable,
    TamperedRow,
    TemplateStore,
    WrongKey,
    open_store,
)
from tests.pg import free_port

from .scan import find_embedding_bytes

SCHEME = "biohash"


def _template(seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(64)


def _embedding(seed: int) -> np.ndarray:
    e = np.random.default_rng(seed).normal(size=512).astype(np.float32)
    return e / np.linalg.norm(e)


def _protect(embedding: np.ndarray, seed: int = 99) -> bytes:
    """A BioHash-like stand-in: sign bits of a seeded random projection."""
    projection = np.random.default_rng(seed).normal(size=(256, embedding.size))
    return np.packbits(projection @ embedding > 0).tobytes()


def _raw(url: str, sql: str, **params):
    """Run ``sql`` on the database behind the store's back; rows for a SELECT."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(sa.text(sql), params)
            return result.all() if result.returns_rows else None
    finally:
        engine.dispose()


def _shift_created(url: str, row_id: int) -> None:
    if url.startswith("sqlite"):
        (created,), = _raw(url, "SELECT created FROM fedface_templates WHERE id = :i", i=row_id)
        later = (datetime.fromisoformat(created) + timedelta(seconds=1)).isoformat()
        _raw(url, "UPDATE fedface_templates SET created = :c WHERE id = :i", c=later, i=row_id)
    else:
        _raw(url, "UPDATE fedface_templates SET created = created + interval '1 second' "
                  "WHERE id = :i", i=row_id)


# -- life cycle --------------------------------------------------------------------------------

def test_enroll_then_get_returns_the_same_record(store_url, mac_key):
    with TemplateStore(store_url) as store:
        rec = store.enroll("p-0001", SCHEME, "fp:abc", _template(), mac_key)
        got = store.get("p-0001", SCHEME, mac_key)
    assert got == rec
    assert (got.subject, got.scheme, got.key_id, got.template) == ("p-0001", SCHEME, "fp:abc",
                                                                   _template())
    assert got.status == "active" and got.active and got.version == 1
    assert got.created == got.updated and got.created.utcoffset() == timedelta(0)
    assert len(got.tag) == 32
    assert "template" not in repr(got)  # neither template nor tag clutter logs
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.status = "revoked"


def test_a_second_enrolment_is_refused_and_changes_nothing(store_url, mac_key):
    with TemplateStore(store_url) as store:
        first = store.enroll("p-0001", SCHEME, "k1", _template(1), mac_key)
        with pytest.raises(AlreadyEnrolled, match="revoke it first, or use renew"):
            store.enroll("p-0001", SCHEME, "k2", _template(2), mac_key)
        store.enroll("p-0001", "ckks", "k3", _template(3), mac_key)  # another scheme is fine
        assert store.get("p-0001", SCHEME, mac_key) == first
        assert len(store.records()) == 2


def test_the_database_itself_holds_one_active_row_per_subject(store_url, mac_key, monkeypatch):
    """With the Python check bypassed (as when two processes race), the unique index still
    refuses, and the refusal is AlreadyEnrolled, not an IntegrityError."""
    with TemplateStore(store_url) as store:
        store.enroll("p-0001", SCHEME, "k1", _template(1), mac_key)
        monkeypatch.setattr(TemplateStore, "_rows", lambda self, conn, subject, scheme, lock=False: [])
        with pytest.raises(AlreadyEnrolled, match="another process"):
            store.enroll("p-0001", SCHEME, "k2", _template(2), mac_key)
    rows = _raw(store_url, "SELECT key_id FROM fedface_templates")
    assert rows == [("k1",)]


def test_revoke_erases_the_template_and_get_says_when(store_url, mac_key):
    with TemplateStore(store_url) as store:
        store.enroll("p-0001", SCHEME, "k1", _template(1), mac_key)
        revoked = store.revoke("p-0001", SCHEME, mac_key)
        assert (revoked.status, revoked.version, revoked.template) == ("revoked", 2, b"")
        with pytest.raises(Revoked, match="revoked on .* UTC: enrol again") as err:
            store.get("p-0001", SCHEME, mac_key)
        assert err.value.revoked_at == revoked.updated
        with pytest.raises(Revoked):
            store.revoke("p-0001", SCHEME, mac_key)
        assert store.records() == []
        assert store.records(include_revoked=True) == [revoked]
        assert store.verified(SCHEME, mac_key) == ([], [])
        again = store.enroll("p-0001", SCHEME, "k2", _template(2), mac_key)
        assert store.get("p-0001", SCHEME, mac_key) == again and again.id != revoked.id
        with pytest.raises(NotEnrolled, match="enrol it first"):
            store.get("p-0002", SCHEME, mac_key)
        with pytest.raises(NotEnrolled):
            store.revoke("p-0002", SCHEME, mac_key)


def test_renew_replaces_template_and_key_and_bumps_the_version(store_url, mac_key):
    with TemplateStore(store_url) as store:
        old = store.enroll("p-0001", SCHEME, "k1", _template(1), mac_key)
        with pytest.raises(WrongKey, match="--old-key"):  # a rotation needs the old key
            store.renew("p-0001", SCHEME, "k2", _template(2), mac_key)
        assert store.get("p-0001", SCHEME, mac_key) == old
        new = store.renew("p-0001", SCHEME, "k2", _template(2), mac_key, old_key_id="k1",
                          old_mac_key=mac_key)
        assert (new.id, new.key_id, new.template, new.version) == (old.id, "k2", _template(2), 2)
        assert new.created == old.created and new.updated >= old.updated
        assert store.get("p-0001", SCHEME, mac_key) == new
        assert store.records(include_revoked=True) == [new]  # the old template is not kept
        with pytest.raises(NotEnrolled, match="enrol it first"):
            store.renew("p-0002", SCHEME, "k2", _template(2), mac_key)
        store.revoke("p-0001", SCHEME, mac_key)
        with pytest.raises(Revoked, match="enrol again"):
            store.renew("p-0001", SCHEME, "k3", _template(3), mac_key)


def test_removed_templates_do_not_linger_in_the_sqlite_files(tmp_path, mac_key):
    path = tmp_path / "t.db"
    with TemplateStore(path) as store:
        store.enroll("p-0001", SCHEME, "k1", _template(1), mac_key)
        store.enroll("p-0002", SCHEME, "k1", _template(2), mac_key)
        store.renew("p-0001", SCHEME, "k1", _template(3), mac_key)
        store.revoke("p-0002", SCHEME, mac_key)
        files = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert _template(3) in files
    assert _template(1) not in files and _template(2) not in files


def test_close_disposes_and_later_calls_are_refused(sqlite_url, mac_key):
    store = open_store(sqlite_url)
    store.enroll("p-0001", SCHEME, "k1", _template(), mac_key)
    store.close()
    store.close()
    assert "closed" in repr(store)
    with pytest.raises(StoreError, match="closed: open it again"):
        store.get("p-0001", SCHEME, mac_key)


def test_a_plain_path_is_a_sqlite_file(tmp_path, mac_key):
    with open_store(tmp_path / "a.db") as a, open_store(str(tmp_path / "b.db")) as b:
        a.enroll("p-0001", SCHEME, "k1", _template(), mac_key)
        assert b.records() == []  # one engine per store, nothing shared
    assert (tmp_path / "a.db").is_file() and (tmp_path / "b.db").is_file()
    assert _raw(f"sqlite:///{tmp_path / 'a.db'}", "PRAGMA journal_mode") == [("wal",)]


# -- tampering ---------------------------------------------------------------------------------

EDITS = {
    "template": "UPDATE fedface_templates SET template = :v WHERE id = :i",
    "status": "UPDATE fedface_templates SET status = 'revoked' WHERE id = :i",
    "subject": "UPDATE fedface_templates SET subject = 'p-mallory' WHERE id = :i",
    "key_id": "UPDATE fedface_templates SET key_id = 'k-forged' WHERE id = :i",
    "version": "UPDATE fedface_templates SET version = version + 1 WHERE id = :i",
    "tag": "UPDATE fedface_templates SET tag = :v WHERE id = :i",
}


def test_every_edited_column_fails_the_integrity_check(store_url, mac_key):
    with TemplateStore(store_url) as store:
        rows = {what: store.enroll(f"p-{what}", SCHEME, "k1", _template(i), mac_key)
                for i, what in enumerate([*EDITS, "created", "untouched"])}
    for what, sql in EDITS.items():
        _raw(store_url, sql, i=rows[what].id, v=b"\x00" * 32)
    _shift_created(store_url, rows["created"].id)

    with TemplateStore(store_url) as store:
        good, tampered = store.verified(SCHEME, mac_key)
        assert [r.id for r in good] == [rows["untouched"].id]
        assert sorted(r.id for r in tampered) == sorted(r.id for k, r in rows.items()
                                                         if k != "untouched")
        assert all(r.template == b"" for r in tampered)  # reported, never matchable
        for what, rec in rows.items():
            if what in ("untouched", "subject"):
                continue
            with pytest.raises(TamperedRow, match=f"row {rec.id} .*fails its integrity check") as err:
                store.get(rec.subject, SCHEME, mac_key)
            assert (err.value.row_id, err.value.subject) == (rec.id, rec.subject)
        with pytest.raises(TamperedRow, match="p-mallory"):  # the edited subject's row
            store.get("p-mallory", SCHEME, mac_key)
        with pytest.raises(NotEnrolled):  # ... reads as a deleted row for the real subject
            store.get("p-subject", SCHEME, mac_key)
        with pytest.raises(TamperedRow):  # under its own key: checked before it is replaced
            store.renew("p-template", SCHEME, "k1", _template(7), mac_key)
        with pytest.raises(TamperedRow):
            store.revoke("p-template", SCHEME, mac_key)
        assert store.get("p-untouched", SCHEME, mac_key) == rows["untouched"]
        # after a look, the operator revokes the tampered row and enrols the subject again
        sealed = store.revoke("p-template", SCHEME, mac_key, allow_tampered=True)
        assert (sealed.status, sealed.template) == ("revoked", b"")
        with pytest.raises(Revoked):
            store.get("p-template", SCHEME, mac_key)
        store.enroll("p-template", SCHEME, "k2", _template(8), mac_key)
        assert store.get("p-template", SCHEME, mac_key).template == _template(8)


def test_swapped_templates_and_a_moved_row_fail(store_url, mac_key):
    with TemplateStore(store_url) as store:
        a = store.enroll("p-a", SCHEME, "k1", _template(1), mac_key)
        b = store.enroll("p-b", SCHEME, "k1", _template(2), mac_key)
        c = store.enroll("p-c", SCHEME, "k1", _template(3), mac_key)
        d = store.enroll("p-d", SCHEME, "k1", _template(4), mac_key)
    set_template = "UPDATE fedface_templates SET template = :t WHERE id = :i"
    _raw(store_url, set_template, t=b.template, i=a.id)
    _raw(store_url, set_template, t=a.template, i=b.id)
    # the whole row, tag included, under another id: the id is tagged too
    _raw(store_url, "UPDATE fedface_templates SET id = :n WHERE id = :i", n=c.id + 1000, i=c.id)
    with TemplateStore(store_url) as store:
        good, tampered = store.verified(SCHEME, mac_key)
        assert good == [d] and {r.id for r in tampered} == {a.id, b.id, c.id + 1000}
        for subject in ("p-a", "p-b", "p-c"):
            with pytest.raises(TamperedRow):
                store.get(subject, SCHEME, mac_key)


def test_a_wrong_mac_key_makes_every_row_tampered(store_url, mac_key):
    with TemplateStore(store_url) as store:
        for i in range(3):
            store.enroll(f"p-{i}", SCHEME, "k1", _template(i), mac_key)
        good, tampered = store.verified(SCHEME, secrets.token_bytes(32))
        assert good == [] and len(tampered) == 3
        with pytest.raises(TamperedRow, match="or the MAC key is not the one"):
            store.get("p-0", SCHEME, secrets.token_bytes(32))
        assert len(store.verified(None, mac_key)[0]) == 3


def test_unreadable_sqlite_cells_read_as_tampered(sqlite_url, mac_key):
    with TemplateStore(sqlite_url) as store:
        rec = store.enroll("p-0001", SCHEME, "k1", _template(), mac_key)
        store.enroll("p-0002", SCHEME, "k1", _template(2), mac_key)
    _raw(sqlite_url, "UPDATE fedface_templates SET created = 'yesterday', template = 'text', "
                     "version = 'x' WHERE id = :i", i=rec.id)
    with TemplateStore(sqlite_url) as store:
        good, tampered = store.verified(SCHEME, mac_key)
        assert [r.subject for r in good] == ["p-0002"] and [r.id for r in tampered] == [rec.id]
        with pytest.raises(TamperedRow):
            store.get("p-0001", SCHEME, mac_key)
        assert len(store.records()) == 2


# -- schema ------------------------------------------------------------------------------------

def test_the_schema_version_is_stored(store_url):
    TemplateStore(store_url).close()
    assert _raw(store_url, "SELECT value FROM fedface_meta WHERE key = 'schema_version'") == [("1",)]


def test_a_newer_schema_is_refused(store_url):
    TemplateStore(store_url).close()
    _raw(store_url, "UPDATE fedface_meta SET value = '2' WHERE key = 'schema_version'")
    with pytest.raises(SchemaMismatch, match="schema version 2, newer .* upgrade fedface"):
        TemplateStore(store_url)


def test_an_older_schema_is_migrated_by_the_hook(sqlite_url, monkeypatch):
    TemplateStore(sqlite_url).close()
    ran = []
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(store_module._MIGRATIONS, 1, lambda conn: ran.append(conn))
    TemplateStore(sqlite_url).close()
    TemplateStore(sqlite_url).close()  # migrated once
    assert len(ran) == 1
    assert _raw(sqlite_url, "SELECT value FROM fedface_meta") == [("2",)]


@pytest.mark.parametrize("tables, message", [
    (["CREATE TABLE fedface_templates (x INTEGER)"], "no 'fedface_meta' .* not made by fedface"),
    (["CREATE TABLE fedface_meta (a INTEGER)"], "'fedface_meta' that is not fedface's"),
    (["CREATE TABLE fedface_meta (key VARCHAR(64), value VARCHAR(256))"],
     "no valid schema_version"),
    (["CREATE TABLE fedface_meta (key VARCHAR(64), value VARCHAR(256))",
      "INSERT INTO fedface_meta VALUES ('schema_version', '1')",
      "CREATE TABLE fedface_templates (x INTEGER)"], "columns .* not those of schema version 1"),
])
def test_foreign_tables_named_like_ours_are_refused(store_url, tables, message):
    for sql in tables:
        _raw(store_url, sql)
    with pytest.raises(SchemaMismatch, match=message):
        TemplateStore(store_url)


def test_other_tables_are_left_alone_and_create_false_needs_a_store(store_url, mac_key):
    _raw(store_url, "CREATE TABLE patients (id INTEGER)")
    with pytest.raises(SchemaMismatch, match="no fedface template store: open it with create=True"):
        TemplateStore(store_url, create=False)
    with TemplateStore(store_url) as store:
        store.enroll("p-0001", SCHEME, "k1", _template(), mac_key)
    with TemplateStore(store_url, create=False) as store:
        assert len(store.records()) == 1


# -- concurrency -------------------------------------------------------------------------------

def _worker(url, mac_key, worker, count, barrier, results):
    try:
        with TemplateStore(url) as store:  # racing to create the schema, too
            barrier.wait()
            for i in range(count):
                store.enroll(f"w{worker}-{i:03d}", SCHEME, "k1", _template(100 * worker + i),
                             mac_key)
            barrier.wait()
            try:
                store.enroll("p-shared", SCHEME, f"k{worker}", _template(worker), mac_key)
                results.put((worker, "won"))
            except AlreadyEnrolled:
                results.put((worker, "already"))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((worker, traceback.format_exc()))


def test_concurrent_processes_lose_nothing_and_race_fairly(store_url, mac_key):
    """4 processes x 25 subjects, then all 4 enrolling the same subject at the same moment."""
    ctx = multiprocessing.get_context("spawn")
    workers, count = 4, 25
    barrier, results = ctx.Barrier(workers, timeout=60), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(store_url, mac_key, w, count, barrier, results))
             for w in range(workers)]
    for p in procs:
        p.start()
    outcome = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert sorted(outcome.values()) == ["already"] * (workers - 1) + ["won"], outcome
    with TemplateStore(store_url) as store:
        good, tampered = store.verified(SCHEME, mac_key)
        assert tampered == []
        assert sorted(r.subject for r in good if r.subject != "p-shared") == sorted(
            f"w{w}-{i:03d}" for w in range(workers) for i in range(count))
        winner = next(w for w, what in outcome.items() if what == "won")
        assert store.get("p-shared", SCHEME, mac_key).key_id == f"k{winner}"
        assert len(store.records(include_revoked=True)) == workers * count + 1


# -- bad locations and input -------------------------------------------------------------------

def _ro_url(path: Path) -> str:
    return f"sqlite:///file:{path}?mode=ro&uri=true"


def test_a_read_only_sqlite_store_reads_refuses_writes_and_keeps_its_data(tmp_path, mac_key):
    path = tmp_path / "t.db"
    with TemplateStore(path) as store:
        for i in range(3):
            store.enroll(f"p-{i}", SCHEME, "k1", _template(i), mac_key)
        before = store.records(include_revoked=True)
    with TemplateStore(_ro_url(path)) as store:
        assert store.get("p-1", SCHEME, mac_key) == before[1]
        for write in (lambda: store.enroll("p-9", SCHEME, "k1", _template(9), mac_key),
                      lambda: store.renew("p-1", SCHEME, "k1", _template(9), mac_key),
                      lambda: store.revoke("p-1", SCHEME, mac_key)):
            with pytest.raises(StoreReadOnly, match=f"{path} is read-only .* Nothing was changed; "
                                                    "open it with write access"):
                write()
    with TemplateStore(path) as store:
        assert store.records(include_revoked=True) == before
        assert len(store.verified(SCHEME, mac_key)[0]) == 3


def test_a_new_store_cannot_be_created_read_only(tmp_path):
    path = tmp_path / "empty.db"
    path.touch()
    with pytest.raises(StoreReadOnly, match="read-only"):
        TemplateStore(_ro_url(path))
    with pytest.raises(StoreUnavailable, match="check that the file exists"):
        TemplateStore(_ro_url(tmp_path / "missing.db"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file permissions")
def test_a_read_only_sqlite_file_and_folder_refuse_writes(tmp_path, mac_key):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "t.db"
    with TemplateStore(path) as store:
        store.enroll("p-0", SCHEME, "k1", _template(), mac_key)
    path.chmod(0o444)
    folder.chmod(0o555)
    try:
        with pytest.raises(StoreError, match="read-only|readable and writable"):
            with TemplateStore(path) as store:
                store.enroll("p-1", SCHEME, "k1", _template(1), mac_key)
    finally:
        folder.chmod(0o755)
        path.chmod(0o644)
    with TemplateStore(path) as store:
        assert [r.subject for r in store.verified(SCHEME, mac_key)[0]] == ["p-0"]


def test_an_unreachable_postgresql_server_is_named_with_its_password_masked():
    url = f"postgresql+psycopg://fedface:s3cret@127.0.0.1:{free_port()}/templates"
    with pytest.raises(StoreUnavailable) as err:
        TemplateStore(url)
    message = str(err.value)
    assert "s3cret" not in message
    assert f"fedface:***@127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}/templates" in message
    assert "check that the PostgreSQL server is running" in message


@pytest.mark.parametrize("target, error, message", [
    ("{tmp}/missing/t.db", StoreUnavailable, "folder .*missing does not exist; create the folder"),
    ("{tmp}", StoreUnavailable, "is a folder: give the path of a database file"),
    ("{tmp}/junk.db", StoreUnavailable, "is not a SQLite database"),
    ("mysql://u:pw@host/db", StoreError, r"mysql://u:\*\*\*@host/db: unknown database kind"),
    ("postgresql+psycopg2://u@host/db", StoreError, "driver 'psycopg2' is not supported"),
    ("://nothing", StoreError, "is not a database URL"),
    ("", StoreError, "location is empty"),
])
def test_bad_locations_are_refused_clearly(tmp_path, target, error, message):
    (tmp_path / "junk.db").write_bytes(b"these bytes are no SQLite database " * 200)
    with pytest.raises(error, match=message):
        TemplateStore(target.format(tmp=tmp_path))
    assert (tmp_path / "junk.db").read_bytes() == b"these bytes are no SQLite database " * 200


@pytest.mark.parametrize("subject, scheme, key_id, template, key, message", [
    ("", SCHEME, "k", b"t", None, "subject is empty"),
    ("p\x00x", SCHEME, "k", b"t", None, "control or invisible characters"),
    ("p\u200bx", SCHEME, "k", b"t", None, "control or invisible characters"),
    (" p-1", SCHEME, "k", b"t", None, "white space"),
    ("p" * 129, SCHEME, "k", b"t", None, "129 characters long, over the limit of 128"),
    (42, SCHEME, "k", b"t", None, "subject must be a str"),
    ("p-1", "bio hash", "k", b"t", None, "not a scheme name"),
    ("p-1", SCHEME, "", b"t", None, "key_id is empty"),
    ("p-1", SCHEME, "k", b"", None, "template is empty"),
    ("p-1", SCHEME, "k", np.zeros(4, np.float32), None, "protect the embedding first"),
    ("p-1", SCHEME, "k", b"t", b"short", "at least 16 secret bytes, got 5 bytes"),
])
def test_bad_input_is_refused(sqlite_url, mac_key, subject, scheme, key_id, template, key, message):
    with TemplateStore(sqlite_url) as store:
        with pytest.raises(StoreError, match=message):
            store.enroll(subject, scheme, key_id, template, key or mac_key)
        assert store.records() == []


def test_every_refusal_is_a_store_error_and_a_value_error():
    for error in (AlreadyEnrolled, NotEnrolled, Revoked, TamperedRow, SchemaMismatch,
                  StoreReadOnly, StoreUnavailable):
        assert issubclass(error, StoreError) and issubclass(error, ValueError)


# -- no raw embedding in the stored bytes ------------------------------------------------------

def test_pg_dump_holds_protected_templates_and_the_scan_finds_only_the_raw_control(
        pg_server, pg_url, mac_key):
    protected, control = _embedding(1), _embedding(2)
    with TemplateStore(pg_url) as store:
        store.enroll("p-protected", SCHEME, "k1", _protect(protected), mac_key)
        store.enroll("p-control", "raw-control", "none", control.tobytes(), mac_key)
    dump = pg_server.dump(sa.engine.make_url(pg_url).database)
    assert "COPY public.fedface_templates" in dump
    assert _protect(protected).hex() in dump
    assert find_embedding_bytes(dump.encode(), protected) == []
    hits = find_embedding_bytes(dump.encode(), control)
    assert any("hex text" in h and "exact float32 little-endian" in h for h in hits), hits


def test_the_sqlite_file_holds_no_raw_embedding_but_the_control(tmp_path, mac_key):
    protected, control = _embedding(1), _embedding(2)
    with TemplateStore(tmp_path / "t.db") as store:
        store.enroll("p-protected", SCHEME, "k1", _protect(protected), mac_key)
        store.enroll("p-control", "raw-control", "none", control.tobytes(), mac_key)
    files = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert find_embedding_bytes(files, protected) == []
    assert any("exact float32" in h for h in find_embedding_bytes(files, control))


# -- the scan helper ---------------------------------------------------------------------------

NOISE = np.random.default_rng(7).bytes(20_000)


@pytest.mark.parametrize("make, finding", [  # finding: "|"-separated parts of one line
    (lambda e: NOISE[:1001] + e.astype("<f4").tobytes() + NOISE[:99],
     "exact float32 little-endian embedding at byte 1001"),
    (lambda e: NOISE[:3] + e.astype(">f4").tobytes(), "exact float32 big-endian"),
    (lambda e: NOISE[:5] + e.astype("<f8").tobytes(), "exact float64 little-endian"),
    (lambda e: NOISE[:7] + e.astype(">f8").tobytes(), "exact float64 big-endian"),
    (lambda e: NOISE[:1003] + (e[100:104] + 3e-5).astype("<f4").tobytes() + NOISE[:50],
     "1 run(s) of 4 values as float32 little-endian, alignment 3: first at byte 1003 = "
     "embedding[100:104]"),
    (lambda e: NOISE[:6] + e[7:11].astype(">f8").tobytes() + NOISE[:6],
     "float64 big-endian, alignment 6: first at byte 6 = embedding[7:11]"),
    (lambda e: b"emb=[" + ", ".join(f"{v:.6f}" for v in e[10:14]).encode() + b"]",
     "decimal numbers in text: first at char 5 = embedding[10:14]"),
    (lambda e: repr(e[200:204].tolist()).encode(), "decimal numbers in text"),
    (lambda e: b"\\\\x" + e.tobytes().hex().encode(), "hex text at char 3: exact float32"),
    (lambda e: __import__("base64").b64encode(e[:64].astype(">f8").tobytes()),
     "base64 text at char 0: |as float64 big-endian"),
])
def test_the_scan_finds_the_embedding_however_it_is_written(make, finding):
    e = _embedding(3)
    hits = find_embedding_bytes(make(e), e)
    assert any(all(part in h for part in finding.split("|")) for h in hits), hits


@pytest.mark.parametrize("make", [
    lambda e, o: NOISE,
    lambda e, o: bytes(50_000),
    lambda e, o: NOISE[:11] + o.tobytes() + o.astype(">f8").tobytes() + o.tobytes().hex().encode(),
    lambda e, o: " ".join(f"{v:.6f}" for v in o).encode(),
    lambda e, o: (e[100:103].astype("<f4").tobytes() + NOISE[:4]),  # a run of 3 is not 4
    lambda e, o: ", ".join(f"{v:.2f}" for v in e[:8]).encode(),  # rounded past tol
    lambda e, o: _protect(e),
])
def test_the_scan_stays_quiet_on_other_bytes(make):
    e, other = _embedding(3), _embedding(4)
    assert find_embedding_bytes(make(e, other), e) == []


def test_the_scan_ignores_all_zero_windows():
    e = _embedding(3)
    e[20:30] = 0.0
    assert find_embedding_bytes(bytes(4096), e) == []
    assert find_embedding_bytes(bytes(8) + e[18:24].tobytes(), e) != []
