"""Historical sync of one block range: chain (fetch) → parse (decode) → persist (Parquet), in one pass.

Plain functions, no Dagster: the assets in `indexer_dagster.assets` call these and report what they
return. Re-running a range rewrites its files with the same rows; a killed run leaves the previous
files (or none) in place, never a partial one.
"""

import asyncio
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from indexer_dagster.block_range import BlockRange, ranges_between
from indexer_dagster.chain.fetch import Chunk, ForkChanged, RangeFetcher
from indexer_dagster.chain.rpc import RpcClient, RpcStats, rpc_client
from indexer_dagster.chain.spans import RangeSizer
from indexer_dagster.chain.verify import verifier_for
from indexer_dagster.config import IndexerConfig
from indexer_dagster.dex.incremental import dex_lease, read_cursor, rows_replaced
from indexer_dagster.dex.sources import enabled as dex_enabled
from indexer_dagster.health.logs import get_logger, log_context, register_config
from indexer_dagster.health.rpc_stats import RpcStatsRecorder
from indexer_dagster.parse.decode import decode_logs
from indexer_dagster.persist.datasets import (
    BLOCK_SCHEMA,
    BLOCKS,
    CHILD_SCHEMA,
    CHILDREN,
    LOG_SCHEMA,
    live_datasets,
    live_segments,
)
from indexer_dagster.persist.files import open_parquet
from indexer_dagster.persist.lake import Lake, StreamWriter, Transaction, open_lake, owned
from indexer_dagster.persist.meta import record_head
from indexer_dagster.persist.windows import block_files, read_window
from indexer_dagster.reorg.guard import BlocksBetween, publish_guard
from indexer_dagster.state import StateStore, store_or_open
from indexer_dagster.sync.contracts import (
    ContractSet,
    coverage_metadata,
    discover,
    empty_children,
    has_factories,
    key_files,
    resolve_range,
    stored_children,
    wanted_coverage,
)
from indexer_dagster.sync.supervise import highest_block, segment_covered
from indexer_dagster.urls import redact_to_host

log = get_logger(__name__)
# (blocks, logs) just written; the CLI turns these into a progress bar.
ProgressFn = Callable[[int, int], None]
_FORK_RESTARTS = 3
DECODE_BATCH_ROWS = 100_000


def _no_progress(_blocks: int, _logs: int) -> None:
    pass


_reporter: ProgressFn = _no_progress


def set_progress_reporter(fn: ProgressFn | None) -> None:
    """Install a process-wide progress callback (the CLI's worker processes do)."""
    global _reporter
    _reporter = fn or _no_progress


@dataclass
class RangeResult:
    range: BlockRange
    from_block: int | None = None  # None when the range holds no block to index
    to_block: int | None = None
    blocks: int = 0
    logs: int = 0
    events: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    last_block_hash: str | None = None
    head: int = 0
    seconds: float = 0.0
    rpc: dict[str, Any] = field(default_factory=dict)
    mode: str = "full"  # or "supplement" / "decode" (sync.supplement: only added contracts or events)

    @property
    def complete(self) -> bool:
        return self.to_block == self.range.end


def _fetcher(cfg: IndexerConfig, rpc: RpcClient, sizer: RangeSizer, contracts: ContractSet, up_to: int) -> RangeFetcher:
    """Static addresses and the factory children created up to `up_to`, each from its own start block."""
    chain_start = cfg.start_block
    starts = contracts.starts(up_to)
    return RangeFetcher(
        rpc, cfg.chain.chain_id, list(starts), sizer, headers_batch_size=cfg.chain.headers_batch_size,
        address_starts={a: s for a, s in starts.items() if s > chain_start},
        verifier=verifier_for(cfg, starts), verify_mode=cfg.chain.verify_logs,
    )


# Logs per eth_getLogs response the span aims at: below the common 10,000-result caps, large enough
# that per-request costs stay small next to parsing.
TARGET_LOGS_PER_REQUEST = 5000


def new_sizer(cfg: IndexerConfig) -> RangeSizer:
    return RangeSizer(
        initial=cfg.chain.blocks_per_request,
        maximum=cfg.chain.max_blocks_per_request,
        target_logs=TARGET_LOGS_PER_REQUEST,
    )


async def _head(rpc: RpcClient) -> tuple[int, str]:
    block = await rpc.call("eth_getBlockByNumber", ["latest", False])
    return int(block["number"], 16), block["hash"].lower()


