"""The DEX tables kept current step by step: each step derives the rows of the next blocks only, so
keeping up costs what the new blocks hold, not what the history holds.

A step covers blocks a..b (contiguous canonical blocks after the cursor, never across a partition
boundary). It reads the decoded Uniswap events of a..b from the views, the pools and tokens known so
far and `pool_state` (the reserves as of a-1: the quotes `volume_ref` values the new swaps with), and
writes:
- the rows of a..b: `dex/<table>/<a>-<b>.parquet` for pools, swaps, pool_reserves, liquidity_events;
- `pool_state`, merged with the step's latest reserves per pool;
- the day file of every UTC day its swaps fall in (`pool_volume`, `pool_candles`), recomputed from
  that day's swaps: the step files from the day's first swap on, plus the new ones;
- the cursor (a, b's hash), last.
Before that it writes an undo record: copies of the files it replaces and the names of those it
creates. A crash in between leaves a record past the cursor, undone by the next call. A reorg undoes
the steps above the fork point, newest first, their rows above it archived in `orphaned/dex/<table>/`;
the next step derives from there on the new fork: the same rows a computation from scratch gives.
Undo records older than the reorg window are dropped and a final partition's step files merged.
"""

import hashlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import polars as pl

from indexer_dagster.block_range import range_for_block
from indexer_dagster.config import IndexerConfig
from indexer_dagster.dex import derive as dex
from indexer_dagster.dex.sources import (
    canonical_blocks,
    file_blocks,
    known_tokens,
    overlapping,
    rows_between,
    source_tables,
    window_events,
    with_unindexed_pools,
)
from indexer_dagster.persist.catalog import build_catalog
from indexer_dagster.persist.datasets import (
    BLOCKS,
    CANDLE_INTERVALS,
    CURSOR_SCHEMA,
    DEX,
    DEX_CURSOR,
    DEX_DAY_TABLES,
    DEX_ROW_TABLES,
    DEX_TABLES,
    DEX_UNDO,
    DEX_UNDO_COPIES,
    ORPHAN_COLUMNS,
    POOL_SCHEMA,
    UNDO_SCHEMA,
    VOLUME_INTERVALS,
    live,
    orphaned,
)
from indexer_dagster.persist.datasets import dex as dex_dataset
from indexer_dagster.persist.files import column_span, parquet_metadata, read_parquet, row_groups
from indexer_dagster.persist.lake import Lake, open_lake
from indexer_dagster.reorg.guard import publish_guard
from indexer_dagster.state import StateStore

# Blocks one step derives at most (memory stays bounded in a backfill; live steps are a few blocks).
STEP_BLOCKS = 10_000
# Step files of a final partition merged into one once there are this many.
MERGE_AT = 2


def dex_lease(chain: str) -> str:
    """Held while the chain's DEX tables are derived: one deriver at a time (and the sensor's sign of life)."""
    return f"{chain}:dex"


@dataclass
class DexResult:
    rows: dict[str, int] = field(default_factory=dict)  # rows of each table (the files' footers)
    seconds: float = 0.0
    steps: int = 0
    blocks: tuple[int, int] | None = None  # (first, last) derived by this call
    cursor: int | None = None  # the last block the tables are derived through
    top_pools: pl.DataFrame | None = None


# -- cursor and undo records -------------------------------------------------------------------


def _cursor_row(lake: Lake) -> dict | None:
    """The cursor file's row (CURSOR_SCHEMA); None before the first step."""
    if not lake.exists(DEX, DEX_CURSOR):
        return None
    return read_parquet(lake.path(DEX, DEX_CURSOR)).row(0, named=True)


def read_cursor(lake: Lake) -> tuple[int, str] | None:
    """(number, hash) of the last block the DEX tables are derived through; None before the first step."""
    row = _cursor_row(lake)
    return (int(row["block_number"]), str(row["block_hash"])) if row is not None else None


def _origin(lake: Lake) -> tuple[int, str] | None:
    """(first block, config inputs) the DEX tables were derived from and under (None before the first step)."""
    row = _cursor_row(lake)
    return (int(row["first_block"]), str(row.get("inputs"))) if row is not None else None


def config_inputs(cfg: IndexerConfig) -> str:
    """What of the config the DEX tables depend on: the contracts of each Uniswap event table (names,
    addresses, factories) and the reference token. The tables are derived again when it changes."""
    src = {t for tables in source_tables(cfg).values() for t in tables}
    used = sorted({(spec.table, c.name, tuple(sorted(c.addresses)), repr(c.factory))
                   for c, spec in cfg.all_specs() if spec.table in src})
    return hashlib.sha256(repr((used, cfg.chain.reference_token)).encode()).hexdigest()[:16]


