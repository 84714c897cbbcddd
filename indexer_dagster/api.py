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
stays readable through an open handle). Across files too: a query waits while a publish of several
files, or a reorg's repair, is half done, and runs again if one happened while it read
(`persist.gate`); a repair that takes longer than 60 s ends the query with a `QueryError` naming it.

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

import os
from typing import Any

from indexer_dagster.dex.queries import DexQueries
from indexer_dagster.query.api import MIN_STATUSES, QueryError

__all__ = ["MIN_STATUSES", "Indexer", "QueryError", "connect"]


class Indexer(DexQueries):
    """A read-only view of the indexer's data: generic SQL and event rows (`query.api.CatalogReader`)
    plus each domain's helpers (`dex.queries.DexQueries`); every method returns a `polars.DataFrame`."""


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
