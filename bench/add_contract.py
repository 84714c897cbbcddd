#!/usr/bin/env python
"""What adding a contract costs: RPC requests of the supplement vs indexing everything again.

On an anvil devnet with real Uniswap V2 traffic it runs `indexer backfill` three times and prints the
RPC requests each made, by method (from the durable counters in `_meta/rpc_stats.json`):
  1. the factory and its pairs, from scratch;
  2. the same data directory after the ERC20 tokens are added to the config (only they are fetched);
  3. a fresh data directory with all three contracts (what re-indexing would cost).

    .venv/bin/python bench/add_contract.py [--blocks 300 --txs-per-block 20 --blocks-per-partition 100]
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer_dagster.devnet import Anvil, build_devnet, write_config  # noqa: E402
from indexer_dagster.health.rpc_stats import read_rpc_stats  # noqa: E402


def backfill(config: Path, home: Path) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    home.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "indexer_dagster.cli", "backfill", "--config", str(config)],
                   env=env, check=True, stdout=subprocess.DEVNULL)


def requests(data_dir: Path, chain: str) -> dict[str, int]:
    return dict(read_rpc_stats(data_dir, chain)["requests"])


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in sorted(after.items()) if v - before.get(k, 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=300)
    ap.add_argument("--txs-per-block", type=int, default=20)
    ap.add_argument("--blocks-per-partition", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-add-") as tmp:
        tmp = Path(tmp)
        node = Anvil(chain_id=31337).start()
        try:
            dep = build_devnet(node, blocks=args.blocks, txs_per_block=args.txs_per_block, seed=3)
            head = node.block_number()
            kw = {"blocks_per_partition": args.blocks_per_partition, "confirmations": 5}
            first = write_config(tmp / "a" / "indexer.yaml", node.url, 31337, dep, "data", include_tokens=False, **kw)
            full = write_config(tmp / "b" / "indexer.yaml", node.url, 31337, dep, "data", **kw)
            data_a, data_b = tmp / "a" / "data", tmp / "b" / "data"

            backfill(first, tmp / "a" / "home")
            initial = requests(data_a, "devnet")
            # Add the tokens to the first config (same data directory) and run the same command again.
            doc = yaml.safe_load(full.read_text())
            first.write_text(yaml.safe_dump({**yaml.safe_load(first.read_text()), "contracts": doc["contracts"]}))
            backfill(first, tmp / "a" / "home")
            added = delta(requests(data_a, "devnet"), initial)
            backfill(full, tmp / "b" / "home")
            scratch = requests(data_b, "devnet")
        finally:
            node.stop()
    ranges = -(-(head + 1) // args.blocks_per_partition)
    print(f"chain: {head + 1} blocks, {ranges} ranges of {args.blocks_per_partition} blocks")
    for label, counts in (("1. factory + pairs, from scratch", initial),
                          ("2. ERC20 tokens added (supplement)", added),
                          ("3. all contracts, from scratch", scratch)):
        total = sum(counts.values())
        print(f"{label:38s} {total:6d} requests  " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"adding the tokens cost {sum(added.values()) / max(sum(scratch.values()), 1):.0%} of re-indexing "
          f"everything (eth_getLogs: {added.get('eth_getLogs', 0)} vs {scratch.get('eth_getLogs', 0)})")


if __name__ == "__main__":
    main()
