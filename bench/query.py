#!/usr/bin/env python
"""Query benchmark: typical analyst queries through the Python API over a synthetic DEX lake.

Generates (or reuses from bench/.cache/query/) a deterministic lake shaped like the indexer's DEX
tables - by default 5,000,000 swaps across 200 pools over 60 days of 12-second blocks - as one
Parquet file per table under <data>/bench/dex/ (swaps, pools, pool_state, pool_candles with
intervals 1m and 1h, pool_volume with 1h and 1d; the aggregates are computed from the swaps with
DuckDB SQL; 64 Ki-row row groups like the lake's writer, candles and volume sorted by interval, pool,
bucket_start), plus <data>/bench/_meta/head.parquet. It then builds a catalog of views shaped like
the real one (``status`` joined from ``chain_heads``), opens it with ``indexer_dagster.connect``
and times, on one warm connection, with repetitions:

  (a) volume per pool per day over all swaps, aggregated at query time (Indexer.sql on `swaps`)
  (b) 1h candles of one pool over 30 days (Indexer.candles, from `pool_candles`)
  (b2) 1m candles of one pool over 30 days (same)
  (c) latest state of every pool (Indexer.pool_state())
  (d) latest state of one pool (Indexer.pool_state(pool)); required: p95 <= 10 ms

and prints p50 / p95 in milliseconds.

    .venv/bin/python bench/query.py [--swaps 5000000 --pools 200 --days 60 --reps 20] [--no-cache]
"""

import argparse
import datetime as dt
import hashlib
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.compute as pc

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer_dagster import connect  # noqa: E402
from indexer_dagster.persist.catalog import write_views  # noqa: E402

GENERATOR_VERSION = 2  # bump when the generated data changes, to invalidate the cache
CHAIN_ID = 1
CHAIN = "bench"
FIRST_BLOCK = 18_000_000
BLOCK_SECONDS = 12
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
CONFIRMATIONS = 12


# ------------------------------------------------------------------------------------------------
# Synthetic data


def _uniform(n: int, seed: int, stream: int) -> pl.Series:
    """n uniform doubles in [0, 1), the same for the same (seed, stream) on every run."""
    return pl.Series(f"u{stream}", pc.random(n, initializer=seed * 1_000 + stream))


def _address(i: int, salt: int) -> str:
    return "0x" + hashlib.sha256(f"{salt}:{i}".encode()).hexdigest()[:40]


