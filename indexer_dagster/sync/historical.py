"""Historical sync of one block range: monitor (fetch) → parse (decode) → persist (Parquet), in one pass.

Plain functions, no Dagster: the assets in `indexer_dagster.assets` call these and report what they
return. Re-running a range rewrites its files with the same rows; a killed run leaves the previous
files (or none) in place, never a partial one.
"""

import asyncio
import time
from collections.abc import Callable, Collection
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from indexer_dagster.config import IndexerConfig
from indexer_dagster.monitor.fetch import BLOCK_SCHEMA, LOG_SCHEMA, Chunk, ForkChanged, RangeFetcher
from indexer_dagster.monitor.ranges import RangeSizer
from indexer_dagster.monitor.rpc import RetryPolicy, RpcClient, RpcStats
from indexer_dagster.parse.decode import decode_logs
from indexer_dagster.partitions import BlockRange
from indexer_dagster.persist.heads import record_head
from indexer_dagster.persist.lake import Lake, Transaction
from indexer_dagster.reorg.state import open_state

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

    @property
    def complete(self) -> bool:
        return self.to_block == self.range.end


def rpc_client(cfg: IndexerConfig, stats: RpcStats | None = None) -> RpcClient:
    c = cfg.chain
    return RpcClient(
        c.rpc_url,
        timeout_s=c.request_timeout_s,
        concurrency=c.concurrency,
        retry=RetryPolicy(max_retries=c.max_retries),
        stats=stats,
    )


