"""The Dagster definitions load, validate with Dagster's own CLI, and materialize on a fresh instance."""

import subprocess
import sys

import dagster as dg
import pytest

from indexer_dagster.definitions import build_definitions
from indexer_dagster.persist.catalog import build_catalog
from indexer_dagster.query import query
from tests.conftest import cfg_of, cli_env

pytestmark = pytest.mark.slow


def test_definitions_validate_with_dagster_cli(make_config, dagster_home):
    path = make_config()
    proc = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-m", "indexer_dagster.definitions"],
        env=cli_env(path, dagster_home), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_assets_groups_and_job(make_config):
    cfg = cfg_of(make_config())
    defs = build_definitions(cfg)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"devnet/blocks", "devnet/logs", "devnet/uniswap_v2_pair_swap", "devnet/erc20_transfer"} <= keys
    swap = graph.get(dg.AssetKey(["devnet", "uniswap_v2_pair_swap"]))
    assert swap.group_name == "decoded" and dg.AssetKey(["devnet", "logs"]) in swap.parent_keys
    assert defs.resolve_job_def("devnet_historical_sync") is not None


def test_materialize_partitions_on_a_fresh_instance(make_config, monkeypatch):
    """No sensor, no daemon: add range keys and materialize them like the UI's launchpad does."""
    path = make_config()
    monkeypatch.setenv("INDEXER_CONFIG", str(path))  # the resource reads it, as in a launched run
    cfg = cfg_of(path)
    defs = build_definitions(cfg)
    job = defs.resolve_job_def("devnet_historical_sync")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("devnet_block_ranges", ["000000000000-000000000024", "000000000025-000000000049"])
        result = job.execute_in_process(
            instance=instance,
            partition_key="000000000025-000000000049",
        )
        assert result.success
        mats = instance.fetch_materializations(dg.AssetKey(["devnet", "logs"]), limit=10).records
        assert [m.partition_key for m in mats] == ["000000000025-000000000049"]
        meta = mats[0].asset_materialization.metadata
        assert meta["rows"].value > 0 and meta["block_range"].value == "25-49"
        assert meta["rpc_requests"].value > 0
    build_catalog(cfg)
    got = query(cfg.duckdb_path, "select min(block_number) lo, max(block_number) hi from logs")
    assert got["lo"][0] >= 25 and got["hi"][0] <= 49


def test_a_run_opens_the_state_store_once(make_config, monkeypatch):
    """The state store is a run's resource: one connection for all its ranges (each range's commit guard
    and range lease included), closed when the run ends."""
    from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

    from indexer_dagster.state.sqlite import SqliteStateStore

    path = make_config()
    monkeypatch.setenv("INDEXER_CONFIG", str(path))
    cfg = cfg_of(path)
    opened: list[SqliteStateStore] = []
    init = SqliteStateStore.__init__

    def counting_init(self, *a, **kw):
        opened.append(self)
        init(self, *a, **kw)

    monkeypatch.setattr(SqliteStateStore, "__init__", counting_init)
    job = build_definitions(cfg).resolve_job_def("devnet_historical_sync")
    keys = ["000000000000-000000000024", "000000000025-000000000049"]
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("devnet_block_ranges", keys)
        result = job.execute_in_process(
            instance=instance, tags={ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[1]})
        assert result.success
        mats = instance.fetch_materializations(dg.AssetKey(["devnet", "logs"]), limit=10).records
        assert sorted(m.partition_key for m in mats) == keys
    assert len(opened) == 1, f"{len(opened)} state stores opened by one run"
    assert opened[0]._closed


def test_a_range_run_stays_alive_for_the_sensor_while_it_builds_its_catalog(make_config, monkeypatch):
    """Issue 13, finding 7: the chain-head sensor fails a started range run whose lease it does not see.
    The run must show itself alive for its whole life, not only while it fetches a range: here, while it
    builds the catalog after its ranges."""
    from indexer_dagster.assets import ranges as ranges_asset
    from indexer_dagster.sensors.chain_head import run_alive
    from indexer_dagster.state import open_state

    path = make_config()
    monkeypatch.setenv("INDEXER_CONFIG", str(path))
    cfg = cfg_of(path)
    job = build_definitions(cfg).resolve_job_def("devnet_historical_sync")
    seen: list[bool] = []
    build = ranges_asset.build_catalog

    with dg.instance_for_test() as instance:
        def slow_catalog(c):
            [run] = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
            store = open_state(c.state_url)  # the sensor's own store, another connection
            try:
                seen.append(run_alive(store, run))
            finally:
                store.close()
            return build(c)

        monkeypatch.setattr(ranges_asset, "build_catalog", slow_catalog)
        instance.add_dynamic_partitions("devnet_block_ranges", ["000000000000-000000000024"])
        assert job.execute_in_process(instance=instance, partition_key="000000000000-000000000024").success
    assert seen == [True], "the sensor would fail this run while it builds its catalog"


def test_each_dex_asset_depends_only_on_what_it_reads(make_config):
    """Issue 15: the DEX assets used to hang off all five Uniswap tables (40 edges); each now has an edge
    from exactly the decoded and DEX tables `dex.build.compute` reads for it."""
    defs = build_definitions(cfg_of(make_config()))
    graph = defs.resolve_asset_graph()
    dex_keys = [k for k in graph.get_all_asset_keys() if k.path[:2] == ["devnet", "dex"]]
    edges = {(p.to_user_string().removeprefix("devnet/"), k.path[-1]) for k in dex_keys for p in graph.get(k).parent_keys}
    pair, factory = "uniswap_v2_pair", "uniswap_v2_factory"
    assert edges == {
        (f"{factory}_pair_created", "pools"), (f"{pair}_swap", "pools"), (f"{pair}_sync", "pools"),
        ("dex/pools", "tokens"),
        (f"{pair}_swap", "swaps"), ("dex/pools", "swaps"), ("dex/tokens", "swaps"),
        (f"{pair}_sync", "pool_reserves"), ("dex/pools", "pool_reserves"), ("dex/tokens", "pool_reserves"),
        ("dex/pool_reserves", "pool_state"),
        (f"{pair}_mint", "liquidity_events"), (f"{pair}_burn", "liquidity_events"),
        ("dex/pools", "liquidity_events"), ("dex/tokens", "liquidity_events"),
        ("dex/swaps", "pool_volume"), ("dex/swaps", "pool_candles"),
    }
