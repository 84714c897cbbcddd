"""EVM event indexer on Dagster: block-range partitions into a Parquet lake with a DuckDB catalog.

Query the indexed data from Python (read-only; Polars frames)::

    import indexer_dagster

    with indexer_dagster.connect() as ix:       # $INDEXER_CONFIG, a config path or a .duckdb path
        ix.pool_state("0x...")

The names below are loaded on first use, so importing this package stays cheap (no DuckDB,
Polars or Dagster until a query API name is touched).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from indexer_dagster.api import Indexer as Indexer
    from indexer_dagster.api import QueryError as QueryError
    from indexer_dagster.api import connect as connect

__all__ = ["Indexer", "QueryError", "connect"]

_LAZY = {
    "connect": "indexer_dagster.api",
    "Indexer": "indexer_dagster.api",
    "QueryError": "indexer_dagster.api",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'indexer_dagster' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