def _write_cursor(tx, number: int, block_hash: str, origin: tuple[int, str]) -> None:
    """The cursor, published after everything else of its transaction."""
    row = {"block_number": [number], "block_hash": [block_hash], "first_block": [origin[0]], "inputs": [origin[1]]}
    tx.writer(DEX, DEX_CURSOR, CURSOR_SCHEMA, marker=True).write(pl.DataFrame(row, schema=CURSOR_SCHEMA))


def _step_key(first: int, last: int) -> str:
    return f"{first:012d}-{last:012d}"


def _records(lake: Lake) -> list[tuple[int, int]]:
    """(first, last) of every undo record, oldest first."""
    return sorted(file_blocks(p) for p in lake.files(DEX_UNDO))


def _copy_key(step: str, dataset: str, key: str) -> str:
    return f"{step}~{dataset.replace('/', '~')}~{key}"


def _undo(lake: Lake, first: int, last: int, fork: int | None = None, reorg_id: int | None = None) -> dict[str, int]:
    """Undo the step of blocks first..last: its files restored or removed, the cursor set back. With `fork`,
    the rows above it of the files it created are archived first (`reorg_id`). Idempotent (a crash midway
    leaves the record, and the next call undoes it again)."""
    step = _step_key(first, last)
    record = read_parquet(lake.path(DEX_UNDO, step))
    archived: dict[str, int] = {}
    if fork is not None:
        for dataset, key in record.filter(pl.col("action") == "delete").select("dataset", "key").rows():
            table = dataset.split("/")[-1]
            if table not in DEX_ROW_TABLES or not lake.exists(dataset, key):
                continue
            gone = read_parquet(lake.path(dataset, key)).filter(pl.col("block_number") > fork)
            if gone.height:
                stamp = datetime.now(UTC)
                gone = gone.with_columns(pl.lit(reorg_id, pl.Int64).alias("reorg_id"),
                                         pl.lit(stamp, ORPHAN_COLUMNS["orphaned_at"]).alias("orphaned_at"))
                lake.ensure_schema_file(orphaned(dataset), dict(gone.schema))
                lake.write(orphaned(dataset), f"r{reorg_id or 0:06d}-{step}", gone)
                archived[table] = archived.get(table, 0) + gone.height
    prev_block, prev_hash = record["prev_block"][0], record["prev_hash"][0]
    origin = _origin(lake)
    with lake.transaction() as tx:
        for action, dataset, key in record.filter(pl.col("action") != "cursor").select("action", "dataset", "key").rows():
            if action == "restore":
                copy = read_parquet(lake.path(DEX_UNDO_COPIES, _copy_key(step, dataset, key)))
                tx.writer(dataset, key, dict(copy.schema)).write(copy)
            else:
                tx.delete(lake.path(dataset, key))
        if prev_block is None or origin is None:
            tx.delete(lake.path(DEX, DEX_CURSOR))
        else:
            _write_cursor(tx, prev_block, prev_hash, origin)
    _drop_record(lake, first, last, record)
    return archived


def _drop_record(lake: Lake, first: int, last: int, record: pl.DataFrame | None = None) -> None:
    step = _step_key(first, last)
    record = record if record is not None else read_parquet(lake.path(DEX_UNDO, step))
    lake.path(DEX_UNDO, step).unlink(missing_ok=True)  # first: a record without its copies is never used
    for dataset, key in record.filter(pl.col("action") == "restore").select("dataset", "key").rows():
        lake.path(DEX_UNDO_COPIES, _copy_key(step, dataset, key)).unlink(missing_ok=True)


def recover(lake: Lake) -> None:
    """Undo a step cut short by a crash (its record is past the cursor, made at the cursor), so the tables
    are as of the cursor. A record past the cursor made elsewhere is a step whose publish was refused
    (a reorg began) before a rollback moved the cursor: nothing of it is visible, and its copies are stale."""
    at = read_cursor(lake)
    for first, last in reversed(_records(lake)):
        if at is not None and last <= at[0]:
            continue
        record = read_parquet(lake.path(DEX_UNDO, _step_key(first, last)))
        prev = record["prev_block"][0]
        if (prev is None and at is None) or (at is not None and prev == at[0]):
            _undo(lake, first, last)
        else:
            _drop_record(lake, first, last, record)


