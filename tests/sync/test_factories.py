"""Factory-created contracts (Uniswap V2 pairs named by the factory's PairCreated) on a real anvil.

Pairs created before the indexer starts, inside a range being backfilled, and during live sync are
all indexed from their creation block; the views equal the node's eth_getLogs for every pair; a
reorg that removes a PairCreated removes the pair and its events from the views (archived).
"""

from pathlib import Path

import polars as pl
import pytest
import yaml
from eth_abi import encode
from eth_utils import to_checksum_address

from indexer_dagster.block_range import ranges_between
from indexer_dagster.config import ConfigError, load_config
from indexer_dagster.devnet import Anvil, write_config
from indexer_dagster.devnet.uniswap import (
    GAS,
    SEL,
    Deployment,
    PairInfo,
    _addr_key,
    _Automine,
    _receipts,
    _send_block,
    _tx,
    deploy_uniswap,
    event_topics,
    generate_traffic,
    mint_call_tx,
    transfer_tx,
)
from indexer_dagster.devnet.uniswap import (
    reorg as anvil_reorg,
)
from indexer_dagster.persist.catalog import build_catalog
from indexer_dagster.query import query
from indexer_dagster.state import Phase, open_state
from indexer_dagster.sync.contracts import ContractSet, discover, gaps, stored_children
from indexer_dagster.sync.historical import sync_range
from indexer_dagster.sync.repair import repair
from tests.sync.test_historical import node_logs
from tests.sync.test_reorg import follow_until_synced as follow

FACTORY = {"contract": "UniswapV2Factory", "event": "PairCreated", "parameter": "pair"}


def factory_config(path: Path, node_url: str, dep: Deployment, **kw) -> Path:
    """The devnet config with UniswapV2Pair given by the factory instead of addresses."""
    write_config(path, node_url, 31337, dep, "data", **kw)
    doc = yaml.safe_load(path.read_text())
    pair = next(c for c in doc["contracts"] if c["name"] == "UniswapV2Pair")
    del pair["addresses"]
    pair["factory"] = dict(FACTORY)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def create_pair(node: Anvil, dep: Deployment, i: int, j: int, extra_blocks_txs: bool = True) -> PairInfo:
    """factory.createPair(tokens[i], tokens[j]) plus its first liquidity (Transfer, Sync, Mint) in the same block."""
    c = node.w3
    data = SEL["createPair"] + encode(["address", "address"], [dep.tokens[i], dep.tokens[j]])
    ret = node.rpc("eth_call", [{"from": dep.trader, "to": dep.factory, "data": "0x" + data.hex()}, "latest"])
    pair = to_checksum_address("0x" + ret[-40:])
    t0, t1 = sorted([dep.tokens[i], dep.tokens[j]], key=_addr_key)
    with _Automine(c):
        nonce = int(node.rpc("eth_getTransactionCount", [dep.trader, "pending"]), 16)
        txs = [
            _tx(dep.trader, dep.factory, data, GAS["create_pair"], nonce),
            transfer_tx(dep.trader, t0, pair, 3 * 10 ** (6 + dep.decimals_of(t0)), nonce + 1),  # 3M whole tokens
            transfer_tx(dep.trader, t1, pair, 5 * 10 ** (6 + dep.decimals_of(t1)), nonce + 2),
            mint_call_tx(dep.trader, pair, dep.trader, nonce + 3),
        ]
        receipts = _receipts(c, _send_block(c, txs))
    info = PairInfo(pair, t0, t1, int(receipts[0]["blockNumber"], 16))
    dep.pairs.append(info)
    return info


def all_addresses(cfg, dep: Deployment) -> list[str]:
    tokens = dep.tokens if any(c.name == "ERC20" for c in cfg.contracts) else []
    return [a.lower() for a in [dep.factory, *dep.pair_addresses, *tokens]]


