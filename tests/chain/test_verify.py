"""Missing-log detection (chain/verify.py) on its own: the bloom function against real anvil headers,
and the forward/reverse checks and the refetch policy on small frames."""

import asyncio
from collections import Counter

import polars as pl
import pytest

from indexer_dagster.chain.verify import (
    LogVerifier,
    MissingLogs,
    agree,
    bloom_mask,
    bloom_of,
    parse_bloom,
    reconcile,
)

A = "0x" + "11" * 20
B = "0x" + "22" * 20
SWAP = "0x" + "aa" * 32
SYNC = "0x" + "bb" * 32
T1 = "0x" + "00" * 12 + "33" * 20


def log(block: int, index: int, address: str, *topics: str) -> dict:
    t = list(topics) + [None] * (4 - len(topics))
    return {"block_number": block, "log_index": index, "address": address, "topic0": t[0], "topic1": t[1],
            "topic2": t[2], "topic3": t[3], "data": "0x"}


def frame(*rows: dict) -> pl.DataFrame:
    schema = {"block_number": pl.Int64, "log_index": pl.Int64, "address": pl.String, "topic0": pl.String,
              "topic1": pl.String, "topic2": pl.String, "topic3": pl.String, "data": pl.String}
    return pl.DataFrame(list(rows), schema=schema)


def bloom_for(*rows: dict) -> int:
    return bloom_of((r["address"], [t for t in (r["topic0"], r["topic1"], r["topic2"], r["topic3"]) if t]) for r in rows)


def test_bloom_mask_sets_three_bits_at_most():
    m = bloom_mask(bytes.fromhex(A[2:]))
    assert 1 <= bin(m).count("1") <= 3 and m < 1 << 2048


def test_complete_logs_are_not_suspect():
    full = [log(5, 0, A, SWAP, T1), log(5, 1, A, SYNC), log(6, 0, B, SYNC)]
    v = LogVerifier({A: [SWAP, SYNC], B: [SWAP, SYNC]})
    blooms = {5: bloom_for(*full[:2]), 6: bloom_for(full[2]), 7: 0}
    assert v.suspects(blooms, frame(*full)) == {}


def test_a_dropped_log_whose_pair_is_alone_in_its_block_is_suspect():
    full = [log(5, 0, A, SWAP, T1), log(5, 1, A, SYNC)]
    v = LogVerifier({A: [SWAP, SYNC]})
    s = v.suspects({5: bloom_for(*full)}, frame(full[1]))
    assert list(s) == [5] and s[5].missing == [(A, SWAP)] and s[5].outside == 0


def test_a_log_not_in_the_bloom_is_suspect():
    v = LogVerifier({A: [SWAP]})
    real = log(5, 0, A, SWAP)
    forged = log(5, 1, A, SWAP, T1)  # a topic the block never logged
    s = v.suspects({5: bloom_for(real)}, frame(real, forged))
    assert s[5].outside == 1 and not s[5].missing


def test_an_address_in_the_bloom_without_logs_is_suspect():
    full = [log(5, 0, A, SWAP), log(5, 1, B, SYNC)]
    v = LogVerifier({A: [SWAP, SYNC], B: [SWAP, SYNC]})
    s = v.suspects({5: bloom_for(*full)}, frame(full[0]))
    assert (B, None) in s[5].missing and (A, SYNC) in s[5].missing  # SYNC: its topic is unaccounted for too


def test_blind_spot_a_shadowed_drop_is_not_seen():
    v = LogVerifier({A: [SWAP, SYNC], B: [SWAP, SYNC]})
    # Same address and event again in the block.
    full = [log(5, 0, A, SWAP), log(5, 1, A, SWAP)]
    assert v.suspects({5: bloom_for(*full)}, frame(full[0])) == {}
    # Address and event each seen in other logs: the bloom cannot pair them.
    full = [log(5, 0, A, SWAP), log(5, 1, A, SYNC), log(5, 2, B, SWAP)]
    assert v.suspects({5: bloom_for(*full)}, frame(full[1], full[2])) == {}


def _refetcher(answers: dict[int, list[pl.DataFrame]]):
    calls = Counter()

    async def refetch(n: int) -> pl.DataFrame:
        calls[n] += 1
        return answers[n].pop(0)

    return refetch, calls


def test_reconcile_takes_the_refetch_with_the_missing_log():
    full = [log(5, 0, A, SWAP), log(5, 1, A, SYNC), log(6, 0, B, SYNC)]
    v = LogVerifier({A: [SWAP, SYNC], B: [SYNC]})
    blooms = {5: bloom_for(*full[:2]), 6: bloom_for(full[2])}
    refetch, calls = _refetcher({5: [frame(*full[:2])]})
    stats = Counter()
    out = asyncio.run(reconcile(v, blooms, frame(full[1], full[2]), refetch, stats))
    assert out.equals(frame(*full))
    assert calls == {5: 1} and stats["verify:logs_recovered"] == 1 and stats["verify:suspect_blocks"] == 1


