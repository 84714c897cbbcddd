"""The live jobs in a real Dagster instance: what the follower writes shows on the asset pages, and the
reorg job reads like a report (each phase logged with the blocks, datasets and rows it touched, the
summary as run metadata, a fork that changes under it as an info line, not a failure)."""

import threading
import time

import dagster as dg
import pytest

from indexer_dagster.block_range import ranges_between
from indexer_dagster.chain.fetch import ForkChanged
from indexer_dagster.definitions import build_definitions
from indexer_dagster.devnet.uniswap import generate_traffic
from indexer_dagster.devnet.uniswap import reorg as anvil_reorg
from indexer_dagster.jobs.names import live_job_name, reorg_job_name
from indexer_dagster.query import query
from tests.sync.test_reorg import (
    assert_views_equal_node,
    cfg_path,
    chain,
    follow_until_synced,
    indexed_live,
    reorg_found_live,
)

pytestmark = pytest.mark.slow
__all__ = ["chain"]  # the fixture


def test_a_reorg_run_reports_each_phase_and_its_summary(chain, monkeypatch):
    from indexer_dagster.sync import repair as repair_module

    node, _dep, cfg = chain
    monkeypatch.setenv("INDEXER_CONFIG", str(cfg_path(cfg)))
    _store, r, expected = reorg_found_live(chain)
    # The fork changes once under the repair (expected on a live chain): the run retries it quietly.
    real_restore, calls = repair_module.restore, []

    def fork_changes_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ForkChanged("simulated: the node changed fork during the restore")
        return real_restore(*args, **kwargs)

    monkeypatch.setattr(repair_module, "restore", fork_changes_once)
    job = build_definitions(cfg).resolve_job_def(reorg_job_name(cfg.chain.name))
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, run_config={
            "ops": {f"{cfg.chain.name}_repair_reorg": {"config": {"reorg_id": r.id}}}})
        assert result.success
        events = instance.all_logs(result.run_id)
        lines = [e.user_message for e in events if e.user_message]
        failures = [e for e in events if e.dagster_event is not None and e.dagster_event.is_step_failure]
        assert failures == []
        rolled = next(m for m in lines if "rolled back blocks" in m)
        assert f"fork point {expected['ancestor']}, depth 3" in rolled and "logs " in rolled
        assert "uniswap_v2_pair_swap" in rolled
        assert any("restored from the new fork" in m and "live blocks" in m for m in lines)
        assert any("changed fork during the restore" in m for m in lines)
        summary = next(m for m in lines if m.startswith(f"reorg {r.id} done: fork point {expected['ancestor']}"))
        assert "rows archived" in summary
        output = next(e.dagster_event.event_specific_data for e in events
                      if e.dagster_event is not None and e.dagster_event.is_successful_output)
        meta = {k: v.value for k, v in output.metadata.items()}
        assert meta["depth"] == 3 and meta["phase"] == "done"
        assert meta["rows_archived/logs"] > 0 and meta["rows_archived"] >= meta["rows_archived/logs"]
        assert {"seconds/rolling_back", "seconds/restoring"} <= set(meta)
        # The ledger and the archive are assets: the repaired reorg shows where an operator looks.
        [ledger] = instance.fetch_materializations(dg.AssetKey([cfg.chain.name, "reorgs"]), limit=1).records
        ledger_meta = {k: v.value for k, v in ledger.asset_materialization.metadata.items()}
        assert ledger_meta["reorg_id"] == r.id and ledger_meta["depth"] == 3 and ledger_meta["dagster/row_count"] == 1
        [archive] = instance.fetch_materializations(dg.AssetKey([cfg.chain.name, "orphaned"]), limit=1).records
        archive_meta = {k: v.value for k, v in archive.asset_materialization.metadata.items()}
        assert archive_meta["rows_archived/logs"] == meta["rows_archived/logs"]
    assert_views_equal_node(cfg, node)


def test_what_the_follower_writes_shows_on_the_asset_pages(chain, monkeypatch):
    """Issue 14: the tip range's page kept the backfill's materialization (`complete: false`, an old
    block range and row count) while live sync wrote hundreds of blocks further. The live run now
    materializes the ranges it fills, with their rows as the views show them and how far they are filled."""
    node, dep, cfg = chain
    monkeypatch.setenv("INDEXER_CONFIG", str(cfg_path(cfg)))
    store = indexed_live(cfg, node, dep, blocks=1, txs_per_block=3, seed=81)
    job = build_definitions(cfg).resolve_job_def(live_job_name(cfg.chain.name))
    keys = [r.key for r in ranges_between(cfg.start_block, node.block_number() + 30, cfg.chain.blocks_per_partition)]

    def traffic():
        time.sleep(1.5)
        generate_traffic(node.url, dep, blocks=4, txs_per_block=4, seed=82)

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(f"{cfg.chain.name}_block_ranges", keys)
        mover = threading.Thread(target=traffic)
        mover.start()
        result = job.execute_in_process(instance=instance, run_config={"ops": {f"{cfg.chain.name}_follow_head": {
            "config": {"minutes": 0.1, "poll_seconds": 0.1, "log_seconds": 1.0, "report_seconds": 1.0}}}})
        mover.join()
        assert result.success
        tip = store.tip(cfg.chain.name)
        assert tip.number == node.block_number()
        tip_key = next(k for k in keys if int(k[:12]) <= tip.number <= int(k[13:]))
        mats = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey([cfg.chain.name, "logs"]), asset_partitions=[tip_key]),
            limit=1).records
        assert mats, "the tip range was not materialized by the live run"
        meta = {k: v.value for k, v in mats[0].asset_materialization.metadata.items()}
        lo, hi = int(tip_key[:12]), int(tip_key[13:])
        in_views = query(cfg.duckdb_path, f"select count(*) n from logs where block_number between {lo} and {hi}")
        assert meta["dagster/row_count"] == in_views["n"][0] > 0
        assert meta["last_block"] == tip.number and meta["last_block_hash"] == tip.hash
        assert meta["complete"] is (tip.number == hi) and meta["source"] == "live sync"
        swaps = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey([cfg.chain.name, "uniswap_v2_pair_swap"]), asset_partitions=[tip_key]), limit=1)
        assert swaps.records
        # The run's log says what the polls wrote.
        lines = [e.user_message for e in instance.all_logs(result.run_id) if e.user_message]
        assert any("wrote 4 blocks" in m or ("wrote" in m and "logs; tip" in m) for m in lines), lines[-20:]