def assert_views_equal_node(cfg, node, dep: Deployment) -> pl.DataFrame:
    build_catalog(cfg)
    head = node.block_number()
    expected = node_logs(node.url, all_addresses(cfg, dep), 0, head)
    got = query(cfg.duckdb_path, "select * from logs order by block_number, log_index")
    assert got.height == expected.height
    assert got.select(expected.columns).equals(expected)
    pairs = {p.address.lower() for p in dep.pairs}
    topics = event_topics("UniswapV2Pair")
    for event, table in (("Swap", "swap"), ("Sync", "sync"), ("Mint", "mint"), ("Transfer", "transfer")):
        want = expected.filter(pl.col("address").is_in(sorted(pairs)) & (pl.col("topic0") == topics[event]))
        rows = query(cfg.duckdb_path, f"select block_number, log_index, address from uniswap_v2_pair_{table} "
                                      "order by block_number, log_index")
        assert rows.equals(want.select("block_number", "log_index", "address")), table
    if not any(c.name == "ERC20" for c in cfg.contracts):
        return expected
    # ERC20 Transfer shares the pair's topic0: each table decodes only its own contracts' logs.
    erc = query(cfg.duckdb_path, "select count(*) n from erc20_transfer where address in "
                                 f"({', '.join(repr(p) for p in sorted(pairs))})")
    assert erc["n"][0] == 0
    return expected


@pytest.mark.slow
def test_pairs_before_during_backfill_and_live_are_indexed_then_a_reorg_removes_one(tmp_path):
    node = Anvil(chain_id=31337).start()
    try:
        # Two pairs before the indexer starts, then traffic.
        dep = deploy_uniswap(node, n_tokens=4, n_pairs=2, seed=5)
        generate_traffic(node.url, dep, blocks=4, txs_per_block=6, seed=5)
        # A pair created in the middle of what becomes a backfilled range, with traffic after it.
        mid = create_pair(node, dep, 0, 3)
        generate_traffic(node.url, dep, blocks=4, txs_per_block=6, seed=6)
        path = factory_config(tmp_path / "indexer.yaml", node.url, dep, blocks_per_partition=10, confirmations=3)
        cfg = load_config(path)
        head = node.block_number()
        ranges = ranges_between(cfg.start_block, head, cfg.chain.blocks_per_partition)
        assert any(r.start < mid.created_block < r.end for r in ranges)
        # Backfill the ranges from the top down: the upper range must find the children created in
        # lower ranges that have not been indexed yet (the scan of uncovered blocks).
        for r in reversed(ranges):
            sync_range(cfg, r)
        registry = stored_children(cfg)
        assert sorted(registry["address"].to_list()) == sorted(p.address.lower() for p in dep.pairs)
        assert dict(zip(registry["address"], registry["block_number"])) == {
            p.address.lower(): p.created_block for p in dep.pairs}
        assert_views_equal_node(cfg, node, dep)

        # Live sync: a pair created (with its first Mint/Sync/Transfers in the same block) while following.
        store = open_state(cfg.state_url)
        follow(cfg, store)
        live_pair = create_pair(node, dep, 1, 2)
        generate_traffic(node.url, dep, blocks=3, txs_per_block=6, seed=7)
        follow(cfg, store)
        assert store.tip(cfg.chain.name).number == node.block_number()
        expected = assert_views_equal_node(cfg, node, dep)
        first = query(cfg.duckdb_path, "select min(block_number) b from uniswap_v2_pair_mint "
                                       f"where address = '{live_pair.address.lower()}'")
        assert first["b"][0] == live_pair.created_block
        assert expected.filter(pl.col("address") == live_pair.address.lower()).height > 3

        # A reorg that removes a PairCreated: the pair and its events leave the views (archived).
        doomed = create_pair(node, dep, 1, 3)
        generate_traffic(node.url, dep, blocks=1, txs_per_block=4, seed=8)
        follow(cfg, store)
        build_catalog(cfg)
        before = query(cfg.duckdb_path, f"select count(*) n from logs where address = '{doomed.address.lower()}'")
        assert before["n"][0] >= 4
        dep.pairs.remove(doomed)
        depth = node.block_number() - doomed.created_block + 1
        anvil_reorg(node.url, dep, depth, txs_per_block=3, seed=9, verify=False)
        results = follow(cfg, store)
        assert results[-1].action == "reorg"
        reorg_id = store.active_reorg(cfg.chain.name).id
        res = repair(cfg, store, reorg_id)
        assert res.reorg.phase is Phase.DONE
        follow(cfg, store)
        assert_views_equal_node(cfg, node, dep)
        gone = doomed.address.lower()
        assert gone not in stored_children(cfg)["address"].to_list()
        for view in ("logs", "uniswap_v2_pair_sync", "uniswap_v2_pair_mint"):
            assert query(cfg.duckdb_path, f"select count(*) n from {view} where address = '{gone}'")["n"][0] == 0
        archived = query(cfg.duckdb_path, f"select count(*) n from orphaned_logs where address = '{gone}' "
                                          f"and reorg_id = {reorg_id}")
        assert archived["n"][0] == before["n"][0]
        orphaned_children = pl.concat([pl.read_parquet(p) for p in (cfg.data_dir / "devnet" / "orphaned" / "children")
                                       .glob("r*.parquet")])
        assert gone in orphaned_children["address"].to_list()
        # The fork's blocks, with other traffic, are live: a pair created after the reorg is found again.
        again = create_pair(node, dep, 2, 3)
        follow(cfg, store)
        assert_views_equal_node(cfg, node, dep)
        assert again.address.lower() in stored_children(cfg)["address"].to_list()
        store.close()
    finally:
        node.stop()


