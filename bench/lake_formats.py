"""What the lake's write path costs in each storage format, on the indexer's own data shapes.

    python bench/lake_formats.py [--logs 1000000 --ranges 10 --reps 3]

Runs in its own virtualenv (DuckLake's extensions exist on PyPI only for DuckDB 1.4.4, while the
project uses the newest DuckDB): `pip install duckdb==1.4.4 duckdb-ext-ducklake==1.4.4.20260205
duckdb-ext-sqlite==1.4.4.20260205 duckdb-ext-postgres==1.4.4.20260205 polars pyarrow deltalake`.

A backfill-shaped workload: `--ranges` block ranges, each committing its headers, its logs and one
decoded event table together (the indexer's per-range publish), with the columns and value shapes
of `persist/datasets.py` (0x-hex strings). For each format: wall and CPU seconds, logs/s and CPU
seconds per million logs; then a reorg (the last 5% of blocks moved to the orphan archive in one
transaction) while a reader checks every answer for duplicated rows and rows both canonical and
orphaned; then a block-range count query.

- `files`: today's protocol: one zstd Parquet file per table and range, temp file + rename.
- `ducklake-sqlite` / `ducklake-postgres`: DuckLake tables, one transaction per range (all three tables).
- `delta`: Delta Lake tables (deltalake), one commit per table and range (it has no multi-table commit).
"""

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

PG = os.environ.get("BENCH_POSTGRES", "dbname=test host=127.0.0.1 user=postgres")


def _hex(rng: np.random.Generator, n: int, nbytes: int) -> pl.Series:
    raw = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    return pl.Series(["0x" + r.tobytes().hex() for r in raw])


def make_ranges(logs: int, ranges: int, seed: int = 1) -> list[dict[str, pl.DataFrame]]:
    """`ranges` ranges of logs/ranges logs each, 50 logs per block, with their blocks and swap events."""
    rng = np.random.default_rng(seed)
    per = logs // ranges
    blocks_per = per // 50
    out = []
    for i in range(ranges):
        first = i * blocks_per
        numbers = np.arange(first, first + blocks_per, dtype=np.int64)
        blocks = pl.DataFrame({
            "chain_id": pl.Series([1] * blocks_per, dtype=pl.Int64), "number": numbers,
            "hash": _hex(rng, blocks_per, 32), "parent_hash": _hex(rng, blocks_per, 32),
            "timestamp": pl.Series(numbers * 12_000_000 + 1_600_000_000_000_000).cast(pl.Datetime("us", "UTC")),
        })
        bn = np.repeat(numbers, 50)
        logs_df = pl.DataFrame({
            "chain_id": pl.Series([1] * per, dtype=pl.Int64), "block_number": bn,
            "block_hash": blocks["hash"].gather(np.repeat(np.arange(blocks_per), 50)),
            "block_timestamp": pl.Series(bn * 12_000_000 + 1_600_000_000_000_000).cast(pl.Datetime("us", "UTC")),
            "transaction_hash": _hex(rng, per, 32), "transaction_index": np.tile(np.arange(50, dtype=np.int64), blocks_per),
            "log_index": np.tile(np.arange(50, dtype=np.int64), blocks_per),
            "address": _hex(rng, per, 20), "topic0": _hex(rng, per, 32), "topic1": _hex(rng, per, 32),
            "topic2": _hex(rng, per, 32), "topic3": pl.Series([None] * per, dtype=pl.String),
            "data": _hex(rng, per, 128),
        })
        swaps = logs_df.head(per // 2).select(
            "chain_id", "block_number", "log_index", "transaction_hash", "address",
            pl.col("topic1").alias("sender"), pl.col("topic2").alias("to"),
            *[pl.lit(str(10**20 + k)).alias(f"amount{k}") for k in range(4)],
        )
        out.append({"blocks": blocks, "logs": logs_df, "swaps": swaps})
    return out


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- formats --------------------------------------------------------------------------------------


