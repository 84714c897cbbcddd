#!/usr/bin/env python
"""Part of `make demo`: keep the devnet live (a block of Uniswap traffic every 2 s), trigger one reorg
with different transactions, and show it detected and repaired in the views. Runs until killed."""

import json
import subprocess
import sys
import time
from pathlib import Path

from indexer_dagster.config import load_config
from indexer_dagster.devnet.uniswap import Deployment, generate_traffic, reorg
from indexer_dagster.query import QueryError, query


def show(cfg, sql: str) -> None:
    print(f"\n$ indexer query \"{sql}\"", flush=True)
    try:
        print(query(cfg.duckdb_path, sql), flush=True)
    except QueryError as e:
        print(f"(not yet: {e})", flush=True)


def main() -> None:
    devnet_dir = Path(sys.argv[1])
    cfg = load_config(devnet_dir / "indexer.yaml")
    meta = json.loads((devnet_dir / "devnet.json").read_text())
    dep = Deployment.from_dict(meta["deployment"])
    url = meta["rpc_url"]
    seed = 1000
    started = time.monotonic()
    reorged = False
    shown = False
    while True:
        seed += 1
        generate_traffic(url, dep, blocks=1, txs_per_block=6, seed=seed, verify=False)
        elapsed = time.monotonic() - started
        if not reorged and elapsed > 40:
            print("\n== live: replacing the last 3 blocks with a fork carrying different swaps (anvil_reorg)", flush=True)
            reorg(url, dep, depth=3, txs_per_block=4, seed=seed * 7, verify=False)
            reorged = True
            reorg_at = time.monotonic()
        if reorged and not shown and time.monotonic() - reorg_at > 25:
            show(cfg, "select reorg_id, common_ancestor, depth, phase, rows_archived, touched_confirmed from reorgs")
            show(cfg, "select reorg_id, count(*) as orphaned_logs from orphaned_logs group by reorg_id")
            show(cfg, "select status, count(*) as blocks, max(number) as last from blocks group by status")
            print("\n$ indexer status   (health: heads, lag, partitions, last reorg, RPC errors)", flush=True)
            subprocess.run([sys.executable, "-m", "indexer_dagster.cli", "status",
                            "--config", str(devnet_dir / "indexer.yaml")], check=False)
            shown = True
        time.sleep(2)


if __name__ == "__main__":
    main()
