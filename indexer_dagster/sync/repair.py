"""The reorg protocol: suspend, roll back, restore — each step idempotent, resumable from its phase.

The ledger row (`state.Reorg`) is the durable reorg context: it is written before anything
is touched and its phase is advanced only after a step has completed, so a run killed at any point
is finished by the next run from the recorded phase, with the same end state.

- suspending: take the chain's writer lock once. Followers and backfills publish only under this
  lock and only while no reorg is active, so from here on nobody else writes the chain's files.
- rolling back, in reverse pipeline order (decoded events, raw logs, headers), for range files and
  live segments alike: rows above the common ancestor move to `<chain>/orphaned/<dataset>/` with
  `reorg_id` and `orphaned_at` (soft delete: nothing is lost), in one transaction per file (archive
  written first; a re-run finds the archive and only finishes the rewrite).
- restoring: range partitions that lost rows are fetched again from the new fork (a real
  re-materialization of those partitions); the blocks above them, up to the node's head, become a
  live segment; the local chain and the head are reset to the new fork.
"""

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import polars as pl

from indexer_dagster.block_range import BlockRange, parse_key
from indexer_dagster.chain.fetch import ForkChanged
from indexer_dagster.chain.rpc import call_sync, rpc_client
from indexer_dagster.config import IndexerConfig
from indexer_dagster.dex.incremental import rollback as dex_rollback
from indexer_dagster.dex.sources import enabled as dex_enabled
from indexer_dagster.persist.datasets import (
    BLOCK_SCHEMA,
    DEX_ROW_TABLES,
    LIVE,
    LOG_SCHEMA,
    ORPHAN_COLUMNS,
    ORPHANED,
    REORGS_SCHEMA,
    live_datasets,
)
from indexer_dagster.persist.datasets import dex as dex_dataset
from indexer_dagster.persist.files import LakePath, read_parquet, scan_parquet
from indexer_dagster.persist.lake import Lake, open_lake
from indexer_dagster.persist.meta import record_head, write_reorgs
from indexer_dagster.persist.windows import block_files, read_window
from indexer_dagster.reorg.detect import LocalChain, find_ancestor
from indexer_dagster.state import Header, Phase, Reorg, StateStore
from indexer_dagster.sync.contracts import coverage_metadata, wanted_coverage
from indexer_dagster.sync.historical import Decoder, sync_range
from indexer_dagster.sync.range_checks import CheckResult, verify_and_record
from indexer_dagster.sync.realtime import CURSOR, Follower, halt_chain


class ReorgAborted(RuntimeError):
    """The reorg cannot be repaired automatically (e.g. the new fork forks below the window)."""


@dataclass
class Restored:
    """What a restore re-fetched: the range partitions, and the blocks above them as a live segment."""

    partitions: list[str] = field(default_factory=list)
    live_blocks: tuple[int, int] | None = None  # (first, last), None when the ranges reach the head
    live_logs: int = 0


@dataclass
class RepairResult:
    reorg: Reorg
    restored: Restored = field(default_factory=Restored)  # what this run's (last) restore re-fetched
    archived: dict[str, int] = field(default_factory=dict)
    # The range checks of each restored range (sync.range_checks), run once the reorg is done.
    checks: dict[str, list[CheckResult]] = field(default_factory=dict)
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)  # this run's time in each phase

    @property
    def restored_partitions(self) -> list[str]:
        return self.restored.partitions


def _number_col(dataset: str) -> str:
    return "number" if dataset.endswith("blocks") else "block_number"


def _files_above(lake: Lake, dataset: str, ancestor: int) -> list[tuple[str, LakePath]]:
    """(archive name, path) of every range file and live segment of `dataset` holding blocks > ancestor."""
    out = []
    for prefix in ("", f"{LIVE}/"):
        for p in lake.files(prefix + dataset):
            last = int(p.stem.split("+", 1)[0].split("-")[1])  # a supplement file is `<range>+<fingerprint>`
            if last > ancestor:
                out.append((("live-" if prefix else "") + p.stem, p))
    return out


_NO_END = 2**62  # a block window without an end


def orphan_key(reorg_id: int, ancestor: int, name: str) -> str:
    """Archive file name: the reorg, the ancestor rolled back to (a merged, deeper reorg rolls back
    again to a lower one and archives the further rows in a file of its own) and the source file."""
    return f"r{reorg_id:06d}-a{ancestor:012d}-{name}"


def _source_name(archive: LakePath) -> str:
    return archive.stem.split("-", 2)[2]