# -- config and pure parts (no chain) ----------------------------------------------------------------


def _cfg_text(tmp_path: Path, pair: dict) -> Path:
    from indexer_dagster.devnet.uniswap import artifact_paths

    arts = artifact_paths()
    doc = {
        "chain": {"name": "t", "chain_id": 1, "rpc_url": "http://127.0.0.1:1"},
        "contracts": [
            {"name": "UniswapV2Factory", "abi": str(arts["UniswapV2Factory"]),
             "addresses": ["0x5c69bee701ef814a2b6a3edd4b1652cb9cc5aa6f"]},
            {"name": "UniswapV2Pair", "abi": str(arts["UniswapV2Pair"]), **pair},
        ],
    }
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


@pytest.mark.parametrize("pair, message", [
    ({"factory": {**FACTORY, "contract": "Nope"}}, "factory.contract: 'Nope' is not a configured contract"),
    ({"factory": {**FACTORY, "event": "Created"}}, "factory.event"),
    ({"factory": {**FACTORY, "parameter": "pool"}}, "factory.parameter: PairCreated has no argument 'pool'"),
    ({"factory": {**FACTORY, "parameter": ""}}, "factory.parameter"),
    ({}, "needs exactly one of `addresses`"),
    ({"addresses": ["0xb4e16d0168e52d35cacd2c6185b44281ec28c9dc"], "factory": FACTORY}, "needs exactly one"),
    ({"factory": {"contract": "UniswapV2Factory", "event": "PairCreated"}}, "factory.parameter: required key"),
])
def test_bad_factory_config_names_the_key(tmp_path, pair, message):
    with pytest.raises(ConfigError) as e:
        load_config(_cfg_text(tmp_path, pair))
    assert message in str(e.value)


def test_factory_parameter_must_be_an_address(tmp_path):
    # PairCreated(address indexed token0, address indexed token1, address pair, uint256): the uint is unnamed.
    import json

    from indexer_dagster.devnet.uniswap import artifact_paths

    abi = json.loads(Path(artifact_paths()["UniswapV2Factory"]).read_text())["abi"]
    for item in abi:
        if item.get("name") == "PairCreated":
            item["inputs"][3]["name"] = "index"
    f = tmp_path / "factory.json"
    f.write_text(json.dumps(abi))
    p = _cfg_text(tmp_path, {"factory": {**FACTORY, "parameter": "index"}})
    doc = yaml.safe_load(p.read_text())
    doc["contracts"][0]["abi"] = str(f)
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"factory.parameter: 'index' of PairCreated\(.*\) is a uint256, not an address"):
        load_config(p)