def test_reconcile_accepts_a_false_positive_when_the_refetches_agree():
    v = LogVerifier({A: [SWAP, SYNC]})
    got = log(5, 0, A, SWAP)
    # The bloom also holds SYNC's bits (as a false positive would), but no SYNC log exists.
    blooms = {5: bloom_for(got) | bloom_mask(bytes.fromhex(SYNC[2:]))}
    refetch, calls = _refetcher({5: [frame(got)] * 3})
    stats = Counter()
    out = asyncio.run(reconcile(v, blooms, frame(got), refetch, stats))
    assert out.equals(frame(got)) and stats["verify:bloom_false_positives"] == 1 and calls[5] == 3


def test_reconcile_replaces_a_forged_log_and_fails_when_the_node_keeps_dropping():
    v = LogVerifier({A: [SWAP, SYNC]})
    real = [log(5, 0, A, SWAP), log(5, 1, A, SYNC)]
    forged = log(5, 2, A, SWAP, T1)
    blooms = {5: bloom_for(*real)}
    refetch, _ = _refetcher({5: [frame(*real)]})
    out = asyncio.run(reconcile(v, blooms, frame(*real, forged), refetch, Counter()))
    assert out.equals(frame(*real))

    # Each answer drops a different log: never two alike, never complete.
    refetch, calls = _refetcher({5: [frame(real[0]), frame(real[1]), frame(real[0])]})
    with pytest.raises(MissingLogs, match="block 5: .*refetches by block hash; the range was not stored"):
        asyncio.run(reconcile(v, blooms, frame(real[1]), refetch, Counter(), attempts=3))
    assert calls[5] == 3


def test_agree_needs_two_identical_answers():
    good = frame(log(5, 0, A, SWAP), log(5, 1, A, SWAP))
    bad = frame(log(5, 0, A, SWAP))
    answers = [good, good]

    async def fetch():
        return answers.pop(0)

    stats = Counter()
    assert asyncio.run(agree(fetch, bad, stats, "blocks 5-5")).equals(good)
    assert stats["verify:double_mismatches"] == 1

    answers = [frame(), frame(log(5, 1, A, SWAP))]
    with pytest.raises(MissingLogs, match="3 fetches of the same logs gave 3 different answers"):
        asyncio.run(agree(fetch, bad, Counter(), "blocks 5-5", attempts=2))


@pytest.mark.slow
def test_bloom_function_reproduces_anvil_headers(devnet):
    """The bloom of every block, computed from all its receipts' logs, equals the header's logsBloom."""
    node, _ = devnet
    head = node.block_number()
    checked = with_logs = 0
    for n in range(head + 1):
        block = node.rpc("eth_getBlockByNumber", [hex(n), False])
        receipts = node.rpc("eth_getBlockReceipts", [hex(n)]) or []
        items = [(lg["address"], lg["topics"]) for r in receipts for lg in r["logs"]]
        assert bloom_of(items) == parse_bloom(block["logsBloom"]), n
        checked += 1
        with_logs += bool(items)
    assert checked == head + 1 and with_logs > 30


def test_reconcile_keeps_refetching_when_the_same_log_is_dropped_twice():
    v = LogVerifier({A: [SWAP, SYNC]})
    real = [log(5, 0, A, SWAP), log(5, 1, A, SYNC)]
    blooms = {5: bloom_for(*real)}
    # The first refetch repeats the first answer's loss; the second is complete.
    refetch, calls = _refetcher({5: [frame(real[1]), frame(*real)]})
    stats = Counter()
    out = asyncio.run(reconcile(v, blooms, frame(real[1]), refetch, stats))
    assert out.equals(frame(*real)) and calls[5] == 2 and stats["verify:bloom_false_positives"] == 0


def test_verify_logs_config_key():
    from indexer_dagster.config import ChainConfig

    base = {"name": "x", "chain_id": 1, "rpc_url": "http://127.0.0.1:8545"}
    assert ChainConfig.model_validate(base).verify_logs == "bloom"
    assert ChainConfig.model_validate({**base, "verify_logs": "double"}).verify_logs == "double"
    assert ChainConfig.model_validate({**base, "verify_logs": False}).verify_logs == "off"  # YAML's bare `off`
    with pytest.raises(ValueError, match="'bloom', 'double' or 'off'"):
        ChainConfig.model_validate({**base, "verify_logs": "twice"})


