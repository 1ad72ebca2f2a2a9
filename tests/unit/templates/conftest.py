"""Fixtures of the template store tests: a SQLite file, a real PostgreSQL database, both.

- ``sqlite_url``: ``sqlite:///`` URL of a fresh file in the test's tmp folder.
- ``pg_server``: a throwaway PostgreSQL cluster for the whole session (:mod:`tests.pg`),
  stopped and removed at the end whatever happened.
- ``pg_url``: URL of a fresh, empty database on that server, one per test.
- ``store_url``: the test runs once with each (ids ``sqlite`` and ``postgresql``).
- ``mac_key``: 32 random bytes.

Without PostgreSQL's server binaries the PostgreSQL tests skip with the reason, unless
``FEDFACE_REQUIRE_POSTGRES=1`` (CI) makes them fail instead.
"""

import itertools
import os
import secrets

import pytest

from tests.pg import find_pg_bin, postgres_server

_databases = itertools.count()


def _unavailable(reason: str):
    if os.environ.get("FEDFACE_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"FEDFACE_REQUIRE_POSTGRES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_server():
    bin_dir, reason = find_pg_bin()
    if bin_dir is None:
        _unavailable(reason)
    with postgres_server(bin_dir) as server:
        yield server


@pytest.fixture
def pg_url(pg_server):
    return pg_server.create_database(f"t{next(_databases)}")


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'templates.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request):
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
def mac_key():
    return secrets.token_bytes(32)
