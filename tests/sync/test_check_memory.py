"""Work over one partition holds a window of it, not the partition (issue 12: peak RSS ≤ 1 GiB for any
partition size the config allows, up to 10M blocks a partition, and any number of logs in it).

The range checks read a partition's key columns whole (blocks: number, hash, parent_hash; logs: block_number,
log_index, block_hash) and built Python sets of its block numbers: ~1.5 GB for a partition of 2M blocks and 6M
logs. A reorg's rollback read the partition's files whole, every column, to cut them at the fork point.
Each test writes such a partition, and one a tenth of its size, with the lake's own writer, runs the work
over each in a process of its own and compares their peak resident memory.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from indexer_dagster.devnet.uniswap import artifact_paths

SCRIPT = """
import resource, sys
import polars as pl
from indexer_dagster.block_range import BlockRange
from indexer_dagster.config import load_config
from indexer_dagster.persist.datasets import BLOCK_SCHEMA, LOG_SCHEMA
from indexer_dagster.persist.lake import open_lake
from indexer_dagster.sync.range_checks import verify_range

cfg = load_config(sys.argv[1])
blocks_n, per_block = int(sys.argv[2]), 3
r = BlockRange(0, cfg.chain.blocks_per_partition - 1)
lake = open_lake(cfg)

def h(n, salt):
    return pl.format("0x{}", (n * 7 + salt).cast(pl.String).str.pad_start(64, "0"))

with lake.transaction() as tx:
    wb = tx.writer("blocks", r.key, BLOCK_SCHEMA, marker=True)
    wl = tx.writer("logs", r.key, LOG_SCHEMA)
    step = 200_000
    for a in range(0, blocks_n, step):
        n = pl.int_range(a, min(a + step, blocks_n), eager=True).alias("n")
        blocks = pl.DataFrame(n).select(
            pl.lit(31337, pl.Int64).alias("chain_id"), pl.col("n").alias("number"), h(pl.col("n"), 0).alias("hash"),
            h(pl.col("n") - 1, 0).alias("parent_hash"), pl.lit(0).cast(pl.Datetime("us", "UTC")).alias("timestamp"))
        wb.write(blocks)
        logs = blocks.select(pl.col("number").repeat_by(per_block), pl.col("hash")).explode("number").with_columns(
            pl.int_range(pl.len()).over("number").alias("log_index"))
        wl.write(logs.select(
            pl.lit(31337, pl.Int64).alias("chain_id"), pl.col("number").alias("block_number"),
            pl.col("hash").alias("block_hash"), pl.lit(0).cast(pl.Datetime("us", "UTC")).alias("block_timestamp"),
            pl.col("hash").alias("transaction_hash"), pl.col("log_index").alias("transaction_index"),
            pl.col("log_index"), pl.lit("0x" + "ab" * 20).alias("address"), pl.col("hash").alias("topic0"),
            pl.lit(None, pl.String).alias("topic1"), pl.lit(None, pl.String).alias("topic2"),
            pl.lit(None, pl.String).alias("topic3"), pl.lit("0x").alias("data")))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[3] == "check":
    results = verify_range(cfg, r, to_block=blocks_n - 1, sample=[])
    failed = [c.description for c in results if not c.passed]
    assert not failed, failed
    rows = {c.name: c.metadata.get("rows") for c in results}
    counts = rows["contiguous_blocks"], rows["unique_logs"], rows["log_block_hashes"]
else:  # a reorg 3 blocks deep at the top of the partition, rolled back
    from indexer_dagster.state import store_or_open
    from indexer_dagster.sync.repair import roll_back
    top = blocks_n - 1
    with store_or_open(cfg.state_url, None) as store:
        reorg = store.open_reorg(cfg.chain.name, top - 3, "0x" + "00" * 32, top, "0x" + "11" * 32, top,
                                 "0x" + "22" * 32, [], [r.key], False)
        archived = roll_back(cfg, store, reorg)
    from indexer_dagster.persist.files import column_span
    rows, _low, high = column_span(lake.path("blocks", r.key), "number")  # (from the footer: reads no rows)
    counts = rows, high, archived["blocks"], archived["logs"]
print(before // 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, *counts)
"""


def _peak_mb(tmp_path: Path, blocks: int, work: str) -> tuple[int, int, tuple[int, ...]]:
    root = tmp_path / f"{work}-{blocks}"
    (root / "abis").mkdir(parents=True)
    (root / "abis" / "ERC20.json").write_bytes(artifact_paths()["ERC20"].read_bytes())
    (root / "indexer.yaml").write_text(json.dumps({
        "chain": {"name": "devnet", "chain_id": 31337, "rpc_url": "http://127.0.0.1:1",
                  "blocks_per_partition": 10_000_000},
        "contracts": [{"name": "ERC20", "abi": "abis/ERC20.json", "addresses": ["0x" + "ab" * 20]}],
        "storage": {"data_dir": "./data"},
    }))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(root / "indexer.yaml"), str(blocks), work],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    before, after, *counts = map(int, out.stdout.split())
    return before, after, tuple(counts)


@pytest.mark.slow
def test_checking_a_partition_holds_a_window_not_the_partition(tmp_path: Path):
    small_before, small, small_counts = _peak_mb(tmp_path, 200_000, "check")
    large_before, large, large_counts = _peak_mb(tmp_path, 2_000_000, "check")
    assert (small_counts, large_counts) == ((200_000, 600_000, 600_000), (2_000_000, 6_000_000, 6_000_000))  # every row checked
    # Ten times the rows (2M blocks, 6M logs: ~1.5 GB of key columns held whole); a windowed check holds
    # about the same as for the small partition.
    assert large - small < 250, (small_before, small, large_before, large)


@pytest.mark.slow
def test_rolling_back_the_top_of_a_partition_holds_a_window_not_the_partition(tmp_path: Path):
    small_before, small, _ = _peak_mb(tmp_path, 200_000, "rollback")
    large_before, large, counts = _peak_mb(tmp_path, 2_000_000, "rollback")
    assert counts == (2_000_000 - 3, 2_000_000 - 4, 3, 9)  # the fork's 3 blocks and their logs archived, the rest kept
    assert large - small < 250, (small_before, small, large_before, large)
