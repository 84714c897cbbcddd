"""A throw-away PostgreSQL database per test, for the Dagster instance profile `postgres`.

The server comes from $INDEXER_TEST_POSTGRES_URL (CI sets it). Each test gets its own database,
`indexer_test_<pid>_<n>`, dropped afterwards, so runs of earlier or parallel sessions are never seen
and a dirty server does not matter. Databases left by a killed session (its pid is gone) are dropped
the next time.
"""

import itertools
import os
import re
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

from indexer_dagster.persist.lake import _alive  # is that process still running

PG_URL_ENV = "INDEXER_TEST_POSTGRES_URL"
_counter = itertools.count()
_swept = False


def server_url() -> str | None:
    return os.environ.get(PG_URL_ENV) or None


def _with_db(url: str, db: str) -> str:
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, "/" + db, p.query, p.fragment))


def _admin(url: str):
    import psycopg2

    conn = psycopg2.connect(url, connect_timeout=5)
    conn.autocommit = True
    return conn


def _sweep(conn) -> None:
    """Drop databases of sessions that no longer run (this machine's pids only)."""
    global _swept
    if _swept:
        return
    _swept = True
    with conn.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE datname LIKE 'indexer_test_%'")
        for (name,) in cur.fetchall():
            m = re.fullmatch(r"indexer_test_(\d+)_\d+", name)
            if m and not _alive(int(m.group(1))):
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')




@contextmanager
def fresh_database(url: str):
    """Create an empty database on the server at `url`; yield its connection parts; drop it after."""
    name = f"indexer_test_{os.getpid()}_{next(_counter)}"
    try:
        conn = _admin(url)
    except Exception as e:  # noqa: BLE001 - a configured server that is down is a failure, not a skip
        raise RuntimeError(f"{PG_URL_ENV} is set but PostgreSQL is unreachable: {e}") from None
    try:
        _sweep(conn)
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        p = urlsplit(url)
        yield {
            "url": _with_db(url, name),
            "host": p.hostname or "127.0.0.1",
            "port": str(p.port or 5432),
            "user": p.username or "postgres",
            "password": p.password or "",
            "db": name,
        }
    finally:
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            conn.close()


def dagster_pg_env(db: dict) -> dict[str, str]:
    """The variables deploy/dagster-postgres.yaml reads."""
    return {
        "DAGSTER_PG_HOST": db["host"],
        "DAGSTER_PG_PORT": db["port"],
        "DAGSTER_PG_DB": db["db"],
        "DAGSTER_PG_USER": db["user"],
        "DAGSTER_PG_PASSWORD": db["password"],
    }


def database_for_test(what: str):
    """Generator body for a fixture: a throw-away database (its connection parts), dropped after the test.
    Skipped when $INDEXER_TEST_POSTGRES_URL is unset (saying it is needed to `what`); failed when it is set
    and the server does not answer."""
    import pytest

    url = server_url()
    if url is None:
        pytest.skip(f"set {PG_URL_ENV} to {what}")
    try:
        cm = fresh_database(url)
        db = cm.__enter__()
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield db
    finally:
        cm.__exit__(None, None, None)
