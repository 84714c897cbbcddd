"""Historical sync end to end on anvil: the views equal what the node returns, row for row."""

import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest
from eth_abi import decode as abi_decode

from indexer_dagster.devnet import rpc
from indexer_dagster.parse.abi import load_abi
from indexer_dagster.persist.files import data_files
from indexer_dagster.query import query
from tests.conftest import cfg_of, cli_env

pytestmark = pytest.mark.slow

INDEXER = [sys.executable, "-m", "indexer_dagster.cli"]


def backfill(config_path, dagster_home, *args, check=True, timeout=300):
    proc = subprocess.run(
        [*INDEXER, "backfill", "--config", str(config_path), *args],
        env=cli_env(config_path, dagster_home), capture_output=True, text=True, timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def node_logs(url, addresses, from_block, to_block) -> pl.DataFrame:
    raw = rpc(url, "eth_getLogs", [{"fromBlock": hex(from_block), "toBlock": hex(to_block), "address": addresses}])
    rows = []
    for log in raw:
        topics = [t.lower() for t in log["topics"]] + [None] * (4 - len(log["topics"]))
        rows.append({
            "block_number": int(log["blockNumber"], 16),
            "block_hash": log["blockHash"].lower(),
            "transaction_hash": log["transactionHash"].lower(),
            "transaction_index": int(log["transactionIndex"], 16),
            "log_index": int(log["logIndex"], 16),
            "address": log["address"].lower(),
            "topic0": topics[0], "topic1": topics[1], "topic2": topics[2], "topic3": topics[3],
            "data": log["data"].lower(),
        })
    return pl.DataFrame(rows).sort("block_number", "log_index")


def view(cfg, sql) -> pl.DataFrame:
    return query(cfg.duckdb_path, sql)


def test_backfill_matches_the_node(devnet, make_config, dagster_home):
    node, _ = devnet
    path = make_config()
    cfg = cfg_of(path)
    head = node.block_number()
    backfill(path, dagster_home)

    addresses = [a for c in cfg.contracts for a in c.addresses]
    expected = node_logs(node.url, addresses, 0, head)
    got = view(cfg, "select * from logs order by block_number, log_index")
    assert got.height == expected.height > 500
    assert got.select(expected.columns).equals(expected)
    assert (got["chain_id"] == 31337).all()

    # Every block 0..head, with the node's hashes, parent hashes and timestamps.
    blocks = view(cfg, "select number, hash, parent_hash, epoch(block_timestamp)::BIGINT as ts, status from blocks order by number")
    assert blocks["number"].to_list() == list(range(0, head + 1))
    for n in (0, head // 2, head):
        b = rpc(node.url, "eth_getBlockByNumber", [hex(n), False])
        row = blocks.row(n, named=True)
        assert (row["hash"], row["parent_hash"], row["ts"]) == (b["hash"], b["parentHash"], int(b["timestamp"], 16))
    # Log timestamps are their block's.
    mism = view(cfg, "select count(*) as n from logs l join blocks b on b.number = l.block_number "
                     "where b.block_timestamp <> l.block_timestamp or b.hash <> l.block_hash")
    assert mism["n"][0] == 0

    # Finality: the last `confirmations` blocks are unconfirmed, the rest confirmed.
    unconfirmed = blocks.filter(pl.col("status") == "unconfirmed")["number"].to_list()
    assert unconfirmed == list(range(head - 4, head + 1))


def _independent_decode(abi_path, event_name, logs: pl.DataFrame) -> list[dict]:
    """Decode with eth_abi, one log at a time: the reference the vectorised decoder must match."""
    abi = load_abi(abi_path)
    ev = next(e for e in abi if e.get("type") == "event" and e["name"] == event_name)
    out = []
    for r in logs.iter_rows(named=True):
        topics = [r["topic1"], r["topic2"], r["topic3"]]
        indexed = [i for i in ev["inputs"] if i["indexed"]]
        plain = [i for i in ev["inputs"] if not i["indexed"]]
        values = dict(zip([i["name"] for i in plain], abi_decode([i["type"] for i in plain], bytes.fromhex(r["data"][2:]))))
        for i, t in zip(indexed, topics):
            values[i["name"]] = abi_decode([i["type"]], bytes.fromhex(t[2:]))[0]
        out.append({k: (v.lower() if isinstance(v, str) else v) for k, v in values.items()})
    return out


# Decoding, range arguments and config checks do not depend on where Dagster keeps its runs: these run on
# the SQLite instance only (the others run on both profiles, see conftest.dagster_home).
@pytest.mark.parametrize("instance_profile", ["sqlite"])
def test_decoded_views_match_an_independent_decode(devnet, make_config, dagster_home):
    node, _dep = devnet
    path = make_config()
    cfg = cfg_of(path)
    backfill(path, dagster_home)
    pair = next(c for c in cfg.contracts if c.name == "UniswapV2Pair")
    head = node.block_number()
    topics = {s.name: s.topic0 for s in cfg.event_specs(pair)}
    raw = node_logs(node.url, pair.addresses, 0, head)

    swaps = view(cfg, "select * from uniswap_v2_pair_swap order by block_number, log_index")
    ref = _independent_decode(cfg.resolve(pair.abi), "Swap", raw.filter(pl.col("topic0") == topics["Swap"]))
    assert swaps.height == len(ref) > 50
    for row, exp in zip(swaps.iter_rows(named=True), ref):
        assert row["sender"] == exp["sender"] and row["to"] == exp["to"]
        for arg in ("amount0In", "amount1In", "amount0Out", "amount1Out"):
            col = {"amount0In": "amount0_in", "amount1In": "amount1_in", "amount0Out": "amount0_out",
                   "amount1Out": "amount1_out"}[arg]
            assert int(row[col]) == exp[arg]  # exact, as text
            assert row[col + "_f64"] == pytest.approx(float(exp[arg]))
            assert row[col + "_num"] == exp[arg]  # exact, as DECIMAL(38,0) in the view

    syncs = view(cfg, "select reserve0, reserve1 from uniswap_v2_pair_sync order by block_number, log_index")
    ref = _independent_decode(cfg.resolve(pair.abi), "Sync", raw.filter(pl.col("topic0") == topics["Sync"]))
    assert [(int(a), int(b)) for a, b in syncs.iter_rows()] == [(r["reserve0"], r["reserve1"]) for r in ref]

    # The last Sync of each pair equals the pair's reserves on chain.
    last = view(cfg, "select address, arg_max(reserve0, (block_number, log_index)) r0, "
                     "arg_max(reserve1, (block_number, log_index)) r1 from uniswap_v2_pair_sync group by address")
    for address, r0, r1 in last.iter_rows():
        ret = rpc(node.url, "eth_call", [{"to": address, "data": "0x0902f1ac"}, "latest"])  # getReserves()
        assert (int(r0), int(r1)) == (int(ret[2:66], 16), int(ret[66:130], 16))

    # ERC-20 Transfers come only from token addresses, pair (LP) Transfers only from pairs.
    tokens = {a for c in cfg.contracts if c.name == "ERC20" for a in c.addresses}
    assert set(view(cfg, "select distinct address from erc20_transfer")["address"]) <= tokens
    assert set(view(cfg, "select distinct address from uniswap_v2_pair_transfer")["address"]) <= set(pair.addresses)
    created = view(cfg, "select token0, token1, pair from uniswap_v2_factory_pair_created order by log_index")
    assert sorted(created["pair"]) == sorted(pair.addresses)


def _snapshot(cfg) -> dict[str, pl.DataFrame]:
    out = {}
    for p in sorted(cfg.data_dir.glob(f"{cfg.chain.name}/**/*.parquet")):
        if "_meta" not in p.parts and not p.name.startswith("."):
            out[str(p.relative_to(cfg.data_dir))] = pl.read_parquet(p)
    return out


def test_rerun_changes_nothing(devnet, make_config, dagster_home):
    path = make_config()
    cfg = cfg_of(path)
    backfill(path, dagster_home)
    first = _snapshot(cfg)
    backfill(path, dagster_home, "--workers", "2")
    second = _snapshot(cfg)
    assert first.keys() == second.keys() and len(first) > 10
    for k in first:
        assert first[k].equals(second[k]), k


def test_killed_backfill_leaves_no_partial_file_and_rerun_is_exact(devnet, make_config, dagster_home, tmp_path):
    node, _ = devnet
    # One block per request and one request in flight: slow enough to kill mid-partition.
    path = make_config()
    text = path.read_text().replace("blocks_per_partition: 25", "blocks_per_partition: 25\n  blocks_per_request: 1\n  max_blocks_per_request: 1\n  concurrency: 1")
    path.write_text(text)
    cfg = cfg_of(path)
    proc = subprocess.Popen([*INDEXER, "backfill", "--config", str(path)], env=cli_env(path, dagster_home),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    logs_dir = cfg.data_dir / cfg.chain.name / "logs"
    deadline = time.time() + 120
    # Wait until a partition is being written (a hidden temp file exists), then kill everything.
    while time.time() < deadline and not (logs_dir.is_dir() and any(p.name.endswith(".tmp") for p in logs_dir.iterdir())):
        time.sleep(0.05)
    assert time.time() < deadline, "the backfill never started writing"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Whatever is visible is complete: every visible file equals the node's logs for its range.
    addresses = [a for c in cfg.contracts for a in c.addresses]
    for f in data_files(logs_dir):
        start, end = (int(x) for x in f.stem.split("-"))
        got = pl.read_parquet(f)
        exp = node_logs(node.url, addresses, start, min(end, node.block_number()))
        assert got.height == exp.height
    # Re-run with the normal config: exactly the node's rows.
    backfill(make_config(), dagster_home)
    head = node.block_number()
    got = view(cfg, "select * from logs order by block_number, log_index")
    exp = node_logs(node.url, addresses, 0, head)
    assert got.select(exp.columns).equals(exp)
    assert not [p for p in logs_dir.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("instance_profile", ["sqlite"])
def test_from_to_and_bad_ranges(devnet, make_config, dagster_home):
    node, _ = devnet
    path = make_config()
    cfg = cfg_of(path)
    backfill(path, dagster_home, "--from", "30", "--to", "40")
    blocks = view(cfg, "select min(number) lo, max(number) hi from blocks")
    assert (blocks["lo"][0], blocks["hi"][0]) == (25, 49)  # the aligned range holding 30..40
    head = node.block_number()
    bad = backfill(path, dagster_home, "--to", str(head + 1000), check=False)
    assert bad.returncode != 0 and "beyond the chain head" in bad.stderr
    bad = backfill(path, dagster_home, "--from", "40", "--to", "30", check=False)
    assert bad.returncode != 0 and "swap them" in bad.stderr
    bad = backfill(path, dagster_home, "--from", "-3", check=False)
    assert bad.returncode != 0 and "-3" in bad.stderr


@pytest.mark.parametrize("instance_profile", ["sqlite"])
def test_wrong_chain_id_and_unreachable_rpc_write_nothing(devnet, make_config, dagster_home):
    path = make_config()
    path.write_text(path.read_text().replace("chain_id: 31337", "chain_id: 1"))
    proc = backfill(path, dagster_home, check=False)
    assert proc.returncode != 0 and "chain.chain_id" in proc.stderr and "is chain 31337" in proc.stderr
    path.write_text(path.read_text().replace("chain_id: 1", "chain_id: 31337").replace(
        devnet[0].url, "http://127.0.0.1:9/secret-key"))
    proc = backfill(path, dagster_home, check=False)
    assert proc.returncode != 0 and "chain.rpc_url" in proc.stderr and "secret-key" not in proc.stderr
    assert not (path.parent / "data").exists()