def roll_back(cfg: IndexerConfig, store: StateStore, reorg: Reorg) -> dict[str, int]:
    """Move every row above the common ancestor to the archive; returns rows archived per dataset."""
    lake = open_lake(cfg)
    ancestor = reorg.common_ancestor
    orphaned_at = datetime.now(UTC)
    archived: dict[str, int] = {}
    if dex_enabled(cfg):  # derived data first: the DEX steps above the ancestor undone, their rows archived
        dex_rollback(cfg, ancestor, reorg.id)
        for table in DEX_ROW_TABLES:  # counted from the archive: a re-run after a crash counts the same
            if n := _archived_rows(lake, dex_dataset(table), reorg.id):
                archived[dex_dataset(table)] = n
                store.add_rows_archived(reorg.id, dex_dataset(table), n)
    for dataset in reversed(live_datasets(cfg)):  # events, then logs, then blocks
        col = _number_col(dataset)
        # Blocks a range file held: their live copies were hidden duplicates. Read from this pass's
        # archives too (this reorg, this ancestor), so a re-run after a crash dedupes the same way; an
        # earlier pass's range files say nothing about what a live segment holds now.
        in_range_files: set[int] = set()
        archive_dir = lake.dir(f"{ORPHANED}/{dataset}")
        if archive_dir.is_dir():
            for p in archive_dir.glob(orphan_key(reorg.id, ancestor, "*.parquet")):
                if not _source_name(p).startswith("live-"):
                    in_range_files.update(read_parquet(p, columns=[col])[col].to_list())
        for name, path in _files_above(lake, dataset, ancestor):  # range files first, then live segments
            # A window at a time: the rows above the ancestor (a reorg's few blocks) are read, the rest
            # copied a row group at a time, so a partition of any size is cut without holding it.
            with block_files([path], col) as (src,):
                above = read_window([src], list(src.schema), ancestor + 1, _NO_END)
                if above.height == 0:
                    continue
                orphans = above
                if name.startswith("live-"):
                    orphans = orphans.filter(~pl.col(col).is_in(sorted(in_range_files)))
                else:
                    in_range_files.update(orphans[col].unique().to_list())
                archive_ds, key = f"{ORPHANED}/{dataset}", orphan_key(reorg.id, ancestor, name)
                with lake.transaction() as tx:
                    if not lake.exists(archive_ds, key):
                        stamped = orphans.with_columns(
                            pl.lit(reorg.id, ORPHAN_COLUMNS["reorg_id"]).alias("reorg_id"),
                            pl.lit(orphaned_at).cast(ORPHAN_COLUMNS["orphaned_at"]).alias("orphaned_at"),
                        )
                        tx.writer(archive_ds, key, dict(stamped.schema)).write(stamped)
                    if src.rows == above.height and name.startswith("live-"):
                        tx.delete(path)  # nothing of the segment is kept
                    else:
                        w = tx.writer(dataset if not name.startswith("live-") else f"{LIVE}/{dataset}",
                                      path.stem, dict(src.schema))
                        for kept in src.batches(-_NO_END, ancestor):
                            w.write(kept)
        archived[dataset] = _archived_rows(lake, dataset, reorg.id)
        store.add_rows_archived(reorg.id, dataset, archived[dataset])
    store.delete_headers_above(cfg.chain.name, ancestor)
    return archived


def _archived_rows(lake: Lake, dataset: str, reorg_id: int) -> int:
    d = lake.dir(f"{ORPHANED}/{dataset}")
    if not d.is_dir():
        return 0
    return sum(scan_parquet(p).select(pl.len()).collect().item() for p in d.glob(f"r{reorg_id:06d}-*.parquet"))


def touched_ranges(cfg: IndexerConfig, reorg: Reorg) -> list[BlockRange]:
    """Range partitions whose files lost rows in this reorg (they are fetched again)."""
    lake = open_lake(cfg)
    d = lake.dir(f"{ORPHANED}/blocks")
    keys = set()
    if d.is_dir():
        for p in d.glob(f"r{reorg.id:06d}-*.parquet"):
            name = _source_name(p)
            if not name.startswith("live-"):
                keys.add(name)
    return sorted(parse_key(k) for k in keys)


