"""A chain's small metadata files under `_meta/`: the chain head, which decides finality, and the
ranges whose last checks failed. Each is one tiny Parquet file, rewritten whole under its lock, so
readers (the DuckDB views) see the old or the new version, never a mixture.

Finality is not stored in the data files: a row is `confirmed` when its block is at or below
`confirmed_through = head - confirmations` of its chain. Moving the head is one atomic file write,
so finality advances without rewriting any data (the seed's periodic confirm task).

A range that fails a check (see `sync.range_checks`) is not trusted: the catalog keeps its rows
`unconfirmed` whatever their depth, and the chain-head sensor syncs the range again. The next run of
the range that passes every check removes its rows. Both live in the lake (not the state store) so
the views read them with no second database.
"""

import time
from collections.abc import Callable, Sequence
from typing import Any

import polars as pl

from indexer_dagster.block_range import BlockRange
from indexer_dagster.persist.datasets import (
    FAILED_CHECKS,
    FAILED_CHECKS_SCHEMA,
    HEAD,
    HEAD_SCHEMA,
    META,
    REORGS,
    REORGS_SCHEMA,
    Schema,
)
from indexer_dagster.persist.files import LakePath, read_parquet
from indexer_dagster.persist.lake import Lake


def _now_us() -> int:
    return int(time.time() * 1_000_000)


def _frame(rows: list[dict[str, Any]], schema: Schema, time_column: str) -> pl.DataFrame:
    """`rows` as a frame of `schema`, their `time_column` given in microseconds since the epoch."""
    return pl.DataFrame(rows, schema={**schema, time_column: pl.Int64}).with_columns(
        pl.col(time_column).cast(schema[time_column]))


def _read(lake: Lake, key: str, schema: Schema) -> pl.DataFrame:
    p = lake.path(META, key)
    return read_parquet(p) if p.is_file() else pl.DataFrame(schema=schema)


def _rewrite(
    lake: Lake, key: str, schema: Schema, update: Callable[[pl.DataFrame], pl.DataFrame | None]
) -> pl.DataFrame:
    """Under the file's lock: read it, let `update` compute the new content (None: leave it as it is), write
    it; returns what the file holds then."""
    with lake.lock(lake.path(META, key)):
        current = _read(lake, key, schema)
        new = update(current)
        if new is None:
            return current
        lake.write(META, key, new)
        return new


# -- the chain head --------------------------------------------------------------------------------


def head_path(lake: Lake) -> LakePath:
    return lake.path(META, HEAD)


def read_head(lake: Lake) -> dict | None:
    rows = _read(lake, HEAD, HEAD_SCHEMA).to_dicts()
    return rows[0] if rows else None


def record_head(
    lake: Lake, chain_id: int, head_number: int, head_hash: str, confirmations: int, force: bool = False
) -> dict:
    """Store the head unless a newer one is already stored (concurrent runs may race; `force` after a
    reorg to a shorter fork); returns the stored head."""
    row = {
        "chain_id": chain_id,
        "chain": lake.chain,
        "head_number": head_number,
        "head_hash": head_hash,
        "confirmations": confirmations,
        "confirmed_through": head_number - confirmations,
        "observed_at": _now_us(),
    }

    def update(current: pl.DataFrame) -> pl.DataFrame | None:
        if not force and current.height and current["head_number"][0] > head_number:
            return None
        return _frame([row], HEAD_SCHEMA, "observed_at")

    return _rewrite(lake, HEAD, HEAD_SCHEMA, update).row(0, named=True)


# -- the ranges whose last checks failed -------------------------------------------------------------


def failed_checks_path(lake: Lake) -> LakePath:
    return lake.path(META, FAILED_CHECKS)


def read_failed(lake: Lake) -> pl.DataFrame:
    return _read(lake, FAILED_CHECKS, FAILED_CHECKS_SCHEMA)


def ensure_failed_checks(lake: Lake) -> LakePath:
    """An empty ledger if there is none, so the views always have a file to read."""
    return _ensure(lake, FAILED_CHECKS, FAILED_CHECKS_SCHEMA)


def ensure_reorgs(lake: Lake) -> LakePath:
    """An empty reorg ledger if there is none: the `reorgs` view reads the file from the catalog's first
    build on, so the chain's first reorg shows up in it without a rebuild (as its archived rows do)."""
    return _ensure(lake, REORGS, REORGS_SCHEMA)


def _ensure(lake: Lake, key: str, schema: Schema) -> LakePath:
    """`_meta/<key>` written empty (typed) unless it exists, under its lock: never over a writer's."""
    p = lake.path(META, key)
    if not p.is_file():
        _rewrite(lake, key, schema, lambda current: None if p.is_file() else current)
    return p


def write_reorgs(lake: Lake, ledger: pl.DataFrame) -> None:
    """Replace the exported reorg ledger (under the lock `ensure_reorgs` takes: never over a newer one)."""
    _rewrite(lake, REORGS, REORGS_SCHEMA, lambda _current: ledger)


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
    exists = failed_checks_path(lake).is_file()

    def update(current: pl.DataFrame) -> pl.DataFrame | None:
        names = {n for n, _ in failed}
        kept = current.filter(
            (pl.col("range_key") != r.key) | (pl.lit(add) & ~pl.col("check_name").is_in(sorted(names))))
        if kept.height == current.height and not failed and exists:
            return None  # nothing to clear: no rewrite
        now = _now_us()
        new = _frame(
            [{"chain_id": chain_id, "chain": lake.chain, "range_key": r.key, "first_block": r.start,
              "last_block": r.end, "check_name": n, "description": d, "failed_at": now} for n, d in failed],
            FAILED_CHECKS_SCHEMA, "failed_at",
        )
        return pl.concat([kept, new]).sort("range_key", "check_name")

    _rewrite(lake, FAILED_CHECKS, FAILED_CHECKS_SCHEMA, update)