def commit_guard(
    cfg: IndexerConfig, store: StateStore, covered: BlockRange | None = None,
    blocks: BlocksBetween | None = None, head: Callable[[], tuple[int, str]] | None = None,
):
    """Publish a range's files only under the chain's writer lock, if no reorg began since the fetch
    started (else its rows could be of the old fork) and its `blocks` are the local chain's; then drop
    the live segments the range now covers and record the `head()` (number, hash) the fetch saw, under
    the same check (a head from before a reorg onto a shorter fork would confirm rows it may replace)."""

    def after() -> None:
        if covered is not None:
            _drop_covered_live_segments(cfg, covered)
        if head is not None:
            record_head(open_lake(cfg), cfg.chain.chain_id, *head(), cfg.chain.confirmations)

    return publish_guard(
        store, cfg.chain.name, "a reorg was detected while the range was fetched; fetching it again",
        after=after, blocks=blocks,
    )


def _staged_blocks(writers: list[StreamWriter], first: int, last: int) -> pl.DataFrame:
    """(number, hash) of blocks first..last from the range's blocks file, written but not yet published
    (read back for the guard, not kept: a partition of any size)."""
    if not writers:
        return pl.DataFrame(schema={"number": pl.Int64, "hash": pl.String})
    with block_files([writers[0].path], "number") as files:
        return read_window(files, ["number", "hash"], first, last)


def supplement_files(lake: Lake, key: str, tables: Collection[str]) -> list:
    """The range's supplement files (`<key>+<fingerprint>.parquet`) of its logs, children and `tables`."""
    datasets = ["logs", CHILDREN, *[f"events/{t}" for t in tables]]
    return [p for ds in datasets for p in key_files(lake, ds, key) if "+" in p.stem]


def _drop_covered_live_segments(cfg: IndexerConfig, covered: BlockRange) -> None:
    """Remove the live segments touching `covered` whose blocks range files now hold, all of them (a
    segment that straddles a partition boundary waits for the range of its other part)."""
    lake = open_lake(cfg)
    width = cfg.chain.blocks_per_partition

    coverage: dict[str, int] = {}  # of the ranges the segments touching `covered` touch
    drop = []
    for ds in live_datasets(cfg):
        for first, last, path in live_segments(lake, ds):
            if first > covered.end or last < covered.start:
                continue
            for r in ranges_between(first, last, width):
                if r.key not in coverage:
                    coverage[r.key] = highest_block(lake.path(BLOCKS, r.key))
            if segment_covered(first, last, coverage, width):
                drop.append(path)
    if drop:
        with lake.transaction() as tx:
            for path in drop:
                tx.delete(path)


class Decoder:
    """Decodes logs into the selected event tables' writers, chunk by chunk, as they are fetched."""

    def __init__(
        self, cfg: IndexerConfig, tables: Collection[str] | None, contracts: ContractSet | None = None,
        write_children: bool = True,
    ) -> None:
        pairs = [(c, s) for c, s in cfg.all_specs() if tables is None or s.table in tables]
        self.cfg = cfg
        self.specs = [s for _, s in pairs]
        self.addresses = {s.table: set(c.addresses) for c, s in pairs}
        # Factory children: the registry (loaded on first use) plus those created in the logs decoded
        # here, which are also written to the `children` dataset of the same key.
        self.factories = has_factories(cfg)
        self.write_children = write_children
        self.contracts = contracts
        self.children = empty_children()
        self._children_writer: StreamWriter | None = None
        self.rows = {s.table: 0 for s in self.specs}
        self.skipped = {s.table: 0 for s in self.specs}
        self.writers: dict = {}
        self._pending: list[pl.DataFrame] = []
        self._pending_rows = 0

    def open(self, tx: Transaction, key: str, prefix: str = "") -> None:
        self.writers = {s.table: tx.writer(f"{prefix}events/{s.table}", key, s.schema()) for s in self.specs}
        if self.factories and self.write_children:
            rules = {"addresses": {}, "factories": wanted_coverage(self.cfg)["factories"]}
            self._children_writer = tx.writer(f"{prefix}{CHILDREN}", key, CHILD_SCHEMA, coverage_metadata(rules))

    def write(self, logs: pl.DataFrame) -> None:
        """Queue logs; they are decoded in large batches (decoding has a fixed cost per call)."""
        if not (self.specs or self.factories) or logs.height == 0:
            return
        self._pending.append(logs)
        self._pending_rows += logs.height
        if self._pending_rows >= DECODE_BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        logs = pl.concat(self._pending, how="vertical")
        self._pending, self._pending_rows = [], 0
        addresses = self.addresses
        if self.factories:
            found = discover(self.cfg, logs).join(self.children.select("contract", "address"),
                                                  on=["contract", "address"], how="anti")
            if self._children_writer is not None:
                self._children_writer.write(found)
            self.children = pl.concat([self.children, found], how="vertical")
            if self.contracts is None:
                self.contracts = ContractSet(self.cfg, stored_children(self.cfg))
            self.contracts.add(found)
            allowed = self.contracts.table_addresses()
            addresses = {t: allowed[t] for t in self.addresses}
        for table, res in decode_logs(logs, self.specs, addresses).items():
            # A small table's rows wait in its writer for many batches: copied, they keep no batch alive.
            self.writers[table].write(owned(res.frame) if res.frame.height * 4 < logs.height else res.frame)
            self.rows[table] += res.frame.height
            self.skipped[table] += res.skipped


