"""DEX tables on anvil: derived from the canonical events, equal to the chain, and after a reorg equal
to a recomputation from scratch on the new fork."""

from datetime import UTC

import polars as pl
import pytest

from indexer_dagster.config import load_config
from indexer_dagster.devnet import write_config
from indexer_dagster.devnet.uniswap import reorg as anvil_reorg
from indexer_dagster.dex.build import build_dex, compute
from indexer_dagster.query import query
from indexer_dagster.sync.repair import repair
from tests.sync.test_reorg import backfill_plain, chain, follow_until_synced, indexed_live  # noqa: F401

pytestmark = pytest.mark.slow


def chain_decimals(node, token: str) -> int:
    return int(node.rpc("eth_call", [{"to": token, "data": "0x313ce567"}, "latest"]), 16)  # decimals()


def check_against_chain(cfg, node):
    state = query(cfg.duckdb_path, "select pool, token0, token1, reserve0, reserve1, reserve0_h, reserve1_h "
                                   "from pool_state")
    assert state.height == 6
    for pool, t0, t1, r0, r1, h0, h1 in state.iter_rows():
        ret = node.rpc("eth_call", [{"to": pool, "data": "0x0902f1ac"}, "latest"])  # getReserves()
        assert (int(r0), int(r1)) == (int(ret[2:66], 16), int(ret[66:130], 16))
        # Human reserves: getReserves() over 10**decimals() of each token, 6-decimal USDC included.
        d0, d1 = chain_decimals(node, t0), chain_decimals(node, t1)
        assert (h0, h1) == pytest.approx((int(r0) / 10**d0, int(r1) / 10**d1), rel=1e-15)
    n_swaps = query(cfg.duckdb_path, "select count(*) n from swaps")["n"][0]
    n_events = query(cfg.duckdb_path, "select count(*) n from uniswap_v2_pair_swap")["n"][0]
    assert n_swaps == n_events > 0
    tokens = query(cfg.duckdb_path, "select * from tokens")
    # The devnet's tokens are ERC-20s named like a market, 18 and 6 decimals; read with eth_call.
    assert dict(zip(tokens["symbol"], tokens["decimals"])) == {"WETH": 18, "USDC": 6, "DAI": 18, "LINK": 18}
    assert all(chain_decimals(node, a) == d for a, d in zip(tokens["address"], tokens["decimals"]))
    # A swap's human amounts are its raw amounts over 10**decimals (USDC's 6 where it is a side).
    swaps = query(cfg.duckdb_path, "select decimals0, decimals1, amount0_in, amount1_out, amount0_in_h, "
                                   "amount1_out_h from swaps where 6 in (decimals0, decimals1)")
    assert swaps.height > 0
    for d0, d1, a0, a1, h0, h1 in swaps.iter_rows():
        assert (h0, h1) == pytest.approx((int(a0) / 10**d0, int(a1) / 10**d1), rel=1e-15)


def dex_frames(cfg) -> dict[str, pl.DataFrame]:
    out = {}
    for t in ("swaps", "pool_reserves", "pool_state", "liquidity_events", "pool_volume", "pool_candles"):
        df = query(cfg.duckdb_path, f"select * exclude (status) from {t}")
        out[t] = df.sort(df.columns)
    return out


def equal_from_scratch(cfg, through: int | None = None) -> None:
    """Every DEX view equals `compute`: all the tables derived at once from the canonical events (up to
    block `through`, where the DEX tables are derived)."""
    a, b = dex_frames(cfg), compute(cfg, through)
    for t, got in a.items():
        want = b[t].select(got.columns)
        want = want.cast(dict(got.schema)).sort(got.columns)
        assert got.equals(want), t


