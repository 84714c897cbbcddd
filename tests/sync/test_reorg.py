"""Reorgs on a real anvil chain with different Uniswap transactions on the new fork.

After each scenario the canonical views must equal the node row for row, every orphaned row must be
in the archive under its reorg id, and the ledger must list the reorg with its phase `done`.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap

import polars as pl
import pytest

from indexer_dagster.block_range import ranges_between
from indexer_dagster.chain.rpc import rpc_client
from indexer_dagster.config import load_config
from indexer_dagster.devnet import Anvil, build_devnet, write_config
from indexer_dagster.devnet.uniswap import generate_traffic
from indexer_dagster.devnet.uniswap import reorg as anvil_reorg
from indexer_dagster.persist.catalog import build_catalog, read_views
from indexer_dagster.persist.lake import open_lake
from indexer_dagster.query import query
from indexer_dagster.state import ChainHalted, Phase, open_state
from indexer_dagster.sync.historical import sync_range
from indexer_dagster.sync.range_checks import CHECKS
from indexer_dagster.sync.realtime import ANCHOR, Follower
from indexer_dagster.sync.repair import repair
from indexer_dagster.sync.supervise import history_due
from tests.health.test_alerts import add_alerts
from tests.sync.test_historical import node_logs

pytestmark = pytest.mark.slow


@pytest.fixture
def chain(tmp_path):
    """A fresh anvil (reorgs change it) with the Uniswap V2 deployment and 25 blocks of traffic."""
    node = Anvil(chain_id=31337).start()
    try:
        dep = build_devnet(node, blocks=25, txs_per_block=8, seed=3)
        path = write_config(tmp_path / "indexer.yaml", node.url, 31337, dep, "data",
                            blocks_per_partition=10, confirmations=4)
        yield node, dep, load_config(path)
    finally:
        node.stop()


def backfill_plain(cfg):
    head = int(_rpc(cfg, "eth_blockNumber"), 16)
    for r in ranges_between(cfg.start_block, head, cfg.chain.blocks_per_partition):
        sync_range(cfg, r)


def _rpc(cfg, method, params=()):
    from indexer_dagster.devnet import rpc
    return rpc(cfg.chain.rpc_url, method, list(params))


def fill_history(cfg, store):
    """What the chain-head sensor does below the follower's anchor: range runs until the files reach it."""
    anchor = store.get_cursor(cfg.chain.name, ANCHOR)
    lake_blocks = open_lake(cfg).dir("blocks")
    for r in history_due(lake_blocks, cfg.start_block, cfg.chain.blocks_per_partition, anchor[0]):
        sync_range(cfg, r)


def follow_until_synced(cfg, store, max_ticks=50):
    """Tick the follower until its tip is the node's head (or a reorg is recorded), with history filled."""
    async def go():
        f = Follower(cfg, store)
        results = []
        async with rpc_client(cfg) as rpc:
            await f.seed(rpc)
            await asyncio.to_thread(fill_history, cfg, store)
            for _ in range(max_ticks):
                res = await f.tick(rpc)
                results.append(res)
                if res.action in ("reorg", "suspended"):
                    break
                head = int(await rpc.call("eth_blockNumber"), 16)
                if res.action == "idle" and res.tip == head:
                    break
        return results
    return asyncio.run(go())


def indexed_live(cfg, node, dep, blocks, txs_per_block, seed):
    """History backfilled, the follower seeded, `blocks` more blocks of traffic, all indexed live."""
    backfill_plain(cfg)
    store = open_state(cfg.state_url)
    follow_until_synced(cfg, store)
    generate_traffic(node.url, dep, blocks=blocks, txs_per_block=txs_per_block, seed=seed)
    follow_until_synced(cfg, store)
    return store


def reorg_found_live(chain, depth: int = 3):
    """Six blocks indexed live, then a reorg of `depth` the follower has found and not yet repaired:
    (store, the active reorg, what anvil_reorg expected)."""
    node, dep, cfg = chain
    store = indexed_live(cfg, node, dep, blocks=6, txs_per_block=6, seed=11)
    expected = anvil_reorg(node.url, dep, depth=depth, txs_per_block=5, seed=99)
    assert follow_until_synced(cfg, store)[-1].action == "reorg"
    return store, store.active_reorg(cfg.chain.name), expected


def assert_views_equal_node(cfg, node):
    build_catalog(cfg)
    head = node.block_number()
    addresses = [a for c in cfg.contracts for a in c.addresses]
    expected = node_logs(node.url, addresses, 0, head)
    got = query(cfg.duckdb_path, "select * from logs order by block_number, log_index")
    assert got.height == expected.height
    assert got.select(expected.columns).equals(expected)
    blocks = query(cfg.duckdb_path, "select number, hash from blocks order by number")
    assert blocks["number"].to_list() == list(range(0, head + 1))
    node_hashes = [node.rpc("eth_getBlockByNumber", [hex(n), False])["hash"] for n in range(head + 1)]
    assert blocks["hash"].to_list() == node_hashes
    # Every decoded table holds one row per log of its event and contracts, from the node's blocks.
    for table, logs in _logs_per_table(cfg, expected).items():
        got = query(cfg.duckdb_path, f"select block_number, log_index, block_hash from {table} order by all")
        assert got.equals(logs.select("block_number", "log_index", "block_hash").sort(pl.all())), table