async def _sync(
    cfg: IndexerConfig, r: BlockRange, tables: Collection[str] | None, progress: ProgressFn, stats: RpcStats,
    guard_factory: Callable | None, store: StateStore,
) -> RangeResult:
    lake = open_lake(cfg)
    started = time.perf_counter()
    async with rpc_client(cfg, stats) as rpc:
        sizer = new_sizer(cfg)
        for attempt in range(_FORK_RESTARTS + 1):
            # The guard first: it refuses the publish if a reorg begins after this point, and everything
            # this attempt reads from the node comes after it, the head included (after a reorg onto a
            # shorter fork, an earlier attempt's head is gone).
            staged: list[StreamWriter] = []  # the blocks file being written, for the guard's check
            seen_head: list[tuple[int, str]] = []
            guard = guard_factory or commit_guard(
                cfg, store, r, blocks=lambda lo, hi: _staged_blocks(staged, lo, hi),  # noqa: B023
                head=lambda: seen_head[0])  # noqa: B023
            head, head_hash = await _head(rpc)
            seen_head.append((head, head_hash))
            clipped = r.clip(cfg.start_block, head)
            if clipped is None and r.start > head:
                raise ValueError(f"range {r.key} starts above the chain head ({head}); backfill up to the head "
                                 "or wait for the chain")
            result = RangeResult(range=r, from_block=clipped.start if clipped is not None else None,
                                 to_block=clipped.end if clipped is not None else None, head=head)
            # Factory children created up to the range's end (registry + a scan of uncovered blocks).
            contracts = await resolve_range(cfg, rpc, clipped.start, clipped.end) if clipped is not None else None
            scanned = contracts.children.select("contract", "address") if contracts is not None else None
            decoder = Decoder(cfg, tables, contracts)
            try:
                with lake.transaction(guard) as tx:
                    wb = tx.writer("blocks", r.key, BLOCK_SCHEMA, marker=True)  # published last
                    staged.append(wb)
                    wl = tx.writer("logs", r.key, LOG_SCHEMA, coverage_metadata(wanted_coverage(cfg)))
                    decoder.open(tx, r.key)
                    # The range now holds every configured address: its supplement files go.
                    for p in supplement_files(lake, r.key, [s.table for s in decoder.specs]):
                        tx.delete(p)

                    def write(chunk: Chunk) -> None:
                        wb.write(chunk.blocks)  # noqa: B023 - called within this iteration
                        wl.write(chunk.logs)  # noqa: B023 - called within this iteration
                        decoder.write(chunk.logs)  # noqa: B023 - called within this iteration

                    if clipped is not None:
                        assert contracts is not None  # resolved above for a clipped range
                        fetcher = _fetcher(cfg, rpc, sizer, contracts, clipped.end)
                        async for chunk in fetcher.iter_chunks(clipped.start, clipped.end, cfg.chain.concurrency):
                            # Polars and Arrow release the GIL: decode and write while the next chunks download.
                            await asyncio.to_thread(write, chunk)
                            if chunk.blocks.height:
                                result.last_block_hash = chunk.blocks["hash"][-1]
                            progress(chunk.blocks.height, chunk.logs.height)
                    await asyncio.to_thread(decoder.flush)
                    if scanned is not None and decoder.children.join(
                        scanned, on=["contract", "address"], how="anti"
                    ).height:
                        # The range's logs name a child the scan before the fetch did not see: another fork.
                        raise ForkChanged(f"range {r.key}: factory creations changed while it was fetched")
                    result.blocks, result.logs = wb.rows, wl.rows
                break
            except ForkChanged:
                if attempt == _FORK_RESTARTS:
                    raise
                await asyncio.sleep(1.0)
    result.events, result.skipped = decoder.rows, decoder.skipped
    result.seconds = time.perf_counter() - started
    result.rpc = stats.as_dict()
    return result


