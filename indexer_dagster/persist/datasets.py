"""The lake's layout: every dataset's name, where its files live and its columns, in one place.

A chain's files live under `<lake root>/<chain>/`:

    blocks/<range>.parquet                 headers of a block range (BLOCK_SCHEMA)
    logs/<range>[+<fingerprint>].parquet   raw logs of the watched contracts (LOG_SCHEMA); `+fingerprint`:
                                           a supplement holding only contracts added later
    children/<range>.parquet               factory children found in the range (CHILD_SCHEMA)
    events/<table>/<range>.parquet         decoded events of one ABI event (schema from the ABI)
    live/<dataset>/<first>-<last>.parquet  live segments written by the follower, compacted into ranges
    orphaned/<dataset>/<name>.parquet      rows a reorg moved out (the dataset's columns + ORPHAN_COLUMNS)
    _meta/head.parquet                     the chain head that decides finality (HEAD_SCHEMA)
    _meta/failed_checks.parquet            ranges whose last range checks failed (FAILED_CHECKS_SCHEMA)
    _meta/reorgs.parquet                   the reorg ledger, exported from the state store (REORGS_SCHEMA)
    _meta/rpc_stats.json                   RPC request / retry / error counters
    dex/<table>/<first>-<last>.parquet     DEX rows derived from blocks first..last (DEX_ROW_TABLES)
    dex/<table>/<yyyymmdd>.parquet         DEX aggregates, every bucket of one UTC day (DEX_DAY_TABLES)
    dex/<table>.parquet                    pool_state and tokens: one small file each
    dex/_cursor.parquet, dex/_undo/        how far the DEX tables are derived; how to undo recent steps

A `<range>` is a zero-padded block-range key (`indexer_dagster.block_range`). Only `persist.lake` turns a
(dataset, key) pair into a path; everything else names datasets with the constants below.
"""

from typing import TYPE_CHECKING, Protocol

import polars as pl

if TYPE_CHECKING:
    from indexer_dagster.config import IndexerConfig
    from indexer_dagster.persist.files import LakePath

UTC_TIME = pl.Datetime("us", "UTC")
# A dataset's columns: name -> Polars dtype (a dtype class such as pl.Int64, or an instance).
Schema = dict[str, pl.DataType | type[pl.DataType]]

# -- raw data, per block range ------------------------------------------------------------------

BLOCKS = "blocks"
LOGS = "logs"
CHILDREN = "children"
EVENTS = "events"

BLOCK_SCHEMA: Schema = {
    "chain_id": pl.Int64,
    "number": pl.Int64,
    "hash": pl.String,
    "parent_hash": pl.String,
    "timestamp": UTC_TIME,
}

LOG_SCHEMA: Schema = {
    "chain_id": pl.Int64,
    "block_number": pl.Int64,
    "block_hash": pl.String,
    "block_timestamp": UTC_TIME,
    "transaction_hash": pl.String,
    "transaction_index": pl.Int64,
    "log_index": pl.Int64,
    "address": pl.String,
    "topic0": pl.String,
    "topic1": pl.String,
    "topic2": pl.String,
    "topic3": pl.String,
    "data": pl.String,
}

CHILD_SCHEMA: Schema = {
    "chain_id": pl.Int64,
    "block_number": pl.Int64,  # the creation block: the child's logs count from here
    "block_hash": pl.String,
    "transaction_hash": pl.String,
    "log_index": pl.Int64,
    "contract": pl.String,  # the configured (child) contract name
    "factory": pl.String,  # the factory address that created it
    "address": pl.String,  # the child
}


def in_log_order(logs: pl.DataFrame) -> bool:
    """Whether `logs` are in strictly increasing (block_number, log_index) order, as a node answers and a
    range file stores them: then no log is there twice, and no sort or hash table is needed to know it."""
    if logs.height < 2:
        return True
    db = logs["block_number"].diff().slice(1)
    di = logs["log_index"].diff().slice(1)
    return bool(((db > 0) | ((db == 0) & (di > 0))).all())


def events(table: str) -> str:
    """The dataset of one decoded event table."""
    return f"{EVENTS}/{table}"


def number_column(dataset: str) -> str:
    """The column holding a row's block number."""
    return "number" if dataset.endswith(BLOCKS) else "block_number"


def in_block_order(dataset: str) -> bool:
    """Whether `dataset` holds the chain's rows in block order (headers, logs, children, decoded events;
    their live segments and orphan archive). A reader skips row groups of such a file by its block
    numbers and times; by a string column (a hash, an address, hex data) it seldom can, as every row
    group holds values from across the range."""
    for area in (LIVE, ORPHANED):
        dataset = dataset.removeprefix(f"{area}/")
    return dataset in (BLOCKS, LOGS, CHILDREN) or dataset.startswith(f"{EVENTS}/")


def live_datasets(cfg: "IndexerConfig") -> list[str]:
    """A chain's per-block datasets in pipeline order: headers, raw logs, children, decoded events (a
    rollback walks them in reverse: derived data first)."""
    return [BLOCKS, LOGS, CHILDREN, *[events(s.table) for _, s in cfg.all_specs()]]


# -- live segments and the orphan archive ---------------------------------------------------------