def _logs_per_table(cfg, logs: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """The node's logs each decoded table is made of (its event's topic, its contracts' addresses)."""
    wanted: dict[str, tuple[str, set[str]]] = {}
    for contract, spec in cfg.all_specs():
        addresses = wanted.setdefault(spec.table, (spec.topic0, set()))[1]
        addresses.update(a.lower() for a in contract.addresses)
    return {t: logs.filter((pl.col("topic0") == topic) & pl.col("address").is_in(sorted(addresses)))
            for t, (topic, addresses) in wanted.items()}


def test_tip_reorg_in_the_live_region(chain):
    node, dep, cfg = chain
    store = indexed_live(cfg, node, dep, blocks=6, txs_per_block=6, seed=11)
    assert store.tip(cfg.chain.name).number == node.block_number()
    assert_views_equal_node(cfg, node)
    before = query(cfg.duckdb_path, "select * from logs where block_number > %d" % (node.block_number() - 3))

    expected = anvil_reorg(node.url, dep, depth=3, txs_per_block=5, seed=99)
    assert expected["old_hashes"] != expected["new_hashes"]
    res = follow_until_synced(cfg, store)
    assert res[-1].action == "reorg"
    r = store.active_reorg(cfg.chain.name)
    assert r.common_ancestor == expected["ancestor"] and r.depth == 3 and not r.touched_confirmed

    done = repair(cfg, store, r.id)
    assert done.reorg.phase is Phase.DONE
    assert_views_equal_node(cfg, node)
    orphaned = query(cfg.duckdb_path, "select * from orphaned_logs order by block_number, log_index")
    assert orphaned.height == before.height and set(orphaned["reorg_id"]) == {r.id}
    assert orphaned.select(before.columns[:-1]).equals(before.drop("status"))
    ledger = query(cfg.duckdb_path, "select * from reorgs")
    assert ledger.height == 1 and ledger["phase"][0] == "done" and ledger["depth"][0] == 3
    assert ledger["rows_archived"][0] > 0
    # The follower carries on from the new fork.
    generate_traffic(node.url, dep, blocks=2, txs_per_block=4, seed=12)
    assert follow_until_synced(cfg, store)[-1].action in ("idle", "extended")
    assert_views_equal_node(cfg, node)


def test_a_query_during_a_repair_sees_the_old_fork_or_the_new_one(chain, monkeypatch):
    """Readers during a repair (issue 13): between the rollback and the end of the restore the lake holds
    the chain cut at the fork point, a state no node ever had. A query then waits for the repair."""
    import threading

    from indexer_dagster.sync import repair as repair_module

    node, _dep, cfg = chain
    _store, r, _expected = reorg_found_live(chain)
    build_catalog(cfg)

    def blocks():
        return query(cfg.duckdb_path, "select number, hash from blocks order by number")

    before = blocks()
    rolled_back, go = threading.Event(), threading.Event()
    real_restore = repair_module.restore

    def held_before_the_restore(*args, **kwargs):
        rolled_back.set()
        assert go.wait(60)
        return real_restore(*args, **kwargs)

    monkeypatch.setattr(repair_module, "restore", held_before_the_restore)
    done: list = []
    repairer = threading.Thread(target=lambda: done.append(repair(cfg, open_state(cfg.state_url), r.id)))
    repairer.start()
    assert rolled_back.wait(60)
    seen: list = []
    reader = threading.Thread(target=lambda: seen.append(blocks()))
    reader.start()
    reader.join(1.0)  # the query waits for the repair (or, before, read the chain cut at the fork)
    go.set()
    repairer.join(120)
    reader.join(120)
    assert done and done[0].reorg.phase is Phase.DONE
    after = blocks()
    assert after["hash"].to_list() != before["hash"].to_list()
    assert seen and (seen[0].equals(before) or seen[0].equals(after)), (
        f"a query during the repair saw blocks {seen[0]['number'].min()}..{seen[0]['number'].max()}, "
        f"before {before['number'].max()}, after {after['number'].max()}")
    assert_views_equal_node(cfg, node)


def test_a_restore_retried_after_the_head_moved_leaves_one_live_copy(chain, monkeypatch):
    """Finding 1: a restore that published its live segment, then failed (here: the fork check after the
    publish) and ran again after the node's head moved, published a second, overlapping segment under
    another key: its blocks and logs appeared twice. Each attempt now replaces the earlier one's."""
    from indexer_dagster.chain.fetch import ForkChanged
    from indexer_dagster.sync import repair as repair_module

    node, dep, cfg = chain
    store, r, _expected = reorg_found_live(chain)
    real_check, calls = repair_module._check_ranges_match, []

    def fail_once_after_the_publish(lake, keys, headers):
        calls.append(len(open_lake(cfg).files("live/blocks")))
        if len(calls) == 1:  # the segment is published; the head moves on; this attempt fails
            generate_traffic(node.url, dep, blocks=2, txs_per_block=4, seed=13)
            raise ForkChanged("simulated: the node changed fork again during the restore")
        return real_check(lake, keys, headers)

    monkeypatch.setattr(repair_module, "_check_ranges_match", fail_once_after_the_publish)
    assert repair(cfg, store, r.id).reorg.phase is Phase.DONE
    assert len(calls) == 2
    assert_views_equal_node(cfg, node)
    dupes = query(cfg.duckdb_path, "select number, count(*) n from blocks group by all having n > 1")
    assert dupes.height == 0


def test_a_follower_starting_during_a_restore_leaves_its_segment_alone(chain, monkeypatch):
    """Finding 5: a follower (re)launched while a restore runs, between the restore's publish of its live
    segment and its storing of the new fork's headers, took that segment for a crash leftover above the
    stored tip and deleted it: the restored blocks were gone for good. It waits for the reorg now."""
    from indexer_dagster.sync import repair as repair_module

    node, _dep, cfg = chain
    store, r, _expected = reorg_found_live(chain)
    real_check, removed = repair_module._check_ranges_match, []

    def a_follower_starts_now(lake, keys, headers):
        assert open_lake(cfg).files("live/blocks")  # the restore's segment is published
        removed.append(Follower(cfg, open_state(cfg.state_url)).remove_stale_segments())
        return real_check(lake, keys, headers)

    monkeypatch.setattr(repair_module, "_check_ranges_match", a_follower_starts_now)
    assert repair(cfg, store, r.id).reorg.phase is Phase.DONE
    assert removed == [0]
    assert_views_equal_node(cfg, node)


def test_a_deeper_reorg_merged_during_a_restore_archives_every_row_it_drops(chain, monkeypatch):
    """Finding 9: the first rollback remembers which blocks a range file held (their live copies were
    hidden duplicates, not archived). A restore onto a shorter fork re-fetched that range only up to the
    new head and published the blocks above it, once the head had moved on, as a live segment; a deeper
    reorg merged next rolled that segment back but skipped those blocks as "range duplicates": visible rows
    dropped without an archive. The archive's ancestor now scopes that memory."""
    from indexer_dagster.chain.fetch import ForkChanged
    from indexer_dagster.sync import repair as repair_module

    node, dep, cfg = chain
    backfill_plain(cfg)  # the top range file ends at the head: it is partial
    store = open_state(cfg.state_url)
    follow_until_synced(cfg, store)
    top = node.block_number()
    assert top % 10 >= 4, "the top range must hold the first fork's ancestor and two blocks above it"
    node.rpc("anvil_rollback", [3])
    generate_traffic(node.url, dep, blocks=1, txs_per_block=3, seed=9)  # a shorter fork: head top - 2
    assert follow_until_synced(cfg, store)[-1].action == "reorg"
    r = store.active_reorg(cfg.chain.name)
    assert r.common_ancestor == top - 3
    real_sync, real_check, visible = repair_module.sync_range, repair_module._check_ranges_match, []

    def head_moves_after_the_range(cfg_, block_range, **kw):
        out = real_sync(cfg_, block_range, **kw)
        if not visible:  # the range now ends at top - 2; blocks top - 1 .. top + 1 will be a live segment
            generate_traffic(node.url, dep, blocks=3, txs_per_block=3, seed=10)
        return out

    def deeper_reorg_after_the_publish(lake, keys, headers):
        if not visible:
            build_catalog(cfg)
            # What the lake holds now (the query API waits for the repair's end: read past its gate).
            visible.append(read_views(cfg.duckdb_path, f"select * from logs where block_number > {top - 5}"))
            assert visible[0]["block_number"].max() == top + 1
            anvil_reorg(node.url, dep, depth=node.block_number() - (top - 5), txs_per_block=3, seed=77)
            raise ForkChanged("the node changed fork again during the restore")
        return real_check(lake, keys, headers)

    monkeypatch.setattr(repair_module, "sync_range", head_moves_after_the_range)
    monkeypatch.setattr(repair_module, "_check_ranges_match", deeper_reorg_after_the_publish)
    done = repair(cfg, store, r.id)
    assert done.reorg.phase is Phase.DONE and done.reorg.common_ancestor == top - 5
    assert_views_equal_node(cfg, node)
    archived = query(cfg.duckdb_path, "select block_hash, log_index from orphaned_logs")
    was_visible = visible[0].select("block_hash", "log_index")
    missing = was_visible.join(archived, on=["block_hash", "log_index"], how="anti")
    assert missing.height == 0, f"visible rows rolled back without an archive: {missing}"


def test_a_live_segment_across_a_partition_boundary_is_compacted_once(chain):
    """Finding 3: a catch-up (or restore) segment may straddle a partition boundary. Compaction was asked
    for the range of its first block only, and a range's publish dropped only segments wholly inside it:
    that range was synced again on every tick and the next one never. Now each range the segment touches
    is synced once, and the segment goes once range files hold all of its blocks."""
    from indexer_dagster.block_range import parse_key, range_for_block
    from indexer_dagster.persist.datasets import live_segments
    from indexer_dagster.sync.supervise import range_coverage, ranges_with_live_segments

    node, dep, cfg = chain
    width = cfg.chain.blocks_per_partition
    backfill_plain(cfg)
    store = open_state(cfg.state_url)
    follow_until_synced(cfg, store)
    head = node.block_number()
    # One tick catches up on these blocks in one segment, across the next partition boundary.
    generate_traffic(node.url, dep, blocks=width - head % width + 3, txs_per_block=2, seed=5)
    follow_until_synced(cfg, store)
    segments = [(first, last) for first, last, _p in live_segments(open_lake(cfg), "blocks")]
    assert any(range_for_block(first, width) != range_for_block(last, width) for first, last in segments)

    synced: list[str] = []
    for _tick in range(6):  # what the sensor's compaction asks for, tick after tick
        lake = open_lake(cfg)
        coverage = range_coverage(lake.dir("blocks"))
        segments = [(first, last) for first, last, _p in live_segments(lake, "blocks")]
        due = ranges_with_live_segments(segments, coverage, width)
        if not due:
            break
        for key in sorted(due):
            sync_range(cfg, parse_key(key))
            synced.append(key)
    assert not live_segments(open_lake(cfg), "blocks") and not live_segments(open_lake(cfg), "logs")
    assert len(synced) == len(set(synced)), f"ranges synced again and again: {synced}"
    assert_views_equal_node(cfg, node)


def test_a_range_run_above_the_followers_tip_then_reorged_is_repaired(chain):
    """Finding 4: a range run (a CLI backfill, a tip range) wrote blocks above the follower's tip while the
    follower was down; the node then reorganised them. The follower extended over them from the new fork,
    but the views prefer range files: orphaned rows were shown (and later confirmed), no reorg recorded.
    The follower now checks the range files' blocks it extends over against the node's."""
    from indexer_dagster.block_range import range_for_block

    node, dep, cfg = chain
    backfill_plain(cfg)
    store = open_state(cfg.state_url)
    follow_until_synced(cfg, store)
    tip = store.tip(cfg.chain.name).number
    generate_traffic(node.url, dep, blocks=4, txs_per_block=4, seed=31)  # the follower is down
    for n in sorted({range_for_block(tip + 1, 10), range_for_block(tip + 4, 10)}):
        sync_range(cfg, n)
    build_catalog(cfg)
    stale = query(cfg.duckdb_path, f"select * from logs where block_number > {tip + 2} order by block_number, log_index")
    expected = anvil_reorg(node.url, dep, depth=2, txs_per_block=3, seed=32)
    assert expected["ancestor"] == tip + 2
    res = follow_until_synced(cfg, store)
    assert res[-1].action == "reorg", res
    r = store.active_reorg(cfg.chain.name)
    assert r.common_ancestor == tip + 2  # the blocks the range files and the node agree on are kept
    assert repair(cfg, store, r.id).reorg.phase is Phase.DONE
    assert_views_equal_node(cfg, node)
    # The two replaced blocks' rows are archived, and only they: no canonical row is called orphaned.
    archived = query(cfg.duckdb_path, "select block_hash, log_index from orphaned_logs")
    assert stale.height > 0 and archived.height == stale.height
    assert stale.select("block_hash", "log_index").join(archived, on=["block_hash", "log_index"], how="anti").height == 0


def test_a_range_from_another_fork_than_the_local_chain_is_not_published(chain):
    """Finding 4: a range run's blocks were never compared with the local canonical chain: an endpoint on
    another fork (a failover, or a reorg the follower has not seen yet) replaced a range file with rows of
    that fork. The range's publish now compares its blocks with the stored headers and refuses."""
    from indexer_dagster.block_range import range_for_block
    from indexer_dagster.chain.fetch import ForkChanged

    node, dep, cfg = chain
    store = indexed_live(cfg, node, dep, blocks=2, txs_per_block=4, seed=41)
    build_catalog(cfg)
    before = query(cfg.duckdb_path, "select number, hash from blocks order by number")
    head = node.block_number()
    anvil_reorg(node.url, dep, depth=3, txs_per_block=3, seed=42)  # the follower has not seen it
    r = range_for_block(head - 2, 10)
    with pytest.raises(ForkChanged, match="another fork than the local chain"):
        sync_range(cfg, r, store=store)
    build_catalog(cfg)
    assert query(cfg.duckdb_path, "select number, hash from blocks order by number").equals(before)
    # The follower finds the reorg; once repaired, the range is the new fork's.
    assert follow_until_synced(cfg, store)[-1].action == "reorg"
    assert repair(cfg, store, store.active_reorg(cfg.chain.name).id).reorg.phase is Phase.DONE
    sync_range(cfg, r, store=store)
    assert_views_equal_node(cfg, node)


def test_a_rollback_below_the_start_of_a_range_file(chain):
    """Finding 10: a reorg onto a fork shorter than the first block of a range file it touched: the
    restore fetched that range again and failed ("starts above the chain head"), leaving the reorg
    unrepaired. The emptied range now waits for the chain to grow, like any range above the head."""
    from indexer_dagster.block_range import range_for_block

    node, dep, cfg = chain
    store = indexed_live(cfg, node, dep, blocks=1, txs_per_block=3, seed=51)
    head = node.block_number()
    generate_traffic(node.url, dep, blocks=10 - head % 10 + 2, txs_per_block=3, seed=52)  # into the next range
    follow_until_synced(cfg, store)
    top = range_for_block(node.block_number(), 10)
    for r in sorted({range_for_block(head, 10), top}):
        sync_range(cfg, r, store=store)  # compaction: range files now hold the live blocks
    node.rpc("anvil_rollback", [node.block_number() - (top.start - 2)])  # back to below the top range
    generate_traffic(node.url, dep, blocks=1, txs_per_block=2, seed=53)  # one conflicting block
    assert node.block_number() == top.start - 1
    assert follow_until_synced(cfg, store)[-1].action == "reorg"
    r = store.active_reorg(cfg.chain.name)
    assert repair(cfg, store, r.id).reorg.phase is Phase.DONE
    assert_views_equal_node(cfg, node)
    # The chain grows into the range again: the follower and the range run bring it back.
    generate_traffic(node.url, dep, blocks=3, txs_per_block=2, seed=54)
    follow_until_synced(cfg, store)
    sync_range(cfg, top, store=store)
    assert_views_equal_node(cfg, node)


def test_a_range_run_across_a_reorg_to_a_shorter_fork_records_the_new_head(chain, monkeypatch):
    """Finding 10: a range run read the head once, before a reorg onto a shorter fork; its retry after the
    reorg fetched up to that old head and recorded it, so `confirmed_through` passed the new fork's
    head (rows called confirmed that the chain may still replace). Each attempt now reads the head."""
    import threading

    from indexer_dagster.block_range import range_for_block
    from indexer_dagster.persist.meta import read_head
    from indexer_dagster.sync import historical

    node, dep, cfg = chain
    store = indexed_live(cfg, node, dep, blocks=3, txs_per_block=3, seed=61)
    old_head = node.block_number()
    real_head, first_read, go_on = historical._head, threading.Event(), threading.Event()

    async def head_then_wait(rpc):
        out = await real_head(rpc)
        if not first_read.is_set():
            first_read.set()
            await asyncio.to_thread(go_on.wait, 60)
        return out

    monkeypatch.setattr(historical, "_head", head_then_wait)
    errors: list[BaseException] = []

    def run():
        try:
            sync_range(cfg, range_for_block(old_head - 2, 10))  # a range the shorter fork still has
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    runner = threading.Thread(target=run)
    runner.start()
    assert first_read.wait(60)
    node.rpc("anvil_rollback", [3])
    generate_traffic(node.url, dep, blocks=1, txs_per_block=2, seed=62)  # a shorter fork: head - 2
    assert follow_until_synced(cfg, store)[-1].action == "reorg"
    assert repair(cfg, store, store.active_reorg(cfg.chain.name).id).reorg.phase is Phase.DONE
    go_on.set()
    runner.join(120)
    assert errors == []
    head = read_head(open_lake(cfg))
    assert head["head_number"] == node.block_number() == old_head - 2
    assert_views_equal_node(cfg, node)


def test_a_reorg_while_a_supplement_fetches_is_not_published_over(tmp_path, monkeypatch):
    """Finding 10: a supplement (logs of a contract added to the config, for a stored range) took its
    publish guard after the fetch, so a reorg repaired meanwhile went unnoticed: the old fork's logs were
    published beside the restored range. The guard is now taken before anything is read."""
    import threading

    from indexer_dagster.block_range import parse_key, range_for_block
    from indexer_dagster.chain.fetch import ForkChanged
    from indexer_dagster.sync import historical
    from indexer_dagster.sync.supplement import plan_range, ranges_to_supplement, supplement_range
    from tests.sync.test_add_contract import rewrite

    node = Anvil(chain_id=31337).start()
    try:
        dep = build_devnet(node, blocks=25, txs_per_block=8, seed=3)
        path = write_config(tmp_path / "indexer.yaml", node.url, 31337, dep, "data",
                            blocks_per_partition=10, confirmations=4, include_tokens=False)
        cfg = load_config(path)
        backfill_plain(cfg)
        stored_to = node.block_number()
        complete = range_for_block(stored_to - stored_to % 10 - 1, 10)  # the highest whole range stored
        store = open_state(cfg.state_url)
        follow_until_synced(cfg, store)
        generate_traffic(node.url, dep, blocks=2, txs_per_block=4, seed=71)
        follow_until_synced(cfg, store)
        rewrite(path, lambda d: d["contracts"].append({
            "name": "ERC20", "abi": "abis/ERC20.json", "addresses": dep.tokens, "events": ["Transfer", "Approval"]}))
        cfg = load_config(path)
        real_reporter, reorged = historical._reporter, []

        def reorg_repaired_during_the_fetch(blocks, logs):
            real_reporter(blocks, logs)
            if not reorged:  # (in a thread: this runs inside the fetch's event loop)
                depth = node.block_number() - (complete.end - 1)  # the fork reaches into `complete`
                reorged.append(anvil_reorg(node.url, dep, depth=depth, txs_per_block=3, seed=72))
                worker = threading.Thread(target=lambda: reorged.append(
                    (follow_until_synced(cfg, store)[-1].action,
                     repair(cfg, store, store.active_reorg(cfg.chain.name).id).reorg.phase)))
                worker.start()
                worker.join(120)

        monkeypatch.setattr(historical, "_reporter", reorg_repaired_during_the_fetch)
        refused = None
        try:
            assert plan_range(cfg, complete) == "supplement"
            supplement_range(cfg, complete, store=store)
        except ForkChanged as e:
            refused = e
        assert reorged[1:] == [("reorg", Phase.DONE)]
        assert refused is not None, "the supplement was published over the repaired range"
        monkeypatch.setattr(historical, "_reporter", real_reporter)
        for key in ranges_to_supplement(cfg):  # what the sensor launches next (the refused one again)
            supplement_range(cfg, parse_key(key), store=store)
        assert_views_equal_node(cfg, node)
    finally:
        node.stop()


KILLED_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys
    from indexer_dagster.block_range import parse_key
    from indexer_dagster.config import load_config
    from indexer_dagster.sync.historical import sync_range
    cfg = load_config(sys.argv[1])
    real_replace, renamed = os.replace, []
    def replace(src, dst):
        real_replace(src, dst)
        renamed.append(str(dst))
        if str(dst).endswith(".parquet") and len(renamed) == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # the power goes after the first file of the range
    os.replace = replace
    sync_range(cfg, parse_key(sys.argv[2]))
""")


def test_a_range_publish_cut_between_its_files_is_synced_again(chain):
    """Finding 8: a range's files were renamed into place one at a time, blocks first; a crash after the
    first left the range "covered" (coverage is measured from blocks) with its logs and events missing for
    good. The blocks file now goes last, so a cut publish leaves the range uncovered and it is synced again
    (what the sensor and `indexer backfill` do for a range whose file stops short)."""
    from indexer_dagster.block_range import range_for_block

    node, _dep, cfg = chain
    head = node.block_number()
    r = range_for_block(head - 12, 10)
    proc = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(cfg_path(cfg)), r.key],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    lake = open_lake(cfg)
    assert lake.files("logs") or lake.files("blocks") or lake.files("events/uniswap_v2_pair_swap")
    # What the chain-head sensor asks for: every range whose blocks file stops short of the anchor.
    for due in history_due(lake.dir("blocks"), cfg.start_block, cfg.chain.blocks_per_partition, head):
        sync_range(cfg, due)
    assert_views_equal_node(cfg, node)


def test_deep_reorg_across_a_partition_boundary_into_confirmed_history(chain):
    node, dep, cfg = chain
    store = open_state(cfg.state_url)
    follow_until_synced(cfg, store)  # anchors the local chain at the head
    backfill_plain(cfg)               # history in range files of 10 blocks
    generate_traffic(node.url, dep, blocks=4, txs_per_block=6, seed=5)
    follow_until_synced(cfg, store)
    head = node.block_number()
    depth = 7  # > confirmations (4), crossing a 10-block boundary
    anvil_reorg(node.url, dep, depth=depth, txs_per_block=4, seed=77)
    res = follow_until_synced(cfg, store)
    assert res[-1].action == "reorg"
    r = store.active_reorg(cfg.chain.name)
    assert r.common_ancestor == head - depth and r.touched_confirmed
    done = repair(cfg, store, r.id)
    assert done.reorg.phase is Phase.DONE and done.restored_partitions
    # Each restored range passed the range checks a range run makes.
    assert set(done.checks) == set(done.restored_partitions)
    assert all(c.passed for results in done.checks.values() for c in results)
    assert {c.name for c in done.checks[done.restored_partitions[0]]} == set(CHECKS)
    assert_views_equal_node(cfg, node)
    assert query(cfg.duckdb_path, "select count(*) n from failed_checks")["n"][0] == 0
    ledger = query(cfg.duckdb_path, "select touched_confirmed, affected_partitions from reorgs")
    assert ledger["touched_confirmed"][0]


def test_a_restored_range_that_fails_its_checks_stays_unconfirmed(chain, monkeypatch):
    """A range the reorg job restores from a node that leaves out a block: the checks after the repair
    record it, so its rows stay unconfirmed and the sensor syncs it again."""
    import indexer_dagster.sync.repair as repair_module

    node, dep, cfg = chain
    store = open_state(cfg.state_url)
    follow_until_synced(cfg, store)
    backfill_plain(cfg)
    generate_traffic(node.url, dep, blocks=4, txs_per_block=6, seed=5)
    follow_until_synced(cfg, store)
    anvil_reorg(node.url, dep, depth=7, txs_per_block=4, seed=77)
    assert follow_until_synced(cfg, store)[-1].action == "reorg"
    r = store.active_reorg(cfg.chain.name)
    lake = open_lake(cfg)
    real_sync_range = repair_module.sync_range
    bad: list[str] = []

    def sync_range_missing_a_block(cfg_, rng, **kw):
        out = real_sync_range(cfg_, rng, **kw)
        if not bad:  # the first restored range loses a block in the middle
            blocks = lake.read("blocks", rng.key)
            lake.write("blocks", rng.key, blocks.filter(pl.col("number") != blocks["number"][1]))
            bad.append(rng.key)
        return out

    monkeypatch.setattr(repair_module, "sync_range", sync_range_missing_a_block)
    done = repair(cfg, store, r.id)
    assert done.reorg.phase is Phase.DONE and bad
    failed = {c.name for c in done.checks[bad[0]] if not c.passed}
    assert "contiguous_blocks" in failed
    build_catalog(cfg)
    recorded = query(cfg.duckdb_path, "select distinct range_key, check_name from failed_checks")
    assert (bad[0], "contiguous_blocks") in recorded.rows()
    first = int(bad[0].split("-")[0])
    status = query(cfg.duckdb_path, f"select distinct status from logs where block_number between {first} and "
                                    f"{first + cfg.chain.blocks_per_partition - 1}")
    assert status["status"].to_list() == ["unconfirmed"]


def test_rollback_to_a_shorter_chain(chain):
    node, dep, cfg = chain
    store = indexed_live(cfg, node, dep, blocks=5, txs_per_block=5, seed=8)
    top = node.block_number()
    build_catalog(cfg)
    before = query(cfg.duckdb_path, f"select * from logs where block_number > {top - 3} order by block_number, log_index")
    node.rpc("anvil_rollback", [3])
    generate_traffic(node.url, dep, blocks=1, txs_per_block=3, seed=9)  # one conflicting block
    res = follow_until_synced(cfg, store)
    assert res[-1].action == "reorg"
    r = store.active_reorg(cfg.chain.name)
    assert (r.common_ancestor, r.old_head, r.new_head) == (top - 3, top, top - 2)
    repair(cfg, store, r.id)
    assert_views_equal_node(cfg, node)
    # Every row of the three dropped blocks is archived under this reorg, and the ledger says so.
    orphaned = query(cfg.duckdb_path, "select * from orphaned_logs order by block_number, log_index")
    assert orphaned.height == before.height > 0 and set(orphaned["reorg_id"]) == {r.id}
    assert orphaned.select(before.columns[:-1]).equals(before.drop("status"))
    ledger = query(cfg.duckdb_path, "select * from reorgs")
    assert ledger["phase"].to_list() == ["done"] and ledger["rows_archived"][0] >= before.height


CRASHER = textwrap.dedent("""
    import os, signal, sys
    from indexer_dagster.config import load_config
    from indexer_dagster.persist import lake as lake_mod
    from indexer_dagster.sync.repair import repair
    from indexer_dagster.state import open_state
    cfg = load_config(sys.argv[1]); reorg_id = int(sys.argv[2]); phase = sys.argv[3]; after = int(sys.argv[4])
    state = {"phase": None, "publishes": 0}
    original = lake_mod.Transaction.publish
    def publish(self):
        original(self)
        if state["phase"] == phase:
            state["publishes"] += 1
            if state["publishes"] >= after:
                os.kill(os.getpid(), signal.SIGKILL)
    lake_mod.Transaction.publish = publish
    def on_phase(p):
        state["phase"] = p.value
        if after == 0 and p.value == phase:
            os.kill(os.getpid(), signal.SIGKILL)
    repair(cfg, open_state(cfg.state_url), reorg_id, on_phase=on_phase)
""")


@pytest.mark.parametrize("phase, after", [("suspending", 0), ("rolling_back", 1), ("rolling_back", 4),
                                          ("restoring", 1), ("restoring", 2)])
def test_reorg_job_killed_in_each_phase_then_resumed(chain, phase, after):
    node, dep, cfg = chain
    store = indexed_live(cfg, node, dep, blocks=4, txs_per_block=6, seed=21)
    expected = anvil_reorg(node.url, dep, depth=6, txs_per_block=4, seed=42)
    build_catalog(cfg)
    before = query(cfg.duckdb_path, f"select * from logs where block_number > {expected['ancestor']}")
    assert follow_until_synced(cfg, store)[-1].action == "reorg"
    r = store.active_reorg(cfg.chain.name)
    proc = subprocess.run([sys.executable, "-c", CRASHER, str(cfg_path(cfg)), str(r.id), phase, str(after)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert store.get_reorg(r.id).phase is not Phase.DONE
    # The node moves on before the next run, as a live chain does (a restore's second attempt then ends
    # higher than the first; test_a_restore_retried_after_the_head_moved_leaves_one_live_copy).
    generate_traffic(node.url, dep, blocks=2, txs_per_block=4, seed=43)
    done = repair(cfg, store, r.id)  # the next run finishes the same reorg from its recorded phase
    assert done.reorg.phase is Phase.DONE
    assert_views_equal_node(cfg, node)
    orphaned = query(cfg.duckdb_path, "select * from orphaned_logs")
    assert orphaned.height == before.height > 0  # every orphaned row archived ...
    assert orphaned.select("block_number", "log_index").is_unique().all()  # ... once, though a step ran twice
    assert query(cfg.duckdb_path, "select count(*) n from reorgs")["n"][0] == 1


def cfg_path(cfg):
    return cfg.resolve("indexer.yaml")


def test_lagging_node_moving_back_is_not_a_reorg(chain):
    node, dep, cfg = chain
    backfill_plain(cfg)
    store = open_state(cfg.state_url)
    generate_traffic(node.url, dep, blocks=4, txs_per_block=5, seed=31)
    follow_until_synced(cfg, store)
    build_catalog(cfg)
    before = query(cfg.duckdb_path, "select * from logs order by block_number, log_index")
    node.rpc("anvil_rollback", [3])  # the head goes back, no conflicting block yet: like a lagging node
    res = follow_until_synced(cfg, store, max_ticks=3)
    assert {r.action for r in res} == {"waiting"}
    assert store.active_reorg(cfg.chain.name) is None
    after = query(cfg.duckdb_path, "select * from logs order by block_number, log_index")
    assert after.equals(before)  # nothing destroyed


def test_second_reorg_while_the_first_is_unrepaired(chain):
    node, dep, cfg = chain
    backfill_plain(cfg)
    store = open_state(cfg.state_url)
    generate_traffic(node.url, dep, blocks=6, txs_per_block=5, seed=41)
    follow_until_synced(cfg, store)
    anvil_reorg(node.url, dep, depth=2, txs_per_block=3, seed=1)
    assert follow_until_synced(cfg, store)[-1].action == "reorg"
    first = store.active_reorg(cfg.chain.name)
    build_catalog(cfg)
    indexed = query(cfg.duckdb_path, "select * exclude (status) from logs where block_number > %d "
                                     "order by block_number, log_index" % (node.block_number() - 5))
    # Before the job runs, the node reorganises again, deeper, with other transactions.
    anvil_reorg(node.url, dep, depth=5, txs_per_block=3, seed=2)
    done = repair(cfg, store, first.id)
    assert done.reorg.phase is Phase.DONE and done.reorg.common_ancestor == node.block_number() - 5
    assert_views_equal_node(cfg, node)
    # Every row the views showed above the (merged) ancestor is in the archive, once.
    archived = query(cfg.duckdb_path, "select * exclude (reorg_id, orphaned_at) from orphaned_logs "
                                      "order by block_number, log_index")
    assert archived.equals(indexed)
    # And one right after the first was repaired: a second ledger entry.
    anvil_reorg(node.url, dep, depth=1, txs_per_block=2, seed=3)
    assert follow_until_synced(cfg, store)[-1].action == "reorg"
    second = store.active_reorg(cfg.chain.name)
    assert second.id != first.id
    repair(cfg, store, second.id)
    assert_views_equal_node(cfg, node)
    assert query(cfg.duckdb_path, "select count(*) n from reorgs where phase = 'done'")["n"][0] == 2


def test_reorg_during_a_backfill_of_the_same_ranges(chain):
    import threading

    node, dep, cfg = chain
    store = open_state(cfg.state_url)
    generate_traffic(node.url, dep, blocks=6, txs_per_block=5, seed=51)
    follow_until_synced(cfg, store)
    # A slow backfill (one block per request) of every range, running while the reorg is handled.
    slow = cfg.model_copy(update={"chain": cfg.chain.model_copy(
        update={"blocks_per_request": 1, "max_blocks_per_request": 1, "concurrency": 1})})
    slow._base_dir, slow._specs = cfg._base_dir, cfg._specs
    errors = []
    t = threading.Thread(target=lambda: _catch(errors, backfill_plain, slow))
    t.start()
    anvil_reorg(node.url, dep, depth=4, txs_per_block=3, seed=52)
    assert follow_until_synced(cfg, store)[-1].action == "reorg"
    assert t.is_alive(), "the backfill ended before the reorg was found: nothing overlapped"
    repair(cfg, store, store.active_reorg(cfg.chain.name).id)
    t.join(timeout=300)
    assert not errors, errors
    assert_views_equal_node(cfg, node)


def _catch(errors, fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def indexed_with_a_small_window(chain, tmp_path, data: str, seed: int, webhook: str | None = None):
    """A chain keeping only 3 headers (`reorg_window: 3`), indexed live: (config path, config, store)."""
    node, dep, _ = chain
    path = write_config(tmp_path / "small.yaml", node.url, 31337, dep, data, blocks_per_partition=10, confirmations=2)
    path.write_text(path.read_text().replace("confirmations: 2", "confirmations: 2\n  reorg_window: 3"))
    if webhook:
        add_alerts(path, webhook)
    cfg = load_config(path)
    return path, cfg, indexed_live(cfg, node, dep, blocks=5, txs_per_block=4, seed=seed)


def test_reorg_below_the_window_stops_live_sync(chain, tmp_path, receiver):
    from indexer_dagster.sync.realtime import ReorgTooDeep

    node, dep, _ = chain
    path, cfg, store = indexed_with_a_small_window(chain, tmp_path, "data_small", seed=61, webhook=receiver.url)
    anvil_reorg(node.url, dep, depth=6, txs_per_block=3, seed=62)
    with pytest.raises(ReorgTooDeep, match="reorg_window"):
        follow_until_synced(cfg, store)
    # Issue 13, finding 6: the stop is durable. The chain is halted, and no writer of it touches a file
    # until an operator resumes it: not a relaunched follower, not a range run (a compaction, a re-sync).
    halt = store.halted(cfg.chain.name)
    assert halt is not None and "reorg_window" in halt.reason
    # The operator is told once, with the way out.
    assert receiver.kinds() == ["chain_halted"]
    assert "indexer resume --chain" in receiver.alerts[0]["summary"]
    lake = open_lake(cfg)

    def files():
        return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(lake.root.rglob("*.parquet"))}

    before = files()
    stats = asyncio.run(Follower(cfg, store).run(lambda: False, poll_s=0.05))
    assert "halted" in stats.note and stats.ticks == 0
    last = ranges_between(cfg.start_block, node.block_number(), cfg.chain.blocks_per_partition)[-1]
    with pytest.raises(ChainHalted, match="indexer resume --chain"):
        sync_range(cfg, last, store=store)
    assert files() == before
    # The operator sees why (`indexer reorgs`), then resumes the chain (`indexer resume`).
    env = {**os.environ, "INDEXER_CONFIG": str(path)}
    shown = subprocess.run([sys.executable, "-m", "indexer_dagster.cli", "reorgs"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and "HALTED" in shown.stdout and "reorg_window" in shown.stdout, shown
    status = subprocess.run([sys.executable, "-m", "indexer_dagster.cli", "status", "--json"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert "reorg_window" in json.loads(status.stdout)[0]["halted"], status
    resumed = subprocess.run([sys.executable, "-m", "indexer_dagster.cli", "resume", "--chain", cfg.chain.name],
                             env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed
    assert store.halted(cfg.chain.name) is None


def test_a_reorg_that_cannot_be_repaired_fails_and_halts_the_chain(chain, tmp_path):
    """Issue 13, finding 2: a repair that meets a fork below the stored window (ReorgAborted) was
    relaunched forever over rolled-back data with its phase never `failed`. It is marked failed with
    why, the chain is halted (no writer publishes), and the ledger says so."""
    from indexer_dagster.sync.repair import ReorgAborted

    node, dep, _ = chain
    _path, cfg, store = indexed_with_a_small_window(chain, tmp_path, "data_abort", seed=63)
    tip = store.tip(cfg.chain.name)
    assert tip is not None
    anvil_reorg(node.url, dep, depth=6, txs_per_block=3, seed=64)
    # A reorg recorded with too shallow an ancestor (as a follower with a 2-block view would): the real
    # fork is 6 deep, below the 3-block window, so the repair cannot find where the forks meet.
    ancestor = store.header(cfg.chain.name, tip.number - 2)
    assert ancestor is not None
    reorg = store.open_reorg(cfg.chain.name, ancestor.number, ancestor.hash, tip.number, tip.hash,
                             node.block_number(), "0x" + "00" * 32, [], [], False)
    with pytest.raises(ReorgAborted):
        repair(cfg, store, reorg.id)
    failed = store.get_reorg(reorg.id)
    assert failed is not None and failed.phase is Phase.FAILED and failed.note
    assert store.active_reorg(cfg.chain.name) is None
    halt = store.halted(cfg.chain.name)
    assert halt is not None and halt.reorg_id == reorg.id and "cannot be repaired" in halt.reason
    build_catalog(cfg)
    ledger = query(cfg.duckdb_path, f"select phase from reorgs where reorg_id = {reorg.id}")
    assert ledger["phase"].to_list() == ["failed"]
    store.close()
