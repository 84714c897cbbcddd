"""Contracts added to the config: fetch only what stored ranges lack, beside their files.

Every `logs` file records in its Parquet metadata what it holds (`sync.contracts.wanted_coverage`:
each static address from its start block, each factory rule). When the config asks for more than a
stored, complete range holds, a *supplement* fetches the logs of only the missing addresses (and the
children of new factory rules) over the blocks the range's `blocks` file holds, checks they are of
the same fork (every log's block hash equals the stored block's), and writes them as extra files
`logs/<range>+<fingerprint>.parquet`, `events/<table>/<range>+<fingerprint>.parquet` and
`children/<range>+<fingerprint>.parquet`. The views glob each dataset's directory, so they union them;
the range's own files are not touched (their bytes and their Dagster history stay as they were).
A full re-sync of the range (a reorg restore, a re-run) writes one file holding everything and
deletes the supplements in the same transaction.

`plan_range` decides, per range, what a historical run does: `full` (not stored completely),
`supplement` (stored, addresses missing), `decode` (stored and covered, only decoded tables of
newly configured events missing: no RPC), or `full` again when nothing is missing (a re-run).
"""

import asyncio
import time
from collections.abc import Collection

import polars as pl

from indexer_dagster.block_range import BlockRange, parse_key, range_for_block
from indexer_dagster.chain.fetch import Chunk, ForkChanged, RangeFetcher
from indexer_dagster.chain.rpc import RpcStats, rpc_client
from indexer_dagster.config import IndexerConfig
from indexer_dagster.persist.datasets import CHILD_SCHEMA, CHILDREN, LIVE, LOG_SCHEMA, live_segments
from indexer_dagster.persist.files import file_state, row_groups
from indexer_dagster.persist.lake import Lake, open_lake
from indexer_dagster.persist.windows import block_files, read_window
from indexer_dagster.state import StateStore, store_or_open
from indexer_dagster.sync import historical
from indexer_dagster.sync.contracts import (
    block_span,
    coverage_metadata,
    dedupe_children,
    discover,
    empty_children,
    file_coverage,
    fingerprint,
    has_factories,
    key_files,
    missing_coverage,
    resolve_range,
    rule_id,
    stored_coverage,
    wanted_coverage,
)
from indexer_dagster.sync.historical import (
    Decoder,
    RangeResult,
    commit_guard,
    decode_range,
    dex_after_publish,
    new_sizer,
    sync_range,
)

FULL, SUPPLEMENT, DECODE = "full", "supplement", "decode"


def _span(lake: Lake, key: str) -> tuple[int, int] | None:
    path = lake.path("blocks", key)
    if not path.is_file():
        return None
    lo, hi = block_span(path)
    return None if lo is None or hi is None else (lo, hi)


def missing_tables(cfg: IndexerConfig, r: BlockRange, files: list | None = None) -> list[str]:
    """Configured event tables lacking a file for one of the range's logs files (`files`, if known)."""
    lake = open_lake(cfg)
    names = [p.stem for p in (key_files(lake, "logs", r.key) if files is None else files)]
    return [s.table for _, s in cfg.all_specs()
            if any(not lake.exists(f"events/{s.table}", n) for n in names)]


def range_missing(cfg: IndexerConfig, r: BlockRange, files: list | None = None) -> dict:
    """What the config asks for that the stored range lacks (empty when it is not stored)."""
    return missing_coverage(wanted_coverage(cfg), stored_coverage(cfg, r.key, files=files))


def _any(missing: dict) -> bool:
    return bool(missing["addresses"] or missing["factories"])


def plan_range(cfg: IndexerConfig, r: BlockRange, head: int | None = None, files: list | None = None) -> str:
    """`full`, `supplement` or `decode` for range `r` (see the module docstring). A range is stored
    completely when its `blocks` file reaches the range's end (or `head`, for the top range).
    `files`: the range's logs files (main one first), when the caller has listed them."""
    lake = open_lake(cfg)
    span = _span(lake, r.key)
    clipped = r.clip(cfg.start_block, head if head is not None else r.end)
    if (span is None or clipped is None or span[0] > clipped.start or span[1] < clipped.end
            or not lake.exists("logs", r.key)):
        return FULL  # not stored, or not all the blocks now wanted (e.g. a lower start_block)
    if _any(range_missing(cfg, r, files)):
        return SUPPLEMENT
    if missing_tables(cfg, r, files):
        return DECODE
    return FULL


_memo: dict[tuple, bool] = {}


