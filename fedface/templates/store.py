"""The template store: protected face templates in SQLite or PostgreSQL, each row sealed.

A face embedding is never stored here. A protection scheme (BioHashing, a keyed
projection, a CKKS-encrypted template ...) turns it into an opaque, revocable *protected
template* first; the store keeps those bytes with the subject's pseudonym, the scheme's
name, the public fingerprint of the key or token that made them (``key_id``), a status
(``'active'`` or ``'revoked'``), UTC timestamps and a version counter that every change
increments. A subject has at most one active template per scheme; the database itself
enforces it (a partial unique index), so concurrent writers cannot break it.

What the store protects against
-------------------------------
The adversary reads and writes the database file or server (a stolen backup, a rogue
administrator, a compromised host) but does not hold the MAC key, which the caller keeps
elsewhere and passes to every call that trusts a row. fedface derives the MAC key from the
key that protected the row (the template token, or the matching key folder), so each key
seals its own rows: a call that names its ``key_id`` checks only those, and a subject
enrolled under another key is refused by name (:class:`WrongKey`), never taken as tampered.

- Reading the database yields protected templates only, never embeddings; how much those
  reveal is the protection scheme's business, not the store's.
- Every row carries an integrity tag, HMAC-SHA256 under the MAC key over a canonical,
  length-prefixed encoding of every other column (id, subject, scheme, key id, template,
  status, both timestamps, version). An edited template, status, subject, key id or
  timestamp, a template swapped between two rows, or a row forged from nothing fails the
  check: :meth:`TemplateStore.get` raises :class:`TamperedRow` (and never returns the
  row's template), :meth:`TemplateStore.verified` lists the row as tampered so that a 1:N
  search never matches it.

What it does not stop
---------------------
- Deleting rows: a deleted subject reads as never enrolled (:class:`NotEnrolled`).
- Rolling a row back to an older copy of itself that was validly tagged at the time (for
  example a template from before :meth:`TemplateStore.renew`, or an active row from before
  :meth:`TemplateStore.revoke`, restored from a backup): the tag covers the row, not the
  history of the database. Detecting that needs state outside the database (a counter or
  a digest of the whole table kept elsewhere).
- Anyone who holds the MAC key can forge rows; keep it apart from the database.
- Denial of service (a locked or deleted database).

Removed templates
-----------------
:meth:`TemplateStore.renew` overwrites the template in place and :meth:`TemplateStore.revoke`
erases it (the row stays, template empty, as the record that says when the subject was
revoked). With SQLite the store turns on ``secure_delete`` (freed space is zeroed) and
checkpoints and truncates the write-ahead log after these two calls, so the old bytes do
not linger in the files. PostgreSQL keeps old row versions on disk until ``VACUUM`` and
later writes reuse that space; ``pg_dump`` never shows them.

Concurrency
-----------
Several processes may write at once. SQLite runs in WAL mode with a 30 s busy timeout, and
every write transaction starts with ``BEGIN IMMEDIATE`` (SQLAlchemy's documented pysqlite
``begin`` hook), so writers queue instead of failing with "database is locked".
PostgreSQL uses ordinary transactions; the unique index turns a concurrent second
enrolment of the same subject into :class:`AlreadyEnrolled`.

Schema versions
---------------
The ``fedface_meta`` table holds ``schema_version`` (:data:`SCHEMA_VERSION`). A database
written by a newer fedface is refused ("upgrade fedface"). To change the schema, raise
:data:`SCHEMA_VERSION` to N+1 and add ``_MIGRATIONS[N]``, a function that takes an open
:class:`sqlalchemy.engine.Connection` inside the write transaction and brings a version-N
database to N+1 (``ALTER TABLE`` ...); opening an older database runs every missing step
in one transaction, then records the new version. A migration cannot re-tag rows (the
store never holds the MAC key), so it must leave the tagged columns and their encoding
(:func:`_tag_message`) alone, or come as a separate step the key holder runs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import sqlite3
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.types import TypeDecorator

SCHEMA_VERSION = 1
ACTIVE, REVOKED = "active", "revoked"
MAX_SUBJECT = 128
MAX_SCHEME = 64
MAX_KEY_ID = 128
MIN_MAC_KEY = 16
BUSY_TIMEOUT_S = 30
PG_CONNECT_TIMEOUT_S = 10

META_TABLE = "fedface_meta"
TEMPLATE_TABLE = "fedface_templates"
INDEX_TABLE = "fedface_indexes"
_ONE_ACTIVE = "fedface_templates_one_active"
_TAG_DOMAIN = b"fedface.templates.store/v1"
_PG_LOCK_KEY = 0x66656466  # pg_advisory_xact_lock key while creating or migrating the schema
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SCHEME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_URL_HELP = "a file path, sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DATABASE"


# -- errors ---------------------------------------------------------------------------------

class StoreError(ValueError):
    """A template store refusal; the message names the problem and what to do."""


class AlreadyEnrolled(StoreError):
    """The subject already has an active template for the scheme."""


class NotEnrolled(StoreError):
    """The subject has no template for the scheme."""


class Revoked(StoreError):
    """The subject's template for the scheme was revoked (:attr:`revoked_at`, UTC)."""

    def __init__(self, message: str, revoked_at: datetime | None = None):
        super().__init__(message)
        self.revoked_at = revoked_at