async def _fetch_new_fork(cfg: IndexerConfig, store: StateStore, reorg: Reorg, live_from: int):
    """The new fork's headers from the ancestor + 1 to the node's head (checked to descend from the
    ancestor), and the blocks and logs of those from `live_from` on (the part no range file holds)."""
    follower = Follower(cfg, store)
    async with rpc_client(cfg) as rpc:
        head = int(await rpc.call("eth_blockNumber"), 16)
        ancestor = await follower._fetch_header(rpc, reorg.common_ancestor)
        if ancestor is None or ancestor.hash != reorg.ancestor_hash:
            raise ForkChanged(f"the common ancestor {reorg.common_ancestor} itself was reorganised")
        headers: list[Header] = []
        for n in range(reorg.common_ancestor + 1, head + 1):
            h = await follower._fetch_header(rpc, n)
            if h is None:
                break
            headers.append(h)
        parents = [ancestor.hash] + [h.hash for h in headers[:-1]]
        if any(h.parent_hash != p for h, p in zip(headers, parents)):
            raise ForkChanged("the node changed fork again during the restore")
        live = [h for h in headers if h.number >= live_from]
        if not live:
            return headers, None, None
        blocks, logs = await follower.fetch_blocks(rpc, live)
        return headers, blocks, logs


async def _rewalk(cfg: IndexerConfig, store: StateStore, reorg: Reorg) -> Reorg:
    """The fork moved below the recorded ancestor (a second reorg): find the new ancestor, merge it in."""
    follower = Follower(cfg, store)
    assert cfg.chain.reorg_window is not None  # ChainConfig sets its default
    window = store.headers(cfg.chain.name, reorg.common_ancestor - cfg.chain.reorg_window, reorg.common_ancestor)
    local = LocalChain(window)
    async with rpc_client(cfg) as rpc:
        ancestor, above, lowest = await find_ancestor(local, lambda n: follower._fetch_header(rpc, n),
                                                      reorg.common_ancestor)
        head = int(await rpc.call("eth_blockNumber"), 16)
    if ancestor is None:
        raise ReorgAborted(f"the new fork does not meet the stored chain above block {lowest}")
    tip = above[-1] if above else ancestor
    return store.extend_reorg(reorg.id, new_head=max(head, tip.number), new_head_hash=tip.hash, new_chain=above,
                              common_ancestor=ancestor.number, ancestor_hash=ancestor.hash)


def restore(cfg: IndexerConfig, store: StateStore, reorg: Reorg, on_partition: Callable[[str], None]) -> Restored:
    """Re-fetch the new fork: touched range partitions, then a live segment up to the head."""
    chain = cfg.chain.name
    lake = open_lake(cfg, chain)

    def ancestor_hash() -> str | None:
        block = call_sync(cfg.chain.endpoints, "eth_getBlockByNumber", [hex(reorg.common_ancestor), False])
        return block["hash"].lower() if block else None

    @contextmanager
    def ours():
        with store.writer_lock(chain):
            current = store.get_reorg(reorg.id)
            if current is None or current.phase is not Phase.RESTORING:
                raise ForkChanged("the reorg is no longer being restored")
            # Publish only while the ancestor is still canonical: if the node forked below it, the
            # files about to replace ours would drop old-fork rows that were never archived.
            if ancestor_hash() != reorg.ancestor_hash:
                raise ForkChanged(f"block {reorg.common_ancestor} was reorganised too")
            yield

    out = Restored()
    head = int(call_sync(cfg.chain.endpoints, "eth_blockNumber", []), 16)
    for r in touched_ranges(cfg, reorg):
        if r.start > head:
            continue  # a shorter fork: the range, emptied by the rollback, waits for the chain to grow
        sync_range(cfg, r, guard=ours)
        out.partitions.append(r.key)
        on_partition(r.key)
    live_from = max(reorg.common_ancestor + 1, _highest_range_block(lake) + 1)
    headers, blocks, logs = asyncio.run(_fetch_new_fork(cfg, store, reorg, live_from))
    with lake.transaction(ours) as tx:
        # An earlier attempt of this restore may have published its segment (under another key if the
        # head has moved since): the new one replaces it in the same transaction, never beside it.
        for path in _segments_above(lake, cfg, reorg.common_ancestor):
            tx.delete(path)
        if blocks is not None:
            out.live_blocks, out.live_logs = (blocks["number"][0], blocks["number"][-1]), logs.height
            key = f"{blocks['number'][0]:012d}-{blocks['number'][-1]:012d}"
            tx.writer(f"{LIVE}/blocks", key, BLOCK_SCHEMA).write(blocks)
            tx.writer(f"{LIVE}/logs", key, LOG_SCHEMA, coverage_metadata(wanted_coverage(cfg))).write(logs)
            decoder = Decoder(cfg, None)
            decoder.open(tx, key, prefix=f"{LIVE}/")
            decoder.write(logs)
            decoder.flush()
    _check_ranges_match(lake, out.partitions, headers)
    # The local chain restarts from the new fork: the stored ancestor + the headers just restored.
    # (If the node moved on meanwhile, the follower's next check finds it like any other change.)
    if headers:
        store.put_headers(chain, headers)
    tip = store.tip(chain)
    if tip is not None:
        store.set_cursor(chain, CURSOR, tip.number, tip.hash)
        record_head(lake, cfg.chain.chain_id, tip.number, tip.hash, cfg.chain.confirmations, force=True)
    return out


