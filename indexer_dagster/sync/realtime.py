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
import itertools
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import polars as pl

from indexer_dagster.block_range import ranges_between
from indexer_dagster.chain.fetch import ForkChanged, RangeFetcher, logs_by_hash
from indexer_dagster.chain.rpc import RpcClient, RpcStats, rpc_client
from indexer_dagster.chain.verify import LogVerifier, verifier_for
from indexer_dagster.config import IndexerConfig
from indexer_dagster.health.alerts import halted_alert, send_alert
from indexer_dagster.health.logs import get_logger, log_context, register_config
from indexer_dagster.health.rpc_stats import RpcStatsRecorder
from indexer_dagster.persist.datasets import (
    BLOCK_SCHEMA,
    BLOCKS,
    HEAD,
    LIVE,
    LOG_SCHEMA,
    LOGS,
    META,
    live,
    live_datasets,
    live_segments,
)
from indexer_dagster.persist.files import read_parquet
from indexer_dagster.persist.lake import open_lake
from indexer_dagster.persist.meta import record_head
from indexer_dagster.persist.windows import block_files, read_window
from indexer_dagster.reorg.detect import Extend, LocalChain, Reorg, TooDeep, Wait, next_step
from indexer_dagster.state import ChainHalted, Header, StateStore
from indexer_dagster.sync.contracts import (
    ContractSet,
    coverage_metadata,
    discover,
    has_factories,
    stored_children,
    wanted_coverage,
)
from indexer_dagster.sync.historical import Decoder, new_sizer
from indexer_dagster.sync.supervise import highest_block
from indexer_dagster.urls import redact_to_host

log = get_logger(__name__)
_RAW_LOG_COLUMNS = [c for c in LOG_SCHEMA if c != "block_timestamp"]
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
    tip_hash: str | None = None  # of the block written last ("extended")


@dataclass
class FollowStats:
    ticks: int = 0
    blocks: int = 0
    logs: int = 0
    reorgs: list[int] = field(default_factory=list)
    note: str = ""


def halt_chain(cfg: IndexerConfig, store: StateStore, reason: str, reorg_id: int | None = None) -> None:
    """Halt the chain durably (see `state.Halt`) and alert the operator, once: the first halt's reason stays."""
    if store.halted(cfg.chain.name) is None:
        halt = store.halt(cfg.chain.name, reason, reorg_id=reorg_id)
        send_alert(cfg.alerts, halted_alert(cfg.chain.name, halt.reason, halt.reorg_id))


def follower_lease(chain: str) -> str:
    return f"{chain}:follower"


def range_lease(chain: str, key: str) -> str:
    return f"{chain}:range:{key}"


def run_lease(run_id: str) -> str:
    """Held by a Dagster run's step for as long as it runs (the sensor's sign of life)."""
    return f"run:{run_id}"


def lease_held(store: StateStore, name: str) -> bool:
    """True when some live process holds the lease `name` (leases die with their process)."""
    try:
        with store.writer_lock(name, timeout_s=0):
            return False
    except TimeoutError:
        return True


def follower_alive(store: StateStore, chain: str) -> bool:
    return lease_held(store, follower_lease(chain))



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


class _RangeFilesForked(Exception):
    """Range files hold blocks of another fork where the follower is about to extend: their blocks from
    there on (`stale`), the first of which differs from the node's at block `fork`."""

    def __init__(self, stale: pl.DataFrame, fork: int) -> None:
        super().__init__(f"range files hold another fork from block {fork}")
        self.stale, self.fork = stale, fork