def reset(lake: Lake) -> None:
    """Forget every derived DEX row (not the token metadata): the next call derives from the first block."""
    with lake.transaction() as tx:
        tx.delete(lake.path(DEX, DEX_CURSOR))
        for table in (*DEX_ROW_TABLES, *DEX_DAY_TABLES):
            for p in lake.files(dex_dataset(table)):
                tx.delete(p)
            tx.delete(lake.path(DEX, table))  # the layout before steps: one file per table
        tx.delete(lake.path(DEX, "pool_state"))
        for ds in (DEX_UNDO, DEX_UNDO_COPIES):
            for p in lake.files(ds):
                tx.delete(p)


def rollback(cfg: IndexerConfig, fork: int, reorg_id: int | None = None) -> dict[str, int]:
    """Take the DEX tables back to block `fork` (a reorg's common ancestor) by undoing the steps above it,
    their rows above `fork` archived; returns the rows archived per table. A step reaching below the
    window's records cannot be undone: the tables are derived again from the start (`reset`)."""
    lake = open_lake(cfg)
    recover(lake)
    archived: dict[str, int] = {}
    while (at := read_cursor(lake)) is not None and at[0] > fork:
        undone = _undo_last_step(lake, at[0], fork=fork, reorg_id=reorg_id)
        if undone is None:
            break
        for table, n in undone.items():
            archived[table] = archived.get(table, 0) + n
    return archived


def _undo_last_step(lake: Lake, cursor: int, fork: int | None = None, reorg_id: int | None = None
                    ) -> dict[str, int] | None:
    """Undo the step that ends at the `cursor` (with `fork`: its rows above it archived, see `_undo`); None
    when no record reaches it (older than the window): the tables are reset, to be derived from the start."""
    records = [r for r in _records(lake) if r[1] == cursor]
    if not records:
        reset(lake)
        return None
    return _undo(lake, *records[-1], fork=fork, reorg_id=reorg_id)


def rows_replaced(cfg: IndexerConfig, first: int, last: int) -> bool:
    """After blocks first..last were published again (a supplement or decode of contracts or events
    added to the config, a range synced again after failed checks): if the DEX tables derived those
    blocks from other Swap/Sync/Mint/Burn rows than the lake now holds, take them back to first-1 (the
    next step derives them again); True if so. A range compacted from live segments holds the same rows."""
    lake = open_lake(cfg)
    at = read_cursor(lake)
    if at is None or at[0] < first:
        return False
    top = min(last, at[0])
    keys = ["block_number", "log_index"]
    derived = [dex_dataset(t) for t in ("swaps", "pool_reserves", "liquidity_events")]
    for a in range(first, top + 1, STEP_BLOCKS):  # a step's blocks at a time: a partition of any size
        b = min(a + STEP_BLOCKS - 1, top)
        frames = window_events(cfg, lake, ("swap", "sync", "mint", "burn"), a, b).values()
        now = pl.concat([f.select(keys) for f in frames if f is not None], how="vertical")
        before = [rows_between(overlapping(lake, d, a, b), "block_number", a, b, keys) for d in derived]
        was = pl.concat([f for f in before if f is not None], how="vertical") if any(
            f is not None for f in before) else now.clear()
        if not now.sort(keys).equals(was.sort(keys)):
            rollback(cfg, first - 1)
            return True
    return False


# -- one step ---------------------------------------------------------------------------------------


def _read_all(lake: Lake, dataset: str) -> pl.DataFrame | None:
    files = lake.files(dataset)
    return pl.concat([read_parquet(p) for p in files], how="vertical_relaxed") if files else None


# pool_state's columns that are not a pool_reserves row's under the same name.
_STATE_AS_RESERVES = {"last_block": "block_number", "last_log_index": "log_index", "last_timestamp": "block_timestamp"}
# The pool_reserves columns a pool_state row has (dex.derive.pool_state): what the quotes and the merge use.
_QUOTE_COLUMNS = ["chain_id", "pool", "token0", "token1", "symbol0", "symbol1", "pair", "reserve0", "reserve1",
                  "reserve0_h", "reserve1_h", "price", "inverse_price", *_STATE_AS_RESERVES.values()]


def _as_reserves(state: pl.DataFrame) -> pl.DataFrame:
    """`pool_state` rows as the `pool_reserves` rows they were taken from (for merging and quotes)."""
    return state.rename(_STATE_AS_RESERVES).select(_QUOTE_COLUMNS)