def _fetcher(cfg: IndexerConfig, rpc: RpcClient, sizer: RangeSizer) -> RangeFetcher:
    chain_start = cfg.start_block
    starts = {
        a: cfg.contract_start(c) for c in cfg.contracts for a in c.addresses if cfg.contract_start(c) > chain_start
    }
    addresses = [a for c in cfg.contracts for a in c.addresses]
    return RangeFetcher(
        rpc, cfg.chain.chain_id, addresses, sizer, headers_batch_size=cfg.chain.headers_batch_size, address_starts=starts
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


def commit_guard(cfg: IndexerConfig, covered: BlockRange | None = None):
    """Publish a range's files only under the chain's writer lock, if no reorg began since the fetch
    started (else its rows could be of the old fork); also drop live segments the range now covers."""
    chain = cfg.chain.name
    store = open_state(cfg.state_url)
    try:
        epoch = store.reorg_epoch(chain)
    finally:
        store.close()

    @contextmanager
    def guard():
        store = open_state(cfg.state_url)
        try:
            with store.writer_lock(chain):
                if store.reorg_epoch(chain) != epoch or store.active_reorg(chain) is not None:
                    raise ForkChanged("a reorg was detected while the range was fetched; fetching it again")
                yield
                if covered is not None:
                    _drop_covered_live_segments(cfg, covered)
        finally:
            store.close()

    return guard


def _drop_covered_live_segments(cfg: IndexerConfig, covered: BlockRange) -> None:
    from indexer_dagster.sync.realtime import live_datasets, live_segments

    lake = Lake(cfg.data_dir, cfg.chain.name)
    for ds in live_datasets(cfg):
        for first, last, path in live_segments(lake, ds):
            if covered.start <= first and last <= covered.end:
                path.unlink(missing_ok=True)


class Decoder:
    """Decodes logs into the selected event tables' writers, chunk by chunk, as they are fetched."""

    def __init__(self, cfg: IndexerConfig, tables: Collection[str] | None) -> None:
        pairs = [(c, s) for c, s in cfg.all_specs() if tables is None or s.table in tables]
        self.specs = [s for _, s in pairs]
        self.addresses = {s.table: set(c.addresses) for c, s in pairs}
        self.rows = {s.table: 0 for s in self.specs}
        self.skipped = {s.table: 0 for s in self.specs}
        self.writers: dict = {}
        self._pending: list[pl.DataFrame] = []
        self._pending_rows = 0

    def open(self, tx: Transaction, key: str, prefix: str = "") -> None:
        self.writers = {s.table: tx.writer(f"{prefix}events/{s.table}", key, s.schema()) for s in self.specs}

    def write(self, logs: pl.DataFrame) -> None:
        """Queue logs; they are decoded in large batches (decoding has a fixed cost per call)."""
        if not self.specs or logs.height == 0:
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
        for table, res in decode_logs(logs, self.specs, self.addresses).items():
            self.writers[table].write(res.frame)
            self.rows[table] += res.frame.height
            self.skipped[table] += res.skipped


async def _sync(
    cfg: IndexerConfig, r: BlockRange, tables: Collection[str] | None, progress: ProgressFn, stats: RpcStats,
    guard_factory: Callable | None,
) -> RangeResult:
    lake = Lake(cfg.data_dir, cfg.chain.name)
    started = time.perf_counter()
    async with rpc_client(cfg, stats) as rpc:
        head, head_hash = await _head(rpc)
        clipped = r.clip(cfg.start_block, head)
        if clipped is None and r.start > head:
            raise ValueError(
                f"range {r.key} starts above the chain head ({head}); backfill up to the head or wait for the chain"
            )
        sizer = new_sizer(cfg)
        for attempt in range(_FORK_RESTARTS + 1):
            guard = guard_factory or commit_guard(cfg, clipped)
            result = RangeResult(range=r, from_block=clipped and clipped.start, to_block=clipped and clipped.end, head=head)
            decoder = Decoder(cfg, tables)
            try:
                with lake.transaction(guard) as tx:
                    wb = tx.writer("blocks", r.key, BLOCK_SCHEMA)
                    wl = tx.writer("logs", r.key, LOG_SCHEMA)
                    decoder.open(tx, r.key)

                    def write(chunk: Chunk) -> None:
                        wb.write(chunk.blocks)
                        wl.write(chunk.logs)
                        decoder.write(chunk.logs)

                    if clipped is not None:
                        fetcher = _fetcher(cfg, rpc, sizer)
                        async for chunk in fetcher.iter_chunks(clipped.start, clipped.end, cfg.chain.concurrency):
                            # Polars and Arrow release the GIL: decode and write while the next chunks download.
                            await asyncio.to_thread(write, chunk)
                            if chunk.blocks.height:
                                result.last_block_hash = chunk.blocks["hash"][-1]
                            progress(chunk.blocks.height, chunk.logs.height)
                    await asyncio.to_thread(decoder.flush)
                    result.blocks, result.logs = wb.rows, wl.rows
                break
            except ForkChanged:
                if attempt == _FORK_RESTARTS:
                    raise
                await asyncio.sleep(1.0)
        record_head(lake, cfg.chain.chain_id, head, head_hash, cfg.chain.confirmations)
    result.events, result.skipped = decoder.rows, decoder.skipped
    result.seconds = time.perf_counter() - started
    result.rpc = stats.as_dict()
    return result


def sync_range(
    cfg: IndexerConfig,
    r: BlockRange,
    tables: Collection[str] | None = None,
    progress: ProgressFn | None = None,
    stats: RpcStats | None = None,
    guard: Callable | None = None,
) -> RangeResult:
    """Fetch range `r` (clipped to [start_block, head]) into its `blocks` and `logs` files and decode it
    into the event tables named in `tables` (default: all), in one pass. `guard` replaces the default
    commit guard (the reorg job passes its own, as it is the chain's writer while it restores)."""
    return asyncio.run(_sync(cfg, r, tables, progress or _reporter, stats or RpcStats(), guard))


def decode_range(cfg: IndexerConfig, r: BlockRange, tables: Collection[str] | None = None) -> RangeResult:
    """Decode the range's existing `logs` file again (e.g. for an event added to the config): no RPC."""
    lake = Lake(cfg.data_dir, cfg.chain.name)
    started = time.perf_counter()
    decoder = Decoder(cfg, tables)
    with pq.ParquetFile(lake.path("logs", r.key)) as src, lake.transaction(commit_guard(cfg)) as tx:
        decoder.open(tx, r.key)
        for batch in src.iter_batches(batch_size=DECODE_BATCH_ROWS):
            decoder.write(pl.from_arrow(batch))
        decoder.flush()
    return RangeResult(range=r, events=decoder.rows, skipped=decoder.skipped, seconds=time.perf_counter() - started)
