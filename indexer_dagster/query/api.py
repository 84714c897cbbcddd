"""The Python query API: one read-only `Indexer` over the DuckDB catalog, returning Polars frames.

    import indexer_dagster

    with indexer_dagster.connect() as ix:            # $INDEXER_CONFIG, or a config / .duckdb path
        ix.pool_state("0xabc...")                    # latest reserves and price of one pool
        ix.candles("0xabc...", "1h", start="2024-05-01", end="2024-06-01")
        ix.events("uniswap_v2_pair_swap", address="0xabc...", from_block=100, to_block=200)
        ix.sql("SELECT pool, sum(amount_in_h) FROM swaps WHERE block_number > ? GROUP BY pool", [100])

Connection
----------
An `Indexer` keeps one read-only connection and reuses it for every call (a query on a warm
connection costs a few milliseconds). The catalog file only holds views and is rebuilt by writing a
new file and renaming it over the old one; before each call the `Indexer` compares the file's
inode with the one it opened and reopens when the file was replaced, so a long-lived `Indexer`
sees rebuilt catalogs without being recreated. Data files (Parquet) are read on every query, so new
and atomically replaced files are seen immediately; a query sees either the old or the new content
of a replaced file, never a mixture (each file is opened once per query, and a renamed-over file
stays readable through an open handle).

The catalog is attached to a private in-memory DuckDB database rather than opened with
``duckdb.connect(path)``: DuckDB caches database instances by path within a process, so a second
``connect`` of a replaced file would silently return the old, cached catalog.

An `Indexer` may be shared between threads: calls are serialised on its connection. For parallel
queries open one `Indexer` per thread.

Status
------
Every view has a ``status`` column: ``'confirmed'`` when the row's block (for aggregates, the
bucket's last block; for pools, the creation block; for pool_state, the block of the latest
reserves) is at or below the chain's confirmed head, else ``'unconfirmed'``. ``min_status`` selects:

* ``"unconfirmed"`` (default): every row, final or not;
* ``"confirmed"``: only confirmed rows. For `pool_state` this drops pools whose latest reserves
  are not final yet (their last confirmed state is not kept by that view).

Safety
------
`Indexer.sql` runs one read-only statement (SELECT / WITH / FROM / VALUES / DESCRIBE / SHOW /
SUMMARIZE, or EXPLAIN of one of these); anything else (COPY, ATTACH, CREATE, SET, PRAGMA, ...)
raises `QueryError` before it runs. The helpers validate their arguments, check table names
against the catalog and bind every value as a parameter, so no argument can change the SQL.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from indexer_dagster.persist.catalog import attach_lake, retry_on_changed_files
from indexer_dagster.query import QueryError

__all__ = [
    "CANDLE_INTERVALS",
    "MIN_STATUSES",
    "VOLUME_INTERVALS",
    "Indexer",
    "QueryError",
    "connect",
]

#: Accepted values of ``min_status``: everything, or only rows at or below the confirmed head.
MIN_STATUSES = ("unconfirmed", "confirmed")
#: Intervals stored in the ``pool_candles`` view.
CANDLE_INTERVALS = ("1m", "1h")
#: Intervals stored in the ``pool_volume`` view.
VOLUME_INTERVALS = ("1h", "1d")

_LOCK_RETRIES = 20
_ALIAS = "indexer_catalog"
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_READ_ONLY_TYPES = {"SELECT"}
_EXPLAIN_PREFIX = re.compile(r"^\s*explain\s+(?:analyze\s+)?", re.IGNORECASE)
_READ_ONLY_HINT = "SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE or EXPLAIN"


def connect(config_or_duckdb_path: Any = None) -> Indexer:
    """Open the catalog read-only and return an `Indexer`.

    config_or_duckdb_path:
      * None: the config named by $INDEXER_CONFIG (its ``duckdb_path`` is the catalog);
      * a str / Path ending in ``.duckdb``: that catalog file;
      * any other str / Path: a config file (YAML);
      * a loaded `IndexerConfig` (anything with a ``duckdb_path`` attribute).
    """
    target = config_or_duckdb_path
    if target is None or (isinstance(target, (str, os.PathLike)) and not str(target).endswith(".duckdb")):
        from indexer_dagster.config import load_config  # imported here: it pulls the ABI/config stack

        target = load_config(target).duckdb_path
    elif not isinstance(target, (str, os.PathLike)):
        path = getattr(target, "duckdb_path", None)
        if path is None:
            raise TypeError(
                "connect() takes None ($INDEXER_CONFIG), a config path, a .duckdb path or an IndexerConfig; "
                f"got {type(target).__name__}"
            )
        target = path
    return Indexer(target)


class Indexer:
    """A read-only view of the indexer's data; every method returns a `polars.DataFrame`."""

    def __init__(self, duckdb_path: str | os.PathLike):
        self._path = Path(duckdb_path).expanduser().absolute()
        self._lock = threading.RLock()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._ident: tuple[int, ...] | None = None
        self._columns: dict[str, tuple[str, ...]] | None = None  # view -> columns, of the open catalog
        self._closed = False
        with self._lock:
            self._connection()  # fail now (missing file, lock) rather than at the first query

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The catalog file."""
        return self._path

    def close(self) -> None:
        """Close the connection; later calls raise `QueryError`. Closing twice is fine."""
        with self._lock:
            self._closed = True
            self._drop()

    def __enter__(self) -> Indexer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Indexer {self._path} ({state})>"

    def _drop(self) -> None:
        if self._con is not None:
            try:
                self._con.close()
            finally:
                self._con, self._ident, self._columns = None, None, None

    def _connection(self) -> duckdb.DuckDBPyConnection:
        """The open connection, reopened first if the catalog file was replaced (caller holds the lock)."""
        if self._closed:
            raise QueryError("this Indexer is closed; open a new one with indexer_dagster.connect()")
        ident = self._stat()
        if self._con is not None and ident == self._ident:
            return self._con
        self._drop()
        # Which file did ATTACH open? The one whose identity was the same just before and just
        # after it. Were the file replaced in between, an identity taken only before could later
        # match a newer file that reused the (by then freed) inode number, and the change would go
        # unnoticed; so retry until the two agree (or keep the older one: the next call reopens).
        for _ in range(5):
            con = _attach(self._path)
            after = self._stat()
            if after == ident:
                break
            con.close()
            ident = after
        else:
            con = _attach(self._path)
        self._con, self._ident = con, ident
        return con

    def _stat(self) -> tuple[int, ...]:
        """The catalog file's identity: a rename over it changes the inode, and also the ctime."""
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            raise QueryError(
                f"{self._path} does not exist yet; run `indexer backfill` (or `indexer catalog`) first"
            ) from None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    # -- generic SQL -------------------------------------------------------------------------

    def sql(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pl.DataFrame:
        """Run one read-only SQL statement; ``params`` bind ``?`` / ``$1`` (a sequence) or ``$name`` (a mapping)."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        with self._lock:
            con = self._connection()
            _check_read_only(con, query)
            return self._run(con, query, params)

    def views(self) -> list[str]:
        """Names of the views a query can use (internal ones, starting with ``_``, left out), sorted."""
        with self._lock:
            return sorted(self._view_columns(self._connection()))

    def columns(self, view: str) -> list[str]:
        """The columns of one view."""
        with self._lock:
            return list(self._require_view(self._connection(), view))

    # -- helpers -----------------------------------------------------------------------------

    def events(
        self,
        table: str,
        address: str | None = None,
        from_block: int | None = None,
        to_block: int | None = None,
        min_status: str = "unconfirmed",
        *,
        chain_id: int | None = None,
    ) -> pl.DataFrame:
        """Rows of one view (an event table such as ``uniswap_v2_pair_swap``, or ``logs``) emitted by
        ``address`` in blocks ``from_block..to_block`` (both inclusive; None = unbounded), ordered by
        (chain_id, block_number, log_index)."""
        _check_status(min_status)
        w = _Where()
        with self._lock:
            con = self._connection()
            cols = self._require_view(con, table)
            if address is not None:
                _need(table, cols, "address", "address")
                w.add("address = ?", _address(address, "address"))
            self._block_range(w, table, cols, from_block, to_block)
            if chain_id is not None:
                w.add("chain_id = ?", _int(chain_id, "chain_id"))
            w.status(min_status, table, cols)
            order: list[str] = [c for c in ("chain_id", "block_number", "log_index") if c in cols]
            return self._select(con, table, w, order)

    def pool_state(
        self, pool: str | None = None, min_status: str = "unconfirmed", *, chain_id: int | None = None
    ) -> pl.DataFrame:
        """Latest reserves and spot price of one pool (None: of every pool), ordered by (chain_id, pool)."""
        _check_status(min_status)
        w = _pool_filter(pool, chain_id)
        with self._lock:
            con = self._connection()
            cols = self._require_view(con, "pool_state")
            w.status(min_status, "pool_state", cols)
            return self._select(con, "pool_state", w, ["chain_id", "pool"])

    def candles(
        self,
        pool: str,
        interval: str = "1h",
        start: Any = None,
        end: Any = None,
        min_status: str = "unconfirmed",
        *,
        chain_id: int | None = None,
    ) -> pl.DataFrame:
        """OHLC price candles of one pool with ``start <= bucket_start < end`` (None = unbounded),
        ordered by (chain_id, bucket_start). Times: datetime (naive = UTC), date, ISO string or
        Unix seconds. Buckets without swaps are absent."""
        return self._buckets("pool_candles", pool, interval, CANDLE_INTERVALS, start, end, min_status, chain_id,
                             pool_required=True)

    def volume(
        self,
        pool: str | None = None,
        interval: str = "1d",
        start: Any = None,
        end: Any = None,
        min_status: str = "unconfirmed",
        *,
        chain_id: int | None = None,
    ) -> pl.DataFrame:
        """Swap count and volume per bucket of one pool (None: of every pool) with
        ``start <= bucket_start < end``, ordered by (chain_id, pool, bucket_start)."""
        return self._buckets("pool_volume", pool, interval, VOLUME_INTERVALS, start, end, min_status, chain_id,
                             pool_required=False)

    def swaps(
        self,
        pool: str | None = None,
        from_block: int | None = None,
        to_block: int | None = None,
        min_status: str = "unconfirmed",
        *,
        chain_id: int | None = None,
    ) -> pl.DataFrame:
        """Swaps of one pool (None: of every pool) in blocks ``from_block..to_block`` (inclusive),
        ordered by (chain_id, block_number, log_index)."""
        _check_status(min_status)
        w = _pool_filter(pool, chain_id)
        with self._lock:
            con = self._connection()
            cols = self._require_view(con, "swaps")
            self._block_range(w, "swaps", cols, from_block, to_block)
            w.status(min_status, "swaps", cols)
            return self._select(con, "swaps", w, ["chain_id", "block_number", "log_index"])

    # -- internals ---------------------------------------------------------------------------

    def _buckets(
        self,
        view: str,
        pool: str | None,
        interval: str,
        allowed: tuple[str, ...],
        start: Any,
        end: Any,
        min_status: str,
        chain_id: int | None,
        pool_required: bool,
    ) -> pl.DataFrame:
        _check_status(min_status)
        if interval not in allowed:
            raise ValueError(f"interval must be one of {', '.join(map(repr, allowed))} for {view}; got {interval!r}")
        w = _Where()
        if pool is not None or pool_required:
            w.add("pool = ?", _address(pool, "pool"))
        w.add('"interval" = ?', interval)
        lo, hi = _time(start, "start"), _time(end, "end")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"start ({lo.isoformat()}) is after end ({hi.isoformat()})")
        if lo is not None:
            w.add("bucket_start >= ?", lo)
        if hi is not None:
            w.add("bucket_start < ?", hi)
        if chain_id is not None:
            w.add("chain_id = ?", _int(chain_id, "chain_id"))
        with self._lock:
            con = self._connection()
            cols = self._require_view(con, view)
            w.status(min_status, view, cols)
            order = ["chain_id", "bucket_start"] if pool_required else ["chain_id", "pool", "bucket_start"]
            return self._select(con, view, w, order)

    def _block_range(self, w: _Where, table: str, cols: tuple[str, ...], lo: Any, hi: Any) -> None:
        if lo is None and hi is None:
            return
        _need(table, cols, "block_number", "from_block/to_block")
        if lo is not None:
            w.add("block_number >= ?", _int(lo, "from_block"))
        if hi is not None:
            w.add("block_number <= ?", _int(hi, "to_block"))
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"from_block ({lo}) is greater than to_block ({hi})")

    def _select(self, con: duckdb.DuckDBPyConnection, view: str, w: _Where, order: list[str]) -> pl.DataFrame:
        sql = f"SELECT * FROM {_quote(view)}{w.sql()}"
        if order:
            sql += " ORDER BY " + ", ".join(_quote(c) for c in order)
        return self._run(con, sql, w.params)

    def _run(self, con: duckdb.DuckDBPyConnection, sql: str, params: Any) -> pl.DataFrame:
        def run() -> pl.DataFrame:
            rel = con.sql(sql, params=params) if params else con.sql(sql)
            return rel.pl() if rel is not None else pl.DataFrame()

        try:
            return retry_on_changed_files(con, run)
        except duckdb.Error as e:
            raise QueryError(str(e).strip()) from None

    def _view_columns(self, con: duckdb.DuckDBPyConnection) -> dict[str, tuple[str, ...]]:
        if self._columns is None:
            rows = con.execute(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_catalog = ? AND table_schema = 'main' ORDER BY table_name, ordinal_position",
                [_ALIAS],
            ).fetchall()
            cols: dict[str, list[str]] = {}
            for table, column in rows:
                if not table.startswith("_"):
                    cols.setdefault(table, []).append(column)
            self._columns = {k: tuple(v) for k, v in cols.items()}
        return self._columns

    def _require_view(self, con: duckdb.DuckDBPyConnection, view: str) -> tuple[str, ...]:
        cols = self._view_columns(con)
        if not isinstance(view, str) or view not in cols:
            available = ", ".join(sorted(cols)) or "none"
            raise QueryError(f"the catalog has no view {view!r}; available views: {available}")
        return cols[view]


# ------------------------------------------------------------------------------------------------


def _pool_filter(pool: str | None, chain_id: int | None) -> "_Where":
    """The optional pool and chain conditions shared by the pool helpers."""
    w = _Where()
    if pool is not None:
        w.add("pool = ?", _address(pool, "pool"))
    if chain_id is not None:
        w.add("chain_id = ?", _int(chain_id, "chain_id"))
    return w


class _Where:
    """A conjunction of conditions with their bound values."""

    def __init__(self) -> None:
        self.conditions: list[str] = []
        self.params: list[Any] = []

    def add(self, condition: str, value: Any) -> None:
        self.conditions.append(condition)
        self.params.append(value)

    def status(self, min_status: str, view: str, cols: tuple[str, ...]) -> None:
        if min_status == "confirmed":
            _need(view, cols, "status", "min_status='confirmed'")
            self.add("status = ?", "confirmed")

    def sql(self) -> str:
        return " WHERE " + " AND ".join(self.conditions) if self.conditions else ""


def _attach(path: Path) -> duckdb.DuckDBPyConnection:
    """A private in-memory database with the catalog attached read-only (retrying briefly while
    another program holds a write lock on it)."""
    for attempt in range(_LOCK_RETRIES):
        con = duckdb.connect(":memory:")
        try:
            con.execute(f"ATTACH {_literal(str(path))} AS {_ALIAS} (READ_ONLY)")
            con.execute(f"USE {_ALIAS}")
            # Timestamps come back in UTC whatever the machine's zone, and local Parquet files are
            # never served from a cache (a file replaced by rename must be read afresh).
            con.execute("SET TimeZone = 'UTC'")
            con.execute("SET cache_local_files = false")
            con.execute("SET parquet_metadata_cache = false")
            attach_lake(con)  # a lake on object storage: its filesystem
            return con
        except duckdb.Error as e:
            con.close()
            msg = str(e)
            if isinstance(e, duckdb.IOException) and "lock" in msg.lower() and attempt < _LOCK_RETRIES - 1:
                time.sleep(0.1)
                continue
            if not path.is_file():
                raise QueryError(
                    f"{path} does not exist yet; run `indexer backfill` (or `indexer catalog`) first"
                ) from None
            if "lock" in msg.lower():
                from indexer_dagster.persist.duck_lock import lock_message

                raise QueryError(lock_message(path, msg)) from None
            raise QueryError(f"cannot open {path}: {msg}") from None
    raise AssertionError("unreachable")


def _check_read_only(con: duckdb.DuckDBPyConnection, query: str, who: str = "Indexer.sql()") -> None:
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as e:
        raise QueryError(str(e).strip()) from None
    if len(statements) != 1:
        raise QueryError(f"{who} runs exactly one statement; got {len(statements)}")
    kind = statements[0].type.name
    if kind == "EXPLAIN":
        inner = _EXPLAIN_PREFIX.sub("", query, count=1)
        if inner != query:
            try:
                inner_statements = con.extract_statements(inner)
            except duckdb.Error:
                inner_statements = []
            if len(inner_statements) == 1 and inner_statements[0].type.name in _READ_ONLY_TYPES:
                return
    elif kind in _READ_ONLY_TYPES:
        return
    raise QueryError(
        f"the catalog is read-only: {who} runs {_READ_ONLY_HINT} statements only, not {kind}"
    )


def _check_status(min_status: Any) -> None:
    if min_status not in MIN_STATUSES:
        raise ValueError(
            "min_status must be 'unconfirmed' (all rows) or 'confirmed' (only rows at or below the "
            f"confirmed head); got {min_status!r}"
        )


def _need(view: str, cols: tuple[str, ...], column: str, what: str) -> None:
    if column not in cols:
        raise QueryError(f"view {view!r} has no {column!r} column, so {what} cannot be used with it")


def _address(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _ADDRESS.match(value):
        raise ValueError(f"{name} must be a 0x-prefixed 20-byte hex address (42 characters); got {value!r}")
    return value.lower()


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int; got {value!r}")
    return value


def _time(value: Any, name: str) -> dt.datetime | None:
    """A UTC-aware datetime from a datetime (naive = UTC), date, ISO-8601 string or Unix seconds."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a datetime, date, ISO-8601 string or Unix seconds; got {value!r}")
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value, dt.timezone.utc)
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"{name} is not an ISO-8601 date or time: {value!r}") from None
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc)
    raise ValueError(f"{name} must be a datetime, date, ISO-8601 string or Unix seconds; got {value!r}")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
