#!/usr/bin/env python
"""DEX-table benchmark: the cost of keeping the DEX tables current must follow the new blocks, not the history.

1. A devnet (anvil, real Uniswap V2) is backfilled with `indexer backfill` (its range runs derive the
   DEX tables as they finish), then the DEX tables alone are derived again from scratch on that lake:
   their share of the backfill's time.
2. Its blocks of swaps are the template of a synthetic history appended after them: range files of
   `--partition` blocks with `--swaps-per-block` Swap (and as many Sync) events of the devnet's pools,
   in the lake's own layout, so the views and the DEX steps read them as they read synced ranges. The
   history grows to 1x, 10x, 100x `--base-swaps` swaps; at each size the DEX tables are caught up
   (timed: DEX seconds per million swaps), then one new block of swaps is appended as a live segment
   (as the follower writes it) and absorbed, `--new-blocks` times: the median time per new block (warm
   page cache), then as many more with the page cache emptied first (root only): the median bytes read
   from disk per new block (`read_bytes` of /proc/self/io, memory-mapped Parquet included).
   The aim: flat per-block cost (within 2x from 1x to 100x).

    .venv/bin/python bench/dex.py [--base-swaps 500000 --scales 1,10,100 --swaps-per-block 10]
"""

import argparse
import cProfile
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import polars as pl  # noqa: E402

from indexer_dagster.block_range import BlockRange  # noqa: E402
from indexer_dagster.config import load_config  # noqa: E402
from indexer_dagster.devnet import Anvil, build_devnet, write_config  # noqa: E402
from indexer_dagster.dex.build import build_dex  # noqa: E402
from indexer_dagster.dex.incremental import reset, table_rows  # noqa: E402
from indexer_dagster.dex.sources import source_tables  # noqa: E402
from indexer_dagster.persist.datasets import BLOCKS, events, live  # noqa: E402
from indexer_dagster.persist.files import parquet_metadata  # noqa: E402
from indexer_dagster.persist.lake import open_lake  # noqa: E402
from indexer_dagster.state import open_state  # noqa: E402


def disk_read() -> int:
    """Bytes this process made the kernel read from disk (memory-mapped Parquet included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def drop_page_cache() -> bool:
    """Empty the page cache (root only), so what a step reads is read from disk and counted."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


