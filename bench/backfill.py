#!/usr/bin/env python
"""Backfill benchmark: `indexer backfill` end to end vs a minimal raw eth_getLogs client.

Builds (or reuses from bench/.cache) an anvil devnet of real Uniswap V2 traffic, then, interleaved
over several repetitions, measures logs/second of
  (a) a raw client: concurrent eth_getLogs over the same addresses and blocks, JSON parsed into
      Polars (nothing stored) — the speed limit the node and HTTP allow here;
  (b) `indexer backfill` as a user runs it: a fresh data dir and Dagster instance, headers + logs
      fetched, checked, written to Parquet, decoded into event tables, DuckDB catalog built.
It prints the medians, the ratio b/a, and the peak memory of (b) for half and for all of the range
(bounded memory means the two stay close).

    .venv/bin/python bench/backfill.py [--blocks 2000 --txs-per-block 50 --reps 3]
    .venv/bin/python bench/backfill.py --workers 1,2,4 --instance postgres   # parallel runs, Postgres instance

`--workers 1,2,4` measures each worker count (interleaved within each repetition) and prints logs/s
per count. `--instance postgres` runs every backfill on a fresh Dagster instance in PostgreSQL
(deploy/dagster-postgres.yaml; a throw-away database on the server of --pg-url, dropped afterwards).
`--lake s3` writes the lake to object storage: a fresh bucket per run on a local S3 server (moto's,
in this process), through the same s3fs/botocore client a real bucket would get.
"""

import argparse
import asyncio
import io
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer_dagster.config import load_config  # noqa: E402
from indexer_dagster.devnet import run_devnet  # noqa: E402

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


async def raw_client(url: str, addresses: list[str], first: int, last: int, span: int, in_flight: int) -> int:
    ranges = [(s, min(s + span - 1, last)) for s in range(first, last + 1, span)]
    total = 0
    sem = asyncio.Semaphore(in_flight)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as session:

        async def one(i: int, a: int, b: int) -> int:
            body = {"jsonrpc": "2.0", "id": i, "method": "eth_getLogs",
                    "params": [{"fromBlock": hex(a), "toBlock": hex(b), "address": addresses}]}
            async with sem, session.post(url, json=body) as resp:
                data = await resp.read()
            if b'"result":[]' in data[:60]:
                return 0
            return pl.read_json(io.BytesIO(data)).select(pl.col("result").explode()).unnest("result").height

        for n in await asyncio.gather(*[one(i, a, b) for i, (a, b) in enumerate(ranges)]):
            total += n
    return total


def _pg_database(pg_url: str):
    """A fresh database on the server for one Dagster instance; returns (DAGSTER_PG_* env, drop function)."""
    from urllib.parse import urlsplit

    import psycopg2

    name = f"indexer_bench_{os.getpid()}_{time.monotonic_ns()}"
    conn = psycopg2.connect(pg_url)
    conn.autocommit = True
    conn.cursor().execute(f'CREATE DATABASE "{name}"')
    u = urlsplit(pg_url)
    env = {"DAGSTER_PG_HOST": u.hostname or "127.0.0.1", "DAGSTER_PG_PORT": str(u.port or 5432),
           "DAGSTER_PG_DB": name, "DAGSTER_PG_USER": u.username or "postgres", "DAGSTER_PG_PASSWORD": u.password or ""}

    def drop() -> None:
        conn.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()

    return env, drop


