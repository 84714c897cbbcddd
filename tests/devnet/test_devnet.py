"""The devnet against a real anvil: real Uniswap V2 contracts, traffic, replacement forks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

try:
    import indexer_dagster  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from eth_abi import decode
from eth_utils import is_checksum_address, to_checksum_address
from web3.exceptions import Web3RPCError

from indexer_dagster.devnet import (
    Anvil,
    build_devnet,
    count_logs,
    plan_reorg,
    read_reserves,
    reorg,
    rpc,
    run_devnet,
    write_config,
)
from indexer_dagster.devnet.anvil import find_anvil
from indexer_dagster.devnet.uniswap import event_topics

pytestmark = pytest.mark.slow

BLOCKS, TXS = 30, 20


def _anvil_or_skip() -> None:
    try:
        find_anvil()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def chain():
    _anvil_or_skip()
    with Anvil() as node:
        dep = build_devnet(node, blocks=BLOCKS, txs_per_block=TXS, seed=11, n_tokens=4, n_pairs=6, verify=False)
        yield node, dep


def test_tokens_read_like_a_market_with_18_and_6_decimals(chain):
    """The devnet's ERC-20s answer name/symbol/decimals like mainnet's (USDC: 6 decimals), and the pools
    start near the tokens' usual prices: WETH around 3000 USDC."""
    node, dep = chain

    def call(to: str, selector: str, typ: str):
        return decode([typ], bytes.fromhex(rpc(node.url, "eth_call", [{"to": to, "data": selector}, "latest"])[2:]))[0]

    got = [(call(t, "0x95d89b41", "string"), call(t, "0x313ce567", "uint8")) for t in dep.tokens]
    assert got == [("WETH", 18), ("USDC", 6), ("DAI", 18), ("LINK", 18)]
    assert dep.token_decimals == [18, 6, 18, 18]
    weth, usdc = dep.tokens[:2]
    [(pair, (r0, r1))] = [(p, r) for p, r in zip(dep.pairs, read_reserves(node, dep)) if {p.token0, p.token1} == {weth, usdc}]
    usdc_reserve, weth_reserve = (r0, r1) if pair.token0 == usdc else (r1, r0)
    assert 2000 < (usdc_reserve / 10**6) / (weth_reserve / 10**18) < 4500  # USDC per WETH, after the traffic


def _get_logs(url: str, frm: int, to: int, address, topic0: str | None = None) -> list[dict]:
    flt = {"fromBlock": hex(frm), "toBlock": hex(to), "address": address}
    if topic0:
        flt["topics"] = [topic0]
    return rpc(url, "eth_getLogs", [flt])


def test_rpc_helpers(chain):
    node, _ = chain
    assert int(rpc(node.url, "eth_chainId"), 16) == 31337
    with pytest.raises(Web3RPCError) as ei:  # web3.py's error for a JSON-RPC error answer
        node.rpc("eth_noSuchMethod")
    assert ei.value.rpc_response["error"]["code"] == -32601
    got = node.batch([("eth_chainId", []), ("eth_noSuchMethod", [])], raise_on_error=False)
    assert got[0] == "0x7a69" and isinstance(got[1], Web3RPCError)
    assert got[1].rpc_response["error"]["code"] == -32601


def test_deployment_logs(chain):
    node, dep = chain
    assert len(dep.tokens) == 4 and len(dep.pairs) == 6
    for p in dep.pairs:  # pair token order = sorted addresses
        assert int(p.token0, 16) < int(p.token1, 16)
        assert {p.token0, p.token1} <= set(dep.tokens)
    got = count_logs(node, dep, 0, dep.seed_block)
    want = dep.expected_deployment_logs()
    for kind in want:
        assert {k: v for k, v in got[kind].items() if v} == {k: v for k, v in want[kind].items() if v}, kind
    created = _get_logs(node.url, 0, dep.seed_block, dep.factory, event_topics("UniswapV2Factory")["PairCreated"])
    assert sorted(to_checksum_address("0x" + lg["data"][26:66]) for lg in created) == sorted(dep.pair_addresses)


