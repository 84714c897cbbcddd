"""Live sync at the chain head: a long-running follower that writes each new block within a second.

Each tick reads the node's head, compares it with the local chain (the stored window of canonical
headers, see `reorg.detect`), and either
- writes the new blocks as small "live segment" files (`<chain>/live/<dataset>/<first>-<last>.parquet`)
  whose logs were fetched by block hash (EIP-234), so header and logs are of the same fork;
- waits (a lagging node is not a reorg);
- records a reorg in the durable ledger and pauses until the reorg job has repaired the data;
- or, for a fork below the stored window, stops with an alert.

Files are published under the chain's writer lock, after checking that no reorg is active and the
local tip is still the parent of the new blocks; the headers are stored after the files, so a crash
in between leaves segments above the stored tip, which the next start deletes.
"""

import asyncio
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import polars as pl

from indexer_dagster.config import IndexerConfig
from indexer_dagster.monitor.fetch import BLOCK_SCHEMA, LOG_SCHEMA, ForkChanged, RangeFetcher, parse_logs_body
from indexer_dagster.monitor.rpc import RpcClient, RpcStats
from indexer_dagster.partitions import ranges_between
from indexer_dagster.persist.heads import record_head
from indexer_dagster.persist.lake import Lake
from indexer_dagster.reorg.detect import Extend, LocalChain, Reorg, TooDeep, Wait, next_step
from indexer_dagster.reorg.state import Header, StateStore
from indexer_dagster.sync.historical import Decoder, new_sizer, rpc_client

LIVE = "live"
CURSOR = "live"
ANCHOR = "anchor"  # the block the follower was seeded at: range files hold it and everything below
BY_HASH_MAX_BLOCKS = 8  # fewer new blocks than this: fetch logs per block hash; more: by range, then verify


class ReorgTooDeep(RuntimeError):
    """The fork point is below the stored window of headers: live sync stops rather than guess."""


@dataclass
class TickResult:
    action: str  # "extended", "idle", "waiting", "reorg", "suspended"
    blocks: int = 0
    logs: int = 0
    tip: int | None = None
    reorg_id: int | None = None
    detail: str = ""


@dataclass
class FollowStats:
    ticks: int = 0
    blocks: int = 0
    logs: int = 0
    reorgs: list[int] = field(default_factory=list)
    note: str = ""


def follower_lease(chain: str) -> str:
    return f"{chain}:follower"


def range_lease(chain: str, key: str) -> str:
    return f"{chain}:range:{key}"


def lease_held(store: StateStore, name: str) -> bool:
    """True when some live process holds the lease `name` (leases die with their process)."""
    try:
        with store.writer_lock(name, timeout_s=0):
            return False
    except TimeoutError:
        return True


def follower_alive(store: StateStore, chain: str) -> bool:
    return lease_held(store, follower_lease(chain))


def live_segments(lake: Lake, dataset: str) -> list[tuple[int, int, "Path"]]:  # noqa: F821
    out = []
    for p in lake.files(f"{LIVE}/{dataset}"):
        a, b = p.stem.split("-")
        out.append((int(a), int(b), p))
    return sorted(out)


def live_datasets(cfg: IndexerConfig) -> list[str]:
    """Datasets in pipeline order: headers, raw logs, decoded events."""
    return ["blocks", "logs", *[f"events/{s.table}" for _, s in cfg.all_specs()]]


def header_of(block: dict) -> Header:
    return Header(
        number=int(block["number"], 16),
        hash=block["hash"].lower(),
        parent_hash=block["parentHash"].lower(),
        timestamp=int(block["timestamp"], 16),
    )


def headers_frame(chain_id: int, headers: list[Header]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "chain_id": [chain_id] * len(headers),
            "number": [h.number for h in headers],
            "hash": [h.hash for h in headers],
            "parent_hash": [h.parent_hash for h in headers],
            "timestamp": [h.timestamp * 1_000_000 for h in headers],
        },
        schema={**BLOCK_SCHEMA, "timestamp": pl.Int64},
    ).with_columns(pl.col("timestamp").cast(pl.Datetime("us", "UTC")))