class Files:
    name = "files"

    def __init__(self, root: Path):
        self.root = root

    def commit(self, key: int, tables: dict[str, pl.DataFrame]) -> None:
        for t, df in tables.items():
            d = self.root / t
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f".{key:06d}.tmp"
            df.write_parquet(tmp, compression="zstd", compression_level=1, row_group_size=64 * 1024)
            os.replace(tmp, d / f"{key:06d}.parquet")

    def reader(self) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect()
        for t in ("logs", "orphaned_logs"):
            (self.root / t).mkdir(parents=True, exist_ok=True)
        return con

    def table(self, t: str) -> str:
        return f"read_parquet('{self.root}/{t}/*.parquet')"

    def reorg(self, above: int) -> None:
        """Today's order: archive published first, then the source file rewritten (two renames)."""
        for p in sorted((self.root / "logs").glob("*.parquet")):
            df = pl.read_parquet(p)
            moved = df.filter(pl.col("block_number") > above)
            if moved.height:
                arch = self.root / "orphaned_logs"
                arch.mkdir(exist_ok=True)
                tmp = arch / f".{p.stem}.tmp"
                moved.write_parquet(tmp)
                os.replace(tmp, arch / p.name)
                tmp = p.with_name(f".{p.stem}.tmp")
                df.filter(pl.col("block_number") <= above).write_parquet(tmp)
                os.replace(tmp, p)


class DuckLake:
    commit_retries = 0

    def _transaction(self, statements: list[str]) -> None:
        """BEGIN; statements; COMMIT — again while a SQLite catalog answers "database is locked" (a reader
        holds it); the retries are counted."""
        con = self.con
        for attempt in range(50):
            try:
                con.execute("BEGIN")
                for sql in statements:
                    con.execute(sql)
                con.execute("COMMIT")
                return
            except duckdb.Error as e:
                if "locked" not in str(e).lower() or attempt == 49:
                    raise
                try:
                    con.execute("ROLLBACK")
                except duckdb.Error:
                    pass
                self.commit_retries += 1
                time.sleep(0.02)

    def __init__(self, root: Path, catalog: str):
        self.root, self.catalog = root, catalog
        self.name = f"ducklake-{catalog}"
        self.schema = f"bench_{os.getpid()}_{time.time_ns()}"
        self.con = self._connect()
        # The same Parquet settings as the file protocol (DuckLake defaults to snappy).
        self.con.execute("CALL lake.set_option('parquet_compression', 'zstd')")
        self.con.execute("CALL lake.set_option('parquet_compression_level', 1)")
        self.con.execute(f"CALL lake.set_option('parquet_row_group_size', {64 * 1024})")
        self.created: set[str] = set()

    def _connect(self) -> duckdb.DuckDBPyConnection:
        ext = Path(duckdb.__file__).parent.parent / "duckdb_ext" / "extensions"
        con = duckdb.connect(config={"extension_directory": str(ext), "autoinstall_known_extensions": False})
        con.execute("LOAD ducklake")
        if self.catalog == "sqlite":
            con.execute("LOAD sqlite")
            meta = f"ducklake:sqlite:{self.root}/meta.sqlite"
            con.execute(f"ATTACH '{meta}' AS lake (DATA_PATH '{self.root}/data/')")
        else:
            con.execute("LOAD postgres")
            con.execute(f"ATTACH 'ducklake:postgres:{PG}' AS lake (DATA_PATH '{self.root}/data/', "
                        f"METADATA_SCHEMA '{self.schema}')")
        return con

    def commit(self, key: int, tables: dict[str, pl.DataFrame]) -> None:
        con = self.con
        for t, df in tables.items():
            con.register(f"src_{t}", df.to_arrow())
            if t not in self.created:
                con.execute(f"CREATE TABLE IF NOT EXISTS lake.{t} AS SELECT * FROM src_{t} LIMIT 0")
                self.created.add(t)
        self._transaction([f"INSERT INTO lake.{t} SELECT * FROM src_{t}" for t in tables])
        for t in tables:
            con.unregister(f"src_{t}")

    def reader(self) -> duckdb.DuckDBPyConnection:
        self.con.execute("CREATE TABLE IF NOT EXISTS lake.orphaned_logs AS SELECT * FROM lake.logs LIMIT 0")
        return self._connect()

    def table(self, t: str) -> str:
        return f"lake.{t}"

    def reorg(self, above: int) -> None:
        self._transaction([
            f"INSERT INTO lake.orphaned_logs SELECT * FROM lake.logs WHERE block_number > {above}",
            f"DELETE FROM lake.logs WHERE block_number > {above}",
        ])