def test_the_follower_repairs_a_reorg_at_once_in_a_reorg_run(chain, monkeypatch):
    """Issue 14: a reorg waited for the sensor's tick and a new run process (~9 s to consistent). The
    follower, which sees the fork first, now runs the reorg job at once in its own process: a run of the
    reorg job in the instance, tagged with the reorg, and the views equal the node while it still follows."""
    from indexer_dagster.jobs.live import LAUNCHED_BY_TAG
    from indexer_dagster.jobs.names import REORG_ID_TAG

    node, dep, cfg = chain
    monkeypatch.setenv("INDEXER_CONFIG", str(cfg_path(cfg)))
    store = indexed_live(cfg, node, dep, blocks=4, txs_per_block=4, seed=91)
    defs = build_definitions(cfg)
    live = defs.resolve_job_def(live_job_name(cfg.chain.name))
    reorged = {}

    def fork_then_watch():
        time.sleep(1.5)
        reorged["expected"] = anvil_reorg(node.url, dep, depth=3, txs_per_block=3, seed=92)

    with dg.instance_for_test() as instance:
        mover = threading.Thread(target=fork_then_watch)
        mover.start()
        result = live.execute_in_process(instance=instance, run_config={"ops": {f"{cfg.chain.name}_follow_head": {
            "config": {"minutes": 0.12, "poll_seconds": 0.1}}}})
        mover.join()
        assert result.success
        runs = instance.get_runs(dg.RunsFilter(job_name=reorg_job_name(cfg.chain.name)))
        assert len(runs) == 1 and runs[0].status == dg.DagsterRunStatus.SUCCESS
        assert runs[0].tags[LAUNCHED_BY_TAG] == "follower"
        [done] = store.list_reorgs(cfg.chain.name)
        assert runs[0].tags[REORG_ID_TAG] == str(done.id) and done.phase.value == "done"
        assert done.common_ancestor == reorged["expected"]["ancestor"]
    assert store.active_reorg(cfg.chain.name) is None
    assert_views_equal_node(cfg, node)


def test_one_long_running_dex_run_keeps_the_dex_tables_at_the_tip(chain, monkeypatch):
    """Issue 14: the sensor launched a DEX run for every new tip (57 runs in 10 minutes of the demo). One
    long-running DEX run now rebuilds the tables whenever the indexed tip moves, and materializes the DEX
    assets with the tip they are at; the pools equal getReserves() at the end."""
    from indexer_dagster.jobs.names import dex_follow_job_name
    from tests.dex.test_build import check_against_chain

    node, dep, cfg = chain
    monkeypatch.setenv("INDEXER_CONFIG", str(cfg_path(cfg)))
    store = indexed_live(cfg, node, dep, blocks=2, txs_per_block=4, seed=95)
    job = build_definitions(cfg).resolve_job_def(dex_follow_job_name(cfg.chain.name))

    def chain_moves():  # the follower's work, while the DEX run runs
        for seed in (96, 97):
            time.sleep(1.0)
            generate_traffic(node.url, dep, blocks=2, txs_per_block=4, seed=seed)
            follow_until_synced(cfg, store)

    with dg.instance_for_test() as instance:
        mover = threading.Thread(target=chain_moves)
        mover.start()
        result = job.execute_in_process(instance=instance, run_config={"ops": {
            f"{cfg.chain.name}_keep_dex_current": {"config": {"minutes": 0.1, "poll_seconds": 0.2,
                                                              "report_seconds": 1.0}}}})
        mover.join()
        assert result.success
        assert len(instance.get_runs()) == 1
        tip = store.tip(cfg.chain.name)
        mats = instance.fetch_materializations(dg.AssetKey([cfg.chain.name, "dex", "pool_state"]), limit=1).records
        meta = {k: v.value for k, v in mats[0].asset_materialization.metadata.items()}
        assert meta["tip"] == tip.number == node.block_number() and meta["tip_hash"] == tip.hash
        assert meta["dagster/row_count"] == 6
        lines = [e.user_message for e in instance.all_logs(result.run_id) if e.user_message]
        assert any(f"DEX tables at tip {tip.number}" in m for m in lines)
    check_against_chain(cfg, node)