def _day_swaps(lake: Lake, day: str, new: pl.DataFrame) -> pl.DataFrame:
    """Every swap of UTC `day`: those of earlier steps (step files from the day's first swap, which its
    pool_volume file names, on) and the `new` ones."""
    start = datetime.strptime(day, "%Y%m%d").replace(tzinfo=UTC)
    end = start + timedelta(days=1)
    in_day = (pl.col("block_timestamp") >= start) & (pl.col("block_timestamp") < end)
    parts = [new.filter(in_day)]
    if lake.exists(dex_dataset("pool_volume"), day):
        first = read_parquet(lake.path(dex_dataset("pool_volume"), day), columns=["first_block"])["first_block"].min()
        for p in lake.files(dex_dataset("swaps")):
            if first is not None and file_blocks(p)[1] >= int(first):  # type: ignore[arg-type]
                parts.append(read_parquet(p).filter(in_day))
    return pl.concat(parts, how="vertical_relaxed").sort("block_number", "log_index")


def derive_step(cfg: IndexerConfig, lake: Lake, first: int, last: int) -> dict[tuple[str, str], pl.DataFrame]:
    """The files a step of blocks first..last writes, by (dataset, key) -> frame, from the tables as of first-1."""
    rows_of = window_events(cfg, lake, ("swap", "sync", "mint", "burn", "pair_created"), first, last)
    swap, sync, mint, burn, created = (rows_of[k] for k in ("swap", "sync", "mint", "burn", "pair_created"))
    assert swap is not None and sync is not None  # `enabled`

    known = _read_all(lake, dex_dataset("pools"))
    known_raw = known.select(list(POOL_SCHEMA)) if known is not None else pl.DataFrame(schema=POOL_SCHEMA)
    pools = known_raw
    if created is not None and created.height:
        pools = pl.concat([pools, dex.pools(created).select(list(POOL_SCHEMA))], how="vertical_relaxed")
        pools = pools.unique(subset=["chain_id", "pool"], keep="first", maintain_order=True)
    pools = with_unindexed_pools(cfg, pools, set(swap["address"]) | set(sync["address"]))
    tokens, fresh_tokens = known_tokens(cfg, lake, set(pools["token0"]) | set(pools["token1"]))

    state_path = lake.path(DEX, "pool_state")
    state = read_parquet(state_path) if lake.exists(DEX, "pool_state") else None
    reserves = dex.pool_reserves(sync, pools, tokens)
    # The reserves as of first-1 (the state's rows) and the step's: the quotes swaps are valued with, and
    # what the new state is the latest of.
    quotes = reserves.select(_QUOTE_COLUMNS)
    if state is not None:
        quotes = pl.concat([_as_reserves(state), quotes], how="vertical_relaxed")
    swaps = dex.value_in(dex.swaps(swap, pools, tokens), quotes, cfg.chain.reference_token)
    key = _step_key(first, last)
    out: dict[tuple[str, str], pl.DataFrame] = {}
    new_pools = pools.join(known_raw.select("chain_id", "pool"), on=["chain_id", "pool"], how="anti")
    rows = {"pools": dex.label_pools(new_pools, tokens), "swaps": swaps, "pool_reserves": reserves}
    if mint is not None and burn is not None:
        rows["liquidity_events"] = dex.liquidity_events(mint, burn, pools, tokens)
    for table, frame in rows.items():
        if frame.height:
            out[(dex_dataset(table), key)] = frame
    if reserves.height:
        out[(DEX, "pool_state")] = dex.pool_state(quotes)
    for day in swaps["block_timestamp"].dt.strftime("%Y%m%d").unique().sort():
        day_swaps = _day_swaps(lake, day, swaps)
        out[(dex_dataset("pool_volume"), day)] = dex.with_interval(
            {i: dex.pool_volume(day_swaps, i) for i in VOLUME_INTERVALS})
        out[(dex_dataset("pool_candles"), day)] = dex.with_interval(
            {i: dex.pool_candles(day_swaps, i) for i in CANDLE_INTERVALS})
    if fresh_tokens.height:
        out[(DEX, "tokens")] = tokens.sort("address")
    return out