def run_indexer(config: Path, work: Path, to_block: int | None, workers: int, instance: str = "sqlite",
                pg_url: str | None = None, lake: str = "local") -> tuple[float, int, float]:
    """Run `indexer backfill` in a fresh data dir and Dagster instance; returns (seconds, logs, peak RSS MiB)."""
    cfg_dir = work / "cfg"
    shutil.rmtree(cfg_dir, ignore_errors=True)
    shutil.copytree(config.parent, cfg_dir, ignore=shutil.ignore_patterns("data", ".dagster_home"))
    if lake == "s3":
        _fresh_bucket_lake(cfg_dir / "indexer.yaml")
    home = cfg_dir / ".dagster_home"
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    drop = None
    if instance == "postgres":
        pg_env, drop = _pg_database(pg_url or DEFAULT_PG_URL)
        env.update(pg_env)
    args = [sys.executable, "-m", "indexer_dagster.cli", "backfill", "--config", str(cfg_dir / "indexer.yaml"),
            "--workers", str(workers), "--instance", instance]
    if to_block is not None:
        args += ["--to", str(to_block)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(args, env=env, capture_output=True, text=True)
    finally:
        seconds = time.perf_counter() - t0
        if drop is not None:
            drop()
    if proc.returncode != 0:
        raise SystemExit(f"indexer backfill failed:\n{proc.stdout}\n{proc.stderr}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    cfg = load_config(cfg_dir / "indexer.yaml")
    from indexer_dagster.query import query

    logs = query(cfg.duckdb_path, "select count(*) n from logs")["n"][0]
    # ru_maxrss of children is the largest single descendant so far (KiB on Linux).
    return seconds, logs, max(peak, before) / 1024


def start_s3_server() -> None:
    """A local S3 server for `--lake s3`; its endpoint and test credentials go to the environment, which
    the backfill processes inherit."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")


def _fresh_bucket_lake(config: Path) -> None:
    import s3fs
    import yaml

    bucket = f"bench-{time.time_ns()}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    raw = yaml.safe_load(config.read_text())
    raw["storage"]["lake_url"] = f"s3://{bucket}/lake"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=2200)
    ap.add_argument("--txs-per-block", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", default="1", help="worker counts to measure, e.g. 1,2,4")
    ap.add_argument("--instance", choices=["sqlite", "postgres"], default="sqlite", help="Dagster instance profile")
    ap.add_argument("--pg-url", default=os.environ.get("INDEXER_TEST_POSTGRES_URL", DEFAULT_PG_URL),
                    help="PostgreSQL server for --instance postgres (a database is created per run)")
    ap.add_argument("--blocks-per-partition", type=int, default=10_000, help="the config default")
    ap.add_argument("--span", type=int, default=50, help="raw client: blocks per eth_getLogs")
    ap.add_argument("--in-flight", type=int, default=4, help="raw client: concurrent requests")
    ap.add_argument("--skip-memory", action="store_true", help="skip the two peak-memory runs")
    ap.add_argument("--lake", choices=["local", "s3"], default="local",
                    help="where the lake goes: data_dir, or a bucket on a local S3 server")
    args = ap.parse_args()
    if args.lake == "s3":
        start_s3_server()
    worker_counts = [int(w) for w in str(args.workers).split(",") if w.strip()]

    work = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    node, _dep, config = run_devnet(
        out_dir=work / "devnet", blocks=args.blocks, txs_per_block=args.txs_per_block, seed=1,
        state_cache=REPO / "bench" / ".cache", blocks_per_partition=args.blocks_per_partition, echo=print,
    )
    try:
        cfg = load_config(config)
        head = node.block_number()
        addresses = [a for c in cfg.contracts for a in c.addresses]
        raw_rates: list[float] = []
        idx_rates: dict[int, list[float]] = {w: [] for w in worker_counts}
        for rep in range(args.reps):
            t0 = time.perf_counter()
            n_raw = asyncio.run(raw_client(node.url, addresses, 0, head, args.span, args.in_flight))
            raw_rates.append(n_raw / (time.perf_counter() - t0))
            line = [f"rep {rep + 1}: raw {raw_rates[-1]:,.0f} logs/s"]
            for w in worker_counts:
                seconds, n_idx, _peak = run_indexer(config, work, None, w, args.instance, args.pg_url, args.lake)
                if n_idx != n_raw:
                    raise SystemExit(f"log counts differ: raw {n_raw}, indexer {n_idx} ({w} workers)")
                idx_rates[w].append(n_idx / seconds)
                line.append(f"{w} worker(s) {idx_rates[w][-1]:,.0f} logs/s ({seconds:.1f}s)")
            print(", ".join(line), flush=True)
        raw_med = statistics.median(raw_rates)
        print()
        print(f"logs: {n_raw:,} in {head + 1:,} blocks ({len(addresses)} contracts); "
              f"{args.blocks_per_partition}-block partitions; Dagster instance: {args.instance}; lake: {args.lake}")
        print(f"raw eth_getLogs client : {raw_med:>10,.0f} logs/s (median of {args.reps})")
        for w in worker_counts:
            med = statistics.median(idx_rates[w])
            print(f"indexer, {w:>2} worker(s)   : {med:>10,.0f} logs/s (median of {args.reps}), "
                  f"ratio to raw {med / raw_med:.2f}")
        if not args.skip_memory:
            # Peak RSS is a high-water mark over all children, so each range is measured in a fresh process.
            w = worker_counts[0]
            peak_half, half_logs = _peak_in_fresh_process(config, work, head // 2, w, args.instance, args.pg_url,
                                                           args.lake)
            peak_full, _ = _peak_in_fresh_process(config, work, None, w, args.instance, args.pg_url, args.lake)
            print(f"peak RSS, half range   : {peak_half:>10.0f} MiB ({half_logs:,} logs, {w} worker(s))")
            print(f"peak RSS, full range   : {peak_full:>10.0f} MiB ({n_raw:,} logs)")
    finally:
        node.stop()
        shutil.rmtree(work, ignore_errors=True)


def _peak_in_fresh_process(config: Path, work: Path, to_block: int | None, workers: int, instance: str = "sqlite",
                           pg_url: str | None = None, lake: str = "local") -> tuple[float, int]:
    code = (
        "import sys, resource; sys.path.insert(0, %r); from bench.backfill import run_indexer; from pathlib import Path;"
        "s, n, _ = run_indexer(Path(%r), Path(%r), %r, %d, %r, %r, %r);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, n)"
    ) % (str(REPO), str(config), str(work), to_block, workers, instance, pg_url, lake)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, logs = out.stdout.strip().splitlines()[-1].split()
    return float(peak), int(logs)


if __name__ == "__main__":
    main()