class Follower:
    """Follows one chain's head; see the module docstring."""

    def __init__(self, cfg: IndexerConfig, store: StateStore, stats: RpcStats | None = None) -> None:
        self.cfg = cfg
        self.chain = cfg.chain.name
        self.store = store
        self.lake = Lake(cfg.data_dir, self.chain)
        self.stats = stats or RpcStats()
        self.addresses = sorted({a for c in cfg.contracts for a in c.addresses})
        self.window = cfg.chain.reorg_window

    # -- node access -------------------------------------------------------------------------
    async def _fetch_header(self, rpc: RpcClient, number: int) -> Header | None:
        block = await rpc.call("eth_getBlockByNumber", [hex(number), False])
        return header_of(block) if block else None

    async def _logs_by_hash(self, rpc: RpcClient, h: Header) -> pl.DataFrame:
        body = await rpc.call_raw("eth_getLogs", [{"blockHash": h.hash, "address": self.addresses}])
        return parse_logs_body(body, self.cfg.chain.chain_id)

    async def fetch_blocks(self, rpc: RpcClient, headers: list[Header]) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Blocks and logs for `headers` (consecutive), all from the fork those headers belong to."""
        blocks = headers_frame(self.cfg.chain.chain_id, headers)
        if len(headers) < BY_HASH_MAX_BLOCKS:
            parts = await asyncio.gather(*[self._logs_by_hash(rpc, h) for h in headers])
            logs = pl.concat(parts, how="vertical")
            if logs.height and not logs["block_hash"].is_in([h.hash for h in headers]).all():
                raise ForkChanged("the node answered logs of another block")
        else:
            fetcher = RangeFetcher(rpc, self.cfg.chain.chain_id, self.addresses, new_sizer(self.cfg),
                                   headers_batch_size=self.cfg.chain.headers_batch_size)
            chunk = await fetcher.chunk(headers[0].number, headers[-1].number)
            if chunk.blocks["hash"].to_list() != [h.hash for h in headers]:
                raise ForkChanged("the node changed fork while the new blocks were read")
            return blocks, chunk.logs
        stamped = logs.join(
            blocks.select(pl.col("number").alias("block_number"), pl.col("timestamp").alias("block_timestamp")),
            on="block_number", how="left",
        )
        return blocks, stamped.select(list(LOG_SCHEMA)).sort("block_number", "log_index")

    # -- local chain -------------------------------------------------------------------------
    def local_chain(self) -> LocalChain:
        tip = self.store.tip(self.chain)
        if tip is None:
            return LocalChain([])
        return LocalChain(self.store.headers(self.chain, tip.number - self.window, tip.number))

    async def seed(self, rpc: RpcClient) -> Header:
        """On first start, anchor the local chain at the node's head: blocks before it are the
        historical sync's, blocks after it the follower's (the views never show a block twice)."""
        tip = self.store.tip(self.chain)
        if tip is not None:
            return tip
        head = int(await rpc.call("eth_blockNumber"), 16)
        anchor = max(head - 1, self.cfg.start_block - 1, 0)
        # The window below the anchor too, so a reorg reaching into history is still detected.
        numbers = range(max(anchor - self.window + 1, 0), anchor + 1)
        results = await rpc.batch("eth_getBlockByNumber", [[hex(n), False] for n in numbers])
        window = [header_of(b) for b in results if b]
        if len(window) != len(numbers) or any(b.parent_hash != a.hash for a, b in zip(window, window[1:])):
            raise ForkChanged("the node changed fork while the local chain was seeded; retrying")
        with self.store.writer_lock(self.chain):
            if self.store.tip(self.chain) is None:
                self.store.put_headers(self.chain, window)
                self.store.set_cursor(self.chain, CURSOR, window[-1].number, window[-1].hash)
                self.store.set_cursor(self.chain, ANCHOR, window[-1].number, window[-1].hash)
        return self.store.tip(self.chain)

    def remove_stale_segments(self) -> int:
        """Delete live segments above the stored tip (left by a crash between publish and store)."""
        tip = self.store.tip(self.chain)
        if tip is None:
            return 0
        removed = 0
        with self.store.writer_lock(self.chain):
            for ds in live_datasets(self.cfg):
                for first, _last, path in live_segments(self.lake, ds):
                    if first > tip.number:
                        path.unlink(missing_ok=True)
                        removed += 1
        return removed

    # -- one step ----------------------------------------------------------------------------
    async def tick(self, rpc: RpcClient) -> TickResult:
        if self.store.active_reorg(self.chain) is not None:
            return TickResult("suspended", detail="a reorg is being repaired")
        local = self.local_chain()
        node_head = int(await rpc.call("eth_blockNumber"), 16)
        step = await next_step(local, node_head, lambda n: self._fetch_header(rpc, n), max_batch=200)
        if isinstance(step, Wait):
            return TickResult("waiting", tip=local.tip.number, detail=step.reason)
        if isinstance(step, TooDeep):
            raise ReorgTooDeep(
                f"{self.chain}: the node's chain differs from the indexed one down to block {step.lowest_checked}, "
                f"the bottom of the stored window ({self.window} blocks); live sync stopped. Raise "
                "chain.reorg_window or re-run the backfill of the affected ranges, then restart."
            )
        if isinstance(step, Reorg):
            reorg = self.open_reorg(step, node_head)
            return TickResult("reorg", tip=local.tip.number, reorg_id=reorg.id,
                              detail=f"fork at {step.ancestor.number}, depth {step.depth}")
        assert isinstance(step, Extend)
        if not step.headers:
            await self._record_head(rpc, node_head)
            return TickResult("idle", tip=local.tip.number)
        return await self._write(rpc, local, step.headers, node_head)

    def open_reorg(self, step: Reorg, node_head: int):
        ancestor, tip = step.ancestor, step.old_tip
        ranges = ranges_between(ancestor.number + 1, max(tip.number, ancestor.number + 1),
                                self.cfg.chain.blocks_per_partition)
        head_file = self.lake.path("_meta", "head")
        confirmed_through = None
        if head_file.is_file():
            confirmed_through = pl.read_parquet(head_file)["confirmed_through"][0]
        touched_confirmed = confirmed_through is not None and ancestor.number + 1 <= confirmed_through
        new_tip = step.new_chain[-1] if step.new_chain else ancestor
        return self.store.open_reorg(
            self.chain, ancestor.number, ancestor.hash, tip.number, tip.hash, new_tip.number, new_tip.hash,
            step.new_chain, [r.key for r in ranges], touched_confirmed,
        )

    async def _record_head(self, rpc: RpcClient, node_head: int) -> None:
        tip = self.store.tip(self.chain)
        if tip is not None:
            record_head(self.lake, self.cfg.chain.chain_id, tip.number, tip.hash, self.cfg.chain.confirmations)

    async def _write(self, rpc: RpcClient, local: LocalChain, headers: list[Header], node_head: int) -> TickResult:
        try:
            blocks, logs = await self.fetch_blocks(rpc, headers)
        except ForkChanged as e:
            return TickResult("waiting", tip=local.tip.number, detail=str(e))
        parent = local.tip
        key = f"{headers[0].number:012d}-{headers[-1].number:012d}"
        decoder = Decoder(self.cfg, None)

        @contextmanager
        def guard():
            with self.store.writer_lock(self.chain):
                tip = self.store.tip(self.chain)
                if self.store.active_reorg(self.chain) is not None or tip is None or tip.hash != parent.hash:
                    raise ForkChanged("the local chain changed while the new blocks were fetched")
                yield
                # Files are visible; now the headers (a crash in between is cleaned up at start).
                self.store.put_headers(self.chain, headers)
                self.store.set_cursor(self.chain, CURSOR, headers[-1].number, headers[-1].hash)
                self.store.prune_headers_below(self.chain, headers[-1].number - self.window)

        try:
            with self.lake.transaction(guard) as tx:
                tx.writer(f"{LIVE}/blocks", key, BLOCK_SCHEMA).write(blocks)
                tx.writer(f"{LIVE}/logs", key, LOG_SCHEMA).write(logs)
                decoder.open(tx, key, prefix=f"{LIVE}/")
                decoder.write(logs)
                decoder.flush()
        except ForkChanged as e:
            return TickResult("waiting", tip=parent.number, detail=str(e))
        record_head(self.lake, self.cfg.chain.chain_id, headers[-1].number, headers[-1].hash,
                    self.cfg.chain.confirmations)
        return TickResult("extended", blocks=len(headers), logs=logs.height, tip=headers[-1].number)

    # -- the loop ----------------------------------------------------------------------------
    def lease_name(self) -> str:
        return follower_lease(self.chain)

    async def run(
        self,
        should_stop: Callable[[], bool],
        poll_s: float = 0.25,
        on_tick: Callable[[TickResult], None] | None = None,
    ) -> FollowStats:
        stats = FollowStats()
        try:
            # One follower per chain: held for the run's life, released by the OS if the process dies.
            lease = self.store.writer_lock(self.lease_name(), timeout_s=10)
            lease.__enter__()
        except TimeoutError:
            stats.note = "another follower holds the lease; this one exits"
            return stats
        try:
            return await self._run(stats, should_stop, poll_s, on_tick)
        finally:
            lease.__exit__(None, None, None)

    async def _run(self, stats: FollowStats, should_stop, poll_s, on_tick) -> FollowStats:
        async with rpc_client(self.cfg, self.stats) as rpc:
            await self.seed(rpc)
            self.remove_stale_segments()
            while not should_stop():
                res = await self.tick(rpc)
                stats.ticks += 1
                stats.blocks += res.blocks
                stats.logs += res.logs
                if res.reorg_id is not None and res.reorg_id not in stats.reorgs:
                    stats.reorgs.append(res.reorg_id)
                if on_tick:
                    on_tick(res)
                if res.action != "extended":
                    await asyncio.sleep(poll_s)
        return stats


def follow(cfg: IndexerConfig, store: StateStore, seconds: float | None = None, **kw) -> FollowStats:
    """Follow the head for `seconds` (None: until interrupted)."""
    deadline = None if seconds is None else time.monotonic() + seconds
    return asyncio.run(Follower(cfg, store).run(lambda: deadline is not None and time.monotonic() > deadline, **kw))