def pools_frame(n_pools: int, seed: int) -> pl.DataFrame:
    u = _uniform(n_pools, seed, 0).to_list()
    tokens = [_address(i, 7) for i in range(n_pools // 4 + 2)]
    rows = []
    for p in range(n_pools):
        t0, t1 = tokens[p % len(tokens)], tokens[(p * 7 + 1) % len(tokens)]
        if t0 == t1:
            t1 = tokens[(p + 1) % len(tokens)]
        rows.append({
            "pool_idx": p,
            "pool": _address(p, 3),
            "token0": t0,
            "token1": t1,
            "decimals1": 6 if p % 4 == 0 else 18,
            "base_price": 10 ** (-3 + 7 * u[p]),  # token1 in token0, 1e-3 .. 1e4
            "liquidity": 2e6 / math.sqrt(p + 1),
            "created_block": FIRST_BLOCK - 1000 + p,
        })
    return pl.DataFrame(rows)


def swaps_frame(n: int, pools: pl.DataFrame, days: int, seed: int) -> pl.DataFrame:
    """The numeric core of the swaps: sorted by block, skewed pool popularity, a random walk of the
    price per pool and log-normal trade sizes."""
    n_blocks = days * 86_400 // BLOCK_SECONDS
    n_pools = pools.height
    u_pool, u_dir, u_r, u_theta = (_uniform(n, seed, k) for k in (1, 2, 3, 4))
    radius = (-2.0 * (1.0 - pl.col("u_r")).log()).sqrt()  # Box-Muller: two independent normals
    angle = 2 * math.pi * pl.col("u_theta")
    f = (
        pl.DataFrame([u_pool.alias("u_pool"), u_dir.alias("u_dir"), u_r.alias("u_r"), u_theta.alias("u_theta")])
        .with_row_index("i")
        .with_columns(
            (FIRST_BLOCK + pl.col("i").cast(pl.Int64) * n_blocks // n).alias("block_number"),
            (n_pools * pl.col("u_pool") ** 2).floor().cast(pl.Int64).clip(0, n_pools - 1).alias("pool_idx"),
            (radius * angle.cos()).alias("z_price"),
            (radius * angle.sin()).alias("z_size"),
            (pl.col("u_dir") < 0.5).alias("zero_to_one"),
        )
        .join(pools.select("pool_idx", "base_price"), on="pool_idx", how="left", maintain_order="left")
        .with_columns(
            (pl.col("i") - pl.col("i").min().over("block_number")).cast(pl.Int64).alias("log_index"),
            (pl.col("base_price").log() + (0.002 * pl.col("z_price")).cum_sum().over("pool_idx")).exp().alias("price"),
            (3.0 + 1.5 * pl.col("z_size")).exp().alias("moved0"),  # token0 units
        )
        .with_columns((pl.col("moved0") / pl.col("price")).alias("moved1"))
    )
    return f.select("i", "block_number", "log_index", "pool_idx", "zero_to_one", "price", "moved0", "moved1")


def generate(data: Path, n: int, n_pools: int, days: int, seed: int, row_group_size: int) -> None:
    chain = data / CHAIN
    dex = chain / "dex"
    dex.mkdir(parents=True)
    (chain / "_meta").mkdir()
    pools = pools_frame(n_pools, seed)
    core = swaps_frame(n, pools, days, seed)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET preserve_insertion_order = true")
    con.register("pool_meta", pools.to_arrow())
    con.register("core", core.to_arrow())
    t0 = T0.strftime("%Y-%m-%d %H:%M:%S+00")

    def copy(select: str, name: str) -> None:
        options = f"FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {row_group_size}"
        con.execute(f"COPY ({select}) TO '{dex / name}.parquet' ({options})")

    scale1 = "CASE WHEN p.decimals1 = 6 THEN 1e6 ELSE 1e18 END"
    copy(
        f"""
        SELECT {CHAIN_ID}::BIGINT AS chain_id, c.block_number,
               TIMESTAMPTZ '{t0}' + to_seconds((c.block_number - {FIRST_BLOCK}) * {BLOCK_SECONDS}) AS block_timestamp,
               '0x' || sha256(c.i::VARCHAR) AS transaction_hash, c.log_index,
               p.pool, p.token0, p.token1,
               CASE WHEN c.zero_to_one THEN '0to1' ELSE '1to0' END AS direction,
               CAST(round(CASE WHEN c.zero_to_one THEN c.moved0 * 1e18 ELSE c.moved1 * {scale1} END)
                    AS DECIMAL(38, 0)) AS amount_in,
               CAST(round(CASE WHEN c.zero_to_one THEN c.moved1 * {scale1} ELSE c.moved0 * 1e18 END)
                    AS DECIMAL(38, 0)) AS amount_out,
               CASE WHEN c.zero_to_one THEN c.moved0 ELSE c.moved1 END AS amount_in_h,
               CASE WHEN c.zero_to_one THEN c.moved1 ELSE c.moved0 END AS amount_out_h,
               c.price
        FROM core c JOIN pool_meta p USING (pool_idx)
        ORDER BY c.i
        """,
        "swaps",
    )
    con.unregister("core")
    del core
    swaps = f"read_parquet('{dex / 'swaps.parquet'}')"
    copy(
        f"SELECT {CHAIN_ID}::BIGINT AS chain_id, pool, token0, token1, created_block FROM pool_meta ORDER BY pool",
        "pools",
    )
    # Latest state: reserves of a constant-product pool of the pool's liquidity at its last price.
    copy(
        f"""
        WITH last AS (
            SELECT chain_id, pool, arg_max(price, block_number * 100000 + log_index) AS price,
                   max(block_number) AS last_block, max(block_timestamp) AS last_timestamp
            FROM {swaps} GROUP BY ALL
        )
        SELECT l.chain_id, l.pool, p.token0, p.token1,
               CAST(round(p.liquidity * sqrt(l.price) * 1e18) AS DECIMAL(38, 0)) AS reserve0,
               CAST(round(p.liquidity / sqrt(l.price) * {scale1}) AS DECIMAL(38, 0)) AS reserve1,
               p.liquidity * sqrt(l.price) AS reserve0_h, p.liquidity / sqrt(l.price) AS reserve1_h,
               l.price, 1 / l.price AS inverse_price, l.last_block, l.last_timestamp
        FROM last l JOIN pool_meta p USING (pool)
        ORDER BY l.chain_id, l.pool
        """,
        "pool_state",
    )

    def buckets(interval: str, unit: str, ohlc: bool) -> str:
        """Per (chain, pool, bucket): count, exact volumes and their human values (/ 10**decimals),
        first/last block, and for candles open/high/low/close in (block_number, log_index) order."""
        order = "block_number * 100000 + log_index"
        prices = (
            f"arg_min(price, {order}) AS open, max(price) AS high, min(price) AS low, arg_max(price, {order}) AS close, "
            if ohlc else ""
        )
        return f"""
            SELECT chain_id, pool, any_value(s.token0) AS token0, any_value(s.token1) AS token1,
                   '{interval}' AS "interval", date_trunc('{unit}', block_timestamp) AS bucket_start, {prices}
                   count(*) AS swap_count,
                   sum(CASE WHEN direction = '0to1' THEN amount_in ELSE amount_out END) AS volume_token0,
                   sum(CASE WHEN direction = '0to1' THEN amount_out ELSE amount_in END) AS volume_token1,
                   min(block_number) AS first_block, max(block_number) AS last_block,
                   any_value(p.decimals1) AS decimals1
            FROM {swaps} s JOIN pool_meta p USING (pool)
            GROUP BY chain_id, pool, bucket_start
        """

    human = (
        "volume_token0, volume_token1, CAST(volume_token0 AS DOUBLE) / 1e18 AS volume_token0_h, "
        "CAST(volume_token1 AS DOUBLE) / (CASE WHEN decimals1 = 6 THEN 1e6 ELSE 1e18 END) AS volume_token1_h"
    )
    candles = " UNION ALL ".join(buckets(i, u, True) for i, u in (("1m", "minute"), ("1h", "hour")))
    copy(
        f"""SELECT chain_id, pool, token0, token1, "interval", bucket_start, open, high, low, close, {human},
                   swap_count, first_block, last_block
            FROM ({candles}) ORDER BY "interval", pool, bucket_start""",
        "pool_candles",
    )
    volume = " UNION ALL ".join(buckets(i, u, False) for i, u in (("1h", "hour"), ("1d", "day")))
    copy(
        f"""SELECT chain_id, pool, token0, token1, "interval", bucket_start, swap_count, {human},
                   first_block, last_block
            FROM ({volume}) ORDER BY "interval", pool, bucket_start""",
        "pool_volume",
    )
    head = con.execute(f"SELECT max(block_number) FROM {swaps}").fetchall()[0][0]
    con.close()
    pl.DataFrame(
        {"chain_id": [CHAIN_ID], "chain": [CHAIN], "head_number": [head], "head_hash": ["0x" + "00" * 32],
         "confirmations": [CONFIRMATIONS], "confirmed_through": [head - CONFIRMATIONS],
         "observed_at": [T0 + dt.timedelta(days=days)]},
        schema_overrides={"observed_at": pl.Datetime("us", "UTC")},
    ).write_parquet(chain / "_meta" / "head.parquet")


def build_catalog(data: Path) -> Path:
    """Views shaped like the real catalog's DEX views, in a temporary file renamed into place."""

    def with_status(table: str, number_col: str) -> str:
        return (
            f"SELECT x.*, CASE WHEN x.{number_col} <= h.confirmed_through THEN 'confirmed' ELSE 'unconfirmed' END "
            f"AS status FROM read_parquet('{data}/*/dex/{table}.parquet', union_by_name = true) x "
            f"LEFT JOIN chain_heads h ON h.chain_id = x.chain_id"
        )

    views = {
        "chain_heads": f"SELECT * FROM read_parquet('{data}/*/_meta/head.parquet', union_by_name = true)",
        "pools": with_status("pools", "created_block"),
        "swaps": with_status("swaps", "block_number"),
        "pool_state": with_status("pool_state", "last_block"),
        "pool_candles": with_status("pool_candles", "last_block"),
        "pool_volume": with_status("pool_volume", "last_block"),
    }
    return write_views(data / "indexer.duckdb", views)


def lake(args: argparse.Namespace, scratch: Path | None) -> Path:
    """The data dir: from the cache when it was generated before with the same parameters."""
    key = f"v{GENERATOR_VERSION}-n{args.swaps}-p{args.pools}-d{args.days}-s{args.seed}-rg{args.row_group_size}"
    root = scratch if scratch is not None else REPO / "bench" / ".cache" / "query"
    data = root / key
    if (data / ".complete").is_file():
        print(f"reusing {data}")
        return data
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"generating {args.swaps:,} swaps across {args.pools} pools over {args.days} days ...", flush=True)
    start = time.perf_counter()
    try:
        generate(tmp, args.swaps, args.pools, args.days, args.seed, args.row_group_size)
        (tmp / ".complete").touch()
        shutil.rmtree(data, ignore_errors=True)
        os.replace(tmp, data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"generated in {time.perf_counter() - start:.1f} s")
    return data


# ------------------------------------------------------------------------------------------------
# Timing


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def timed(fn: Callable[[int], pl.DataFrame], reps: int, warmup: int) -> tuple[list[float], int]:
    rows = 0
    for r in range(warmup):
        fn(r)
    samples = []
    for r in range(reps):
        start = time.perf_counter()
        rows = fn(r).height
        samples.append((time.perf_counter() - start) * 1000)
    return samples, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--swaps", type=int, default=5_000_000)
    ap.add_argument("--pools", type=int, default=200)
    ap.add_argument("--days", type=int, default=60)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--row-group-size", type=int, default=64 * 1024,
                    help="rows per Parquet row group (default: the lake's ROW_GROUP_SIZE)")
    ap.add_argument("--reps", type=int, default=20, help="repetitions of the heavy query (a); the others run more")
    ap.add_argument("--no-cache", action="store_true", help="generate into a temporary dir, removed afterwards")
    args = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="indexer-query-bench-")) if args.no_cache else None
    try:
        data = lake(args, scratch)
        catalog = build_catalog(data)
        sizes = {p.name: p.stat().st_size for p in (data / CHAIN / "dex").glob("*.parquet")}
        with connect(catalog) as ix:
            counts = ix.sql(
                "SELECT (SELECT count(*) FROM swaps) AS swaps, (SELECT count(*) FROM pool_candles) AS candles, "
                "(SELECT count(*) FROM pool_volume) AS volume, (SELECT count(*) FROM pool_state) AS pools"
            ).row(0, named=True)
            print(
                f"lake: {counts['swaps']:,} swaps, {counts['pools']} pools, {counts['candles']:,} candle rows, "
                f"{counts['volume']:,} volume rows; "
                + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(sizes.items()))
            )
            pools = ix.sql("SELECT pool FROM pool_state ORDER BY pool")["pool"].to_list()
            busiest = ix.sql("SELECT pool FROM pool_state ORDER BY reserve0_h DESC LIMIT 10")["pool"].to_list()
            month_start = T0 + dt.timedelta(days=max(0, args.days - 30) // 2)
            month_end = month_start + dt.timedelta(days=30)

            daily_volume_sql = """
                SELECT pool, date_trunc('day', block_timestamp) AS day, count(*) AS swaps,
                       sum(CASE WHEN direction = '0to1' THEN amount_in ELSE amount_out END) AS volume_token0,
                       sum(CASE WHEN direction = '0to1' THEN amount_out ELSE amount_in END) AS volume_token1,
                       sum(CASE WHEN direction = '0to1' THEN amount_in_h ELSE amount_out_h END) AS volume_token0_h,
                       sum(CASE WHEN direction = '0to1' THEN amount_out_h ELSE amount_in_h END) AS volume_token1_h
                FROM swaps GROUP BY ALL ORDER BY pool, day
            """
            cases = [
                ("(a) volume per pool per day, all swaps (sql)", lambda r: ix.sql(daily_volume_sql), args.reps, 2),
                ("(b) 1h candles, one pool, 30 days",
                 lambda r: ix.candles(busiest[r % len(busiest)], "1h", month_start, month_end), 100, 5),
                ("(b2) 1m candles, one pool, 30 days",
                 lambda r: ix.candles(busiest[r % len(busiest)], "1m", month_start, month_end), 50, 3),
                ("(c) latest state, all pools", lambda r: ix.pool_state(), 200, 10),
                ("(d) latest state, one pool", lambda r: ix.pool_state(pools[(r * 37) % len(pools)]), 500, 20),
            ]
            results = []
            for name, fn, reps, warmup in cases:
                samples, rows = timed(fn, reps, warmup)
                results.append((name, reps, rows, statistics.median(samples), percentile(samples, 0.95)))
                print(f"  {name}: done", flush=True)

        print()
        print(f"{'query (Python API, warm connection)':<46} {'reps':>5} {'rows':>9} {'p50 ms':>9} {'p95 ms':>9}")
        print("-" * 82)
        for name, reps, rows, p50, p95 in results:
            print(f"{name:<46} {reps:>5} {rows:>9,} {p50:>9.2f} {p95:>9.2f}")
        p95_state = results[-1][4]
        verdict = "OK" if p95_state <= 10 else "TOO SLOW"
        print(f"\nlatest-state lookup of one pool: p95 {p95_state:.2f} ms (requirement <= 10 ms): {verdict}")
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
