"""A query through the API sees each publish of the lake whole or not at all: never a range's logs without
its blocks, although a publish renames its files one by one, whatever moment the query runs at."""

import threading
from pathlib import Path

import polars as pl

from indexer_dagster.config import parse_config
from indexer_dagster.persist.catalog import build_catalog
from indexer_dagster.persist.datasets import BLOCK_SCHEMA, LOG_SCHEMA
from indexer_dagster.persist.gate import Gate, read_consistent
from indexer_dagster.persist.lake import Transaction, open_lake
from indexer_dagster.query import query

PAIR_ABI = Path(__file__).resolve().parents[2] / "node_modules/@uniswap/v2-core/build/UniswapV2Pair.json"
CONFIG = f"""
chain: {{name: devnet, chain_id: 31337, rpc_url: "http://127.0.0.1:1", blocks_per_partition: 10}}
storage: {{data_dir: ./data}}
contracts:
  - name: UniswapV2Pair
    abi: {PAIR_ABI}
    addresses: ["0x5fbdb2315678afecb367f032d93f642f64180aa3"]
    events: [Sync]
"""


def frames(first: int, last: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Blocks first..last and one (undecodable) log in each."""
    numbers = list(range(first, last + 1))
    hashes = [f"0x{n:064x}" for n in numbers]
    blocks = pl.DataFrame({"chain_id": 31337, "number": numbers, "hash": hashes,
                           "parent_hash": [f"0x{n - 1:064x}" for n in numbers],
                           "timestamp": [n * 1_000_000 for n in numbers]},
                          ).with_columns(pl.col("timestamp").cast(pl.Datetime("us", "UTC"))).cast(BLOCK_SCHEMA)
    logs = pl.DataFrame({
        "chain_id": 31337, "block_number": numbers, "block_hash": hashes,
        "block_timestamp": [n * 1_000_000 for n in numbers], "transaction_hash": hashes,
        "transaction_index": 0, "log_index": 0, "address": "0x5fbdb2315678afecb367f032d93f642f64180aa3",
        "topic0": "0x" + "00" * 32, "topic1": None, "topic2": None, "topic3": None, "data": "0x",
    }).with_columns(pl.col("block_timestamp").cast(pl.Datetime("us", "UTC"))).cast(LOG_SCHEMA)  # type: ignore[arg-type]
    return blocks, logs.select(list(LOG_SCHEMA))


def publish(lake, first: int, last: int) -> None:
    """A range as `sync_range` publishes it: the logs, then the blocks (the marker) last."""
    blocks, logs = frames(first, last)
    key = f"{first:012d}-{last:012d}"
    with lake.transaction() as tx:
        tx.writer("logs", key, LOG_SCHEMA).write(logs)
        tx.writer("blocks", key, BLOCK_SCHEMA, marker=True).write(blocks)


def test_a_query_during_a_publish_sees_it_whole_or_not_at_all(tmp_path, monkeypatch):
    cfg = parse_config(CONFIG, tmp_path, "indexer.yaml", environ={})
    lake = open_lake(cfg)
    publish(lake, 0, 9)
    build_catalog(cfg)

    def counts():
        return query(cfg.duckdb_path, "select (select count(*) from blocks) b, (select count(*) from logs) l").row(0)

    before = counts()
    assert before == (10, 10)
    renamed, go = threading.Event(), threading.Event()
    real = Transaction._rename

    def held_after_the_first_rename(w, final):
        out = real(w, final)
        renamed.set()
        assert go.wait(30)
        return out

    monkeypatch.setattr(Transaction, "_rename", staticmethod(held_after_the_first_rename))
    writer = threading.Thread(target=publish, args=(lake, 10, 19))
    writer.start()
    assert renamed.wait(30)  # the new range's logs are in place, its blocks not yet
    seen: list = []
    reader = threading.Thread(target=lambda: seen.append(counts()))
    reader.start()
    reader.join(0.5)  # a query now either waits for the publish or sees the state before it
    go.set()
    writer.join(30)
    reader.join(30)
    after = counts()
    assert after == (20, 20)
    assert seen and seen[0] in (before, after), f"a query saw {seen[0]}: a publish cut in half"


def test_a_query_overlapping_a_publish_is_run_again(tmp_path):
    gate = Gate(tmp_path / ".gate")
    state = {"rows": 1}
    calls = []

    def run():
        calls.append(state["rows"])
        if len(calls) == 1:  # a publish happens while the first attempt reads
            with gate.publishing():
                state["rows"] = 2
        return state["rows"]

    assert read_consistent([gate], run) == 2
    assert calls == [1, 2]


def test_a_query_waits_for_a_repair_and_names_it_when_it_takes_too_long(tmp_path):
    gate = Gate(tmp_path / ".gate")
    gate.begin_repair(7)
    try:
        read_consistent([gate], lambda: 1, wait_s=0.2)
    except TimeoutError as e:
        assert "reorg 7" in str(e) and "being repaired" in str(e)
    else:
        raise AssertionError("a query ran in the middle of a repair")
    gate.end_repair(7)
    assert read_consistent([gate], lambda: 1, wait_s=0.2) == 1


def test_the_first_reorg_is_in_the_reorgs_view_of_a_catalog_built_before_it(tmp_path):
    """Found by the chaos test: the `reorgs` view read only the ledger files there at the catalog's build,
    so a catalog built before the chain's first reorg listed no reorg while its archive showed the rows it
    moved (until something rebuilt the catalog)."""
    from indexer_dagster.state import open_state
    from indexer_dagster.sync.repair import export_ledger

    cfg = parse_config(CONFIG, tmp_path, "indexer.yaml", environ={})
    publish(open_lake(cfg), 0, 9)
    build_catalog(cfg)
    assert query(cfg.duckdb_path, "select count(*) n from reorgs")["n"][0] == 0
    store = open_state(cfg.state_url)
    r = store.open_reorg("devnet", 5, "0x" + "05" * 32, 9, "0x" + "09" * 32, 9, "0x" + "99" * 32, [], [], False)
    export_ledger(cfg, store)
    assert query(cfg.duckdb_path, "select reorg_id from reorgs")["reorg_id"].to_list() == [r.id]


def test_a_query_overtaken_on_every_try_holds_publishes_off_for_its_last(tmp_path):
    """A long query on a busy lake would be run again forever; its last try keeps writers waiting."""
    gate = Gate(tmp_path / ".gate")
    calls: list[int] = []
    published = threading.Event()

    def publish_once():
        with gate.publishing():
            published.set()

    def run():
        calls.append(gate.generation())
        if len(calls) < 3:
            publish_once()  # overtaken
            return "mixed"
        published.clear()
        writer = threading.Thread(target=publish_once)
        writer.start()
        held_off = not published.wait(0.3)  # the writer waits for this try to end
        run.writer = writer  # type: ignore[attr-defined]
        return "whole" if held_off else "overtaken again"

    assert read_consistent([gate], run) == "whole"
    assert len(calls) == 3
    run.writer.join(5)  # type: ignore[attr-defined]
    assert published.is_set()  # and it published right after