class TamperedRow(StoreError):
    """A row fails its integrity check: edited outside fedface, or the MAC key is wrong."""

    def __init__(self, message: str, row_id: int | None = None, subject: str | None = None):
        super().__init__(message)
        self.row_id = row_id
        self.subject = subject


class WrongKey(StoreError):
    """The subject's template was made under another key than the one given."""


class SchemaMismatch(StoreError):
    """The database holds tables that are not (this version of) a fedface template store."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or opened."""


class StoreReadOnly(StoreError):
    """The database refuses writes; nothing was changed."""


# -- schema ---------------------------------------------------------------------------------

class _UTCTime(TypeDecorator):
    """A UTC ``datetime`` (microseconds): ``timestamptz`` in PostgreSQL, ISO-8601 text in SQLite.

    Reads never raise: a value that is not a time (an edited SQLite cell) reads as ``None``,
    which the row check reports as tampering.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(32))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.isoformat(timespec="microseconds") if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        try:
            if isinstance(value, str):
                value = datetime.fromisoformat(value)
            if not isinstance(value, datetime):
                return None
            if value.tzinfo is None:
                return value.replace(tzinfo=UTC)
            return value.astimezone(UTC)
        except (ValueError, OverflowError):
            return None


class _Blob(TypeDecorator):
    """``LargeBinary`` whose reads never raise: a non-binary value (an edited SQLite cell)
    comes back as it is, for the row check to report."""

    impl = LargeBinary
    cache_ok = True

    def result_processor(self, dialect, coltype):
        def process(value):
            return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else value
        return process


_metadata = MetaData()

_meta = Table(
    META_TABLE, _metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)

_templates = Table(
    TEMPLATE_TABLE, _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("subject", String(MAX_SUBJECT), nullable=False),
    Column("scheme", String(MAX_SCHEME), nullable=False),
    Column("key_id", String(MAX_KEY_ID), nullable=False),
    Column("template", _Blob, nullable=False),
    Column("status", String(8), nullable=False),
    Column("created", _UTCTime, nullable=False),
    Column("updated", _UTCTime, nullable=False),
    Column("version", Integer, nullable=False),
    Column("tag", _Blob, nullable=False),
    CheckConstraint(f"status IN ('{ACTIVE}', '{REVOKED}')", name="fedface_templates_status"),
    sqlite_autoincrement=True,  # ids are never reused, as in PostgreSQL
)
Index(_ONE_ACTIVE, _templates.c.subject, _templates.c.scheme, unique=True,
      sqlite_where=_templates.c.status == ACTIVE, postgresql_where=_templates.c.status == ACTIVE)
Index("fedface_templates_scheme", _templates.c.scheme)

# Search indexes derived from the templates of one (scheme, key id): the encrypted 1:N
# gallery's blocks. Each part is sealed like a row (its own tag under the key's MAC key).
_indexes = Table(
    INDEX_TABLE, _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("scheme", String(MAX_SCHEME), nullable=False),
    Column("key_id", String(MAX_KEY_ID), nullable=False),
    Column("part", Integer, nullable=False),
    Column("data", _Blob, nullable=False),
    Column("updated", _UTCTime, nullable=False),
    Column("version", Integer, nullable=False),
    Column("tag", _Blob, nullable=False),
    sqlite_autoincrement=True,
)
Index("fedface_indexes_part", _indexes.c.scheme, _indexes.c.key_id, _indexes.c.part, unique=True)

_COLUMNS = {c.name for c in _templates.columns}

# version N -> function bringing a version-N database to N+1, inside the write transaction.
_MIGRATIONS: dict[int, Callable[[Connection], None]] = {}


# -- records and tags ------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """One row of the store.

    Attributes
    ----------
    id : int
        Row id, assigned by the database.
    subject : str
        The caller's pseudonym for the person, never a name.
    scheme : str
        Name of the protection scheme that made ``template``.
    key_id : str
        Public fingerprint of the key or token the scheme used.
    template : bytes
        The protected template (opaque); empty for a revoked row, and in the rows
        :meth:`TemplateStore.verified` reports as tampered.
    status : str
        ``'active'`` or ``'revoked'``.
    created, updated : datetime
        UTC times of enrolment and of the last change.
    version : int
        1 at enrolment, incremented by every change.
    tag : bytes
        HMAC-SHA256 of every other field under the caller's MAC key.
    """

    id: int
    subject: str
    scheme: str
    key_id: str
    template: bytes = field(repr=False)
    status: str
    created: datetime
    updated: datetime
    version: int
    tag: bytes = field(repr=False)

    @property
    def active(self) -> bool:
        """Whether the row is the subject's current template for its scheme."""
        return self.status == ACTIVE


def _micros(when: datetime) -> int:
    return (when - _EPOCH) // timedelta(microseconds=1)


def _tag_message(rec: Record) -> bytes:
    """The canonical encoding the tag covers: each field as 8-byte big-endian length + bytes."""
    fields: Sequence[bytes | str] = (
        _TAG_DOMAIN, str(rec.id), rec.subject, rec.scheme, rec.key_id, rec.template, rec.status,
        str(_micros(rec.created)), str(_micros(rec.updated)), str(rec.version))
    out = bytearray()
    for value in fields:
        raw = value if isinstance(value, bytes) else value.encode("utf-8")
        out += len(raw).to_bytes(8, "big") + raw
    return bytes(out)


def _tag(mac_key: bytes, rec: Record) -> bytes:
    return hmac.new(mac_key, _tag_message(rec), hashlib.sha256).digest()


