"""The Dagster definitions load, validate with Dagster's own CLI, and materialize on a fresh instance."""

import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.metadata.metadata_set import TableMetadataSet  # not exported by `dagster` in 1.13

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
        assert meta["dagster/row_count"].value > 0 and meta["block_range"].value == "25-49"
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
        (f"{pair}_swap", "swaps"), ("dex/pools", "swaps"), ("dex/tokens", "swaps"), ("dex/pool_reserves", "swaps"),
        (f"{pair}_sync", "pool_reserves"), ("dex/pools", "pool_reserves"), ("dex/tokens", "pool_reserves"),
        ("dex/pool_reserves", "pool_state"),
        (f"{pair}_mint", "liquidity_events"), (f"{pair}_burn", "liquidity_events"),
        ("dex/pools", "liquidity_events"), ("dex/tokens", "liquidity_events"),
        ("dex/swaps", "pool_volume"), ("dex/swaps", "pool_candles"),
    }


def test_a_range_run_shows_dagster_table_metadata(make_config, monkeypatch):
    """Issue 15: what a Dagster user sees on the range assets after a real run. Each table names its DuckDB
    view and Parquet directory, its column schema is that view's columns, each range's row count is
    `dagster/row_count` (equal to the view's rows in the range), checks carry numbers, and descriptions
    name the chain and the contract."""
    import duckdb

    path = make_config()
    monkeypatch.setenv("INDEXER_CONFIG", str(path))
    cfg = cfg_of(path)
    defs = build_definitions(cfg)
    graph = defs.resolve_asset_graph()
    key = "000000000025-000000000049"
    swap_key, logs_key = dg.AssetKey(["devnet", "uniswap_v2_pair_swap"]), dg.AssetKey(["devnet", "logs"])
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("devnet_block_ranges", [key])
        assert defs.resolve_job_def("devnet_historical_sync").execute_in_process(instance=instance, partition_key=key).success
        counts = {k: instance.fetch_materializations(k, limit=1).records[0].asset_materialization.metadata["dagster/row_count"]
                  for k in (swap_key, logs_key, dg.AssetKey(["devnet", "blocks"]))}
        assert defs.resolve_job_def("devnet_dex").execute_in_process(instance=instance).success
        dex_swaps = dg.AssetKey(["devnet", "dex", "swaps"])
        dex_count = instance.fetch_materializations(dex_swaps, limit=1).records[0].asset_materialization.metadata[
            "dagster/row_count"]
        check = dg.AssetCheckKey(logs_key, "unique_logs")
        [execution] = instance.event_log_storage.get_asset_check_execution_history(check, limit=1)
        check_meta = execution.event.dagster_event.event_specific_data.metadata
    assert all(isinstance(v, dg.IntMetadataValue) for v in counts.values()), counts
    assert isinstance(check_meta["ranges_checked"], dg.IntMetadataValue) and check_meta["ranges_checked"].value == 1
    assert check_meta["ranges_failed"].value == 0 and check_meta["duplicated_keys"].value == 0
    assert check_meta["rows"].value == counts[logs_key].value > 0

    con = duckdb.connect(str(cfg.duckdb_path), read_only=True)
    try:
        for asset_key, count in counts.items():
            spec = graph.get(asset_key)
            standard = TableMetadataSet.extract(spec.metadata)  # how Dagster itself reads these keys
            table = standard.table_name
            number = "number" if asset_key.path[-1] == "blocks" else "block_number"
            [(rows,)] = con.execute(f"select count(*) from {table} where {number} between 25 and 49").fetchall()
            assert rows == count.value, (table, rows, count)
            described = con.execute(f"describe {table}").fetchall()
            schema = standard.column_schema
            assert schema is not None
            assert [(c.name, c.type) for c in schema.columns] == [(n, t) for n, t, *_ in described], table
            uri = spec.metadata["dagster/uri"]
            assert uri.startswith("file://") and (Path(uri.removeprefix("file://")) / f"{key}.parquet").is_file(), uri
        dex_table = TableMetadataSet.extract(graph.get(dex_swaps).metadata).table_name
        assert con.execute(f"select count(*) from {dex_table}").fetchall() == [(dex_count.value,)] != [(0,)]
        # The DEX tables' Parquet: a directory of step files (swaps), or one file (pool_state).
        for table, kind in (("swaps", Path.is_dir), ("pool_state", Path.is_file)):
            uri = graph.get(dg.AssetKey(["devnet", "dex", table])).metadata["dagster/uri"]
            assert kind(Path(uri.removeprefix("file://"))), uri
    finally:
        con.close()
    swap = graph.get(swap_key)
    swap_schema = TableMetadataSet.extract(swap.metadata).column_schema
    assert swap_schema is not None
    contract, spec = next((c, s) for c, s in cfg.all_specs() if s.table == "uniswap_v2_pair_swap")
    amount = next(p for p in spec.inputs if p.name == "amount0In")
    column = next(c for c in swap_schema.columns if c.name == amount.column)
    assert column.description is not None and "amount0In (uint256)" in column.description, column
    assert swap.description is not None and "devnet (chain id 31337)" in swap.description
    assert contract.name in swap.description
    emitter = contract.factory.contract if contract.factory is not None else contract.addresses[0]
    assert emitter in swap.description, swap.description