def test_traffic_logs_match_chain(chain):
    node, dep = chain
    tr = dep.traffic
    assert tr["blocks"] == BLOCKS and tr["txs"] == BLOCKS * TXS
    assert (tr["first_block"], tr["last_block"]) == (dep.seed_block + 1, dep.seed_block + BLOCKS)
    assert node.block_number() == tr["last_block"]
    lo, hi = tr["first_block"], tr["last_block"]
    pair_topics = event_topics("UniswapV2Pair")
    want_pair = tr["logs_by_contract"]["UniswapV2Pair"]
    for ev in ("Swap", "Sync", "Mint", "Burn", "Transfer"):
        logs = _get_logs(node.url, lo, hi, dep.pair_addresses, pair_topics[ev])
        assert len(logs) == want_pair[ev] > 0, ev
    erc_topics = event_topics("ERC20")
    for ev in ("Transfer", "Approval"):
        logs = _get_logs(node.url, lo, hi, dep.tokens, erc_topics[ev])
        assert len(logs) == tr["logs_by_contract"]["ERC20"][ev] > 0, ev
    # every block carries TXS transactions; Swap, Sync and Transfer happen in each block
    for n in (lo, (lo + hi) // 2, hi):
        assert int(node.rpc("eth_getBlockTransactionCountByNumber", [hex(n)]), 16) == TXS
    # swaps go both ways
    swaps = _get_logs(node.url, lo, hi, dep.pair_addresses, pair_topics["Swap"])
    dirs = set()
    for lg in swaps:
        a0in, a1in, a0out, a1out = decode(["uint256"] * 4, bytes.fromhex(lg["data"][2:]))
        dirs.add((a0in > 0 and a1out > 0, a1in > 0 and a0out > 0))
    assert (True, False) in dirs and (False, True) in dirs
    # no reverted tx (sampled): every receipt of the last block succeeded
    blk = node.rpc("eth_getBlockByNumber", [hex(hi), False])
    receipts = node.batch([("eth_getTransactionReceipt", [h]) for h in blk["transactions"]])
    assert all(r["status"] == "0x1" for r in receipts)


def test_reserves_match_tracking(chain):
    node, dep = chain
    assert [tuple(r) for r in read_reserves(node, dep)] == [tuple(r) for r in dep.traffic["reserves"]]
    # the last Sync of each pair carries the same reserves
    syncs = _get_logs(node.url, dep.traffic["first_block"], dep.traffic["last_block"], dep.pair_addresses,
                      event_topics("UniswapV2Pair")["Sync"])
    last = {}
    for lg in syncs:
        last[lg["address"].lower()] = decode(["uint112", "uint112"], bytes.fromhex(lg["data"][2:]))
    for p, r in zip(dep.pairs, dep.traffic["reserves"]):
        assert tuple(last[p.address.lower()]) == tuple(r)


def test_write_config(chain, tmp_path):
    import yaml

    _node, dep = chain
    cfg = write_config(tmp_path / "cfg" / "indexer.yaml", "DEVNET_RPC_URL", 31337, dep, data_dir=tmp_path / "data")
    doc = yaml.safe_load(cfg.read_text())
    assert doc["chain"]["rpc_url"] == "${DEVNET_RPC_URL}" and doc["chain"]["chain_id"] == 31337
    assert doc["storage"] == {"data_dir": "../data", "duckdb_path": "../data/indexer.duckdb"}
    by_name = {c["name"]: c for c in doc["contracts"]}
    assert by_name["UniswapV2Pair"]["addresses"] == dep.pair_addresses
    assert by_name["UniswapV2Pair"]["events"] == ["Swap", "Sync", "Mint", "Burn", "Transfer"]
    for c in doc["contracts"]:
        assert all(is_checksum_address(a) for a in c["addresses"])
        art = json.loads((cfg.parent / c["abi"]).read_text())
        assert "abi" in art


def test_reorg_replaces_blocks_with_different_uniswap_txs():
    _anvil_or_skip()
    with Anvil() as node:
        dep = build_devnet(node, blocks=8, txs_per_block=10, seed=5)
        head = node.block_number()
        depth = 3
        lo = head - depth + 1
        swap_t = event_topics("UniswapV2Pair")["Swap"]
        before = _get_logs(node.url, lo, head, dep.pair_addresses, swap_t)
        pairs, _ = plan_reorg(node, dep, depth, txs_per_block=6, seed=99)
        assert all(set(tx) >= {"from", "to", "data", "gas"} and 0 <= off < depth for tx, off in pairs)
        exp = reorg(node, dep, depth, txs_per_block=6, seed=99)  # verifies logs + reserves itself
        assert node.block_number() == head
        assert all(o != n for o, n in zip(exp["old_hashes"], exp["new_hashes"]))
        after = _get_logs(node.url, lo, head, dep.pair_addresses, swap_t)
        assert len(after) == exp["logs_by_contract"]["UniswapV2Pair"]["Swap"] > 0
        assert {lg["blockHash"] for lg in after} <= set(exp["new_hashes"])
        assert {(lg["transactionHash"], lg["data"]) for lg in before}.isdisjoint(
            {(lg["transactionHash"], lg["data"]) for lg in after})
        for h in exp["new_hashes"]:
            blk = node.rpc("eth_getBlockByHash", [h, False])
            rs = node.batch([("eth_getTransactionReceipt", [t]) for t in blk["transactions"]])
            assert len(rs) == 6 and all(r["status"] == "0x1" for r in rs)
        # the chain keeps going on the new branch
        node.rpc("evm_mine")
        assert node.block_number() == head + 1


def test_run_devnet_state_cache(tmp_path):
    _anvil_or_skip()
    cache = tmp_path / "cache"
    node, dep, cfg = run_devnet(tmp_path / "out", blocks=5, txs_per_block=8, seed=2, state_cache=cache, echo=None)
    try:
        head = node.rpc("eth_getBlockByNumber", ["latest", False])
        n_logs = count_logs(node, dep, 0, int(head["number"], 16))
    finally:
        node.stop()
    assert cfg.is_file() and (cfg.parent / "abis" / "UniswapV2Pair.json").is_file()
    assert len(list(cache.glob("*.state.json.gz"))) == 1
    node2, dep2, _ = run_devnet(tmp_path / "out", blocks=5, txs_per_block=8, seed=2, state_cache=cache, echo=None)
    try:
        assert dep2.to_dict() == json.loads(json.dumps(dep.to_dict()))
        assert node2.rpc("eth_getBlockByNumber", ["latest", False])["hash"] == head["hash"]
        assert count_logs(node2, dep2, 0, int(head["number"], 16)) == n_logs
    finally:
        node2.stop()