class Follower:
    """Follows one chain's head; see the module docstring."""

    def __init__(self, cfg: IndexerConfig, store: StateStore, stats: RpcStats | None = None) -> None:
        self.cfg = cfg
        self.chain = cfg.chain.name
        self.store = store
        self.lake = open_lake(cfg, self.chain)
        self.stats = stats or RpcStats()
        self.addresses = sorted({a for c in cfg.contracts for a in c.addresses})
        assert cfg.chain.reorg_window is not None  # ChainConfig sets its default
        self.window = cfg.chain.reorg_window
        # Factory children: the registry in the lake, reloaded after a reorg (which may remove some),
        # plus children found in the blocks this follower fetches.
        self.factories = has_factories(cfg)
        self.contracts: ContractSet | None = None
        self._contracts_epoch: int | None = None
        # Missing-log detection: the blooms of headers read lately (by hash), and the verifier.
        self._blooms: dict[str, str | None] = {}
        self._verifier: tuple[tuple[str, ...], LogVerifier] | None = None

    def contract_set(self) -> ContractSet:
        epoch = self.store.reorg_epoch(self.chain)
        if self.contracts is None or epoch != self._contracts_epoch:
            self.contracts, self._contracts_epoch = ContractSet(self.cfg, stored_children(self.cfg)), epoch
            self.addresses = self.contracts.addresses()
        return self.contracts

    # -- node access -------------------------------------------------------------------------
    async def _fetch_header(self, rpc: RpcClient, number: int) -> Header | None:
        block = await rpc.call("eth_getBlockByNumber", [hex(number), False])
        if block:
            self._blooms[block["hash"].lower()] = block.get("logsBloom")
            while len(self._blooms) > 4 * self.window + 256:
                self._blooms.pop(next(iter(self._blooms)))
        return header_of(block) if block else None

    def _fetcher(self, rpc: RpcClient) -> RangeFetcher:
        """A fetcher of the current addresses, with missing-log detection (`chain.verify_logs`)."""
        key = tuple(self.addresses)
        if self._verifier is None or self._verifier[0] != key:
            self._verifier = (key, verifier_for(self.cfg, self.addresses))
        return RangeFetcher(rpc, self.cfg.chain.chain_id, self.addresses, new_sizer(self.cfg),
                            headers_batch_size=self.cfg.chain.headers_batch_size,
                            verifier=self._verifier[1], verify_mode=self.cfg.chain.verify_logs)

    async def _logs_by_hash(self, rpc: RpcClient, h: Header, addresses: list[str] | None = None) -> pl.DataFrame:
        # ForkChanged when the node no longer knows the block: the tick waits and checks the fork again.
        return await logs_by_hash(rpc, h.hash, addresses or self.addresses, self.cfg.chain.chain_id)

    async def _new_children_logs(self, rpc: RpcClient, headers: list[Header], logs: pl.DataFrame) -> pl.DataFrame:
        """Children created in these blocks (found in their factory logs): register them and fetch
        their logs of the blocks from their creation on, so a child's first events are not missed."""
        new = self.contract_set().add(discover(self.cfg, logs))
        if new.height == 0:
            return logs
        assert self.contracts is not None  # loaded by contract_set()
        self.addresses = self.contracts.addresses()
        born = dict(zip(new["address"].to_list(), new["block_number"].to_list()))
        parts = [logs.select(list(_RAW_LOG_COLUMNS))]
        for h in headers:
            wanted = sorted(a for a, b in born.items() if b <= h.number)
            if wanted:
                extra = await self._logs_by_hash(rpc, h, wanted)
                if extra.height and not (extra["block_hash"] == h.hash).all():
                    raise ForkChanged("the node answered logs of another block")
                parts.append(extra.select(list(_RAW_LOG_COLUMNS)))
        return pl.concat(parts, how="vertical").unique(["block_number", "log_index"], keep="first")

    async def fetch_blocks(self, rpc: RpcClient, headers: list[Header]) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Blocks and logs for `headers` (consecutive), all from the fork those headers belong to."""
        blocks = headers_frame(self.cfg.chain.chain_id, headers)
        if self.factories:
            self.contract_set()
        if len(headers) < BY_HASH_MAX_BLOCKS:
            async def by_hash() -> pl.DataFrame:
                parts = await asyncio.gather(*[self._logs_by_hash(rpc, h) for h in headers])
                out = pl.concat(parts, how="vertical")
                if out.height and not out["block_hash"].is_in([h.hash for h in headers]).all():
                    raise ForkChanged("the node answered logs of another block")
                return out

            blooms = pl.Series("logs_bloom", [self._blooms.get(h.hash) for h in headers], pl.String)
            logs = await self._fetcher(rpc).verified(blocks.with_columns(blooms), await by_hash(), by_hash)
        else:
            fetcher = self._fetcher(rpc)
            chunk = await fetcher.chunk(headers[0].number, headers[-1].number)
            if chunk.blocks["hash"].to_list() != [h.hash for h in headers]:
                raise ForkChanged("the node changed fork while the new blocks were read")
            if not self.factories:
                return blocks, chunk.logs
            logs = chunk.logs.drop("block_timestamp")
        if self.factories:
            logs = await self._new_children_logs(rpc, headers, logs)
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
        if len(window) != len(numbers) or any(b.parent_hash != a.hash for a, b in itertools.pairwise(window)):
            raise ForkChanged("the node changed fork while the local chain was seeded; retrying")
        with self.store.writer_lock(self.chain):
            if self.store.tip(self.chain) is None:
                self.store.put_headers(self.chain, window)
                self.store.set_cursor(self.chain, CURSOR, window[-1].number, window[-1].hash)
                self.store.set_cursor(self.chain, ANCHOR, window[-1].number, window[-1].hash)
        tip = self.store.tip(self.chain)
        assert tip is not None  # seeded above (by this follower or a concurrent one)
        return tip

    def remove_stale_segments(self) -> int:
        """Delete live segments above the stored tip (left by a crash between publish and store), and
        the gate's mark of a repair that has finished (left by a crash just after it finished).

        Not while a reorg is active: its restore publishes a segment before it stores the new fork's
        headers, and that segment is no leftover."""
        with self.store.writer_lock(self.chain):
            tip = self.store.tip(self.chain)
            if tip is None or self.store.active_reorg(self.chain) is not None:
                return 0
            if self.lake.gate.repair() is not None:
                self.lake.gate.clear_repair()
            stale = [path for ds in live_datasets(self.cfg)
                     for first, _last, path in live_segments(self.lake, ds) if first > tip.number]
            if stale:
                with self.lake.transaction() as tx:  # one publish: readers see all of them go at once
                    for path in stale:
                        tx.delete(path)
        return len(stale)

    # -- one step ----------------------------------------------------------------------------
    async def tick(self, rpc: RpcClient) -> TickResult:
        if (halt := self.store.halted(self.chain)) is not None:
            return TickResult("halted", detail=halt.reason)
        if self.store.active_reorg(self.chain) is not None:
            return TickResult("suspended", detail="a reorg is being repaired")
        local = self.local_chain()
        node_head = int(await rpc.call("eth_blockNumber"), 16)
        step = await next_step(local, node_head, lambda n: self._fetch_header(rpc, n), max_batch=200)
        assert local.tip is not None  # next_step raises on an empty local chain
        if isinstance(step, Wait):
            return TickResult("waiting", tip=local.tip.number, detail=step.reason)
        if isinstance(step, TooDeep):
            why = (f"the node's chain differs from the indexed one down to block {step.lowest_checked}, the "
                   f"bottom of the stored window ({self.window} blocks): raise chain.reorg_window or re-run the "
                   "backfill of the affected ranges")
            # Durably: no writer of this chain (follower, range runs, compaction, DEX) publishes until
            # an operator resumes it, so the two forks are never mixed in the files.
            halt_chain(self.cfg, self.store, why)
            raise ReorgTooDeep(f"{self.chain}: {why}; live sync stopped, the chain is halted until "
                               f"`indexer resume --chain {self.chain}`.")
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
        head_file = self.lake.path(META, HEAD)
        confirmed_through = None
        if head_file.is_file():
            confirmed_through = read_parquet(head_file)["confirmed_through"][0]
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
        assert local.tip is not None  # called by tick() after next_step, which needs a tip
        try:
            blocks, logs = await self.fetch_blocks(rpc, headers)
        except ForkChanged as e:
            return TickResult("waiting", tip=local.tip.number, detail=str(e))
        parent = local.tip
        key = f"{headers[0].number:012d}-{headers[-1].number:012d}"
        decoder = Decoder(self.cfg, None, self.contracts)

        @contextmanager
        def guard():
            with self.store.writer_lock(self.chain):
                self.store.check_not_halted(self.chain)
                tip = self.store.tip(self.chain)
                if self.store.active_reorg(self.chain) is not None or tip is None or tip.hash != parent.hash:
                    raise ForkChanged("the local chain changed while the new blocks were fetched")
                if (forked := self._range_blocks_of_another_fork(headers)) is not None:
                    raise _RangeFilesForked(*forked)
                yield
                # Files are visible; now the headers (a crash in between is cleaned up at start).
                self.store.put_headers(self.chain, headers)
                self.store.set_cursor(self.chain, CURSOR, headers[-1].number, headers[-1].hash)
                self.store.prune_headers_below(self.chain, headers[-1].number - self.window)

        try:
            with self.lake.transaction(guard) as tx:
                tx.writer(live(BLOCKS), key, BLOCK_SCHEMA).write(blocks)
                tx.writer(live(LOGS), key, LOG_SCHEMA, coverage_metadata(wanted_coverage(self.cfg))).write(logs)
                decoder.open(tx, key, prefix=f"{LIVE}/")
                decoder.write(logs)
                decoder.flush()
        except ForkChanged as e:
            return TickResult("waiting", tip=parent.number, detail=str(e))
        except _RangeFilesForked as e:
            # A range run wrote these blocks before the follower got here, from a fork the node has left:
            # the blocks both agree on join the local chain, the rest is a reorg above them.
            fork = e.fork
            agreed = [h for h in headers if h.number < fork]
            if agreed:
                with self.store.writer_lock(self.chain):
                    self.store.put_headers(self.chain, agreed)
                    self.store.set_cursor(self.chain, CURSOR, agreed[-1].number, agreed[-1].hash)
            old_tip = e.stale.row(-1, named=True)
            step = Reorg(ancestor=agreed[-1] if agreed else parent, new_chain=[h for h in headers if h.number >= fork],
                         old_tip=Header(number=old_tip["number"], hash=old_tip["hash"],
                                        parent_hash=old_tip["parent_hash"],
                                        timestamp=int(old_tip["timestamp"].timestamp())))
            reorg = self.open_reorg(step, node_head)
            return TickResult("reorg", tip=step.ancestor.number, reorg_id=reorg.id,
                              detail=f"range files hold another fork from block {fork}")
        record_head(self.lake, self.cfg.chain.chain_id, headers[-1].number, headers[-1].hash,
                    self.cfg.chain.confirmations)
        return TickResult("extended", blocks=len(headers), logs=logs.height, tip=headers[-1].number,
                          tip_hash=headers[-1].hash)

    def _range_blocks_of_another_fork(self, headers: list[Header]) -> tuple[pl.DataFrame, int] | None:
        """(the range-file blocks from `headers[0]` on (number, hash, parent_hash, timestamp), the first
        block number where they differ from the node's in `headers`), if they do. Range files are written
        up to the node's head of their run, which may pass the follower's tip (a CLI backfill, the follower
        down meanwhile); the views prefer them, so they are checked here, where the follower reaches them."""
        ours = {h.number: h.hash for h in headers}
        for r in ranges_between(headers[0].number, headers[-1].number, self.cfg.chain.blocks_per_partition):
            path = self.lake.path(BLOCKS, r.key)
            if highest_block(path) < headers[0].number:
                continue
            with block_files([path], "number") as files:
                held = read_window(files, ["number", "hash", "parent_hash", "timestamp"], headers[0].number,
                                   r.end).sort("number")
            differ = [n for n, h in held.select("number", "hash").rows() if ours.get(n, h) != h]
            if differ:
                return held, differ[0]
        return None

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
            if (halt := self.store.halted(self.chain)) is not None:
                stats.note = str(ChainHalted(halt))  # nothing seeded, nothing removed: it waits for an operator
                log.error("%s", stats.note)
                return stats
            return await self._run(stats, should_stop, poll_s, on_tick)
        finally:
            lease.__exit__(None, None, None)

    async def _run(self, stats: FollowStats, should_stop, poll_s, on_tick) -> FollowStats:
        register_config(self.cfg)
        recorder = RpcStatsRecorder(self.cfg.data_dir, self.chain, self.stats)  # durable RPC counters
        with log_context(chain=self.chain):
            try:
                async with rpc_client(self.cfg, self.stats) as rpc:
                    tip = await self.seed(rpc)
                    self.remove_stale_segments()
                    log.info("following the head from block %d via %s", tip.number, redact_to_host(self.cfg.chain.endpoints[0]))
                    while not should_stop():
                        res = await self.tick(rpc)
                        stats.ticks += 1
                        stats.blocks += res.blocks
                        stats.logs += res.logs
                        if res.reorg_id is not None and res.reorg_id not in stats.reorgs:
                            stats.reorgs.append(res.reorg_id)
                            log.warning("reorg %d detected at tip %s: %s", res.reorg_id, res.tip, res.detail)
                        else:
                            log.debug("tick: %s tip=%s blocks=%d logs=%d %s", res.action, res.tip, res.blocks,
                                      res.logs, res.detail)
                        if on_tick:
                            on_tick(res)
                        if res.action == "halted":
                            log.error("chain %s is halted: %s; the follower exits", self.chain, res.detail)
                            break
                        recorder.maybe_flush()
                        if res.action != "extended":
                            await asyncio.sleep(poll_s)
            except Exception as e:
                log.warning("live sync stopped: %s: %s", type(e).__name__, e)
                raise
            finally:
                recorder.flush()
            log.info("live sync ended: %d ticks, %d blocks, %d logs", stats.ticks, stats.blocks, stats.logs)
        return stats


def follow(cfg: IndexerConfig, store: StateStore, seconds: float | None = None, **kw) -> FollowStats:
    """Follow the head for `seconds` (None: until interrupted)."""
    deadline = None if seconds is None else time.monotonic() + seconds
    return asyncio.run(Follower(cfg, store).run(lambda: deadline is not None and time.monotonic() > deadline, **kw))