def test_discover_and_contract_set(tmp_path):
    cfg = load_config(_cfg_text(tmp_path, {"factory": FACTORY}))
    topic = event_topics("UniswapV2Factory")["PairCreated"]
    fac = "0x5c69bee701ef814a2b6a3edd4b1652cb9cc5aa6f"
    word = lambda a: "0x" + "0" * 24 + a[2:]  # noqa: E731
    pair_a, pair_b = "0x" + "a" * 40, "0x" + "b" * 40
    rows = [
        # (block, log index, emitter, pair): the third is emitted by another address and is ignored.
        (7, 0, fac, pair_a), (9, 3, fac, pair_b), (9, 4, "0x" + "c" * 40, "0x" + "d" * 40),
    ]
    logs = pl.DataFrame({
        "chain_id": [1] * 3, "block_number": [r[0] for r in rows], "block_hash": ["0x" + "1" * 64] * 3,
        "transaction_hash": ["0x" + "2" * 64] * 3, "transaction_index": [0] * 3,
        "log_index": [r[1] for r in rows], "address": [r[2] for r in rows], "topic0": [topic] * 3,
        "topic1": [word("0x" + "e" * 40)] * 3, "topic2": [word("0x" + "f" * 40)] * 3, "topic3": [None] * 3,
        "data": ["0x" + word(r[3])[2:] + "%064x" % 1 for r in rows],
    })
    found = discover(cfg, logs)
    assert found.select("block_number", "address", "contract").rows() == [
        (7, pair_a, "UniswapV2Pair"), (9, pair_b, "UniswapV2Pair")]
    cs = ContractSet(cfg, found.head(1))
    assert cs.add(found).height == 1 and cs.add(found).height == 0
    assert cs.addresses_of("UniswapV2Pair", up_to=8) == [pair_a]
    assert cs.starts() == {fac: 0, pair_a: 7, pair_b: 9}
    assert cs.table_addresses()["uniswap_v2_pair_swap"] == {pair_a, pair_b}
    assert gaps(0, 30, [(0, 9), (15, 19)]) == [(10, 14), (20, 30)]
    assert gaps(5, 8, [(0, 9)]) == []


@pytest.mark.slow
def test_adding_a_factory_supplements_stored_ranges_and_a_reorg_archives_the_supplement(tmp_path):
    """The factory is indexed first; adding its pairs (a factory rule) fetches only the pairs' logs
    into supplement files; a reorg through a supplemented range archives their rows too, and the
    restore replaces range + supplements by one file holding both."""
    from indexer_dagster.persist.files import data_files
    from indexer_dagster.sync.supplement import SUPPLEMENT, plan_range, supplement_range

    node = Anvil(chain_id=31337).start()
    try:
        dep = deploy_uniswap(node, n_tokens=3, n_pairs=2, seed=2)
        generate_traffic(node.url, dep, blocks=8, txs_per_block=6, seed=2)
        create_pair(node, dep, 1, 2)  # a pair created inside a range already stored
        generate_traffic(node.url, dep, blocks=16, txs_per_block=6, seed=3)
        path = factory_config(tmp_path / "indexer.yaml", node.url, dep, blocks_per_partition=10, confirmations=3,
                              include_tokens=False)
        only_factory = yaml.safe_load(path.read_text())
        only_factory["contracts"] = [c for c in only_factory["contracts"] if c["name"] == "UniswapV2Factory"]
        full_text = path.read_text()
        path.write_text(yaml.safe_dump(only_factory, sort_keys=False))
        cfg = load_config(path)
        head = node.block_number()
        ranges = ranges_between(cfg.start_block, head, 10)
        for r in ranges:
            sync_range(cfg, r)
        lake = cfg.data_dir / cfg.chain.name
        before = {p: p.read_bytes() for p in data_files(lake / "logs")}

        path.write_text(full_text)  # add UniswapV2Pair, given by the factory
        cfg = load_config(path)
        complete = [r for r in ranges if r.end <= head]
        assert [plan_range(cfg, r) for r in complete] == [SUPPLEMENT] * len(complete)
        from indexer_dagster.chain.rpc import RpcStats

        for r in complete:
            supplement_range(cfg, r, RpcStats())
        sync_range(cfg, ranges[-1])  # the top range was cut at the head: fetched again in full
        assert all(p.read_bytes() == b for p, b in before.items() if "000000000020" not in p.name)
        assert any("+" in p.name for p in data_files(lake / "logs"))
        assert sorted(stored_children(cfg)["address"]) == sorted(a.lower() for a in dep.pair_addresses)
        assert_views_equal_node(cfg, node, dep)

        # A reorg reaching into a supplemented range (10-19).
        store = open_state(cfg.state_url)
        follow(cfg, store)
        build_catalog(cfg)
        depth = node.block_number() - 16
        old_rows = query(cfg.duckdb_path, "select * from logs where block_number > 16")
        anvil_reorg(node.url, dep, depth, txs_per_block=4, seed=12, verify=False)
        assert follow(cfg, store)[-1].action == "reorg"
        res = repair(cfg, store, store.active_reorg(cfg.chain.name).id)
        assert res.reorg.phase is Phase.DONE and "000000000010-000000000019" in res.restored_partitions
        follow(cfg, store)
        store.close()
        assert_views_equal_node(cfg, node, dep)
        assert not [p for p in data_files(lake / "logs") if p.name.startswith("000000000010-000000000019+")]
        archived = query(cfg.duckdb_path, "select block_number, log_index, address from orphaned_logs "
                                          f"where reorg_id = {res.reorg.id} order by 1, 2")
        assert archived.equals(old_rows.select("block_number", "log_index", "address").sort("block_number", "log_index"))
        pairs = {p.address.lower() for p in dep.pairs}
        assert set(archived["address"]) & pairs  # rows that were in supplement files
    finally:
        node.stop()