class DuckLakeAddFiles(DuckLake):
    """DuckLake as the commit record only: files written by polars (as today), then registered in one
    DuckLake transaction per range (`ducklake_add_data_files`): the commit is metadata, not a rewrite."""

    def __init__(self, root: Path, catalog: str):
        super().__init__(root, catalog)
        self.name = f"ducklake-{catalog}+files"
        self.files = Files(root / "files")

    def commit(self, key: int, tables: dict[str, pl.DataFrame]) -> None:
        con = self.con
        for t, df in tables.items():
            if t not in self.created:
                con.register(f"src_{t}", df.head(0).to_arrow())
                con.execute(f"CREATE TABLE IF NOT EXISTS lake.{t} AS SELECT * FROM src_{t} LIMIT 0")
                con.unregister(f"src_{t}")
                self.created.add(t)
        self.files.commit(key, tables)
        self._transaction([f"CALL ducklake_add_data_files('lake', '{t}', '{self.root}/files/{t}/{key:06d}.parquet')"
                           for t in tables])


class Delta:
    name = "delta"

    def __init__(self, root: Path):
        self.root = root

    def commit(self, key: int, tables: dict[str, pl.DataFrame]) -> None:
        for t, df in tables.items():
            df.write_delta(str(self.root / t), mode="append")

    def reader(self):
        return None

    def reorg(self, above: int) -> None:
        from deltalake import DeltaTable

        moved = pl.read_delta(str(self.root / "logs")).filter(pl.col("block_number") > above)
        moved.write_delta(str(self.root / "orphaned_logs"), mode="append")
        DeltaTable(str(self.root / "logs")).delete(f"block_number > {above}")


# -- measurements ---------------------------------------------------------------------------------


def write(fmt, data) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), _cpu()
    for i, tables in enumerate(data):
        fmt.commit(i, tables)
    return time.perf_counter() - t0, _cpu() - c0


def _read_once(con: duckdb.DuckDBPyConnection, sql: str) -> tuple | None:
    """One answer of `sql`, or None when the read must be made again: it met a concurrent commit
    (DuckLake), a file renamed away under its glob (files), or a SQLite catalog mid-commit."""
    try:
        return con.execute(sql).fetchone()
    except duckdb.TransactionException:
        con.execute("ROLLBACK")
        return None
    except duckdb.Error as e:
        low = str(e).lower()
        if "no files found" in low or "no such file" in low or "locked" in low:
            return None
        raise