class History:
    """Synthetic blocks after the devnet's head: each block the template's swaps and syncs, new hashes."""

    def __init__(self, cfg, swap_table: str, sync_table: str, swaps_per_block: int) -> None:
        self.cfg, self.lake = cfg, open_lake(cfg)
        self.tables = {"swap": swap_table, "sync": sync_table}
        swap = pl.concat([pl.read_parquet(p) for p in self.lake.files(events(swap_table))])
        sync = pl.concat([pl.read_parquet(p) for p in self.lake.files(events(sync_table))])
        blocks = pl.concat([pl.read_parquet(p) for p in self.lake.files(BLOCKS)]).sort("number")
        self.head = int(blocks["number"].max())  # type: ignore[arg-type]
        self.head_hash = blocks["hash"][-1]
        self.head_time = blocks["timestamp"][-1]
        # One block's worth: the first `swaps_per_block` swaps and their pools' syncs, log indexes 0..2n-1.
        sw = swap.sort("block_number", "log_index").head(swaps_per_block).with_row_index("i")
        sy = sync.sort("block_number", "log_index").head(swaps_per_block).with_row_index("i")
        # Each swap after a sync of its own pool: Uniswap V2 emits Sync before Swap.
        sy = sy.with_columns(sw["address"].alias("address"))
        self.swap_tpl = sw.with_columns((pl.col("i") * 2 + 1).cast(pl.Int64).alias("log_index")).drop("i")
        self.sync_tpl = sy.with_columns((pl.col("i") * 2).cast(pl.Int64).alias("log_index")).drop("i")
        self.block_tpl = blocks.tail(1)
        self.n = swaps_per_block

    def _rows(self, tpl: pl.DataFrame, first: int, count: int) -> pl.DataFrame:
        numbers = pl.DataFrame({"block_number": pl.int_range(first, first + count, eager=True)})
        out = numbers.join(tpl.drop("block_number"), how="cross")
        offset = (pl.col("block_number") - self.head)
        return out.with_columns(
            pl.format("0x{}", pl.col("block_number").cast(pl.String).str.zfill(64)).alias("block_hash"),
            (pl.lit(self.head_time) + pl.duration(seconds=offset * 12)).alias("block_timestamp"),
            pl.format("0x{}{}", pl.col("block_number").cast(pl.String).str.zfill(48),
                      pl.col("log_index").cast(pl.String).str.zfill(16)).alias("transaction_hash"),
        ).select(tpl.columns)

    def _blocks(self, first: int, count: int) -> pl.DataFrame:
        n = pl.int_range(first, first + count, eager=True)
        df = pl.DataFrame({"number": n})
        return df.with_columns(
            pl.lit(self.cfg.chain.chain_id, pl.Int64).alias("chain_id"),
            pl.format("0x{}", pl.col("number").cast(pl.String).str.zfill(64)).alias("hash"),
            pl.when(pl.col("number") == self.head + 1).then(pl.lit(self.head_hash)).otherwise(
                pl.format("0x{}", (pl.col("number") - 1).cast(pl.String).str.zfill(64))).alias("parent_hash"),
            (pl.lit(self.head_time) + pl.duration(seconds=(pl.col("number") - self.head) * 12)).alias("timestamp"),
        ).select(self.block_tpl.columns)

    def write(self, first: int, last: int, as_live: bool = False) -> None:
        """Blocks first..last with their swaps and syncs: range files (a whole partition) or a live segment."""
        key = BlockRange(first, last).key  # (live segments are named like range files, as the follower names them)
        wrap = live if as_live else (lambda d: d)
        count = last - first + 1
        self.lake.write(wrap(events(self.tables["swap"])), key, self._rows(self.swap_tpl, first, count))
        self.lake.write(wrap(events(self.tables["sync"])), key, self._rows(self.sync_tpl, first, count))
        self.lake.write(wrap(BLOCKS), key, self._blocks(first, count))  # last: coverage is read from blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-swaps", type=int, default=500_000)
    ap.add_argument("--scales", default="1,10,100")
    ap.add_argument("--swaps-per-block", type=int, default=10)
    ap.add_argument("--partition", type=int, default=10_000, help="blocks per range file")
    ap.add_argument("--new-blocks", type=int, default=7)
    ap.add_argument("--devnet-blocks", type=int, default=300)
    ap.add_argument("--devnet-txs", type=int, default=20, help="transactions per devnet block")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--profile", help="write a cProfile of the new blocks' absorbs to this file")
    args = ap.parse_args()
    profile = cProfile.Profile() if args.profile else None
    work = Path(tempfile.mkdtemp(prefix="bench-dex-"))
    node = Anvil(chain_id=31337).start()
    try:
        dep = build_devnet(node, blocks=args.devnet_blocks, txs_per_block=args.devnet_txs, seed=1)
        cfg = load_config(write_config(work / "indexer.yaml", node.url, 31337, dep, "data",
                                       blocks_per_partition=args.partition, confirmations=12))
        head = node.block_number()
        # `indexer backfill` as a user runs it (its range runs derive the DEX tables as they finish);
        # then the DEX tables alone, derived again from scratch on the same lake: their share of it.
        env = {**os.environ, "DAGSTER_HOME": str(work / ".dagster_home")}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "indexer_dagster.cli", "backfill", "--config", str(work / "indexer.yaml"),
                        "--workers", "1"], env=env, check=True, capture_output=True)
        backfill_s = time.perf_counter() - t0
        store = open_state(cfg.state_url)
        reset(open_lake(cfg))
        t0 = time.perf_counter()
        res = build_dex(cfg, store=store)
        dex_s = time.perf_counter() - t0
        logs = sum(parquet_metadata(p).num_rows for p in open_lake(cfg).files("logs"))
        print(f"devnet: {head + 1} blocks, {logs:,} logs, {res.rows['swaps']:,} swaps: `indexer backfill` "
              f"{backfill_s:.2f} s end to end, of which deriving the DEX tables {dex_s:.2f} s ({dex_s / backfill_s:.1%})")
        src = source_tables(cfg)
        hist = History(cfg, src["swap"][0], src["sync"][0], args.swaps_per_block)
        nxt = hist.head + 1
        # Synthetic ranges start on a partition boundary (the devnet's own partition holds its blocks).
        first_free = (nxt // args.partition + 1) * args.partition
        if first_free > nxt:  # fill the rest of the devnet's partition as a live segment: no gap
            hist.write(nxt, first_free - 1, as_live=True)
            nxt = first_free
        print(f"{'history swaps':>14} {'range files':>11} {'catch-up s':>10} {'s/M swaps':>9} "
              f"{'new block ms':>12} {'MB disk':>8} {'x 1x':>5}")
        base_ms = None
        for scale in [int(s) for s in args.scales.split(",") if s]:  # (--scales '': the backfill share only)
            target_blocks = scale * args.base_swaps // args.swaps_per_block
            while nxt - hist.head - 1 < target_blocks:
                hist.write(nxt, nxt + args.partition - 1)
                nxt += args.partition
            t0 = time.perf_counter()
            res = build_dex(cfg, store=store, count_rows=False)
            catch_up = time.perf_counter() - t0
            swaps_total = table_rows(open_lake(cfg))["swaps"]
            times, reads = [], []
            # One new block after the history, each absorbed alone (the next ranges start after them):
            # warm first (time), then with the page cache emptied (bytes from disk).
            for i in range(2 * args.new_blocks):
                hist.write(nxt, nxt, as_live=True)
                nxt_block = nxt
                nxt += 1
                cold = i >= args.new_blocks and drop_page_cache()
                r0, t0 = disk_read(), time.perf_counter()
                if profile is not None and not cold:
                    profile.enable()
                res = build_dex(cfg, store=store, count_rows=False)
                if profile is not None and not cold:
                    profile.disable()
                (reads.append(disk_read() - r0) if cold else times.append(time.perf_counter() - t0))
                assert res.cursor == nxt_block, (res.cursor, nxt_block)
            ms = statistics.median(times) * 1000
            base_ms = base_ms or ms
            files = len(open_lake(cfg).files(events(src["swap"][0])))
            print(f"{swaps_total:>14,} {files:>11,} {catch_up:>10.1f} {catch_up / max(swaps_total, 1) * 1e6:>9.1f} "
                  f"{ms:>12.1f} {(statistics.median(reads) / 1e6 if reads else float('nan')):>8.2f} {ms / base_ms:>5.2f}", flush=True)
        if profile is not None:
            profile.dump_stats(args.profile)
    finally:
        node.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    main()
