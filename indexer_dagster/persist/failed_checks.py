"""The ranges whose last checks failed: `<lake>/<chain>/_meta/failed_checks.parquet`.

A range that fails a check (see `sync.range_checks`) is not trusted: the catalog keeps its rows
`unconfirmed` whatever their depth, and the chain-head sensor syncs the range again. The next run
of the range that passes every check removes its rows here. It lives in the lake (not the state
store) so the DuckDB views can read it like the chain head, with no second database.
"""

import time
from collections.abc import Sequence

import polars as pl

from indexer_dagster.block_range import BlockRange
from indexer_dagster.persist.datasets import FAILED_CHECKS, META
from indexer_dagster.persist.datasets import FAILED_CHECKS_SCHEMA as SCHEMA
from indexer_dagster.persist.files import LakePath, read_parquet
from indexer_dagster.persist.lake import Lake


def ledger_path(lake: Lake) -> LakePath:
    return lake.path(META, FAILED_CHECKS)


def read_failed(lake: Lake) -> pl.DataFrame:
    p = ledger_path(lake)
    return read_parquet(p) if p.is_file() else pl.DataFrame(schema=SCHEMA)


def ensure_ledger(lake: Lake) -> LakePath:
    """An empty ledger if there is none, so the views always have a file to read."""
    p = ledger_path(lake)
    if not p.is_file():
        with lake.lock(p):
            if not p.is_file():
                lake.write(META, FAILED_CHECKS, pl.DataFrame(schema=SCHEMA))
    return p


def failed_ranges(lake: Lake, older_than_s: float = 0.0) -> dict[str, list[str]]:
    """Range key -> the names of its failed checks (only failures at least `older_than_s` old: the
    sensor's back-off, so a range that keeps failing is not re-synced in a tight loop)."""
    out: dict[str, list[str]] = {}
    df = read_failed(lake)
    if older_than_s > 0:
        cutoff = int((time.time() - older_than_s) * 1_000_000)
        df = df.filter(pl.col("failed_at").dt.epoch("us") <= cutoff)
    for key, name in df.select("range_key", "check_name").iter_rows():
        out.setdefault(key, []).append(name)
    return out


def record_range_checks(
    lake: Lake, chain_id: int, r: BlockRange, failed: Sequence[tuple[str, str]], add: bool = False
) -> None:
    """Replace range `r`'s entries with its latest failed checks ((name, description) pairs; none clears
    it), or with `add`, add these to its entries (a neighbour's check blamed it too)."""
    p = ledger_path(lake)
    with lake.lock(p):
        current = read_failed(lake)
        names = {n for n, _ in failed}
        kept = current.filter((pl.col("range_key") != r.key) | (pl.lit(add) & ~pl.col("check_name").is_in(sorted(names))))
        if kept.height == current.height and not failed and p.is_file():
            return  # nothing to clear: no rewrite
        now = int(time.time() * 1_000_000)
        new = pl.DataFrame(
            [{"chain_id": chain_id, "chain": lake.chain, "range_key": r.key, "first_block": r.start,
              "last_block": r.end, "check_name": n, "description": d, "failed_at": now} for n, d in failed],
            schema={**SCHEMA, "failed_at": pl.Int64},
        ).with_columns(pl.col("failed_at").cast(SCHEMA["failed_at"]))
        lake.write(META, FAILED_CHECKS, pl.concat([kept, new]).sort("range_key", "check_name"))
