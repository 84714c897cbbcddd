"""A range's memory does not grow with its length: decoding and writing a long range holds a few batches,
not every batch it has seen (issue 12: peak RSS ≤ 1 GiB for any range length).

Polars slices and filters share the buffers of the frame they come from. An event table with few rows
buffered until its row group fills (often the whole range) kept every decode batch's logs alive: RSS grew by
the size of each batch, ~1 GiB on a 10,000-block partition of a busy chain. The test decodes synthetic ERC-20
logs (mostly Transfers, a few Approvals: the small table) batch after batch in a process of its own and
compares its resident memory after 3 and after 15 batches.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from indexer_dagster.devnet.uniswap import artifact_paths

SCRIPT = textwrap.dedent("""
    import sys
    import polars as pl
    from indexer_dagster.config import load_config
    from indexer_dagster.persist.lake import open_lake
    from indexer_dagster.sync.historical import DECODE_BATCH_ROWS, Decoder

    TRANSFER = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
    APPROVAL = "0x8c5be1e5ebec7d5bd14f71427d1e84f3dd0314c0f7b2291e5b200ac8c7c3b925"
    TOKEN = "0x" + "ab" * 20

    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6

    def batch(k, n):
        i = pl.int_range(k * n, (k + 1) * n, eager=True)
        word = lambda salt: pl.format("0x{}", (i * 7919 + salt).cast(pl.String).str.pad_start(64, "0"))
        return pl.DataFrame({"i": i}).select(
            pl.lit(31337, pl.Int64).alias("chain_id"), (i // 100).alias("block_number"),
            word(1).alias("block_hash"), word(2).alias("transaction_hash"),
            (i % 100).cast(pl.Int64).alias("transaction_index"), (i % 100).cast(pl.Int64).alias("log_index"),
            pl.lit(TOKEN).alias("address"),
            pl.when(i % 200 == 0).then(pl.lit(APPROVAL)).otherwise(pl.lit(TRANSFER)).alias("topic0"),
            word(3).str.slice(0, 26).add(pl.lit("ab" * 20)).alias("topic1"),
            word(4).str.slice(0, 26).add(pl.lit("cd" * 20)).alias("topic2"),
            pl.lit(None, pl.String).alias("topic3"), word(5).alias("data"),
            pl.lit(0).cast(pl.Datetime("us", "UTC")).alias("block_timestamp"),
        )

    cfg = load_config(sys.argv[1])
    lake = open_lake(cfg)
    decoder = Decoder(cfg, None)
    seen = {}
    with lake.transaction() as tx:
        decoder.open(tx, "0000000000-0000099999")
        for k in range(15):
            decoder.write(batch(k, DECODE_BATCH_ROWS))
            seen[k + 1] = rss_mb()
        decoder.flush()
    print(seen[3], seen[15], decoder.rows["erc20_approval"], decoder.rows["erc20_transfer"])
""")


@pytest.mark.slow
def test_decoding_a_long_range_holds_a_few_batches_not_all_of_them(tmp_path: Path):
    (tmp_path / "abis").mkdir()
    (tmp_path / "abis" / "ERC20.json").write_bytes(artifact_paths()["ERC20"].read_bytes())
    (tmp_path / "indexer.yaml").write_text(json.dumps({
        "chain": {"name": "devnet", "chain_id": 31337, "rpc_url": "http://127.0.0.1:1", "blocks_per_partition": 100_000},
        "contracts": [{"name": "ERC20", "abi": "abis/ERC20.json", "addresses": ["0x" + "ab" * 20],
                       "events": ["Transfer", "Approval"]}],
        "storage": {"data_dir": "./data"},
    }))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "indexer.yaml")], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    after_3, after_15, approvals, transfers = out.stdout.split()
    assert (int(approvals), int(transfers)) == (7_500, 1_492_500)  # every log decoded
    # 12 more batches of 100k logs: ~60 MB each if kept; a bounded pipeline holds none of them.
    assert float(after_15) - float(after_3) < 150, (after_3, after_15)
