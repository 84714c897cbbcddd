#!/usr/bin/env python
"""Backfill under a flaky node: how much longer than fault-free it takes (issue 13, finding 11).

A node behind a load balancer answers a few calls of each JSON-RPC batch with `-32000 header not found`,
sends 429s with Retry-After, resets connections, truncates bodies, and caps eth_getLogs at 500 blocks.
The same devnet is backfilled range by range (`sync_range`, the work of a range run, default retry
settings) through the fault-injecting proxy of the tests, first with no fault, then with the faults, and
the script prints both times and their ratio (the aim: within 3x) plus what was injected. Both runs'
logs are compared with the node's.

    .venv/bin/python bench/faults.py [--blocks 2000 --txs-per-block 10 --item-errors 0.02 --rate 0.05]
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import polars as pl  # noqa: E402

from indexer_dagster.block_range import ranges_between  # noqa: E402
from indexer_dagster.config import load_config  # noqa: E402
from indexer_dagster.devnet import run_devnet  # noqa: E402
from indexer_dagster.persist.lake import open_lake  # noqa: E402
from indexer_dagster.sync.historical import sync_range  # noqa: E402
from tests.support.faultproxy import FaultProxy  # noqa: E402

FAULT_KINDS = ("http_429", "reset", "truncated", "http_503")


def backfill_through(config: Path, proxy: FaultProxy, work: Path, name: str) -> tuple[float, int]:
    """Every range of the devnet via the proxy, in a fresh data dir: (seconds, logs stored)."""
    target = work / name
    shutil.copytree(config.parent, target, ignore=shutil.ignore_patterns("data", ".dagster_home"))
    path = target / config.name
    path.write_text(path.read_text().replace(proxy.upstream, proxy.url))
    cfg = load_config(path)
    head = int(proxy_head(proxy))
    started = time.perf_counter()
    for r in ranges_between(cfg.start_block, head, cfg.chain.blocks_per_partition):
        sync_range(cfg, r)
    seconds = time.perf_counter() - started
    logs = sum(pl.scan_parquet(p).select(pl.len()).collect().item() for p in open_lake(cfg).files("logs"))
    return seconds, logs


def proxy_head(proxy: FaultProxy) -> int:
    from indexer_dagster.devnet import rpc

    return int(rpc(proxy.upstream, "eth_blockNumber", []), 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=2000)
    ap.add_argument("--txs-per-block", type=int, default=10)
    ap.add_argument("--item-errors", type=float, default=0.02, help="share of batch calls answered 'header not found'")
    ap.add_argument("--rate", type=float, default=0.05, help="share of HTTP requests given a transport fault")
    ap.add_argument("--logs-span", type=int, default=500, help="eth_getLogs over more blocks is refused")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    node, _dep, config = run_devnet(out_dir=work / "devnet", blocks=args.blocks, txs_per_block=args.txs_per_block,
                                    seed=1, state_cache=REPO / "bench" / ".cache", blocks_per_partition=500, echo=print)
    proxy = FaultProxy(node.url, seed=7).start()
    try:
        clean_s, clean_logs = backfill_through(config, proxy, work, "clean")
        proxy.configure(rate=args.rate, kinds=FAULT_KINDS, item_error_rate=args.item_errors,
                        max_logs_span=args.logs_span)
        flaky_s, flaky_logs = backfill_through(config, proxy, work, "flaky")
        injected = dict(proxy.injected)
        if flaky_logs != clean_logs:
            raise SystemExit(f"logs differ: fault-free {clean_logs}, under faults {flaky_logs}")
        print()
        print(f"chain: {proxy_head(proxy) + 1:,} blocks, {clean_logs:,} logs; 500-block ranges")
        print(f"fault-free   : {clean_s:7.1f} s")
        print(f"under faults : {flaky_s:7.1f} s  ({flaky_s / clean_s:.2f}x; {args.item_errors:.0%} of batch calls "
              f"'header not found', {args.rate:.0%} of requests {'/'.join(FAULT_KINDS)}, eth_getLogs capped at "
              f"{args.logs_span} blocks)")
        print(f"injected     : {injected}")
    finally:
        proxy.stop()
        node.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