def test_thousands_of_children_decode_and_show_in_the_views(tmp_path):
    """3,000 children sharing the pair ABI: the registry is derived from the factory's logs, decoding
    keeps each child's events, the views show exactly the registered children (a log of an
    unregistered address is hidden)."""
    from indexer_dagster.block_range import parse_key
    from indexer_dagster.persist.datasets import LOG_SCHEMA
    from indexer_dagster.persist.lake import Lake
    from indexer_dagster.sync.historical import decode_range

    cfg = load_config(_cfg_text(tmp_path, {"factory": FACTORY}))
    n, key = 3000, "000000000000-000000009999"
    fac = "0x5c69bee701ef814a2b6a3edd4b1652cb9cc5aa6f"
    children = [f"0x{i + 1:040x}" for i in range(n)]
    word = lambda a: "0x" + "0" * 24 + a[2:]  # noqa: E731
    created = [(2 * i, fac, event_topics("UniswapV2Factory")["PairCreated"], word(fac), word(fac),
                "0x" + word(c)[2:] + "%064x" % (i + 1)) for i, c in enumerate(children)]
    # Each child's Sync right after its creation; the last five from an address no factory created.
    synced = [(2 * i + 1, c, event_topics("UniswapV2Pair")["Sync"], None, None,
               "0x" + "%064x" % (i + 1) + "%064x" % 7) for i, c in enumerate(children + ["0x" + "e" * 40] * 5)]
    rows = sorted(created + synced)
    m = len(rows)
    Lake(cfg.data_dir, cfg.chain.name).write("logs", key, pl.DataFrame({
        "chain_id": [1] * m, "block_number": [r[0] for r in rows], "block_hash": ["0x" + "1" * 64] * m,
        "block_timestamp": [None] * m, "transaction_hash": ["0x" + "2" * 64] * m, "transaction_index": [0] * m,
        "log_index": [0] * m, "address": [r[1] for r in rows], "topic0": [r[2] for r in rows],
        "topic1": [r[3] for r in rows], "topic2": [r[4] for r in rows], "topic3": [None] * m,
        "data": [r[5] for r in rows],
    }, schema=LOG_SCHEMA))
    res = decode_range(cfg, parse_key(key))
    assert res.events["uniswap_v2_pair_sync"] == n
    assert stored_children(cfg)["address"].to_list() == children
    build_catalog(cfg)
    got = query(cfg.duckdb_path, "select count(*) n, count(distinct address) a from uniswap_v2_pair_sync")
    assert got.row(0) == (n, n)
    assert query(cfg.duckdb_path, "select count(*) n from logs")["n"][0] == 2 * n