def _publish_step(cfg: IndexerConfig, lake: Lake, store: StateStore, first: int, last: int,
                  blocks: pl.DataFrame, at: tuple[int, str] | None, files: dict[tuple[str, str], pl.DataFrame],
                  origin: tuple[int, str]) -> bool:
    """An undo record, then the step's files under the chain's publish guard, the cursor last. True when
    a table got its first file (the catalog needs its view)."""
    guard = publish_guard(store, cfg.chain.name, "a reorg began while the DEX tables were derived; again",
                          blocks=lambda lo, hi: blocks.filter(pl.col("number").is_between(lo, hi)))
    step = _step_key(first, last)
    actions = []
    with lake.transaction() as tx:
        for dataset, key in files:
            if (dataset, key) == (DEX, "tokens"):
                continue  # facts about contracts, whatever the fork: kept
            if lake.exists(dataset, key):
                copy = read_parquet(lake.path(dataset, key))
                tx.writer(DEX_UNDO_COPIES, _copy_key(step, dataset, key), dict(copy.schema)).write(copy)
                actions.append(("restore", dataset, key))
            else:
                actions.append(("delete", dataset, key))
        # A row per file, and one for the cursor itself: a step over blocks without DEX events writes no file.
        actions.append(("cursor", DEX, DEX_CURSOR))
        record = pl.DataFrame(
            [(at[0] if at else None, at[1] if at else None, *a) for a in actions], schema=UNDO_SCHEMA, orient="row")
        tx.writer(DEX_UNDO, step, UNDO_SCHEMA, marker=True).write(record)  # after its copies
    new_table = False
    for (dataset, key), frame in files.items():
        new_table |= not (lake.has_schema_file(dataset) if dataset != DEX else lake.exists(dataset, key))
        if dataset != DEX:  # views over an emptied directory still bind; the archive's view exists from the start
            lake.ensure_schema_file(dataset, dict(frame.schema))
            if dataset.split("/")[-1] in DEX_ROW_TABLES:
                lake.ensure_schema_file(orphaned(dataset), {**frame.schema, **ORPHAN_COLUMNS})
    head = blocks.row(blocks.height - 1, named=True)
    with lake.transaction(guard) as tx:
        for (dataset, key), frame in files.items():
            tx.writer(dataset, key, dict(frame.schema)).write(frame)
        _write_cursor(tx, head["number"], head["hash"], origin)
    return new_table


def _settle(cfg: IndexerConfig, lake: Lake, cursor: int) -> None:
    """Drop the undo records no reorg can need (older than the reorg window) and merge the step files
    of each partition they leave behind, once the partition is final."""
    window = cfg.chain.reorg_window or 0
    final = cursor - window
    for first, last in _records(lake):
        if last < final:
            _drop_record(lake, first, last)
    undoable = min((f for f, _ in _records(lake)), default=cursor + 1)
    width = cfg.chain.blocks_per_partition
    for table in DEX_ROW_TABLES:
        by_partition: dict[str, list] = {}
        for p in lake.files(dex_dataset(table)):
            a, b = file_blocks(p)
            r = range_for_block(a, width)
            if b < undoable and r.end < final:
                by_partition.setdefault(r.key, []).append(p)
        for paths in by_partition.values():
            if len(paths) < MERGE_AT:
                continue
            _merge(lake, table, paths)


def _merge(lake: Lake, table: str, paths: list) -> None:
    """One file for the step files `paths` of a table, copied a row group at a time (a partition of any size)."""
    spans = [file_blocks(p) for p in paths]
    empties = [pl.from_arrow(parquet_metadata(p).schema.to_arrow_schema().empty_table()) for p in paths]
    schema = pl.concat([e for e in empties if isinstance(e, pl.DataFrame)], how="vertical_relaxed").schema
    with lake.transaction() as tx:
        for p in paths:
            tx.delete(p)
        w = tx.writer(dex_dataset(table), _step_key(min(s[0] for s in spans), max(s[1] for s in spans)), dict(schema))
        for p in paths:
            for group in row_groups(p):
                w.write(group.cast(schema))


def _contiguous(blocks: pl.DataFrame, first: int) -> pl.DataFrame:
    """`blocks` (number, hash; sorted) from `first` up to the first gap."""
    if blocks.height == 0 or blocks["number"][0] != first:
        return blocks.clear()
    gaps = blocks.with_row_index("i").filter(pl.col("number") != pl.col("i") + first)
    return blocks if gaps.height == 0 else blocks.head(int(gaps["i"][0]))


