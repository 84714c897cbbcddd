#!/usr/bin/env python
"""Backfill benchmark: `indexer backfill` end to end vs the node's raw eth_getLogs limit and cryo.

Builds (or reuses from bench/.cache) an anvil devnet of real Uniswap V2 traffic, then, interleaved
over several repetitions, runs each client in its own process over the same blocks and addresses:
  (a) the limit: concurrent eth_getLogs, JSON parsed into Polars, rows counted (nothing stored) —
      the speed the node and HTTP allow here;
  (b) cryo (PyPI `cryo`, its Rust core), `cryo.freeze("logs", contract=[...])` into Parquet, when
      installed (`pip install cryo`; `--no-cryo` skips it);
  (c) `indexer backfill` as a user runs it: a fresh data dir and Dagster instance, headers + logs
      fetched, checked, written to Parquet, decoded into event tables, range checks, DEX tables,
      DuckDB catalog built.
For each it prints the median logs/s, the ratio to (a), the client CPU seconds (user + system of the
process and its children) per million logs and that ratio to (a)'s, and the largest peak RSS of its
runs. (b) and (c) are timed as whole processes, start included; (a) is timed inside its process, from
the first request to the last row counted (the node's limit, not a Python start's).

    .venv/bin/python bench/backfill.py [--blocks 2200 --txs-per-block 50 --reps 3]
    .venv/bin/python bench/backfill.py --blocks 11000 --workers 1,2   # 1.01M logs, one and two workers
    .venv/bin/python bench/backfill.py --workers 1,2,4 --instance postgres   # parallel runs, Postgres instance

`--pin` puts anvil on CPU 0 and every client on CPU 1 (the node's CPU kept out of the way, as with a
remote node and one core for the indexer). `--workers 1,2,4` measures each worker count (interleaved within each repetition) and prints logs/s
per count. `--instance postgres` runs every backfill on a fresh Dagster instance in PostgreSQL
(deploy/dagster-postgres.yaml; a throw-away database on the server of --pg-url, dropped afterwards).
`--lake s3` writes the lake to object storage: a fresh bucket per run on a local S3 server (moto's,
in this process), through the same s3fs/botocore client a real bucket would get.
"""

import argparse
import asyncio
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import polars as pl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer_dagster.config import load_config  # noqa: E402
from indexer_dagster.devnet import run_devnet  # noqa: E402

DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def limit_rows(body: bytes) -> int:
    """The limit client's parse of an eth_getLogs body: JSON into a Polars frame of the logs, rows counted."""
    if b'"result":[]' in body[:60]:
        return 0
    return pl.read_json(io.BytesIO(body)).select(pl.col("result").explode()).unnest("result").height


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
            return limit_rows(data)

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


@dataclass
class Measured:
    """One client's process, as the kernel accounted it (`wait4`: the process and its reaped children)."""

    seconds: float
    cpu_s: float  # user + system
    peak_mib: float  # the largest resident set of the process or any of its children
    stdout: str


