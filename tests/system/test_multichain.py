"""Several chains in one config: two anvil nodes with different chain ids, one lake, one DuckDB."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from indexer_dagster.cli import main
from indexer_dagster.config import ConfigError, load_config, parse_configs
from indexer_dagster.devnet import Anvil, build_devnet, write_config
from indexer_dagster.query import query
from tests.sync.test_historical import node_logs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def second_chain():
    """A second anvil with its own chain id and its own Uniswap deployment and traffic."""
    node = Anvil(chain_id=31338).start()
    try:
        yield node, build_devnet(node, blocks=20, txs_per_block=8, seed=11)
    finally:
        node.stop()


def two_chain_config(tmp_path: Path, first, second) -> Path:
    """One file with `chains:` made from the single-chain configs the devnet writes for each node."""
    entries = []
    for name, (node, deployment), chain_id in (("alpha", first, 31337), ("beta", second, 31338)):
        single = yaml.safe_load(write_config(tmp_path / f"{name}.yaml", node.url, chain_id, deployment, "data",
                                             chain_name=name, confirmations=3, blocks_per_partition=25).read_text())
        entries.append({**single["chain"], "contracts": single["contracts"]})
    path = tmp_path / "indexer.yaml"
    path.write_text(yaml.safe_dump({"chains": entries, "storage": single["storage"]}, sort_keys=False))
    return path


def test_two_chains_backfill_into_one_catalog(devnet, second_chain, tmp_path, dagster_home):
    path = two_chain_config(tmp_path, devnet, second_chain)
    cfg = load_config(path)
    assert [c.chain.name for c in cfg.chains] == ["alpha", "beta"]

    result = CliRunner().invoke(main, ["backfill", "--config", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "chain alpha (id 31337)" in result.output and "chain beta (id 31338)" in result.output

    per_chain = query(cfg.duckdb_path, "select chain_id, count(*) as n from logs group by 1 order by 1")
    nodes = {31337: devnet[0], 31338: second_chain[0]}
    for c in cfg.chains:
        node = nodes[c.chain.chain_id]
        head = node.block_number()
        addresses = [a for contract in c.contracts for a in contract.addresses]
        expected = node_logs(node.url, addresses, 0, head)
        got = query(cfg.duckdb_path, f"select * from logs where chain_id = {c.chain.chain_id} "
                                     "order by block_number, log_index")
        assert got.select(expected.columns).equals(expected), c.chain.name
        blocks = query(cfg.duckdb_path, f"select number from blocks where chain_id = {c.chain.chain_id} order by 1")
        assert blocks["number"].to_list() == list(range(head + 1))
    assert per_chain["chain_id"].to_list() == [31337, 31338]
    # Decoded and DEX tables answer across chains too, each chain's pools from its own deployment.
    swaps = query(cfg.duckdb_path, "select distinct chain_id from uniswap_v2_pair_swap order by 1")
    assert swaps["chain_id"].to_list() == [31337, 31338]
    pools = query(cfg.duckdb_path, "select chain_id, count(*) as n from pool_state group by 1 order by 1")
    assert dict(zip(pools["chain_id"], pools["n"])) == {
        31337: len(devnet[1].pairs), 31338: len(second_chain[1].pairs)}

    # One chain alone: a second backfill of beta touches only beta (nothing new to write).
    again = CliRunner().invoke(main, ["backfill", "--config", str(path), "--chain", "beta"], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert "alpha" not in again.output


def test_each_chain_has_its_own_partitions_jobs_and_sensor(devnet, second_chain, tmp_path):
    from indexer_dagster.definitions import build_definitions

    defs = build_definitions(load_config(two_chain_config(tmp_path, devnet, second_chain)))
    jobs = {j.name for j in defs.resolve_all_job_defs()}
    for chain in ("alpha", "beta"):
        assert {f"{chain}_historical_sync", f"{chain}_live_sync", f"{chain}_reorg"} <= jobs
        assert defs.resolve_sensor_def(f"{chain}_chain_head") is not None
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"alpha/logs", "beta/logs"} <= keys


def test_chain_selection_and_multi_chain_config_errors(devnet, second_chain, tmp_path):
    path = two_chain_config(tmp_path, devnet, second_chain)
    assert load_config(path, "beta").chain.chain_id == 31338
    with pytest.raises(ConfigError, match="chain 'gamma' is not in the config .*alpha, beta"):
        load_config(path, "gamma")
    result = CliRunner().invoke(main, ["check", "--config", str(path), "--chain", "gamma"])
    assert result.exit_code != 0 and "alpha, beta" in result.output

    doc = yaml.safe_load(path.read_text())
    doc["chains"][1]["chain_id"] = 31337
    with pytest.raises(ConfigError, match="chain_id 31337 appears more than once"):
        parse_configs(yaml.safe_dump(doc), tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["chain"] = doc["chains"][0]
    with pytest.raises(ConfigError, match="not both"):
        parse_configs(yaml.safe_dump(doc), tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["chains"][1]["rpc_url"] = "ws://example"
    with pytest.raises(ConfigError, match=r"chains\[1\] \(beta\): .*chain.rpc_url"):
        parse_configs(yaml.safe_dump(doc), tmp_path)


def test_a_bad_chain_stops_the_backfill_before_any_chain_is_written(devnet, second_chain, tmp_path, dagster_home):
    path = two_chain_config(tmp_path, devnet, second_chain)
    cfg = load_config(path)
    beta_head = second_chain[0].block_number()
    alpha_head = devnet[0].block_number()
    assert alpha_head > beta_head
    # --to fits alpha (checked first) but is beyond beta's head.
    result = CliRunner().invoke(main, ["backfill", "--config", str(path), "--to", str(alpha_head)])
    assert result.exit_code != 0
    assert f"beyond the chain head {beta_head}" in result.output
    assert not list(cfg.data_dir.glob("*/logs/*.parquet")), "alpha was written before beta's check failed"