def test_many_suspects_cost_one_chunk_refetch_and_only_differing_blocks_are_refetched_by_hash():
    # A busy chain: another contract's event sets SYNC's bits in every block where A swaps, so every
    # block is suspect. The chunk is fetched once more; identical blocks are accepted without a
    # per-block refetch, and the one block whose second answer is complete is taken from it.
    v = LogVerifier({A: [SWAP, SYNC]})
    foreign = bloom_mask(bytes.fromhex(SYNC[2:]))
    swaps = [log(n, 0, A, SWAP) for n in range(10, 20)]
    dropped = log(15, 1, A, SWAP, T1)
    blooms = {r["block_number"]: bloom_for(r) | foreign for r in swaps}
    blooms[15] |= bloom_for(dropped)
    first = frame(*swaps)  # block 15's second swap is missing from the first answer
    complete = frame(*swaps, dropped).sort("block_number", "log_index")
    chunk_calls = []

    async def refetch_all():
        chunk_calls.append(1)
        return complete

    # Block 15 still shows SYNC's foreign bits: it alone is refetched by hash, from the complete answer.
    refetch, calls = _refetcher({15: [complete.filter(pl.col("block_number") == 15)] * 3})
    stats = Counter()
    out = asyncio.run(reconcile(v, blooms, first, refetch, stats, refetch_all=refetch_all))
    assert out.equals(complete)
    assert len(chunk_calls) == 1 and dict(calls) == {15: 3}  # not one refetch by hash for the other nine
    assert stats["verify:logs_recovered"] == 1 and stats["verify:bloom_unsettled"] == 9


def test_suspects_are_settled_by_narrow_questions_asked_twice():
    # A busy chain: another contract's event sets SYNC's bits in every block where A swaps. The node is
    # asked, per suspect block, only for A's SYNC logs there, twice; block 15's second answer has a log the
    # first fetch lacked: recovered. Nothing is refetched by hash, and no chunk is fetched again.
    v = LogVerifier({A: [SWAP, SYNC]})
    foreign = bloom_mask(bytes.fromhex(SYNC[2:]))
    swaps = [log(n, 0, A, SWAP) for n in range(10, 20)]
    dropped = log(15, 1, A, SYNC)
    blooms = {r["block_number"]: bloom_for(r) | foreign for r in swaps}
    asked = []

    async def refetch_matching(queries):
        asked.append(queries)
        return [frame(dropped) if n == 15 and len(asked) == 2 else frame() for n, _a, _t in queries]

    async def no_refetch(n):
        raise AssertionError(f"block {n} refetched by hash")

    stats = Counter()
    out = asyncio.run(reconcile(v, blooms, frame(*swaps), no_refetch, stats, refetch_matching=refetch_matching))
    assert out.equals(frame(*swaps, dropped).sort("block_number", "log_index"))
    assert len(asked) == 2 and asked[0] == [(n, [A], [SYNC]) for n in range(10, 20)]
    assert stats["verify:logs_recovered"] == 1 and stats["verify:bloom_unsettled"] == 9


@pytest.mark.slow
def test_the_bloom_check_costs_little_when_unwatched_contracts_share_the_watched_topics(tmp_path):
    """Issue 12: indexing the pairs of a chain whose tokens (not indexed) emit the same Transfer topic, the
    bloom check found nearly every block suspect and fetched nearly every chunk twice (16.5 MB of
    eth_getLogs bodies for ~8 MB of logs). It now asks the node only about the suspect blocks' missing
    (address, topic) pairs: at most 10% more eth_getLogs bytes than no check at all, same logs."""
    from indexer_dagster.block_range import ranges_between
    from indexer_dagster.chain.rpc import RpcStats
    from indexer_dagster.config import load_config
    from indexer_dagster.devnet import Anvil, build_devnet, write_config
    from indexer_dagster.persist.lake import open_lake
    from indexer_dagster.sync.historical import sync_range
    from tests.sync.test_add_contract import CountingProxy

    node = Anvil(chain_id=31337).start()
    proxy = CountingProxy(node.url)
    try:
        dep = build_devnet(node, blocks=60, txs_per_block=10, seed=21)
        costs, stored = {}, {}
        for mode in ("off", "bloom"):
            path = write_config(tmp_path / f"{mode}.yaml", proxy.url, 31337, dep, f"data_{mode}",
                                blocks_per_partition=1000, include_tokens=False)
            path.write_text(path.read_text().replace("chain_id: 31337", f"chain_id: 31337\n  verify_logs: {mode}"))
            cfg = load_config(path)
            assert cfg.chain.verify_logs == mode
            proxy.body_bytes.clear()
            stats = RpcStats()
            for r in ranges_between(cfg.start_block, node.block_number(), cfg.chain.blocks_per_partition):
                sync_range(cfg, r, stats=stats)
            costs[mode] = proxy.body_bytes["eth_getLogs"]
            stored[mode] = pl.concat([pl.read_parquet(p) for p in open_lake(cfg).files("logs")])
            if mode == "bloom":
                assert stats.errors["verify:suspect_blocks"] > 10  # the shared topic makes many blocks suspect
        assert stored["bloom"].drop("chain_id").equals(stored["off"].drop("chain_id"))
        assert costs["bloom"] <= 1.10 * costs["off"], costs
    finally:
        proxy.close()
        node.stop()
