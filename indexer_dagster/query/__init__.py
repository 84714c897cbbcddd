"""Read-only access to the DuckDB catalog: the views over the Parquet lake."""

import time
from pathlib import Path

import duckdb
import polars as pl

_LOCK_RETRIES = 20


class QueryError(ValueError):
    """A query that cannot run; the message says why and what to do."""


def connect(duckdb_path: str | Path) -> duckdb.DuckDBPyConnection:
    """Open the catalog read-only (retrying briefly if another program holds a write lock)."""
    path = Path(duckdb_path)
    if not path.is_file():
        raise QueryError(f"{path} does not exist yet; run `indexer backfill` (or `indexer catalog`) first")
    from indexer_dagster.persist.duck_lock import is_lock_error, lock_message

    from indexer_dagster.persist.catalog import attach_lake

    for attempt in range(_LOCK_RETRIES):
        try:
            con = duckdb.connect(str(path), read_only=True)
            attach_lake(con)  # a lake on object storage: its filesystem
            return con
        except duckdb.Error as e:
            if not is_lock_error(e):
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise QueryError(f"cannot open the catalog {path} ({first}); rebuild it with `indexer catalog`") from None
            if attempt == _LOCK_RETRIES - 1:
                raise QueryError(lock_message(path, e)) from None
            time.sleep(0.1)
    raise AssertionError("unreachable")


def query(duckdb_path: str | Path, sql: str) -> pl.DataFrame:
    """Run one read-only SQL statement and return a Polars frame; writes are refused."""
    from indexer_dagster.query.api import _check_read_only

    con = connect(duckdb_path)
    try:
        # Refuse by statement type before running: a read-only catalog still lets COPY TO, EXPORT,
        # INSTALL, ATTACH, SET or PRAGMA write files or change the session.
        _check_read_only(con, sql, who="`indexer query`")
        from indexer_dagster.persist.catalog import retry_on_changed_files

        def run() -> pl.DataFrame:
            rel = con.sql(sql)
            return rel.pl() if rel is not None else pl.DataFrame()

        try:
            return retry_on_changed_files(con, run)
        except (duckdb.InvalidInputException, duckdb.PermissionException) as e:
            if "read-only" in str(e).lower() or "read only" in str(e).lower():
                raise QueryError("the catalog is read-only: `indexer query` runs SELECT queries only") from None
            raise QueryError(str(e)) from None
        except duckdb.Error as e:
            raise QueryError(str(e).splitlines()[0]) from None
    finally:
        con.close()


# The Python query API (imported last: it uses QueryError from this module). Its `connect` returns an
# `Indexer` and is exported as `indexer_dagster.connect`; the `connect` above keeps returning a raw
# DuckDB connection for the CLI.
from indexer_dagster.query.api import (  # noqa: E402
    CANDLE_INTERVALS as CANDLE_INTERVALS,
    MIN_STATUSES as MIN_STATUSES,
    VOLUME_INTERVALS as VOLUME_INTERVALS,
    Indexer as Indexer,
)