def dex_after_publish(cfg: IndexerConfig, store: StateStore, r: BlockRange) -> None:
    """Range `r` was published again: the DEX tables derived from other rows of it are taken back (see
    `dex.incremental.rows_replaced`), under their lease."""
    at = read_cursor(open_lake(cfg)) if dex_enabled(cfg) else None
    if at is None or at[0] < r.start:
        return  # (checked without the lease: a step from now on reads the rows just published)
    with store.writer_lock(dex_lease(cfg.chain.name), timeout_s=600):
        if rows_replaced(cfg, r.start, r.end):
            log.info("range %s: published rows differ from those the DEX tables were derived from; "
                     "they are derived again from block %d", r.key, r.start)


def sync_range(
    cfg: IndexerConfig,
    r: BlockRange,
    tables: Collection[str] | None = None,
    progress: ProgressFn | None = None,
    stats: RpcStats | None = None,
    guard: Callable | None = None,
    *,
    store: StateStore | None = None,
) -> RangeResult:
    """Fetch range `r` (clipped to [start_block, head]) into its `blocks` and `logs` files and decode it
    into the event tables named in `tables` (default: all), in one pass. `guard` replaces the default
    commit guard (the reorg job passes its own, as it is the chain's writer while it restores); `store`:
    the run's state store (None: one opened for this call)."""
    stats = stats or RpcStats()
    recorder = RpcStatsRecorder(cfg.data_dir, cfg.chain.name, stats)  # durable RPC counters (`indexer status`)
    register_config(cfg)
    with log_context(chain=cfg.chain.name, range=r.key):
        log.info("range %s: syncing via %s", r.key, redact_to_host(cfg.chain.endpoints[0]))
        try:
            with store_or_open(cfg.state_url, store) as s:
                res = asyncio.run(_sync(cfg, r, tables, progress or _reporter, stats, guard, s))
                if guard is None:  # (a reorg run restoring the range has rolled the DEX tables back itself)
                    dex_after_publish(cfg, s, r)
        except Exception as e:
            log.warning("range %s failed: %s: %s", r.key, type(e).__name__, e)
            raise
        finally:
            recorder.flush()
        log.info("range %s: %d blocks, %d logs, %d events in %.1fs (head %d, %d requests, %d retries)", r.key,
                 res.blocks, res.logs, sum(res.events.values()), res.seconds, res.head, stats.total_requests,
                 stats.total_retries)
    return res


def decode_range(
    cfg: IndexerConfig, r: BlockRange, tables: Collection[str] | None = None, *, store: StateStore | None = None
) -> RangeResult:
    """Decode the range's existing `logs` files again (e.g. for an event added to the config): no RPC.
    Each logs file (the range's and its supplements) is decoded into event files of the same name."""
    lake = open_lake(cfg)
    started = time.perf_counter()
    result = RangeResult(range=r)
    files = key_files(lake, "logs", r.key) or [lake.path("logs", r.key)]  # (a missing file: the usual error)
    with store_or_open(cfg.state_url, store) as s:
        with lake.transaction(commit_guard(cfg, s)) as tx:
            for path in files:
                # A supplement's children file was written from all the range's logs: keep it.
                decoder = Decoder(cfg, tables, write_children="+" not in path.stem)
                with open_parquet(path) as src:
                    decoder.open(tx, path.stem)
                    for batch in src.iter_batches(batch_size=DECODE_BATCH_ROWS):
                        decoder.write(pl.from_arrow(batch))  # type: ignore[arg-type]  # pyarrow untyped: a RecordBatch gives a DataFrame
                    decoder.flush()
                for t, n in decoder.rows.items():
                    result.events[t] = result.events.get(t, 0) + n
                for t, n in decoder.skipped.items():
                    result.skipped[t] = result.skipped.get(t, 0) + n
        dex_after_publish(cfg, s, r)  # once the files are published
    result.seconds = time.perf_counter() - started
    return result
