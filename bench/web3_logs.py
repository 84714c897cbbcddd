#!/usr/bin/env python
"""eth_getLogs through web3.py vs the indexer's own client, on the same devnet blocks and addresses.

The indexer fetches logs with `chain.rpc.RpcClient` (aiohttp, raw bytes) and parses each answer straight
into a Polars frame (`chain.fetch.parse_logs_body`); web3.py's `eth.get_logs` decodes the JSON with the
standard library and formats every log into an AttributeDict of HexBytes. Each run fetches the same block
range in the same chunks with the same number of requests in flight and prints logs/s (wall) and the CPU
seconds of this process (anvil runs in its own):

  (a) fast client: RpcClient + parse_logs_body, the indexer's bulk path (logs as a typed frame)
  (b) AsyncWeb3(AsyncHTTPProvider).eth.get_logs (a list of AttributeDicts, not yet a frame)
  (c) Web3(HTTPProvider).eth.get_logs, one request at a time

    .venv/bin/python bench/web3_logs.py [--blocks 1000 --txs-per-block 50 --span 100 --in-flight 4 --reps 3]
"""

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from web3 import AsyncHTTPProvider, AsyncWeb3, HTTPProvider, Web3  # noqa: E402

from indexer_dagster.chain.fetch import parse_logs_body  # noqa: E402
from indexer_dagster.chain.rpc import RpcClient  # noqa: E402
from indexer_dagster.devnet import run_devnet  # noqa: E402


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _filter(a: int, b: int, addresses: list[str]) -> dict:
    return {"fromBlock": hex(a), "toBlock": hex(b), "address": addresses}


async def fast(url: str, ranges, addresses, in_flight: int) -> int:
    async with RpcClient(url, concurrency=in_flight, timeout_s=300) as rpc:
        frames = await asyncio.gather(*[
            rpc.call_raw("eth_getLogs", [_filter(a, b, addresses)], parse=lambda body: parse_logs_body(body, 31337))
            for a, b in ranges])
    return sum(f.height for f in frames)


async def web3_async(url: str, ranges, addresses, in_flight: int) -> int:
    w3 = AsyncWeb3(AsyncHTTPProvider(url, request_kwargs={"timeout": 300}))
    sem = asyncio.Semaphore(in_flight)
    checksummed = [w3.to_checksum_address(a) for a in addresses]

    async def one(a: int, b: int) -> int:
        async with sem:
            return len(await w3.eth.get_logs({"fromBlock": a, "toBlock": b, "address": checksummed}))

    try:
        return sum(await asyncio.gather(*[one(a, b) for a, b in ranges]))
    finally:
        await w3.provider.disconnect()


def web3_sync(url: str, ranges, addresses) -> int:
    w3 = Web3(HTTPProvider(url, request_kwargs={"timeout": 300}))
    checksummed = [w3.to_checksum_address(a) for a in addresses]
    return sum(len(w3.eth.get_logs({"fromBlock": a, "toBlock": b, "address": checksummed})) for a, b in ranges)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=1000)
    ap.add_argument("--txs-per-block", type=int, default=50)
    ap.add_argument("--span", type=int, default=100, help="blocks per eth_getLogs request")
    ap.add_argument("--in-flight", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        node, dep, _ = run_devnet(tmp, blocks=args.blocks, txs_per_block=args.txs_per_block,
                                  state_cache=REPO / "bench" / ".cache", echo=print)
        try:
            addresses = sorted(a.lower() for a in [dep.factory, *dep.tokens, *dep.pair_addresses])
            first, last = dep.start_block, int(node.rpc("eth_blockNumber"), 16)
            ranges = [(s, min(s + args.span - 1, last)) for s in range(first, last + 1, args.span)]
            runs = {
                "(a) fast client (RpcClient + Polars)": lambda: asyncio.run(fast(node.url, ranges, addresses, args.in_flight)),
                "(b) web3.py AsyncWeb3 eth.get_logs": lambda: asyncio.run(web3_async(node.url, ranges, addresses, args.in_flight)),
                "(c) web3.py Web3 eth.get_logs (sequential)": lambda: web3_sync(node.url, ranges, addresses),
            }
            results: dict[str, list[tuple[float, float, int]]] = {k: [] for k in runs}
            for _ in range(args.reps):  # interleaved: a slow moment of the machine hits every client alike
                for name, run in runs.items():
                    t0, c0 = time.perf_counter(), _cpu()
                    n = run()
                    results[name].append((time.perf_counter() - t0, _cpu() - c0, n))
            counts = {n for rs in results.values() for *_, n in rs}
            assert len(counts) == 1, f"the clients got different log counts: {counts}"
            n = counts.pop()
            print(f"\n{n} logs, blocks {first}..{last}, {len(ranges)} requests of {args.span} blocks, "
                  f"{args.in_flight} in flight; medians of {args.reps}")
            base = None
            for name, rs in results.items():
                wall = statistics.median(r[0] for r in rs)
                cpu = statistics.median(r[1] for r in rs)
                base = base or wall
                print(f"{name:45s} {n / wall:10,.0f} logs/s  {wall:6.2f} s wall  {cpu:6.2f} CPU s  x{wall / base:.1f}")
        finally:
            node.stop()


if __name__ == "__main__":
    main()
