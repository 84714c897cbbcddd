"""The DuckDB catalog: stable views over the Parquet lake, rebuilt as a whole and swapped in atomically.

The database holds only views (no data), so it is built in a temporary file and renamed over the
old one: there is never a second writer to fight over DuckDB's lock, and readers (which open it
read-only) keep working through a rebuild. Views read Parquet globs, so new range files show up in
queries without rebuilding; a rebuild is needed only when the set of tables changes.
"""

import os
import uuid
from pathlib import Path

import duckdb
import polars as pl
from filelock import FileLock

from indexer_dagster.config import IndexerConfig
from indexer_dagster.monitor.fetch import BLOCK_SCHEMA, LOG_SCHEMA
from indexer_dagster.persist.heads import HEAD_DATASET, HEAD_KEY, HEAD_SCHEMA

_DUCK_TYPES = {
    pl.Int64: "BIGINT",
    pl.UInt64: "UBIGINT",
    pl.Int32: "INTEGER",
    pl.Float64: "DOUBLE",
    pl.String: "VARCHAR",
    pl.Boolean: "BOOLEAN",
}


def duck_type(dtype: pl.DataType) -> str:
    if isinstance(dtype, pl.Datetime):
        return "TIMESTAMPTZ" if dtype.time_zone else "TIMESTAMP"
    for k, v in _DUCK_TYPES.items():
        if dtype == k:
            return v
    raise TypeError(f"no DuckDB type for {dtype}")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _source(glob: str, schema: dict[str, pl.DataType], has_files: bool) -> str:
    """A SELECT of the Parquet files under `glob`, or an empty typed SELECT while there are none."""
    if has_files:
        cols = ", ".join(_quote(c) for c in schema)
        return f"SELECT {cols} FROM read_parquet('{glob}', union_by_name = true)"
    cols = ", ".join(f"CAST(NULL AS {duck_type(t)}) AS {_quote(c)}" for c, t in schema.items())
    return f"SELECT {cols} WHERE false"


def _any_files(data_dir: Path, *parts: str) -> bool:
    return any(p for p in data_dir.glob("/".join(["*", *parts, "*.parquet"])))


def view_statements(cfg: IndexerConfig) -> dict[str, str]:
    """CREATE VIEW statements, by view name, for every table of the lake."""
    d = cfg.data_dir
    views: dict[str, str] = {}
    heads_glob = str(d / "*" / HEAD_DATASET / f"{HEAD_KEY}.parquet")
    views["chain_heads"] = _source(heads_glob, HEAD_SCHEMA, _any_files(d, HEAD_DATASET))

    def with_status(src: str, number_col: str) -> str:
        return (
            f"SELECT x.*, CASE WHEN x.{number_col} <= h.confirmed_through THEN 'confirmed' "
            f"ELSE 'unconfirmed' END AS status FROM ({src}) x "
            f"LEFT JOIN chain_heads h ON h.chain_id = x.chain_id"
        )

    views["blocks"] = with_status(
        _source(str(d / "*" / "blocks" / "*.parquet"), BLOCK_SCHEMA, _any_files(d, "blocks")), "number"
    )
    views["logs"] = with_status(
        _source(str(d / "*" / "logs" / "*.parquet"), LOG_SCHEMA, _any_files(d, "logs")), "block_number"
    )
    for _contract, spec in cfg.all_specs():
        ds = f"events/{spec.table}"
        src = _source(str(d / "*" / "events" / spec.table / "*.parquet"), spec.schema(), _any_files(d, *ds.split("/")))
        views[spec.table] = with_status(src, "block_number")
    return views


def build_catalog(cfg: IndexerConfig) -> Path:
    """(Re)build the DuckDB file of views and swap it in atomically."""
    target = cfg.duckdb_path
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            con = duckdb.connect(str(tmp))
            try:
                for name, sql in view_statements(cfg).items():
                    con.execute(f"CREATE OR REPLACE VIEW {_quote(name)} AS {sql}")
                con.execute("CHECKPOINT")
            finally:
                con.close()
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
            Path(str(tmp) + ".wal").unlink(missing_ok=True)
    return target


def connect_read_only(path: Path) -> duckdb.DuckDBPyConnection:
    return duckdb.connect(str(path), read_only=True)