def _index_tag(mac_key: bytes, scheme: str, key_id: str, part: int, version: int,
               data: bytes) -> bytes:
    out = bytearray()
    for value in (_TAG_DOMAIN + b"|index", scheme, key_id, str(part), str(version), data):
        raw = value if isinstance(value, bytes) else value.encode("utf-8")
        out += len(raw).to_bytes(8, "big") + raw
    return hmac.new(mac_key, bytes(out), hashlib.sha256).digest()


def _decode(row: Any) -> tuple[Record, bool]:
    """A row as a :class:`Record`, and whether every field has its type (an edited SQLite
    cell may not); a field that has not reads as a placeholder (-1, repr, the epoch, b"")."""
    m = row._mapping
    ok = True

    def take(name: str, kind: type, placeholder: Any) -> Any:
        nonlocal ok
        value = m[name]
        if isinstance(value, kind) and not isinstance(value, bool):
            return value
        ok = False
        return placeholder if kind is not str else repr(value)

    rec = Record(
        id=take("id", int, -1), subject=take("subject", str, ""), scheme=take("scheme", str, ""),
        key_id=take("key_id", str, ""), template=take("template", bytes, b""),
        status=take("status", str, ""), created=take("created", datetime, _EPOCH),
        updated=take("updated", datetime, _EPOCH), version=take("version", int, -1),
        tag=take("tag", bytes, b""))
    return rec, ok and rec.status in (ACTIVE, REVOKED)


def _authentic(row: Any, mac_key: bytes) -> tuple[Record, bool]:
    rec, ok = _decode(row)
    return rec, ok and hmac.compare_digest(rec.tag, _tag(mac_key, rec))


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(when: datetime) -> str:
    return f"{when:%Y-%m-%d %H:%M:%S} UTC"


# -- input checks ----------------------------------------------------------------------------

def _check_text(value: Any, what: str, limit: int, hint: str) -> str:
    if not isinstance(value, str):
        raise StoreError(f"{what} must be a str, got {type(value).__name__}: {hint}")
    if not value.strip():
        raise StoreError(f"{what} is empty: {hint}")
    if len(value) > limit:
        raise StoreError(f"{what} is {len(value)} characters long, over the limit of {limit}: "
                         f"{hint}")
    odd = sorted({f"U+{ord(c):04X}" for c in value if unicodedata.category(c).startswith("C")})
    if odd:
        raise StoreError(f"{what} {value!r} holds control or invisible characters "
                         f"({', '.join(odd)}): {hint}")
    if value != value.strip():
        raise StoreError(f"{what} {value!r} starts or ends with white space: {hint}")
    return value


def _check_subject(subject: Any) -> str:
    return _check_text(subject, "subject", MAX_SUBJECT,
                       "give the person's pseudonym (a random or keyed id, never a name), "
                       f"1 to {MAX_SUBJECT} printable characters")


def _check_scheme(scheme: Any) -> str:
    scheme = _check_text(scheme, "scheme", MAX_SCHEME,
                         "give the protection scheme's name, e.g. 'biohash'")
    if not _SCHEME_RE.fullmatch(scheme):
        raise StoreError(f"scheme {scheme!r} is not a scheme name: use letters, digits and . _ + - "
                         "(e.g. 'biohash', 'ckks')")
    return scheme


def _check_key_id(key_id: Any) -> str:
    return _check_text(key_id, "key_id", MAX_KEY_ID,
                       "give the public fingerprint of the key or token the scheme used")


def _check_template(template: Any) -> bytes:
    if not isinstance(template, (bytes, bytearray, memoryview)):
        raise StoreError(f"template must be bytes, the output of a protection scheme, got "
                         f"{type(template).__name__}: protect the embedding first (the store "
                         "never keeps raw embeddings)")
    template = bytes(template)
    if not template:
        raise StoreError("template is empty: pass the protected template the scheme produced")
    return template


def _check_mac_key(mac_key: Any) -> bytes:
    if not isinstance(mac_key, (bytes, bytearray)) or len(mac_key) < MIN_MAC_KEY:
        got = f"{len(mac_key)} bytes" if isinstance(mac_key, (bytes, bytearray)) else \
            type(mac_key).__name__
        raise StoreError(f"mac_key must be at least {MIN_MAC_KEY} secret bytes, got {got}: "
                         "use e.g. secrets.token_bytes(32), kept apart from the database")
    return bytes(mac_key)


# -- locations -------------------------------------------------------------------------------