def ranges_to_supplement(cfg: IndexerConfig) -> list[str]:
    """Range keys to run after contracts or events were added to the config (what the sensor asks
    for): stored ranges lacking them (a run supplements or re-decodes them), and ranges holding live
    segments written before (a run replaces those by a range file fetched with the new config).
    Verdicts are kept per file state, so a sensor tick costs a directory listing once all are known."""
    lake = open_lake(cfg)
    wanted = wanted_coverage(cfg)
    config_fp = (fingerprint(wanted), tuple(sorted(s.table for _, s in cfg.all_specs())))
    out: set[str] = set()
    by_key: dict[str, list] = {}
    for p in lake.files("logs"):  # one listing per directory, not one per range
        by_key.setdefault(p.stem.split("+", 1)[0], []).append(p)
    table_files = {s.table: {p.stem for p in lake.files(f"events/{s.table}")} for _, s in cfg.all_specs()}
    for key, files in sorted(by_key.items()):
        sig = (config_fp, key, tuple((p.name, file_state(p)) for p in files))
        if sig not in _memo:  # reading coverage means a Parquet footer per file: once per file state
            main = [p for p in files if "+" not in p.stem]
            ordered = main + [p for p in files if "+" in p.stem] if main else []
            _memo[sig] = plan_range(cfg, parse_key(key), files=ordered) == SUPPLEMENT
        if _memo[sig] or any(p.stem not in names for p in files for names in table_files.values()):
            out.add(key)
    # Live segments written with an older config, below one written with this config (so the follower
    # runs with it now): the ranges holding their blocks are fetched again until range files with
    # everything hold all those blocks.
    tables = [s.table for _, s in cfg.all_specs()]

    def stale(path, cov) -> bool:
        return (cov is not None and _any(missing_coverage(wanted, cov))) or any(
            not lake.exists(f"{LIVE}/events/{t}", path.stem) for t in tables)

    segments = [(first, last, stale(path, file_coverage(path))) for first, last, path in live_segments(lake, "logs")]
    current = [first for first, _l, old in segments if not old]
    for first, last, old in segments:
        if not old or not current or first > max(current):
            continue
        for b in (first, last):
            r = range_for_block(b, cfg.chain.blocks_per_partition)
            span = _span(lake, r.key)
            if span is None or span[1] < min(last, r.end) or _any(range_missing(cfg, r)):
                out.add(r.key)
    if len(_memo) > 100_000:
        _memo.clear()
    return sorted(out)


def supplement_range(
    cfg: IndexerConfig, r: BlockRange, stats: RpcStats | None = None, *, store: StateStore | None = None
) -> RangeResult:
    """Fetch the logs of what range `r` lacks (see the module docstring); then decode the range's
    other logs files into tables they lack (no RPC). Falls back to a full sync if `r` is not stored.
    `store`: the run's state store (None: one opened for this call)."""
    if plan_range(cfg, r) == FULL:
        return sync_range(cfg, r, stats=stats, store=store)
    with store_or_open(cfg.state_url, store) as s:
        return _supplement_stored(cfg, r, stats, s)


def _supplement_stored(cfg: IndexerConfig, r: BlockRange, stats: RpcStats | None, store: StateStore) -> RangeResult:
    started = time.perf_counter()
    span = _span(open_lake(cfg), r.key)
    if _any(range_missing(cfg, r)):
        result = asyncio.run(_supplement(cfg, r, stats or RpcStats(), store))
        result.mode = SUPPLEMENT
        dex_after_publish(cfg, store, r)
    else:
        assert span is not None  # plan_range is FULL for a range without stored blocks
        result = RangeResult(range=r, from_block=span[0], to_block=span[1], mode=DECODE)
    tables = missing_tables(cfg, r)
    if tables:
        decoded = decode_range(cfg, r, tables, store=store)
        for t, n in decoded.events.items():
            result.events[t] = result.events.get(t, 0) + n
        for t, n in decoded.skipped.items():
            result.skipped[t] = result.skipped.get(t, 0) + n
    for _, spec in cfg.all_specs():  # every table has a count (rows added by this run)
        result.events.setdefault(spec.table, 0)
        result.skipped.setdefault(spec.table, 0)
    result.seconds = time.perf_counter() - started
    return result


