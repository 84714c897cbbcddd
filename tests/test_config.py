"""Config errors: each mistake stops with one message naming the key and the fix."""

import json
from pathlib import Path

import pytest

from indexer_dagster.config import ConfigError, interpolate_env, parse_config
from indexer_dagster.urls import redact_to_host

PAIR_ABI = Path(__file__).resolve().parents[1] / "node_modules/@uniswap/v2-core/build/UniswapV2Pair.json"
ADDR = "0x5FbDB2315678afecb367f032d93F642f64180aa3"  # checksummed (anvil's first deployment)

GOOD = f"""
chain:
  name: devnet
  chain_id: 31337
  rpc_url: ${{RPC_URL}}
  confirmations: 12
  start_block: 0
  blocks_per_partition: 10000
storage:
  data_dir: ./data
contracts:
  - name: UniswapV2Pair
    abi: {PAIR_ABI}
    addresses: ["{ADDR}"]
    events: [Swap, Sync]
"""


def load(text: str, env=None, base: Path = Path("/tmp")):
    return parse_config(text, base, "test.yaml", environ={"RPC_URL": "http://127.0.0.1:8545"} if env is None else env)


def test_good_config_loads_and_resolves_paths():
    cfg = load(GOOD)
    assert cfg.chain.rpc_url == "http://127.0.0.1:8545"
    assert cfg.contracts[0].addresses == [ADDR.lower()]
    assert [s.table for _, s in cfg.all_specs()] == ["uniswap_v2_pair_swap", "uniswap_v2_pair_sync"]
    assert cfg.data_dir == Path("/tmp/data")
    assert cfg.duckdb_path == Path("/tmp/data/indexer.duckdb")


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda t: t.replace("confirmations: 12", "confirmation: 12"), "chain.confirmation: unknown key"),
        (lambda t: t.replace(ADDR, ADDR[:-1]), "not an address"),
        (lambda t: t.replace(ADDR, ADDR.replace("F", "f", 1)), "wrong EIP-55 checksum"),
        (lambda t: t.replace(ADDR, "0x" + "zz" * 20), "not an address"),
        (lambda t: t.replace(str(PAIR_ABI), "/nonexistent/abi.json"), "contracts[0] (UniswapV2Pair).abi"),
        (lambda t: t.replace("[Swap, Sync]", "[Swap, Swapp]"), "Swapp"),
        (lambda t: t.replace("chain_id: 31337", "chain_id: -1"), "chain.chain_id"),
        (lambda t: t.replace("start_block: 0", "start_block: -5"), "chain.start_block"),
        (lambda t: t.replace("${RPC_URL}", "ws://localhost:8546"), "http:// or https://"),
        (lambda t: t.replace("name: devnet", "name: Dev Net"), "not a valid chain name"),
        (lambda t: t.replace("  chain_id: 31337\n", ""), "chain.chain_id: required key is missing"),
        (lambda t: t + "  - name: UniswapV2Pair\n    abi: x.json\n    addresses: []\n", "contracts"),
        (lambda t: t.replace("chain:\n", "chain:\n  - oops\n", 1), "not valid YAML"),
    ],
)
def test_mistakes_name_the_key(mutate, expected):
    with pytest.raises(ConfigError) as e:
        load(mutate(GOOD))
    assert expected in str(e.value)


def test_duplicate_contract_names(tmp_path):
    text = GOOD + f"""  - name: UniswapV2Pair
    abi: {PAIR_ABI}
    addresses: ["0x{'11' * 20}"]
"""
    with pytest.raises(ConfigError, match="UniswapV2Pair appears more than once"):
        load(text)


def test_lower_case_address_skips_checksum():
    cfg = load(GOOD.replace(ADDR, ADDR.lower()))
    assert cfg.contracts[0].addresses == [ADDR.lower()]


def test_missing_env_var_is_named():
    with pytest.raises(ConfigError, match=r"RPC_URL is not set"):
        load(GOOD, env={})


def test_env_default_and_secret_not_parsed_as_yaml():
    # A value with YAML-significant characters stays one string.
    assert interpolate_env("${X:-http://a}", {}) == "http://a"
    cfg = load(GOOD, env={"RPC_URL": "https://node.example/v2/key: {x}"})
    assert cfg.chain.rpc_url == "https://node.example/v2/key: {x}"


def test_bare_abi_list(tmp_path):
    abi = json.loads(PAIR_ABI.read_text())["abi"]
    p = tmp_path / "pair.json"
    p.write_text(json.dumps(abi))
    cfg = load(GOOD.replace(str(PAIR_ABI), "pair.json"), base=tmp_path)
    assert len(cfg.all_specs()) == 2


def test_abi_not_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        load(GOOD.replace(str(PAIR_ABI), str(p)))


def test_redact_to_host_hides_keys():
    assert redact_to_host("https://eth-mainnet.g.alchemy.com/v2/SECRETKEY") == "https://eth-mainnet.g.alchemy.com/…"
    assert "SECRET" not in redact_to_host("https://user:SECRET@host:8545/x?key=SECRET")


def test_reference_token_is_an_address_with_a_clear_error(tmp_path):
    from indexer_dagster.config import ChainConfig

    base = {"name": "x", "chain_id": 1, "rpc_url": "http://127.0.0.1:8545"}
    weth = "0xC02aaA39b223FE8D0A0e5C4F27eAD9083C756Cc2"
    assert ChainConfig.model_validate({**base, "reference_token": weth}).reference_token == weth.lower()
    assert ChainConfig.model_validate(base).reference_token is None
    with pytest.raises(ValueError, match="reference_token 'WETH' is not an address"):
        ChainConfig.model_validate({**base, "reference_token": "WETH"})
    with pytest.raises(ValueError, match="wrong EIP-55 checksum"):
        ChainConfig.model_validate({**base, "reference_token": weth[:-1] + "C"})