def _mask_unparsed(target: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", target)


def _sqlite_file(url: URL) -> Path | None:
    """The file a SQLite URL names, or ``None`` for an in-memory database."""
    db = url.database or ""
    if db in ("", ":memory:") or "mode=memory" in db:
        return None
    if str(url.query.get("uri", "")).lower() in ("true", "1") or db.startswith("file:"):
        db = db[len("file:"):] if db.startswith("file:") else db
        db = db.split("?", 1)[0]
        if db.startswith("//"):  # file://host/path: sqlite accepts an empty host or localhost
            db = "/" + db[2:].split("/", 1)[-1]
    return Path(db).expanduser()


def _resolve(target: str | os.PathLike) -> URL:
    """The SQLAlchemy URL of ``target``: a path means SQLite at that path."""
    if isinstance(target, os.PathLike) or (isinstance(target, str) and "://" not in target):
        if not str(target).strip():
            raise StoreError(f"the store location is empty: give {_URL_HELP}")
        url = URL.create("sqlite+pysqlite", database=str(Path(target).expanduser().absolute()))
    elif isinstance(target, str):
        try:
            url = make_url(target)
        except ArgumentError:
            raise StoreError(f"{_mask_unparsed(target)!r} is not a database URL: give {_URL_HELP}"
                             ) from None
    else:
        raise StoreError(f"the store location must be a str or a path, got "
                         f"{type(target).__name__}: give {_URL_HELP}")
    backend, _, driver = url.drivername.partition("+")
    shown = url.render_as_string(hide_password=True)
    if backend == "sqlite":
        if url.drivername not in ("sqlite", "sqlite+pysqlite"):
            raise StoreError(f"{shown}: SQLite driver {driver!r} is not supported: use sqlite:///PATH")
        path = _sqlite_file(url)
        if path is not None and not path.parent.is_dir():
            raise StoreUnavailable(f"cannot open {path}: its folder {path.parent} does not exist; "
                                   "create the folder first or check the path")
        if path is not None and path.is_dir():
            raise StoreUnavailable(f"{path} is a folder: give the path of a database file in it, "
                                   f"e.g. {path / 'templates.db'}")
        return url
    if backend == "postgresql":
        if url.drivername not in ("postgresql", "postgresql+psycopg"):
            raise StoreError(f"{shown}: PostgreSQL driver {driver!r} is not supported: use "
                             "postgresql+psycopg://USER@HOST:PORT/DATABASE")
        return url.set(drivername="postgresql+psycopg")
    raise StoreError(f"{shown}: unknown database kind {url.drivername!r}: give {_URL_HELP}")


def _sqlite_engine(url: URL) -> Engine:
    """SQLite with WAL, a busy timeout and ``BEGIN IMMEDIATE`` for write transactions.

    pysqlite's own transaction handling is switched off and SQLAlchemy's ``begin`` hook
    emits the BEGIN, as SQLAlchemy's SQLite documentation describes; a connection whose
    execution options carry ``fedface_write=True`` begins IMMEDIATE (takes the write lock
    at once, waiting up to the busy timeout), others a plain deferred BEGIN.
    """
    engine = create_engine(url)
    in_memory = _sqlite_file(url) is None

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, connection_record):
        dbapi_connection.isolation_level = None
        dbapi_connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
        dbapi_connection.execute("PRAGMA secure_delete = ON")
        if in_memory:
            return
        mode = dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() != "wal":
            try:
                dbapi_connection.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError:
                pass  # a read-only database: reads work in its current mode

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        write = conn.get_execution_options().get("fedface_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


# -- the store -------------------------------------------------------------------------------

class TemplateStore:
    """Protected templates in a SQLite file or a PostgreSQL database (see the module text).

    Parameters
    ----------
    url : str or path
        A filesystem path (SQLite at that path), ``sqlite:///PATH`` (``sqlite:///file:PATH?
        mode=ro&uri=true`` opens it read-only) or ``postgresql+psycopg://USER@HOST:PORT/DB``.
    create : bool
        Create the store's tables (and the SQLite file) if the database has none. With
        ``False`` a database without a store is refused.

    Raises
    ------
    StoreError
        The location is unusable (unknown URL kind, missing folder, not a database,
        unreachable server) or holds tables that are not this version's store.

    Notes
    -----
    Calls that trust a row take the MAC key (``mac_key``, at least 16 secret bytes); the
    store never keeps it. Each store owns its engine: open one per process, and
    :meth:`close` it (or use it as a context manager).
    """

    def __init__(self, url: str | os.PathLike, *, create: bool = True):
        self._target = _resolve(url)
        self.url = self._target.render_as_string(hide_password=True)
        self._sqlite = self._target.get_backend_name() == "sqlite"
        self._path = _sqlite_file(self._target) if self._sqlite else None
        if self._sqlite:
            self._engine: Engine | None = _sqlite_engine(self._target)
        else:
            self._engine = create_engine(self._target, pool_pre_ping=True,
                                         connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S})
        try:
            self._open_schema(create)
        except BaseException:
            self.close()
            raise

    # -- life cycle

    def close(self) -> None:
        """Dispose of the engine (closes its connections); later calls are refused."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def __enter__(self) -> TemplateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TemplateStore({self.url!r}{', closed' if self._engine is None else ''})"

    # -- public API

    def enroll(self, subject: str, scheme: str, key_id: str, template: bytes,
               mac_key: bytes) -> Record:
        """Store ``subject``'s protected ``template`` for ``scheme`` as its active row.

        Parameters
        ----------
        subject : str
            The person's pseudonym, never a name (1 to 128 printable characters).
        scheme : str
            Protection scheme name (letters, digits, ``. _ + -``).
        key_id : str
            Public fingerprint of the key or token the scheme used.
        template : bytes
            The protected template (non-empty).
        mac_key : bytes
            Secret key of the integrity tag (at least 16 bytes).

        Returns
        -------
        Record
            The new row, tagged.

        Raises
        ------
        AlreadyEnrolled
            ``subject`` already has an active ``scheme`` template (also when another
            process enrols it at the same moment).
        """
        subject, scheme = _check_subject(subject), _check_scheme(scheme)
        key_id, template = _check_key_id(key_id), _check_template(template)
        mac_key = _check_mac_key(mac_key)
        now = _now()
        try:
            with self._transaction(f"enrol {subject!r}", write=True) as conn:
                for row in self._rows(conn, subject, scheme, lock=True):
                    rec, _ = _decode(row)
                    if rec.status == ACTIVE:
                        raise self._already(rec)
                row_id = conn.execute(insert(_templates).values(
                    subject=subject, scheme=scheme, key_id=key_id, template=template,
                    status=ACTIVE, created=now, updated=now, version=1, tag=b"",
                ).returning(_templates.c.id)).scalar_one()
                rec = Record(row_id, subject, scheme, key_id, template, ACTIVE, now, now, 1, b"")
                rec = replace(rec, tag=_tag(mac_key, rec))
                conn.execute(update(_templates).where(_templates.c.id == row_id).values(tag=rec.tag))
        except IntegrityError as err:
            if _is_duplicate(err):
                raise AlreadyEnrolled(
                    f"subject {subject!r} already has an active {scheme!r} template (enrolled by "
                    "another process at the same moment): revoke it first, or use renew to "
                    "replace it") from None
            raise self._failure(err, f"enrol {subject!r}") from err
        return rec

    def get(self, subject: str, scheme: str, mac_key: bytes, key_id: str | None = None) -> Record:
        """The active, verified ``scheme`` template of ``subject``.

        With ``key_id`` (the key ``mac_key`` belongs to), only rows made under that key are
        checked with ``mac_key``; an active row under another key raises :class:`WrongKey`
        (its tag is under that key's MAC key, which was not given).

        Raises
        ------
        WrongKey
            The active template was made under another key than ``key_id``.
        NotEnrolled
            No row for ``subject`` and ``scheme``.
        Revoked
            The subject's template was revoked (the message says when): enrol again.
        TamperedRow
            A row of ``subject`` for ``scheme`` fails its integrity check; its template
            is not returned.
        """
        subject, scheme = _check_subject(subject), _check_scheme(scheme)
        mac_key = _check_mac_key(mac_key)
        with self._transaction(f"read {subject!r}", write=False) as conn:
            rows = self._rows(conn, subject, scheme)
        return self._current(rows, subject, scheme, mac_key, key_id)

    def records(self, scheme: str | None = None, *, key_id: str | None = None,
                subject: str | None = None, include_revoked: bool = False) -> list[Record]:
        """Rows in id order, NOT verified (for listings and statistics, not for matching).

        Parameters
        ----------
        scheme, key_id, subject : str, optional
            Keep only rows with these values.
        include_revoked : bool
            Also list revoked rows (their templates are empty).
        """
        query = select(_templates).order_by(_templates.c.id)
        if scheme is not None:
            query = query.where(_templates.c.scheme == scheme)
        if key_id is not None:
            query = query.where(_templates.c.key_id == key_id)
        if subject is not None:
            query = query.where(_templates.c.subject == subject)
        if not include_revoked:
            query = query.where(_templates.c.status == ACTIVE)
        with self._transaction("list templates", write=False) as conn:
            rows = conn.execute(query).all()
        return [_decode(row)[0] for row in rows]

    def verified(self, scheme: str | None, mac_key: bytes, key_id: str | None = None
                 ) -> tuple[list[Record], list[Record]]:
        """The gallery for a 1:N search: ``(good, tampered)``.

        Every row of ``scheme`` (all schemes for ``None``) is checked; with ``key_id``, only
        the rows made under that key (the others are in neither list). ``good`` holds the
        active rows that pass, ``tampered`` every row that fails (active or not), with its
        template emptied: report those, never match them. Revoked rows that pass are in
        neither list.
        """
        mac_key = _check_mac_key(mac_key)
        query = select(_templates).order_by(_templates.c.id)
        if scheme is not None:
            query = query.where(_templates.c.scheme == _check_scheme(scheme))
        if key_id is not None:
            query = query.where(_templates.c.key_id == _check_key_id(key_id))
        with self._transaction("read the gallery", write=False) as conn:
            rows = conn.execute(query).all()
        good, tampered = [], []
        for row in rows:
            rec, ok = _authentic(row, mac_key)
            if not ok:
                tampered.append(replace(rec, template=b""))
            elif rec.status == ACTIVE:
                good.append(rec)
        return good, tampered

    def revoke(self, subject: str, scheme: str, mac_key: bytes, key_id: str | None = None, *,
               allow_tampered: bool = False) -> Record:
        """Revoke ``subject``'s active ``scheme`` template; the template bytes are erased.

        Parameters
        ----------
        allow_tampered : bool
            Also revoke (erase and re-seal as revoked) the subject's rows that fail their
            integrity check, after you have looked into them. Without it such rows raise
            :class:`TamperedRow` and nothing changes.

        Returns
        -------
        Record
            The revoked row (empty template, version incremented).

        Raises
        ------
        NotEnrolled, Revoked, TamperedRow
            As :meth:`get`.
        """
        subject, scheme = _check_subject(subject), _check_scheme(scheme)
        mac_key = _check_mac_key(mac_key)
        now = _now()
        with self._transaction(f"revoke {subject!r}", write=True) as conn:
            rows = self._rows(conn, subject, scheme, lock=True)
            if allow_tampered:
                mine = [r for r in rows if key_id is None or _decode(r)[0].key_id == key_id]
                targets = [rec for rec, ok in (_authentic(r, mac_key) for r in mine)
                           if not ok or rec.status == ACTIVE]
                if not targets:
                    self._current(rows, subject, scheme, mac_key)  # raises NotEnrolled/Revoked
            else:
                targets = [self._current(rows, subject, scheme, mac_key, key_id)]
            done = [self._rewrite(conn, rec, mac_key, template=b"", status=REVOKED, updated=now)
                    for rec in targets]
        self._truncate_wal()
        return next((r for r, old in zip(done, targets) if old.status == ACTIVE), done[-1])

    def renew(self, subject: str, scheme: str, key_id: str, template: bytes,
              mac_key: bytes, *, old_key_id: str | None = None,
              old_mac_key: bytes | None = None) -> Record:
        """Replace ``subject``'s active ``scheme`` template and key id in one transaction.

        The old template is overwritten, not kept. Returns the updated row (version
        incremented, ``created`` unchanged). The active row is verified first: under
        ``key_id`` with ``mac_key``, or, for a key rotation (the row was made under another
        key), under ``old_key_id`` with ``old_mac_key``, which must be that row's key: a
        rotation without the old key is refused (:class:`WrongKey`), so holding some key
        is not enough to take a subject over.

        Raises
        ------
        NotEnrolled, Revoked, TamperedRow, WrongKey
            As :meth:`get` (a revoked subject is enrolled again with :meth:`enroll`).
        """
        subject, scheme = _check_subject(subject), _check_scheme(scheme)
        key_id, template = _check_key_id(key_id), _check_template(template)
        mac_key = _check_mac_key(mac_key)
        now = _now()
        with self._transaction(f"renew {subject!r}", write=True) as conn:
            rows = self._rows(conn, subject, scheme, lock=True)
            active = [rec for rec in (_decode(r)[0] for r in rows) if rec.status == ACTIVE]
            if active and active[0].key_id != key_id and old_key_id is not None:
                current = self._current(rows, subject, scheme, _check_mac_key(old_mac_key),
                                        _check_key_id(old_key_id))
            else:
                current = self._current(rows, subject, scheme, mac_key, key_id)
            rec = self._rewrite(conn, current, mac_key, key_id=key_id, template=template,
                                updated=now)
        self._truncate_wal()
        return rec

    # -- search indexes

    def index_parts(self, scheme: str, key_id: str, mac_key: bytes) -> dict[int, bytes]:
        """The verified parts of the search index of ``scheme`` under ``key_id``.

        Raises :class:`TamperedRow` when a part fails its integrity check (the index is
        then not used: rebuild it by re-enrolling under a new key).
        """
        scheme, key_id = _check_scheme(scheme), _check_key_id(key_id)
        mac_key = _check_mac_key(mac_key)
        with self._transaction("read the search index", write=False) as conn:
            rows = self._index_rows(conn, scheme, key_id)
        return self._verified_parts(rows, scheme, key_id, mac_key)

    @contextmanager
    def updating_index(self, scheme: str, key_id: str, mac_key: bytes
                       ) -> Iterator[dict[int, bytes]]:
        """Read, change and write the search index in one write transaction.

        Yields the verified parts (``{part: bytes}``); parts added or replaced in the dict
        are written and sealed when the block ends without an error. Other writers of the
        same store wait meanwhile (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: the index rows
        are locked, and a first part is protected by the unique index), so no concurrent
        enrolment is lost.
        """
        scheme, key_id = _check_scheme(scheme), _check_key_id(key_id)
        mac_key = _check_mac_key(mac_key)
        try:
            with self._transaction("update the search index", write=True) as conn:
                if not self._sqlite:  # serialise index writers of this key (rows may not exist yet)
                    conn.execute(text("SELECT pg_advisory_xact_lock(:a, :b)"),
                                 {"a": _PG_LOCK_KEY, "b": int.from_bytes(
                                     hashlib.sha256(f"{scheme}|{key_id}".encode()).digest()[:4],
                                     "big", signed=True)})
                rows = self._index_rows(conn, scheme, key_id, lock=True)
                parts = self._verified_parts(rows, scheme, key_id, mac_key)
                before = dict(parts)
                versions = {int(r._mapping["part"]): int(r._mapping["version"]) for r in rows}
                yield parts
                now = _now()
                for part, data in parts.items():
                    if before.get(part) == data:
                        continue
                    data = _check_template(data)
                    version = versions.get(part, 0) + 1
                    values = {"data": data, "updated": now, "version": version,
                              "tag": _index_tag(mac_key, scheme, key_id, part, version, data)}
                    if part in versions:
                        conn.execute(update(_indexes).where(
                            _indexes.c.scheme == scheme, _indexes.c.key_id == key_id,
                            _indexes.c.part == part).values(**values))
                    else:
                        conn.execute(insert(_indexes).values(scheme=scheme, key_id=key_id,
                                                             part=int(part), **values))
        except IntegrityError as err:
            raise StoreError(f"the search index of {scheme!r} under key {key_id} was changed by "
                             "another process at the same moment: try again") from err

    def _index_rows(self, conn: Connection, scheme: str, key_id: str, *, lock: bool = False) -> list:
        query = (select(_indexes).where(_indexes.c.scheme == scheme, _indexes.c.key_id == key_id)
                 .order_by(_indexes.c.part))
        return conn.execute(query.with_for_update() if lock else query).all()

    @staticmethod
    def _verified_parts(rows: list, scheme: str, key_id: str, mac_key: bytes) -> dict[int, bytes]:
        parts = {}
        for row in rows:
            m = row._mapping
            data = bytes(m["data"]) if m["data"] is not None else b""
            want = _index_tag(mac_key, scheme, key_id, int(m["part"]), int(m["version"]), data)
            if not isinstance(m["tag"], bytes) or not hmac.compare_digest(m["tag"], want):
                raise TamperedRow(f"part {m['part']} of the {scheme!r} search index under key "
                                  f"{key_id} fails its integrity check: it was changed outside "
                                  "fedface. The index is not used; investigate, then re-enrol the "
                                  "subjects under a new key", int(m["id"]), None)
            parts[int(m["part"])] = data
        return parts

    # -- internals

    def _rows(self, conn: Connection, subject: str, scheme: str, *, lock: bool = False) -> list:
        query = (select(_templates)
                 .where(_templates.c.subject == subject, _templates.c.scheme == scheme)
                 .order_by(_templates.c.id))
        return conn.execute(query.with_for_update() if lock else query).all()

    def _current(self, rows: list, subject: str, scheme: str, mac_key: bytes,
                 key_id: str | None = None) -> Record:
        """The verified active row among ``rows`` (all of one subject and scheme).

        With ``key_id``, rows under other keys are not checked with ``mac_key``; an active
        one raises :class:`WrongKey`."""
        everything = [_decode(r)[0] for r in rows]
        if key_id is not None:
            others = [rec for rec in everything if rec.key_id != key_id and rec.status == ACTIVE]
            if others:
                raise WrongKey(
                    f"subject {subject!r} is stored under key {others[0].key_id}, not under the "
                    f"key given ({key_id}): pass the key it was enrolled with (to move it to a "
                    "new key: renew with --old-key). If no one enrolled or renewed it under "
                    f"{others[0].key_id}, its key id was edited: treat the row as tampered")
            rows = [r for r, rec in zip(rows, everything, strict=True) if rec.key_id == key_id]
        checked = [_authentic(row, mac_key) for row in rows]
        for rec, ok in checked:
            if not ok:
                raise self._tampered(rec, subject, scheme)
        active = [rec for rec, _ in checked if rec.status == ACTIVE]
        if active:
            return active[0]
        if everything:
            last = max(everything, key=lambda r: r.updated)
            raise Revoked(f"the {scheme!r} template of subject {subject!r} was revoked on "
                          f"{_stamp(last.updated)}: enrol again to use this scheme",
                          last.updated)
        raise NotEnrolled(f"subject {subject!r} has no {scheme!r} template in {self.url}: "
                          "enrol it first (or check the subject and scheme)")

    @staticmethod
    def _tampered(rec: Record, subject: str, scheme: str) -> TamperedRow:
        return TamperedRow(
            f"row {rec.id} (subject {subject!r}, scheme {scheme!r}) fails its integrity check: "
            "it was changed outside fedface, or the MAC key is not the one it was stored with. "
            "Its template is not used; check the key, investigate, then "
            "revoke(..., allow_tampered=True) and enrol again", rec.id, subject)

    def _rewrite(self, conn: Connection, rec: Record, mac_key: bytes, **changes: Any) -> Record:
        """Write ``rec`` with ``changes`` and version + 1, re-tagged, every column (so a
        tampered row being revoked comes out consistent); only if the row is still at
        ``rec.version`` (a concurrent change makes this fail, not overwrite it)."""
        new = replace(rec, **changes, version=max(rec.version, 0) + 1, tag=b"")
        new = replace(new, tag=_tag(mac_key, new))
        values = {c.name: getattr(new, c.name) for c in _templates.columns if c.name != "id"}
        query = update(_templates).where(_templates.c.id == rec.id)
        if rec.version >= 1:
            query = query.where(_templates.c.version == rec.version)
        done = conn.execute(query.values(**values))
        if done.rowcount != 1:
            raise StoreError(f"row {rec.id} (subject {rec.subject!r}) was changed by another "
                             "process at the same moment: try again")
        return new

    def _already(self, rec: Record) -> AlreadyEnrolled:
        return AlreadyEnrolled(
            f"subject {rec.subject!r} already has an active {rec.scheme!r} template (row {rec.id}, "
            f"enrolled {_stamp(rec.created)}): revoke it first, or use renew to replace it")

    @contextmanager
    def _transaction(self, action: str, *, write: bool) -> Iterator[Connection]:
        """A connection inside one transaction, committed at the end of the block; database
        failures become :class:`StoreError` (an ``IntegrityError`` is left to the caller)."""
        if self._engine is None:
            raise StoreError(f"the template store {self.url} is closed: open it again")
        try:
            conn = self._engine.connect()
        except (SQLAlchemyError, sqlite3.Error) as err:
            raise self._failure(err, action, connecting=True) from err
        try:
            with conn:
                if write and self._sqlite:
                    conn.execution_options(fedface_write=True)
                with conn.begin():
                    yield conn
        except IntegrityError:
            raise
        except (SQLAlchemyError, sqlite3.Error) as err:
            raise self._failure(err, action) from err

    def _failure(self, err: BaseException, action: str, *, connecting: bool = False) -> StoreError:
        orig = getattr(err, "orig", None) or err
        reason = " ".join(str(orig).split())[:300] or type(orig).__name__
        low = reason.lower()
        if self._sqlite:
            where = str(self._path) if self._path else self.url
            if "readonly" in low or "read-only" in low:
                return StoreReadOnly(
                    f"cannot {action}: {where} is read-only ({reason}). Nothing was changed; "
                    "open it with write access (file and folder writable by this user, no "
                    "mode=ro in the URL) to change it")
            if "not a database" in low or "malformed" in low:
                return StoreUnavailable(
                    f"{where} is not a SQLite database or is damaged ({reason}): give the path "
                    "of a fedface template store, or a new file name")
            if "locked" in low or "busy" in low:
                return StoreUnavailable(
                    f"cannot {action}: {where} stayed locked by another process for "
                    f"{BUSY_TIMEOUT_S} s ({reason}): try again, or find the process that holds it")
            if "unable to open" in low:
                return StoreUnavailable(
                    f"cannot open {where} ({reason}): check that the file exists (for mode=ro) "
                    "and that it and its folder are readable and writable")
            return StoreError(f"cannot {action} in {where} ({reason})")
        if connecting:
            return StoreUnavailable(
                f"cannot connect to {self.url} ({reason}): check that the PostgreSQL server is "
                "running and reachable at that host and port, and that the user, password and "
                "database name are right")
        if "read-only" in low or "permission denied" in low:
            return StoreReadOnly(f"cannot {action} in {self.url} ({reason}): the database user "
                                 "needs write access to the fedface tables; nothing was changed")
        return StoreError(f"cannot {action} in {self.url} ({reason}): check the server and "
                          "try again")

    def _truncate_wal(self) -> None:
        """SQLite: copy the write-ahead log into the database file and empty it, so removed
        template bytes do not stay in the log (best effort; other readers may delay it)."""
        if not self._sqlite or self._path is None or self._engine is None:
            return
        try:
            with self._engine.connect() as conn:
                conn.connection.dbapi_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except (SQLAlchemyError, sqlite3.Error):
            pass

    def _open_schema(self, create: bool) -> None:
        """Check (and if needed create or migrate) the schema; see the module text."""
        with self._transaction("read the schema", write=False) as conn:
            state = self._schema_state(conn)
        if state == SCHEMA_VERSION:
            return
        if state == 0 and not create:
            raise SchemaMismatch(f"{self.url} holds no fedface template store: open it with "
                                 "create=True to create one, or check the location")
        with self._transaction("create the template store", write=True) as conn:
            if not self._sqlite:  # one creator at a time (SQLite: BEGIN IMMEDIATE already)
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            state = self._schema_state(conn)
            if state == 0:
                _metadata.create_all(conn)
                conn.execute(insert(_meta).values(key="schema_version", value=str(SCHEMA_VERSION)))
                return
            for version in range(state, SCHEMA_VERSION):
                if version not in _MIGRATIONS:
                    raise SchemaMismatch(f"{self.url} holds template store schema version {version}, "
                                         f"which this fedface cannot migrate: use the fedface "
                                         "release that wrote it")
                _MIGRATIONS[version](conn)
            conn.execute(update(_meta).where(_meta.c.key == "schema_version")
                         .values(value=str(SCHEMA_VERSION)))
            self._schema_state(conn)

    def _schema_state(self, conn: Connection) -> int:
        """0 for no store, else the stored schema version (refusing foreign or newer ones)."""
        probe = inspect(conn)
        names = set(probe.get_table_names())
        if not names & {META_TABLE, TEMPLATE_TABLE}:
            return 0
        if META_TABLE not in names:
            raise SchemaMismatch(
                f"{self.url} has a table {TEMPLATE_TABLE!r} but no {META_TABLE!r} with a schema "
                "version: it was not made by fedface, or is damaged. Use another database or "
                "file, or rename that table")
        meta_columns = {c["name"] for c in probe.get_columns(META_TABLE)}
        if meta_columns != {"key", "value"}:
            raise SchemaMismatch(
                f"{self.url} has a table {META_TABLE!r} that is not fedface's (columns "
                f"{sorted(meta_columns)}): use another database or file, or rename that table")
        stored = conn.execute(select(_meta.c.value).where(_meta.c.key == "schema_version")
                              ).scalar_one_or_none()
        try:
            version = int(str(stored))
        except ValueError:
            version = -1
        if version < 1:
            raise SchemaMismatch(
                f"{self.url}: {META_TABLE!r} holds no valid schema_version ({stored!r}): the "
                "store is damaged or not fedface's; use another database or file")
        if version > SCHEMA_VERSION:
            raise SchemaMismatch(
                f"{self.url} holds a template store of schema version {version}, newer than this "
                f"fedface knows ({SCHEMA_VERSION}): upgrade fedface to open it")
        if TEMPLATE_TABLE not in names:
            raise SchemaMismatch(f"{self.url} has {META_TABLE!r} but no {TEMPLATE_TABLE!r}: the "
                                 "store is damaged; restore it from a backup")
        if version == SCHEMA_VERSION:
            columns = {c["name"] for c in probe.get_columns(TEMPLATE_TABLE)}
            if columns != _COLUMNS:
                raise SchemaMismatch(
                    f"{self.url} has a table {TEMPLATE_TABLE!r} whose columns {sorted(columns)} "
                    f"are not those of schema version {SCHEMA_VERSION}: it is damaged or not "
                    "fedface's; use another database or file")
        return version


def _is_duplicate(err: IntegrityError) -> bool:
    """Whether ``err`` is the one-active-row index refusing a second active row."""
    orig = err.orig
    if getattr(orig, "sqlstate", None) == "23505":  # psycopg: unique_violation
        return True
    return "unique" in str(orig).lower()


def open_store(url_or_path: str | os.PathLike, *, create: bool = True) -> TemplateStore:
    """A :class:`TemplateStore` at ``url_or_path`` (a plain path means a SQLite file)."""
    return TemplateStore(url_or_path, create=create)