def _segments_above(lake: Lake, cfg: IndexerConfig, ancestor: int) -> list[LakePath]:
    """Live segments starting above the ancestor. Once rolled back, only a restore writes these."""
    return [p for dataset in live_datasets(cfg) for p in lake.files(f"{LIVE}/{dataset}")
            if parse_key(p.stem).start > ancestor]


def _check_ranges_match(lake: Lake, keys: list[str], headers: list[Header]) -> None:
    """The re-fetched range files must hold the same fork as the headers the local chain restarts from."""
    by_number = {h.number: h.hash for h in headers}
    if not by_number:
        return
    for key in keys:
        with block_files([lake.path("blocks", key)], "number") as files:
            blocks = read_window(files, ["number", "hash"], min(by_number), max(by_number))
        for number, block_hash in blocks.iter_rows():
            if number in by_number and by_number[number] != block_hash:
                raise ForkChanged(f"range {key} was re-fetched from another fork than block {number}'s header")


def _highest_range_block(lake: Lake) -> int:
    ends = [scan_parquet(p).select(pl.col("number").max()).collect().item() for p in lake.files("blocks")]
    return max([e for e in ends if e is not None], default=-1)


def export_ledger(cfg: IndexerConfig, store: StateStore) -> None:
    """Write the ledger to `<chain>/_meta/reorgs.parquet`, which the `reorgs` view reads."""
    write_reorgs(open_lake(cfg), ledger_frame(store.list_reorgs(cfg.chain.name)))




def ledger_frame(reorgs: list[Reorg]) -> pl.DataFrame:
    rows = [
        {
            "chain": r.chain, "reorg_id": r.id, "detected_at": r.detected_at,
            "common_ancestor": r.common_ancestor, "ancestor_hash": r.ancestor_hash, "depth": r.depth,
            "old_head": r.old_head, "old_head_hash": r.old_head_hash, "new_head": r.new_head,
            "new_head_hash": r.new_head_hash, "phase": r.phase.value,
            "affected_partitions": ",".join(r.affected_partitions),
            "rows_archived": sum(r.rows_archived.values()),
            "rows_archived_by_dataset": json.dumps(r.rows_archived, sort_keys=True),
            "touched_confirmed": r.touched_confirmed, "updated_at": r.updated_at,
            "finished_at": r.finished_at, "note": r.note or "",
        }
        for r in reorgs
    ]
    return pl.DataFrame(rows, schema=REORGS_SCHEMA)


def repair(
    cfg: IndexerConfig,
    store: StateStore,
    reorg_id: int,
    on_phase: Callable[[Phase], None] | None = None,
    on_partition: Callable[[str], None] | None = None,
    on_report: Callable[[str], None] | None = None,
) -> RepairResult:
    """Carry reorg `reorg_id` from its recorded phase to done. One that cannot be repaired automatically
    (ReorgAborted: the new fork does not meet the stored window) is marked failed and halts the chain:
    relaunching it would only repeat the failure over rolled-back data. `on_report` gets one line per
    finished phase saying what it did (blocks, datasets, rows, seconds): what an operator reads."""
    try:
        return _repair(cfg, store, reorg_id, on_phase, on_partition, on_report or (lambda _line: None))
    except ReorgAborted as e:
        reason = f"reorg {reorg_id} cannot be repaired: {e}; raise chain.reorg_window or re-run the backfill of the affected ranges"
        halt_chain(cfg, store, reason, reorg_id=reorg_id)
        current = store.get_reorg(reorg_id)
        if current is not None and not current.finished:
            store.set_phase(reorg_id, Phase.FAILED, note=str(e))
        export_ledger(cfg, store)
        # Readers stop waiting: the halted chain's lake holds what it had up to the fork point.
        open_lake(cfg).gate.end_repair(reorg_id)
        raise