def test_dex_tables_follow_reorgs_and_equal_a_fresh_computation(chain, tmp_path):  # noqa: F811 - the fixture
    node, dep, cfg = chain
    store = indexed_live(cfg, node, dep, blocks=5, txs_per_block=6, seed=71)
    build_dex(cfg)
    check_against_chain(cfg, node)
    equal_from_scratch(cfg)
    swaps_before = query(cfg.duckdb_path, "select block_number, log_index from swaps")
    anvil_reorg(node.url, dep, depth=6, txs_per_block=5, seed=72)
    assert follow_until_synced(cfg, store)[-1].action == "reorg"
    reorg = store.active_reorg(cfg.chain.name)
    repair(cfg, store, reorg.id)
    # Derived rows rolled back with the raw rows, archived like them (then derived again from the fork).
    orphaned = query(cfg.duckdb_path, "select block_number, log_index, reorg_id from orphaned_swaps")
    above = swaps_before.filter(pl.col("block_number") > reorg.common_ancestor)
    assert orphaned.height == above.height > 0 and set(orphaned["reorg_id"]) == {reorg.id}
    assert store.get_reorg(reorg.id).rows_archived["dex/swaps"] == above.height
    build_dex(cfg)
    check_against_chain(cfg, node)
    equal_from_scratch(cfg)
    # From scratch: a new lake indexed from the node as it is now.
    fresh_path = write_config(tmp_path / "fresh" / "indexer.yaml", node.url, 31337, dep, "data",
                              blocks_per_partition=10, confirmations=4)
    fresh = load_config(fresh_path)
    backfill_plain(fresh)
    build_dex(fresh)
    a, b = dex_frames(cfg), dex_frames(fresh)
    for t in a:
        assert a[t].equals(b[t]), t


def test_volumes_and_candles_equal_an_independent_computation_from_raw_logs(tmp_path):
    """Blocks 5 minutes apart, so hourly candles and volumes cross hour boundaries; pools differ in token
    order (the same token is token0 in some pools and token1 in others)."""
    from collections import defaultdict
    from datetime import datetime

    from indexer_dagster.devnet import Anvil, build_devnet, rpc

    node = Anvil(chain_id=31337).start()
    try:
        dep = build_devnet(node, blocks=30, txs_per_block=6, seed=9, block_interval=300)
        cfg = load_config(write_config(tmp_path / "indexer.yaml", node.url, 31337, dep, "data",
                                       blocks_per_partition=10, confirmations=4))
        backfill_plain(cfg)
        build_dex(cfg)
        swap_topic = next(s.topic0 for _, s in cfg.all_specs() if s.table == "uniswap_v2_pair_swap")
        pairs = [p.address.lower() for p in dep.pairs]
        logs = rpc(node.url, "eth_getLogs", [{"fromBlock": "0x0", "toBlock": "latest", "address": pairs,
                                              "topics": [swap_topic]}])
        ts = {}
        decimals = {}
        for p in dep.pairs:
            for t in (p.token0, p.token1):
                decimals[t.lower()] = int(rpc(node.url, "eth_call", [{"to": t, "data": "0x313ce567"}, "latest"]), 16)
        pair_decimals = {p.address.lower(): (decimals[p.token0.lower()], decimals[p.token1.lower()]) for p in dep.pairs}
        volume = defaultdict(lambda: [0, 0, 0])
        candles = defaultdict(list)
        for log in logs:
            n = int(log["blockNumber"], 16)
            if n not in ts:
                ts[n] = int(rpc(node.url, "eth_getBlockByNumber", [hex(n), False])["timestamp"], 16)
            words = [int(log["data"][2 + 64 * i: 66 + 64 * i], 16) for i in range(4)]  # in0, in1, out0, out1
            a0, a1 = words[0] + words[2], words[1] + words[3]
            hour = datetime.fromtimestamp(ts[n] - ts[n] % 3600, tz=UTC)
            key = (log["address"].lower(), hour)
            volume[key][0] += a0
            volume[key][1] += a1
            volume[key][2] += 1
            d0, d1 = pair_decimals[log["address"].lower()]
            candles[key].append(((n, int(log["logIndex"], 16)), (a0 / 10**d0) / (a1 / 10**d1)))  # 18 and 6 decimals
        assert len({h for _, h in volume}) >= 2  # the data crosses an hour boundary
        got = query(cfg.duckdb_path, "select pool, bucket_start, volume_token0, volume_token1, swap_count "
                                     "from pool_volume where interval = '1h'")
        assert {(p, b): [int(v0), int(v1), c] for p, b, v0, v1, c in got.iter_rows()} == dict(volume)
        got = query(cfg.duckdb_path, "select pool, bucket_start, open, high, low, close from pool_candles "
                                     "where interval = '1h'")
        assert got.height == len(candles)
        for pool, bucket, o, h, lo, c in got.iter_rows():
            prices = [p for _, p in sorted(candles[(pool, bucket)])]
            assert (o, h, lo, c) == pytest.approx((prices[0], max(prices), min(prices), prices[-1]), rel=1e-12)
    finally:
        node.stop()