# Starts a command from a small process and writes its rusage there: a child forked from this (large)
# process would count this process's memory in its peak RSS (Linux carries the forked copy's high-water
# mark across exec).
_LAUNCHER = """
import os, sys
if os.environ.get("BENCH_CLIENT_CPUS"):
    os.sched_setaffinity(0, {int(c) for c in os.environ["BENCH_CLIENT_CPUS"].split(",")})
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{usage.ru_utime + usage.ru_stime} {usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measured(args: list[str], env: dict[str, str] | None = None) -> Measured:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as usage:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, usage.name, *args], env=env, stdout=out,
                              stderr=err)
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
        cpu_s, maxrss_kib = usage.read().split()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:4])} ... failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return Measured(seconds, float(cpu_s), int(maxrss_kib) / 1024, stdout)


def run_limit(url: str, addresses: list[str], first: int, last: int, span: int, in_flight: int) -> tuple[Measured, int]:
    """The limit client in a process of its own; returns (measurement, logs). Its time and CPU are those
    of the fetch alone, measured inside the process: the limit is the node's, not a Python start's."""
    m = measured([sys.executable, __file__, "_limit", url, ",".join(addresses), str(first), str(last), str(span),
                  str(in_flight)])
    logs, seconds, cpu_s = m.stdout.split()[-3:]
    return Measured(float(seconds), float(cpu_s), m.peak_mib, m.stdout), int(logs)


def run_cryo(url: str, addresses: list[str], first: int, last: int, work: Path) -> tuple[Measured, int]:
    """cryo 0.3 (`cryo.freeze`, Rust) writing the same logs to Parquet, in a process of its own."""
    out = work / "cryo"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    m = measured([sys.executable, __file__, "_cryo", url, ",".join(addresses), str(first), str(last), str(out)])
    logs = pl.scan_parquet(str(out / "*.parquet")).select(pl.len()).collect().item()
    return m, logs


def _child_limit(url: str, addresses: str, first: str, last: str, span: str, in_flight: str) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    logs = asyncio.run(raw_client(url, addresses.split(","), int(first), int(last), int(span), int(in_flight)))
    print(logs, time.perf_counter() - t0, time.process_time() - c0)


def _child_cryo(url: str, addresses: str, first: str, last: str, out: str) -> None:
    import cryo

    cryo.freeze("logs", rpc=url, blocks=[f"{first}:{int(last) + 1}"], contract=addresses.split(","),
                output_dir=out, no_verbose=True)


def pin(anvil_pid: int | None) -> None:
    """anvil (every thread of it) on CPU 0 and the clients on CPU 1: each side gets one core of its own, as
    when the node is on another machine and the indexer has one core."""
    if anvil_pid is None or (os.cpu_count() or 1) < 2:
        raise SystemExit("--pin needs two CPUs and a local anvil")
    for tid in os.listdir(f"/proc/{anvil_pid}/task"):
        os.sched_setaffinity(int(tid), {0})
    os.environ["BENCH_CLIENT_CPUS"] = "1"


def cryo_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("cryo") is not None


def run_indexer(config: Path, work: Path, to_block: int | None, workers: int, instance: str = "sqlite",
                pg_url: str | None = None, lake: str = "local") -> tuple[Measured, int]:
    """Run `indexer backfill` in a fresh data dir and Dagster instance; returns (measurement, logs)."""
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
    try:
        m = measured(args, env)
    finally:
        if drop is not None:
            drop()
    cfg = load_config(cfg_dir / "indexer.yaml")
    from indexer_dagster.query import query

    logs = query(cfg.duckdb_path, "select count(*) n from logs")["n"][0]
    return m, logs


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


@dataclass
class Client:
    name: str
    rates: list[float]
    cpu_per_m: list[float]
    peaks: list[float]

    def add(self, m: Measured, logs: int) -> str:
        self.rates.append(logs / m.seconds)
        self.cpu_per_m.append(m.cpu_s / (logs / 1e6))
        self.peaks.append(m.peak_mib)
        return f"{self.name} {self.rates[-1]:,.0f} logs/s ({m.seconds:.1f} s, {m.cpu_s:.1f} CPU s)"


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
    ap.add_argument("--span", type=int, default=50, help="limit client: blocks per eth_getLogs")
    ap.add_argument("--in-flight", type=int, default=4, help="limit client: concurrent requests")
    ap.add_argument("--no-cryo", action="store_true", help="skip cryo (also skipped when it is not installed)")
    ap.add_argument("--pin", action="store_true",
                    help="anvil on CPU 0, every client on CPU 1: the node's CPU kept out of the clients' way")
    ap.add_argument("--lake", choices=["local", "s3"], default="local",
                    help="where the lake goes: data_dir, or a bucket on a local S3 server")
    args = ap.parse_args()
    if args.lake == "s3":
        start_s3_server()
    worker_counts = [int(w) for w in str(args.workers).split(",") if w.strip()]
    with_cryo = not args.no_cryo and cryo_installed()
    if not args.no_cryo and not with_cryo:
        print("cryo is not installed (pip install cryo): measuring without it")
    if with_cryo and args.pin:
        # Seen here: it writes every chunk, then aborts ("Fatal Python error: PyGILState_Release").
        print("cryo 0.3.2 aborts when confined to one CPU: --pin measures without it")
        with_cryo = False

    work = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    node, _dep, config = run_devnet(
        out_dir=work / "devnet", blocks=args.blocks, txs_per_block=args.txs_per_block, seed=1,
        state_cache=REPO / "bench" / ".cache", blocks_per_partition=args.blocks_per_partition, echo=print,
    )
    try:
        if args.pin:
            pin(node.proc.pid if node.proc else None)
        cfg = load_config(config)
        head = node.block_number()
        addresses = [a for c in cfg.contracts for a in c.addresses]
        limit = Client("limit client", [], [], [])
        cryo = Client("cryo", [], [], [])
        indexers = {w: Client(f"indexer backfill, {w} worker(s)", [], [], []) for w in worker_counts}
        for rep in range(args.reps):
            m, n_raw = run_limit(node.url, addresses, 0, head, args.span, args.in_flight)
            line = [f"rep {rep + 1}: " + limit.add(m, n_raw)]
            if with_cryo:
                m, n_cryo = run_cryo(node.url, addresses, 0, head, work)
                if n_cryo != n_raw:
                    raise SystemExit(f"log counts differ: limit client {n_raw}, cryo {n_cryo}")
                line.append(cryo.add(m, n_cryo))
            for w in worker_counts:
                m, n_idx = run_indexer(config, work, None, w, args.instance, args.pg_url, args.lake)
                if n_idx != n_raw:
                    raise SystemExit(f"log counts differ: limit client {n_raw}, indexer {n_idx} ({w} workers)")
                line.append(indexers[w].add(m, n_idx))
            print(", ".join(line), flush=True)
        print()
        print(f"logs: {n_raw:,} in {head + 1:,} blocks ({len(addresses)} contracts); "
              f"{args.blocks_per_partition}-block partitions; Dagster instance: {args.instance}; lake: {args.lake}; "
              f"medians of {args.reps}" + ("; anvil pinned to CPU 0, clients to CPU 1" if args.pin else ""))
        lim_rate, lim_cpu = statistics.median(limit.rates), statistics.median(limit.cpu_per_m)
        print(f"{'client':34s} {'logs/s':>10s} {'x limit':>8s} {'CPU s/M logs':>13s} {'x limit':>8s} {'peak RSS':>9s}")
        for c in [limit, *([cryo] if with_cryo else []), *indexers.values()]:
            rate, cpu = statistics.median(c.rates), statistics.median(c.cpu_per_m)
            print(f"{c.name:34s} {rate:>10,.0f} {rate / lim_rate:>8.2f} {cpu:>13.2f} {cpu / lim_cpu:>8.2f} "
                  f"{max(c.peaks):>5.0f} MiB")
    finally:
        node.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_limit":
        _child_limit(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "_cryo":
        _child_cryo(*sys.argv[2:])
    else:
        main()