LIVE = "live"
ORPHANED = "orphaned"
ORPHAN_COLUMNS: Schema = {"reorg_id": pl.Int64, "orphaned_at": UTC_TIME}


def live(dataset: str) -> str:
    """The live segments of `dataset` (`live/<dataset>/<first>-<last>.parquet`)."""
    return f"{LIVE}/{dataset}"


class _Listing(Protocol):  # a `persist.lake.Lake` (which names files by these datasets)
    def files(self, dataset: str) -> "list[LakePath]": ...


def live_segments(lake: _Listing, dataset: str) -> list[tuple[int, int, "LakePath"]]:
    """(first block, last block, path) of each live segment of `dataset`, in block order."""
    out = []
    for p in lake.files(live(dataset)):
        a, b = p.stem.split("-")
        out.append((int(a), int(b), p))
    return sorted(out)


def orphaned(dataset: str) -> str:
    """The archive of `dataset`'s rows a reorg moved out."""
    return f"{ORPHANED}/{dataset}"


# -- per-chain metadata files (`_meta/<key>.parquet`) ----------------------------------------------

META = "_meta"
HEAD = "head"
FAILED_CHECKS = "failed_checks"
REORGS = "reorgs"
RPC_STATS_FILE = "rpc_stats.json"

HEAD_SCHEMA: Schema = {
    "chain_id": pl.Int64,
    "chain": pl.String,
    "head_number": pl.Int64,
    "head_hash": pl.String,
    "confirmations": pl.Int64,
    "confirmed_through": pl.Int64,
    "observed_at": UTC_TIME,
}

FAILED_CHECKS_SCHEMA: Schema = {
    "chain_id": pl.Int64,
    "chain": pl.String,
    "range_key": pl.String,
    "first_block": pl.Int64,
    "last_block": pl.Int64,
    "check_name": pl.String,
    "description": pl.String,
    "failed_at": UTC_TIME,
}

REORGS_SCHEMA: Schema = {
    "chain": pl.String, "reorg_id": pl.Int64, "detected_at": UTC_TIME,
    "common_ancestor": pl.Int64, "ancestor_hash": pl.String, "depth": pl.Int64,
    "old_head": pl.Int64, "old_head_hash": pl.String, "new_head": pl.Int64, "new_head_hash": pl.String,
    "phase": pl.String, "affected_partitions": pl.String, "rows_archived": pl.Int64,
    "rows_archived_by_dataset": pl.String, "touched_confirmed": pl.Boolean,
    "updated_at": UTC_TIME, "finished_at": UTC_TIME, "note": pl.String,
}

# -- derived DEX tables (maintained step by step by `dex.incremental`) ----------------------------

DEX = "dex"
# Each table, with the column whose block decides the row's finality (None: always final).
DEX_TABLES: dict[str, str | None] = {
    "pools": "block_number",
    "tokens": None,
    "swaps": "block_number",
    "pool_reserves": "block_number",
    "pool_state": "last_block",
    "liquidity_events": "block_number",
    "pool_volume": "last_block",
    "pool_candles": "last_block",
}

# Rows of the blocks one step derived, a file per step (merged per partition once final).
DEX_ROW_TABLES = ("pools", "swaps", "pool_reserves", "liquidity_events")
# Time buckets, a file per UTC day (every bucket of the two intervals each table stores).
DEX_DAY_TABLES = ("pool_volume", "pool_candles")
DEX_CURSOR = "_cursor"  # dex/_cursor.parquet: the last block the DEX tables are derived through
DEX_UNDO = "dex/_undo"  # <first>-<last>.parquet: what undoes the step of those blocks (files it replaced/created)
DEX_UNDO_COPIES = "dex/_undo_copies"  # the files a step replaced, as they were before it


def dex(table: str) -> str:
    """The dataset (a directory of files) of a DEX row or day table."""
    return f"{DEX}/{table}"


# The last block derived, the first (the lowest block the lake held when the DEX tables began) and what
# of the config they were derived under (`dex.incremental.config_inputs`).
CURSOR_SCHEMA: Schema = {"block_number": pl.Int64, "block_hash": pl.String, "first_block": pl.Int64,
                         "inputs": pl.String}
UNDO_SCHEMA: Schema = {
    "prev_block": pl.Int64, "prev_hash": pl.String,  # the cursor before the step
    # "restore" (from a copy), "delete" (a file the step created), "cursor" (one row: the record is never empty)
    "action": pl.String, "dataset": pl.String, "key": pl.String,
}

CANDLE_INTERVALS = ("1m", "1h")  # the buckets `pool_candles` stores
VOLUME_INTERVALS = ("1h", "1d")  # the buckets `pool_volume` stores

POOL_SCHEMA: Schema = {
    "chain_id": pl.Int64, "pool": pl.String, "token0": pl.String, "token1": pl.String, "factory": pl.String,
    "pair_index": pl.Int64, "created_block": pl.Int64, "created_timestamp": UTC_TIME,
    "block_number": pl.Int64, "log_index": pl.Int64, "transaction_hash": pl.String,
}

TOKEN_SCHEMA: Schema = {"address": pl.String, "symbol": pl.String, "decimals": pl.Int64}