def publish_with_reader(fmt, data) -> int:
    """Commit the ranges again into a fresh lake while a reader checks that every range it sees has its
    headers, its logs and its decoded rows together (a multi-table publish seen whole or not at all).
    Returns the number of reads that saw one table of a range without the others."""
    fmt.commit(0, data[0])  # the tables exist before the reader starts
    con = fmt.reader()
    if con is None:
        return -1
    per = {t: df.height for t, df in data[0].items()}
    sql = (f"SELECT (SELECT count(*) FROM {fmt.table('blocks')}), (SELECT count(*) FROM {fmt.table('logs')}), "
           f"(SELECT count(*) FROM {fmt.table('swaps')})")
    stop, bad = threading.Event(), [0]

    def read():
        while not stop.is_set():
            row = _read_once(con, sql)
            if row is None:
                continue
            b, lg, sw = row
            if not (b // per["blocks"] == lg // per["logs"] == sw // per["swaps"]):
                bad[0] += 1
            time.sleep(0.002)

    th = threading.Thread(target=read)
    th.start()
    for i, tables in enumerate(data[1:], start=1):
        fmt.commit(i, tables)
    stop.set()
    th.join()
    return bad[0]


def reorg_with_reader(fmt, above: int, total: int) -> dict:
    """The reorg in one go while a reader counts: canonical rows, orphaned rows, duplicates, overlap."""
    con = fmt.reader()
    if con is None:
        t0 = time.perf_counter()
        fmt.reorg(above)
        return {"reorg_s": time.perf_counter() - t0, "reads": 0, "mixed_reads": "n/a (one table per commit)"}
    logs, orph = fmt.table("logs"), fmt.table("orphaned_logs")
    sql = (f"SELECT (SELECT count(*) FROM {logs}) + (SELECT count(*) FROM {orph}) AS n, "
           f"(SELECT count(*) - count(DISTINCT (block_number, log_index)) FROM {logs}) AS dup, "
           f"(SELECT count(*) FROM {logs} l WHERE l.block_number > {above}) AS left_above, "
           f"(SELECT count(*) FROM {orph}) AS orphaned")
    stop = threading.Event()
    bad, reads, retries = [], [0], [0]

    def read():
        while not stop.is_set():
            row = _read_once(con, sql)
            if row is None:
                retries[0] += 1
                continue
            n, dup, left_above, orphaned = row
            reads[0] += 1
            time.sleep(0.002)  # a busy reader, not a spin: a SQLite catalog serialises its locks
            # Before: all rows canonical, none orphaned. After: none canonical above, all moved. Else mixed.
            if dup or n != total or (left_above and orphaned):
                bad.append((n, dup, left_above, orphaned))

    th = threading.Thread(target=read)
    th.start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    fmt.reorg(above)
    s = time.perf_counter() - t0
    time.sleep(0.2)
    stop.set()
    th.join()
    out = {"reorg_s": round(s, 3), "reads": reads[0], "retried_reads": retries[0], "mixed_reads": len(bad)}
    if hasattr(fmt, "commit_retries"):
        out["commit_retries"] = fmt.commit_retries  # both phases: the publish under a reader, then the reorg
    return out


def count_query(fmt, lo: int, hi: int) -> float:
    con = fmt.reader()
    if con is None:
        t0 = time.perf_counter()
        pl.scan_delta(str(fmt.root / "logs")).filter(pl.col("block_number").is_between(lo, hi)).select(pl.len()).collect()
        return time.perf_counter() - t0
    sql = f"SELECT count(*) FROM {fmt.table('logs')} WHERE block_number BETWEEN {lo} AND {hi}"
    con.execute(sql).fetchall()
    t0 = time.perf_counter()
    for _ in range(10):
        con.execute(sql).fetchall()
    return (time.perf_counter() - t0) / 10


def make(name: str, root: Path):
    return {"files": lambda: Files(root), "ducklake-sqlite": lambda: DuckLake(root, "sqlite"),
            "ducklake-postgres": lambda: DuckLake(root, "postgres"), "delta": lambda: Delta(root),
            "ducklake-sqlite+files": lambda: DuckLakeAddFiles(root, "sqlite"),
            "ducklake-postgres+files": lambda: DuckLakeAddFiles(root, "postgres")}[name]()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--logs", type=int, default=1_000_000)
    ap.add_argument("--ranges", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--formats", default="files,ducklake-sqlite,ducklake-postgres,ducklake-sqlite+files,"
                                         "ducklake-postgres+files,delta")
    a = ap.parse_args()
    data = make_ranges(a.logs, a.ranges)
    total = sum(d["logs"].height for d in data)
    last = int(data[-1]["blocks"]["number"].max())
    above = int(last * 0.95)
    print(f"{total:,} logs in {a.ranges} ranges (+ headers and {sum(d['swaps'].height for d in data):,} decoded rows); "
          f"duckdb {duckdb.__version__}, polars {pl.__version__}")
    for name in a.formats.split(","):
        walls: list[float] = []
        cpus: list[float] = []
        extra: dict = {}
        for rep in range(a.reps):
            root = Path(tempfile.mkdtemp(prefix=f"lake-{name}-"))
            fmt = make(name, root)
            w, c = write(fmt, data)
            walls.append(w)
            cpus.append(c)
            if rep == a.reps - 1:
                root2 = Path(tempfile.mkdtemp(prefix=f"lake-{name}-pub-"))
                fmt2 = make(name, root2)
                extra["publish_mixed_reads"] = publish_with_reader(fmt2, data)
                fmt.commit_retries = getattr(fmt2, "commit_retries", 0)
                shutil.rmtree(root2, ignore_errors=True)
                extra |= reorg_with_reader(fmt, above, total)
                extra["count_ms"] = round(count_query(fmt, above - 1000, above) * 1000, 2)
                extra["bytes_MB"] = round(sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6, 1)
            shutil.rmtree(root, ignore_errors=True)
        w, c = statistics.median(walls), statistics.median(cpus)
        print(f"{name:18s} write {w:6.2f} s  {total / w:>10,.0f} logs/s  CPU {c / total * 1e6:5.2f} s per M logs  "
              + "  ".join(f"{k}={v}" for k, v in extra.items()))


if __name__ == "__main__":
    main()