def _repair(
    cfg: IndexerConfig,
    store: StateStore,
    reorg_id: int,
    on_phase: Callable[[Phase], None] | None,
    on_partition: Callable[[str], None] | None,
    report: Callable[[str], None],
) -> RepairResult:
    started = time.perf_counter()
    chain = cfg.chain.name
    notify = on_phase or (lambda _p: None)
    first = store.get_reorg(reorg_id)
    if first is None:
        raise ValueError(f"no reorg {reorg_id} in the ledger")
    result = RepairResult(reorg=first)
    gate = open_lake(cfg).gate

    @contextmanager
    def timed(phase: Phase) -> Iterator[None]:
        notify(phase)
        t0 = time.perf_counter()
        yield
        result.phase_seconds[phase.value] = result.phase_seconds.get(phase.value, 0.0) + time.perf_counter() - t0

    for _attempt in range(5):
        reorg = store.get_reorg(reorg_id)
        if reorg is None:
            raise ValueError(f"no reorg {reorg_id} in the ledger")
        if reorg.phase is Phase.DETECTED:
            reorg = store.set_phase(reorg_id, Phase.SUSPENDING, expect=Phase.DETECTED)
            export_ledger(cfg, store)
        if reorg.phase is Phase.SUSPENDING:
            with timed(Phase.SUSPENDING), store.writer_lock(chain):
                pass  # any publish in flight has finished; new ones see the active reorg and stop
            report(f"suspended: the writer lock of {chain} is held, no file is published but the repair's "
                   f"({result.phase_seconds[Phase.SUSPENDING.value]:.2f} s)")
            reorg = store.set_phase(reorg_id, Phase.ROLLING_BACK, expect=Phase.SUSPENDING)
            export_ledger(cfg, store)
        if reorg.phase in (Phase.ROLLING_BACK, Phase.RESTORING):
            # From the first row rolled back to the last one restored, queries wait (`persist.gate`).
            gate.begin_repair(reorg_id)
        if reorg.phase is Phase.ROLLING_BACK:
            with timed(Phase.ROLLING_BACK), store.writer_lock(chain):
                result.archived = roll_back(cfg, store, reorg)
            rows = ", ".join(f"{ds} {n}" for ds, n in result.archived.items() if n) or "none"
            report(f"rolled back blocks {reorg.common_ancestor + 1}..{reorg.old_head} (fork point "
                   f"{reorg.common_ancestor}, depth {reorg.depth}); rows archived to orphaned/: {rows} "
                   f"({result.phase_seconds[Phase.ROLLING_BACK.value]:.2f} s)")
            reorg = store.set_phase(reorg_id, Phase.RESTORING, expect=Phase.ROLLING_BACK)
            export_ledger(cfg, store)
        if reorg.phase is Phase.RESTORING:
            try:
                with timed(Phase.RESTORING):
                    restored = result.restored = restore(cfg, store, reorg, on_partition or (lambda _k: None))
            except ForkChanged as e:
                # A second reorg under the first: merge it, roll back to the new ancestor, restore again.
                report(f"the node changed fork during the restore ({e}): merging the new fork and repairing again")
                reorg = _rewalk_and_reopen(cfg, store, reorg)
                continue
            live = (f"live blocks {restored.live_blocks[0]}..{restored.live_blocks[1]} ({restored.live_logs} logs)"
                    if restored.live_blocks else "no live blocks")
            report(f"restored from the new fork: ranges {', '.join(restored.partitions) or 'none'}, {live} "
                   f"({result.phase_seconds[Phase.RESTORING.value]:.2f} s)")
            reorg = store.set_phase(reorg_id, Phase.DONE, expect=Phase.RESTORING)
            export_ledger(cfg, store)
        break
    final = store.get_reorg(reorg_id)
    assert final is not None  # the ledger never drops a reorg
    result.reorg = final
    if result.reorg.phase is Phase.DONE:
        gate.end_repair(reorg_id)  # also when an earlier run died between DONE and this line
        # The same checks a range run makes: a restored range that fails stays unconfirmed and is synced
        # again by the sensor, like any other failed range.
        result.checks = {key: verify_and_record(cfg, parse_key(key)) for key in result.restored_partitions}
    result.seconds = time.perf_counter() - started
    return result


def _rewalk_and_reopen(cfg: IndexerConfig, store: StateStore, reorg: Reorg) -> Reorg:
    merged = asyncio.run(_rewalk(cfg, store, reorg))
    if merged.common_ancestor < reorg.common_ancestor:
        return store.set_phase(reorg.id, Phase.ROLLING_BACK, expect=Phase.RESTORING, note="merged a deeper reorg")
    return merged
