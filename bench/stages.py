#!/usr/bin/env python
"""Per-stage CPU of a range sync, per million logs: where the indexer's CPU per log goes.

Builds (or reuses from bench/.cache) the seeded devnet of `bench/backfill.py`, takes the node's real
answers for a span of blocks (eth_getLogs of 54 blocks, the span the sizer settles on, and the headers
batch of the same blocks), then replays each chunk through the functions a range run calls, in order,
timing each with the process's CPU clock (all threads): parsing the logs and the headers, the fork
checks, the bloom check, the timestamps, writing the blocks and logs files, decoding and writing the
event tables. The limit client's parse (what `bench/backfill.py` counts as the limit) is timed on the
same bodies for scale. HTTP, Dagster, the checks, the DEX tables, the catalog and process start are not
per chunk: `bench/backfill.py` measures the whole.

    .venv/bin/python bench/stages.py [--blocks 11000 --first 4000 --last 5999 --reps 3]
"""

import argparse
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import indexer_dagster.sync.historical as historical  # noqa: E402
from bench.backfill import limit_rows  # noqa: E402
from indexer_dagster.chain import fetch  # noqa: E402
from indexer_dagster.chain.verify import verifier_for  # noqa: E402
from indexer_dagster.config import load_config  # noqa: E402
from indexer_dagster.devnet import run_devnet  # noqa: E402
from indexer_dagster.persist.datasets import BLOCK_SCHEMA, LOG_SCHEMA  # noqa: E402
from indexer_dagster.persist.lake import Lake  # noqa: E402

SPAN = 54  # blocks per eth_getLogs: what the sizer's 5,000 logs per request give on this devnet


def answers(url: str, addresses: list[str], first: int, last: int) -> list[tuple[int, int, bytes, bytes]]:
    """(first, last, eth_getLogs body, headers batch body) of each chunk."""
    def post(payload) -> bytes:
        req = urllib.request.Request(url, orjson.dumps(payload), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as resp:
            return resp.read()

    out = []
    for a in range(first, last + 1, SPAN):
        b = min(a + SPAN - 1, last)
        logs = post({"jsonrpc": "2.0", "id": 1, "method": "eth_getLogs",
                     "params": [{"fromBlock": hex(a), "toBlock": hex(b), "address": addresses}]})
        headers = post([{"jsonrpc": "2.0", "id": i, "method": "eth_getBlockByNumber", "params": [hex(n), False]}
                        for i, n in enumerate(range(a, b + 1))])
        out.append((a, b, logs, headers))
    return out


def replay(cfg, chunks, work: Path) -> dict[str, float]:
    """CPU seconds of each stage over all chunks, as a range run does them."""
    cpu: dict[str, float] = defaultdict(float)

    def timed(stage: str, f, *args):
        t = time.process_time()
        out = f(*args)
        cpu[stage] += time.process_time() - t
        return out

    addresses = sorted({a.lower() for c in cfg.contracts for a in c.addresses})
    fetcher = fetch.RangeFetcher(None, cfg.chain.chain_id, addresses, None,  # type: ignore[arg-type]  # no RPC
                                 verifier=verifier_for(cfg), verify_mode="bloom")
    assert fetcher.verifier is not None
    decode_logs, owned = historical.decode_logs, historical.owned
    # Parts of "decode and write events", timed inside it.
    historical.decode_logs = lambda *a: timed("  of which decoding", decode_logs, *a)  # type: ignore[assignment]
    historical.owned = lambda *a: timed("  of which copying small tables", owned, *a)  # type: ignore[assignment]
    try:
        lake = Lake(Path(tempfile.mkdtemp(dir=work)), cfg.chain.name)
        key = "000000000000-000000009999"
        with lake.transaction() as tx:
            blocks_w = tx.writer("blocks", key, BLOCK_SCHEMA, marker=True)
            logs_w = tx.writer("logs", key, LOG_SCHEMA)
            decoder = historical.Decoder(cfg, None)
            decoder.open(tx, key)
            for first, last, logs_body, headers_body in chunks:
                logs = timed("parse logs", fetch.parse_logs_body, logs_body, cfg.chain.chain_id)
                headers = timed("parse headers", lambda b: [r["result"] for r in orjson.loads(b)], headers_body)
                blocks = timed("parse headers", fetch.parse_headers, headers, list(range(first, last + 1)),
                               cfg.chain.chain_id)
                assert timed("fork checks", fetch._consistent, blocks, logs)
                blooms = timed("bloom check", fetch.blooms_of, blocks)
                assert not timed("bloom check", fetcher.verifier.suspects, blooms, logs)
                blocks = blocks.drop("logs_bloom")
                logs = timed("timestamps", fetcher._finish_logs, blocks, logs)
                timed("write blocks file", blocks_w.write, blocks)
                timed("write logs file", logs_w.write, logs)
                timed("decode and write events", decoder.write, logs)
            timed("decode and write events", decoder.flush)
            t = time.process_time()
        cpu["close and publish the files"] += time.process_time() - t  # last row groups, footers, fsync
    finally:
        historical.decode_logs, historical.owned = decode_logs, owned
    return cpu


def limit_parse(chunks) -> float:
    t = time.process_time()
    for _a, _b, body, _h in chunks:
        limit_rows(body)
    return time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=11000, help="devnet blocks (as bench/backfill.py --blocks)")
    ap.add_argument("--txs-per-block", type=int, default=50)
    ap.add_argument("--first", type=int, default=4000)
    ap.add_argument("--last", type=int, default=5999)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    node, _dep, config = run_devnet(out_dir=work / "devnet", blocks=args.blocks, txs_per_block=args.txs_per_block,
                                    seed=1, state_cache=REPO / "bench" / ".cache", echo=print)
    try:
        cfg = load_config(config)
        addresses = sorted({a.lower() for c in cfg.contracts for a in c.addresses})
        chunks = answers(node.url, addresses, args.first, min(args.last, node.block_number()))
    finally:
        node.stop()
    n = sum(len(fetch.parse_logs_body(c[2], cfg.chain.chain_id)) for c in chunks)
    runs = [replay(cfg, chunks, work) for _ in range(args.reps)]
    limits = [limit_parse(chunks) for _ in range(args.reps)]
    per_m = 1e6 / n
    lim = statistics.median(limits) * per_m
    print(f"\n{n:,} logs, blocks {args.first}-{args.last}, {len(chunks)} chunks of {SPAN} blocks; "
          f"CPU s per million logs, medians of {args.reps}")
    total = 0.0
    for stage in runs[0]:
        v = statistics.median(r[stage] for r in runs) * per_m
        total += 0 if stage.startswith("  ") else v
        print(f"  {stage:34s} {v:6.2f}")
    print(f"  {'all of the above':34s} {total:6.2f}  ({total / lim:.2f} x the limit client's parse, {lim:.2f})")


if __name__ == "__main__":
    main()