def _lowest_block(lake: Lake) -> int | None:
    """The lowest block the lake holds: from the footer of its first blocks file (range files and live
    segments are named by their blocks), not a scan of every block."""
    firsts = []
    for dataset in (BLOCKS, live(BLOCKS)):
        files = lake.files(dataset)
        if files:
            rows, low, _high = column_span(min(files, key=lambda p: file_blocks(p)[0]), "number")
            if rows and low is not None:
                firsts.append(int(low))
    return min(firsts, default=None)


def _behind_fork(lake: Lake) -> None:
    """Undo the steps whose last block the lake's canonical blocks no longer hold (a reorg the DEX tables
    missed): the tables go back to a cursor on the canonical chain."""
    while (at := read_cursor(lake)) is not None:
        got = canonical_blocks(lake, at[0], at[0])
        if got.height and got["hash"][0] == at[1]:
            return
        if _undo_last_step(lake, at[0]) is None:  # (a reorg run archives what it rolls back; this is the safety net)
            return


def advance(cfg: IndexerConfig, store: StateStore, max_steps: int | None = None, count_rows: bool = True) -> DexResult:
    """Derive the DEX tables through the highest contiguous canonical block the lake holds (at most
    `max_steps` steps), from where the last call stopped. Refused (ForkChanged) when a reorg begins meanwhile.
    `count_rows`: report each table's rows (`table_rows`: a footer per file, which grows with the history)."""
    started = time.perf_counter()
    lake = open_lake(cfg)
    res = DexResult()
    if any(lake.exists(DEX, t) for t in (*DEX_ROW_TABLES, *DEX_DAY_TABLES)):
        reset(lake)  # a lake of the layout before steps (one file per table): derived again, step by step
        build_catalog(cfg)
    elif not cfg.duckdb_path.is_file():
        build_catalog(cfg)  # (the writers of the events build it as they add tables)
    recover(lake)
    width = cfg.chain.blocks_per_partition
    new_tables = False
    _behind_fork(lake)
    # From the lowest block the lake holds (a backfill may start above the config's start block);
    # blocks below where the tables began, backfilled since, mean deriving them again from there.
    # Another config (a Uniswap contract added or removed, another reference token) means deriving
    # them again too (rows of an added contract's history then arrive below: `rows_replaced`).
    lowest = _lowest_block(lake)
    inputs = config_inputs(cfg)
    origin = _origin(lake)
    if origin is not None and ((lowest is not None and lowest < origin[0]) or origin[1] != inputs):
        reset(lake)
        origin = None
    if origin is None:
        origin = (max(int(lowest), cfg.start_block) if lowest is not None else cfg.start_block, inputs)
    base = origin[0]
    while max_steps is None or res.steps < max_steps:
        if store.active_reorg(cfg.chain.name) is not None:
            break
        at = read_cursor(lake)
        first = at[0] + 1 if at else base
        end = min(range_for_block(first, width).end, first + STEP_BLOCKS - 1)
        blocks = _contiguous(canonical_blocks(lake, first, end), first)
        if blocks.height == 0:
            break
        last = int(blocks["number"][-1])
        files = derive_step(cfg, lake, first, last)
        new_tables |= _publish_step(cfg, lake, store, first, last, blocks, at, files, origin)
        res.steps += 1
        res.blocks = (res.blocks[0] if res.blocks else first, last)
    at = read_cursor(lake)
    res.cursor = at[0] if at else None
    if at is not None and res.steps:
        _settle(cfg, lake, at[0])
    if new_tables:
        build_catalog(cfg)  # a DEX view appears once its table has a file
    if count_rows:
        res.rows = table_rows(lake)
        res.top_pools = _top_pools(lake)
    res.seconds = time.perf_counter() - started
    return res


def table_rows(lake: Lake) -> dict[str, int]:
    """Rows of each DEX table, from the files' footers (for reports, not for every step)."""
    out = {}
    for table in DEX_TABLES:
        if table in (*DEX_ROW_TABLES, *DEX_DAY_TABLES):
            paths = lake.files(dex_dataset(table))
        else:
            paths = [lake.path(DEX, table)] if lake.exists(DEX, table) else []
        out[table] = sum(parquet_metadata(p).num_rows for p in paths)
    return out


def _top_pools(lake: Lake) -> pl.DataFrame | None:
    if not lake.exists(DEX, "pool_state"):
        return None
    state = read_parquet(lake.path(DEX, "pool_state"))
    return state.sort("last_block", descending=True).select(
        "pool", "pair", "reserve0_h", "reserve1_h", "price", "last_block").head(10)
