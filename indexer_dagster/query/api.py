"""The catalog reader under the Python query API (`indexer_dagster.api.Indexer`): one read-only
connection, reopened when the catalog file is replaced, statements checked to be read-only, arguments
validated and bound as parameters. See `indexer_dagster.api` for the guarantees a user relies on."""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import duckdb
import polars as pl

from indexer_dagster.persist.catalog import (
    CATALOG_ALIAS,
    CatalogUnavailable,
    gates_of,
    open_catalog,
    quote_name,
    retry_on_changed_files,
)
from indexer_dagster.persist.gate import Gate, LakeBusy, read_consistent

__all__ = ["MIN_STATUSES", "CatalogReader", "QueryError"]

#: Accepted values of ``min_status``: everything, or only rows at or below the confirmed head.
MIN_STATUSES = ("unconfirmed", "confirmed")

_ALIAS = CATALOG_ALIAS
_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_READ_ONLY_TYPES = {"SELECT"}
_EXPLAIN_PREFIX = re.compile(r"^\s*explain\s+(?:analyze\s+)?", re.IGNORECASE)
_READ_ONLY_HINT = "SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE or EXPLAIN"


class QueryError(ValueError):
    """A query that cannot run; the message says why and what to do."""


class CatalogReader:
    """A read-only handle on the catalog: generic SQL, views, event rows; every method returns a
    `polars.DataFrame`. Domains add their helpers in subclasses (`dex.queries.DexQueries`), which
    `indexer_dagster.api.Indexer` combines."""

    def __init__(self, duckdb_path: str | os.PathLike):
        self._path = Path(duckdb_path).expanduser().absolute()
        self._lock = threading.RLock()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._ident: tuple[int, ...] | None = None
        self._columns: dict[str, tuple[str, ...]] | None = None  # view -> columns, of the open catalog
        self._gates: list[Gate] = []  # of the open catalog's lakes: a query waits out half-done changes
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self._path} ({state})>"

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
        self._con, self._ident, self._gates = con, ident, gates_of(con)
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
        return self._statement(query, params, "Indexer.sql()")

    def _statement(self, query: str, params: Any, who: str) -> pl.DataFrame:
        """`sql`, with `who` naming the caller in a refusal (the CLI's `indexer query` too)."""
        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        with self._lock:
            con = self._connection()
            _check_read_only(con, query, who)
            return self._run(con, query, params)

    def views(self) -> list[str]:
        """Names of the analyst's views (schema ``main``; the ``internal`` schema and ``_`` names left out), sorted."""
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
        check_status(min_status)
        w = Where()
        with self._lock:
            con = self._connection()
            cols = self._require_view(con, table)
            if address is not None:
                need_column(table, cols, "address", "address")
                w.add("address = ?", address_param(address, "address"))
            self._block_range(w, table, cols, from_block, to_block)
            if chain_id is not None:
                w.add("chain_id = ?", int_param(chain_id, "chain_id"))
            w.status(min_status, table, cols)
            order: list[str] = [c for c in ("chain_id", "block_number", "log_index") if c in cols]
            return self._select(con, table, w, order)

    # -- for the domain helpers (subclasses) -------------------------------------------------

    def _block_range(self, w: Where, table: str, cols: tuple[str, ...], lo: Any, hi: Any) -> None:
        if lo is None and hi is None:
            return
        need_column(table, cols, "block_number", "from_block/to_block")
        if lo is not None:
            w.add("block_number >= ?", int_param(lo, "from_block"))
        if hi is not None:
            w.add("block_number <= ?", int_param(hi, "to_block"))
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"from_block ({lo}) is greater than to_block ({hi})")

    def _select(self, con: duckdb.DuckDBPyConnection, view: str, w: Where, order: list[str]) -> pl.DataFrame:
        sql = f"SELECT * FROM {quote_name(view)}{w.sql()}"
        if order:
            sql += " ORDER BY " + ", ".join(quote_name(c) for c in order)
        return self._run(con, sql, w.params)

    def _run(self, con: duckdb.DuckDBPyConnection, sql: str, params: Any) -> pl.DataFrame:
        def run() -> pl.DataFrame:
            rel = con.sql(sql, params=params) if params else con.sql(sql)
            return rel.pl() if rel is not None else pl.DataFrame()

        try:
            return read_consistent(self._gates, lambda: retry_on_changed_files(con, run))
        except duckdb.Error as e:
            raise QueryError(str(e).strip()) from None
        except LakeBusy as e:
            raise QueryError(str(e)) from None

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


class Where:
    """A conjunction of conditions with their bound values."""

    def __init__(self) -> None:
        self.conditions: list[str] = []
        self.params: list[Any] = []

    def add(self, condition: str, value: Any) -> None:
        self.conditions.append(condition)
        self.params.append(value)

    def status(self, min_status: str, view: str, cols: tuple[str, ...]) -> None:
        if min_status == "confirmed":
            need_column(view, cols, "status", "min_status='confirmed'")
            self.add("status = ?", "confirmed")

    def sql(self) -> str:
        return " WHERE " + " AND ".join(self.conditions) if self.conditions else ""


def _attach(path: Path) -> duckdb.DuckDBPyConnection:
    try:
        return open_catalog(path)
    except CatalogUnavailable as e:
        raise QueryError(str(e)) from None


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


def check_status(min_status: Any) -> None:
    if min_status not in MIN_STATUSES:
        raise ValueError(
            "min_status must be 'unconfirmed' (all rows) or 'confirmed' (only rows at or below the "
            f"confirmed head); got {min_status!r}"
        )


def need_column(view: str, cols: tuple[str, ...], column: str, what: str) -> None:
    if column not in cols:
        raise QueryError(f"view {view!r} has no {column!r} column, so {what} cannot be used with it")


def address_param(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _ADDRESS.match(value):
        raise ValueError(f"{name} must be a 0x-prefixed 20-byte hex address (42 characters); got {value!r}")
    return value.lower()


def int_param(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int; got {value!r}")
    return value


def time_param(value: Any, name: str) -> dt.datetime | None:
    """A UTC-aware datetime from a datetime (naive = UTC), date, ISO-8601 string or Unix seconds."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a datetime, date, ISO-8601 string or Unix seconds; got {value!r}")
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(value, dt.UTC)
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"{name} is not an ISO-8601 date or time: {value!r}") from None
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    raise ValueError(f"{name} must be a datetime, date, ISO-8601 string or Unix seconds; got {value!r}")