async def _supplement(cfg: IndexerConfig, r: BlockRange, stats: RpcStats, store: StateStore) -> RangeResult:
    # Taken before anything is read: a reorg repaired while this fetches refuses the publish (the
    # stored blocks and the node's blocks it compared may both be gone by then).
    guard = commit_guard(cfg, store)
    lake = open_lake(cfg)
    span = _span(lake, r.key)
    assert span is not None  # supplement_range: plan_range found the range's blocks stored
    lo, hi = span
    stored = stored_coverage(cfg, r.key)
    missing = range_missing(cfg, r)
    name = f"{r.key}+{fingerprint(missing)}"
    result = RangeResult(range=r, from_block=lo, to_block=hi)
    async with rpc_client(cfg, stats) as rpc:
        contracts = await resolve_range(cfg, rpc, lo, hi)
        starts = contracts.starts(hi)
        # Missing static addresses (from their start; an address stored from a later start only up
        # to that start), and every child of a missing factory rule from its creation.
        fetch: dict[str, int] = {a: max(s, lo) for a, s in missing["addresses"].items()}
        until = {a: stored["addresses"][a] for a in fetch if stored and a in stored["addresses"]}
        rule_children = _children_of_rules(cfg, contracts, set(missing["factories"]))
        for a in rule_children:
            if a in starts and a not in (stored or {}).get("addresses", {}):
                fetch[a] = max(starts[a], lo)
        decoder = Decoder(cfg, None, contracts, write_children=False)
        children = [empty_children()]  # of the range (its stored logs and these), for new factory rules
        # Written as fetched, and the stored blocks read a chunk's worth at a time: a range of any size.
        with block_files([lake.path("blocks", r.key)], "number") as stored_blocks, lake.transaction(guard) as tx:
            wl = tx.writer("logs", name, LOG_SCHEMA, coverage_metadata(missing))
            decoder.open(tx, name)

            def write(chunk: Chunk) -> None:
                if chunk.blocks.height:
                    first, last = chunk.blocks.select(pl.col("number").min(), pl.col("number").max().alias("b")).row(0)
                    _same_fork(chunk.blocks, read_window(stored_blocks, ["number", "hash"], first, last), r.key)
                logs = chunk.logs
                for a, end in until.items():
                    logs = logs.filter((pl.col("address") != a) | (pl.col("block_number") < end))
                wl.write(logs)
                decoder.write(logs)
                if has_factories(cfg):
                    children.append(discover(cfg, logs))

            if fetch:
                fetcher = RangeFetcher(rpc, cfg.chain.chain_id, sorted(fetch), new_sizer(cfg),
                                       headers_batch_size=cfg.chain.headers_batch_size, address_starts=fetch)
                async for chunk in fetcher.iter_chunks(lo, hi, cfg.chain.concurrency):
                    await asyncio.to_thread(write, chunk)
                    historical._reporter(chunk.blocks.height, chunk.logs.height)
            await asyncio.to_thread(decoder.flush)
            if has_factories(cfg):
                for p in key_files(lake, "logs", r.key):  # a row group at a time
                    children += [discover(cfg, group) for group in row_groups(p)]
                rules = {"addresses": {}, "factories": wanted_coverage(cfg)["factories"]}
                tx.writer(CHILDREN, name, CHILD_SCHEMA, coverage_metadata(rules)).write(
                    dedupe_children(pl.concat(children, how="vertical")))
            result.logs = wl.rows
    result.events, result.skipped = decoder.rows, decoder.skipped
    result.rpc = stats.as_dict()
    return result


def _children_of_rules(cfg: IndexerConfig, contracts, rules: set[str]) -> list[str]:
    out = []
    for c in cfg.contracts:
        if c.factory is not None and rule_id(cfg, c) in rules:
            out += contracts.addresses_of(c.name)
    return out


def _same_fork(blocks: pl.DataFrame, stored: pl.DataFrame, key: str) -> None:
    joined = blocks.select("number", "hash").join(stored, on="number", how="left", suffix="_stored")
    if not (joined["hash"] == joined["hash_stored"]).all():
        raise ForkChanged(f"range {key}: the node's blocks differ from the stored ones (a reorg to repair first)")


def fetch_range(
    cfg: IndexerConfig, r: BlockRange, tables: Collection[str] | None = None, stats: RpcStats | None = None,
    *, store: StateStore | None = None,
) -> RangeResult:
    """What a historical run does for range `r`: a supplement (or a decode) when the stored range
    lacks only added contracts (or events), else a full sync of the selected tables. `store`: the
    run's state store (None: one opened for this call)."""
    every = {s.table for _, s in cfg.all_specs()}
    if (tables is None or set(tables) >= every) and plan_range(cfg, r) in (SUPPLEMENT, DECODE):
        return supplement_range(cfg, r, stats, store=store)
    return sync_range(cfg, r, tables, stats=stats, store=store)
