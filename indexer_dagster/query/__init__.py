"""Stage 6, query: read-only access to the DuckDB catalog of views over the lake.

`CatalogReader` is the one read path (the Python API's `indexer_dagster.connect()` returns one with
every domain's helpers); `query()` runs a one-off statement through it, for `indexer query`.
"""

import os

import polars as pl

from indexer_dagster.query.api import MIN_STATUSES, CatalogReader, QueryError

__all__ = ["MIN_STATUSES", "CatalogReader", "QueryError", "query"]


def query(duckdb_path: str | os.PathLike, sql: str) -> pl.DataFrame:
    """Run one read-only SQL statement on the catalog and return a Polars frame; writes are refused."""
    with CatalogReader(duckdb_path) as ix:
        try:
            return ix._statement(sql, None, "`indexer query`")
        except QueryError as e:
            raise QueryError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
