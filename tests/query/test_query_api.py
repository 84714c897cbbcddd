"""The Python query API (`indexer_dagster.connect` -> `Indexer`) over a small hand-built lake.

The lake and its catalog are built here with DuckDB directly, shaped like the real catalog: Parquet
files under <data>/<chain>/..., views over globs of them, and a ``status`` joined from
``chain_heads`` (confirmed when the row's block is <= confirmed_through). No node, no Dagster.
"""

import datetime as dt
import os
import subprocess
import sys
import threading
from decimal import Decimal as D
from pathlib import Path
from types import SimpleNamespace

import duckdb
import polars as pl
import pytest

import indexer_dagster
from indexer_dagster.api import connect
from indexer_dagster.persist.catalog import write_views
from indexer_dagster.query import QueryError

REPO = Path(__file__).resolve().parents[2]
PAIR_ABI = REPO / "node_modules/@uniswap/v2-core/build/UniswapV2Pair.json"

P1 = "0x" + "a1" * 20
P2 = "0x" + "b2" * 20
P3 = "0x" + "c3" * 20  # on chain 10
T0, T1 = "0x" + "01" * 20, "0x" + "02" * 20
P1_MIXED = "0x" + "A1" * 20
UTC = dt.UTC
T_START = dt.datetime(2024, 5, 1, tzinfo=UTC)
EXACT = pl.Decimal(38, 0)
CONFIRMED_THROUGH = {1: 150, 10: 10_000}
CHAINS = {1: "mainnet", 10: "optimism"}


def ts(block: int) -> dt.datetime:
    """Block timestamps: block 100 at T_START, 12 s per block."""
    return T_START + dt.timedelta(seconds=12 * (block - 100))


# ------------------------------------------------------------------------------------------------
# The lake


def write(path: Path, frame: pl.DataFrame, **kw) -> None:
    """Write a Parquet file atomically (temporary file + rename), as the indexer does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    frame.write_parquet(tmp, **kw)
    os.replace(tmp, path)


def swaps_frame(chain_id: int, pool: str, blocks: list[int], tag: int = 0) -> pl.DataFrame:
    n = len(blocks)
    return pl.DataFrame(
        {
            "chain_id": [chain_id] * n,
            "block_number": blocks,
            "block_timestamp": [ts(b) for b in blocks],
            "transaction_hash": [f"0x{tag:04x}{b:060x}" for b in blocks],
            "log_index": [1] * n,
            "pool": [pool] * n,
            "token0": [T0] * n,
            "token1": [T1] * n,
            "direction": ["0to1" if b % 20 else "1to0" for b in blocks],
            "amount_in": [D(10**18 * (i + 1)) for i in range(n)],
            "amount_out": [D(2 * 10**18 * (i + 1)) for i in range(n)],
            "amount_in_h": [float(i + 1) for i in range(n)],
            "amount_out_h": [2.0 * (i + 1) for i in range(n)],
            "price": [0.5 + tag for _ in range(n)],
        },
        schema_overrides={"block_timestamp": pl.Datetime("us", "UTC"), "amount_in": EXACT, "amount_out": EXACT},
    )


def build_lake(data: Path, tag: int = 0) -> None:
    """Two chains: pools P1, P2 on chain 1 (confirmed through block 150), P3 on chain 10. `tag`
    changes values (prices) so that a rebuilt lake can be told apart."""
    for chain_id, name in CHAINS.items():
        write(
            data / name / "_meta/head.parquet",
            pl.DataFrame(
                {"chain_id": [chain_id], "chain": [name], "head_number": [CONFIRMED_THROUGH[chain_id] + 12],
                 "confirmed_through": [CONFIRMED_THROUGH[chain_id]]}
            ),
        )
    # Raw logs and one decoded event table of chain 1: P1 emits at 100, 110, ..., 200; P2 at 105, 125.
    blocks1 = list(range(100, 201, 10))
    rows = [(b, P1) for b in blocks1] + [(105, P2), (125, P2)]
    keys = {
        "chain_id": [1] * len(rows),
        "block_number": [b for b, _ in rows],
        "block_hash": [f"0x{b:064x}" for b, _ in rows],
        "block_timestamp": [ts(b) for b, _ in rows],
        "transaction_hash": [f"0x{b:064x}" for b, _ in rows],
        "transaction_index": [0] * len(rows),
        "log_index": [i for i in range(len(rows))],
        "address": [a for _, a in rows],
    }
    key_types = {"block_timestamp": pl.Datetime("us", "UTC")}
    write(data / "mainnet/logs/00000000.parquet",
          pl.DataFrame({**keys, "topic0": ["0xd78ad95f"] * len(rows), "topic1": [None] * len(rows),
                        "topic2": [None] * len(rows), "topic3": [None] * len(rows), "data": ["0x"] * len(rows)},
                       schema_overrides={**key_types, "topic1": pl.String, "topic2": pl.String, "topic3": pl.String}))
    write(data / "mainnet/events/uniswap_v2_pair_swap/00000000.parquet",
          pl.DataFrame({**keys, "sender": [T0] * len(rows), "amount0_in": ["1"] * len(rows)},
                       schema_overrides=key_types))

    # DEX tables: one file per table per chain.
    dex1, dex10 = data / "mainnet/dex", data / "optimism/dex"
    write(dex1 / "pools.parquet", pl.DataFrame(
        {"chain_id": [1, 1], "pool": [P1, P2], "token0": [T0, T0], "token1": [T1, T1], "created_block": [90, 160]}))
    write(dex10 / "pools.parquet", pl.DataFrame(
        {"chain_id": [10], "pool": [P3], "token0": [T0], "token1": [T1], "created_block": [5]}))
    write(dex1 / "swaps.parquet", pl.concat([swaps_frame(1, P1, blocks1, tag), swaps_frame(1, P2, [105, 125], tag)])
          .sort("block_number"))
    write(dex10 / "swaps.parquet", swaps_frame(10, P3, [7, 8, 9], tag))

    def state(chain_id: int, pool: str, last_block: int, r0: int) -> dict:
        return {"chain_id": chain_id, "pool": pool, "token0": T0, "token1": T1, "reserve0": D(r0),
                "reserve1": D(2 * r0), "reserve0_h": r0 / 1e18, "reserve1_h": 2 * r0 / 1e18, "price": 0.5 + tag,
                "inverse_price": 2.0, "last_block": last_block, "last_timestamp": ts(last_block)}

    st_schema = {"reserve0": EXACT, "reserve1": EXACT, "last_timestamp": pl.Datetime("us", "UTC")}
    write(dex1 / "pool_state.parquet",
          pl.DataFrame([state(1, P1, 200, 10**21), state(1, P2, 125, 5 * 10**20)], schema_overrides=st_schema))
    write(dex10 / "pool_state.parquet", pl.DataFrame([state(10, P3, 9, 10**20)], schema_overrides=st_schema))

    # P1 candles: four 1h buckets (the last two unconfirmed) and two 1m buckets; P2 one 1h bucket.
    def bucket(pool: str, interval: str, start: dt.datetime, first: int, last: int, **extra) -> dict:
        return {"chain_id": 1, "pool": pool, "token0": T0, "token1": T1, "interval": interval, "bucket_start": start,
                **extra, "volume_token0": D(10**18), "volume_token1": D(2 * 10**18), "volume_token0_h": 1.0,
                "volume_token1_h": 2.0, "swap_count": 3, "first_block": first, "last_block": last}

    ohlc = {"open": 0.5 + tag, "high": 0.6 + tag, "low": 0.4 + tag, "close": 0.55 + tag}
    hour = dt.timedelta(hours=1)
    candles = [bucket(P1, "1h", T_START + i * hour, 100 + 40 * i, 130 + 40 * i, **ohlc) for i in range(4)]
    candles += [bucket(P1, "1m", T_START + i * dt.timedelta(minutes=1), 100 + 5 * i, 104 + 5 * i, **ohlc)
                for i in range(2)]
    candles += [bucket(P2, "1h", T_START, 105, 125, **ohlc)]
    b_schema = {"bucket_start": pl.Datetime("us", "UTC"), "volume_token0": EXACT, "volume_token1": EXACT}
    write(dex1 / "pool_candles.parquet", pl.DataFrame(candles, schema_overrides=b_schema))
    day = dt.timedelta(days=1)
    volume = [bucket(P1, "1d", T_START + i * day, 100 + 100 * i, 140 + 100 * i) for i in range(2)]
    volume += [bucket(P1, "1h", T_START, 100, 130), bucket(P2, "1d", T_START, 105, 125)]
    write(dex1 / "pool_volume.parquet", pl.DataFrame(volume, schema_overrides=b_schema))


def _status(source: str, number_col: str) -> str:
    return (
        f"SELECT x.*, CASE WHEN x.{number_col} <= h.confirmed_through THEN 'confirmed' ELSE 'unconfirmed' END "
        f"AS status FROM ({source}) x LEFT JOIN chain_heads h ON h.chain_id = x.chain_id"
    )


def build_catalog(data: Path, target: Path, extra_views: dict[str, str] | None = None) -> Path:
    """Views over the lake in a temporary DuckDB file, renamed over `target` (as the catalog build does)."""
    def glob(rel: str) -> str:
        return f"SELECT * FROM read_parquet('{data}/*/{rel}', union_by_name = true)"

    views = {
        "chain_heads": glob("_meta/head.parquet"),
        "_range_blocks": "SELECT 1 AS number",  # internal: hidden by views()
        "logs": _status(glob("logs/*.parquet"), "block_number"),
        "uniswap_v2_pair_swap": _status(glob("events/uniswap_v2_pair_swap/*.parquet"), "block_number"),
        "pools": _status(glob("dex/pools.parquet"), "created_block"),
        "swaps": _status(glob("dex/swaps.parquet"), "block_number"),
        "pool_state": _status(glob("dex/pool_state.parquet"), "last_block"),
        "pool_candles": _status(glob("dex/pool_candles.parquet"), "last_block"),
        "pool_volume": _status(glob("dex/pool_volume.parquet"), "last_block"),
        **(extra_views or {}),
    }
    return write_views(target, views)


@pytest.fixture
def lake(tmp_path):
    data = tmp_path / "data"
    build_lake(data)
    catalog = build_catalog(data, tmp_path / "data" / "indexer.duckdb")
    return SimpleNamespace(data=data, catalog=catalog, root=tmp_path)


@pytest.fixture
def ix(lake):
    with connect(lake.catalog) as indexer:
        yield indexer


# ------------------------------------------------------------------------------------------------
# Connecting


def test_connect_accepts_paths_configs_and_the_environment(lake, monkeypatch):
    for target in (lake.catalog, str(lake.catalog), SimpleNamespace(duckdb_path=lake.catalog)):
        with connect(target) as ix:
            assert "pool_state" in ix.views()
    # A real config file, given by path or through $INDEXER_CONFIG.
    if PAIR_ABI.is_file():
        cfg = lake.root / "indexer.yaml"
        cfg.write_text(
            "chain: {name: mainnet, chain_id: 1, rpc_url: 'http://127.0.0.1:1'}\n"
            f"storage: {{data_dir: ./data, duckdb_path: {lake.catalog}}}\n"
            f"contracts: [{{name: Pair, abi: '{PAIR_ABI}', addresses: ['{P1}'], events: [Swap]}}]\n"
        )
        with connect(cfg) as ix:
            assert ix.path == lake.catalog
        monkeypatch.setenv("INDEXER_CONFIG", str(cfg))
        with indexer_dagster.connect() as ix:
            assert ix.pool_state(P1).height == 1
    with pytest.raises(TypeError, match="connect"):
        connect(42)
    with pytest.raises(QueryError, match="does not exist yet"):
        connect(lake.root / "missing.duckdb")


def test_package_import_stays_cheap_and_lazy():
    code = (
        "import sys, indexer_dagster\n"
        "assert 'duckdb' not in sys.modules and 'polars' not in sys.modules, 'eager import'\n"
        "from indexer_dagster import connect, Indexer, QueryError\n"
        "assert connect.__module__ == 'indexer_dagster.api' and Indexer.__name__ == 'Indexer'\n"
        "assert 'dagster' not in sys.modules, 'dagster imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_views_and_close(lake):
    ix = connect(lake.catalog)
    assert ix.views() == sorted(
        ["chain_heads", "logs", "uniswap_v2_pair_swap", "pools", "swaps", "pool_state", "pool_candles", "pool_volume"]
    )
    assert "status" in ix.columns("swaps")
    ix.close()
    ix.close()
    with pytest.raises(QueryError, match="closed"):
        ix.views()


# ------------------------------------------------------------------------------------------------
# Helpers


def test_events_by_contract_and_block_range(ix):
    df = ix.events("uniswap_v2_pair_swap", address=P1_MIXED, from_block=110, to_block=170)
    assert df["block_number"].to_list() == [110, 120, 130, 140, 150, 160, 170]
    assert set(df["address"]) == {P1}
    assert df["status"].to_list() == ["confirmed"] * 5 + ["unconfirmed"] * 2
    confirmed = ix.events("uniswap_v2_pair_swap", address=P1, from_block=110, min_status="confirmed")
    assert confirmed["block_number"].to_list() == [110, 120, 130, 140, 150]
    assert ix.events("logs", address=P2)["block_number"].to_list() == [105, 125]
    assert ix.events("logs").height == 13
    assert ix.events("logs", to_block=105)["block_number"].to_list() == [100, 105]
    assert ix.events("logs", chain_id=10).height == 0
    assert ix.events("logs", address="0x" + "00" * 20).is_empty()


def test_events_validates_its_arguments(ix):
    with pytest.raises(QueryError, match="no view 'uniswap_v2_pair_mint'.*available views: chain_heads, logs"):
        ix.events("uniswap_v2_pair_mint")
    with pytest.raises(QueryError, match="available views"):
        ix.events("_range_blocks")  # internal views are not offered
    with pytest.raises(QueryError, match="available views"):
        ix.events('logs" WHERE 1=1; --')
    with pytest.raises(QueryError, match="no 'address' column"):
        ix.events("chain_heads", address=P1)
    with pytest.raises(QueryError, match="no 'block_number' column"):
        ix.events("pools", from_block=1)
    with pytest.raises(ValueError, match="address must be a 0x-prefixed"):
        ix.events("logs", address="0x1234")
    with pytest.raises(ValueError, match="address must be"):
        ix.events("logs", address=P1 + "' OR '1'='1")
    with pytest.raises(ValueError, match="from_block must be a non-negative int"):
        ix.events("logs", from_block="100")
    with pytest.raises(ValueError, match="to_block"):
        ix.events("logs", to_block=-1)
    with pytest.raises(ValueError, match="greater than to_block"):
        ix.events("logs", from_block=200, to_block=100)


def test_pool_state(ix):
    one = ix.pool_state(P1_MIXED)
    assert one.height == 1
    row = one.row(0, named=True)
    assert (row["pool"], row["reserve0"], row["last_block"], row["status"]) == (P1, 10**21, 200, "unconfirmed")
    assert one.schema["reserve0"] == pl.Decimal(38, 0)
    assert one.schema["last_timestamp"] == pl.Datetime("us", "UTC")
    every = ix.pool_state()
    assert every.select("chain_id", "pool").rows() == [(1, P1), (1, P2), (10, P3)]
    assert ix.pool_state(min_status="confirmed")["pool"].to_list() == [P2, P3]
    assert ix.pool_state(P1, min_status="confirmed").is_empty()
    assert ix.pool_state(chain_id=10)["pool"].to_list() == [P3]
    assert ix.pool_state("0x" + "ee" * 20).is_empty()


def test_candles(ix):
    hourly = ix.candles(P1)
    assert hourly["bucket_start"].to_list() == [T_START + dt.timedelta(hours=i) for i in range(4)]
    assert hourly["status"].to_list() == ["confirmed", "unconfirmed", "unconfirmed", "unconfirmed"]
    assert set(hourly["interval"]) == {"1h"}
    assert ix.candles(P1, "1m").height == 2
    # start inclusive, end exclusive; datetimes, dates, ISO strings and Unix seconds are all accepted.
    window = ix.candles(P1, "1h", start="2024-05-01T01:00:00Z", end=T_START + dt.timedelta(hours=3))
    assert window["bucket_start"].to_list() == [T_START + dt.timedelta(hours=h) for h in (1, 2)]
    assert ix.candles(P1, start=dt.datetime(2024, 5, 1, 2)).height == 2  # naive = UTC
    assert ix.candles(P1, end=dt.date(2024, 5, 1)).is_empty()
    assert ix.candles(P1, start=T_START.timestamp() + 3600).height == 3
    tz2 = dt.timezone(dt.timedelta(hours=2))
    assert ix.candles(P1, start=dt.datetime(2024, 5, 1, 3, tzinfo=tz2)).height == 3  # = 01:00 UTC
    assert ix.candles(P1, min_status="confirmed")["bucket_start"].to_list() == [T_START]
    with pytest.raises(ValueError, match="interval must be one of '1m', '1h' for pool_candles"):
        ix.candles(P1, "1d")
    with pytest.raises(ValueError, match="pool must be"):
        ix.candles(None)
    with pytest.raises(ValueError, match="start is not an ISO-8601"):
        ix.candles(P1, start="yesterday")
    with pytest.raises(ValueError, match="is after end"):
        ix.candles(P1, start="2024-06-01", end="2024-05-01")


def test_volume(ix):
    daily = ix.volume()
    assert daily.select("pool", "bucket_start").rows() == [
        (P1, T_START), (P1, T_START + dt.timedelta(days=1)), (P2, T_START)
    ]
    assert daily.schema["volume_token0"] == pl.Decimal(38, 0)
    assert ix.volume(P1, "1h").height == 1
    assert ix.volume(P1, min_status="confirmed")["bucket_start"].to_list() == [T_START]
    assert ix.volume(P2, start="2024-05-02").is_empty()
    with pytest.raises(ValueError, match="'1h', '1d'"):
        ix.volume(P1, "1m")


def test_swaps(ix):
    s = ix.swaps(P1, from_block=150, to_block=180)
    assert s["block_number"].to_list() == [150, 160, 170, 180]
    assert s.schema["amount_in"] == pl.Decimal(38, 0)
    assert ix.swaps().height == 16
    assert ix.swaps(chain_id=1).select("block_number").to_series().is_sorted()
    assert ix.swaps(min_status="confirmed").height == 6 + 2 + 3
    assert ix.swaps(P3)["chain_id"].to_list() == [10, 10, 10]


@pytest.mark.parametrize(
    "call",
    [
        lambda ix, s: ix.events("logs", min_status=s),
        lambda ix, s: ix.pool_state(min_status=s),
        lambda ix, s: ix.candles(P1, min_status=s),
        lambda ix, s: ix.volume(min_status=s),
        lambda ix, s: ix.swaps(min_status=s),
    ],
)
def test_min_status_is_validated(ix, call):
    for bad in ("final", "Confirmed", "", None):
        with pytest.raises(ValueError, match="min_status must be 'unconfirmed' .* or 'confirmed'"):
            call(ix, bad)
    assert call(ix, "confirmed").height < call(ix, "unconfirmed").height


# ------------------------------------------------------------------------------------------------
# SQL


def test_sql_reads_with_parameters(ix):
    df = ix.sql("SELECT pool, count(*) AS n FROM swaps WHERE chain_id = ? GROUP BY pool ORDER BY pool", [1])
    assert df.rows() == [(P1, 11), (P2, 2)]
    assert ix.sql("SELECT count(*) AS n FROM swaps WHERE pool = $pool", {"pool": P3})["n"][0] == 3
    # A value is a value: quotes in it cannot end the string.
    assert ix.sql("SELECT count(*) AS n FROM swaps WHERE pool = ?", [f"{P1}' OR '1'='1"])["n"][0] == 0
    assert ix.sql("WITH t AS (SELECT 1 AS x) SELECT x FROM t")["x"].to_list() == [1]
    assert "column_name" in ix.sql("DESCRIBE pool_state").columns
    assert ix.sql("SHOW TABLES").height >= 8
    assert ix.sql("EXPLAIN SELECT * FROM pools").height >= 1
    assert ix.sql("FROM pools SELECT pool ORDER BY pool")["pool"].to_list() == [P1, P2, P3]


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE t AS SELECT 1",
        "CREATE TEMP TABLE t AS SELECT 1",
        "CREATE VIEW v AS SELECT 1",
        "DROP VIEW swaps",
        "INSERT INTO pools SELECT * FROM pools",
        "COPY (SELECT 1) TO '{out}'",
        "EXPORT DATABASE '{out}'",
        "ATTACH '{out}' AS other",
        "SET threads = 1",
        "PRAGMA threads = 1",
        "INSTALL httpfs",
        "CHECKPOINT",
        "EXPLAIN ANALYZE COPY (SELECT 1) TO '{out}'",
        "SELECT 1; COPY (SELECT 1) TO '{out}'",
    ],
)
def test_sql_refuses_writes(ix, lake, statement):
    out = lake.root / "written"
    with pytest.raises(QueryError, match="read-only|exactly one statement"):
        ix.sql(statement.format(out=out))
    assert not out.exists()
    assert ix.views()  # the connection is still usable


def test_sql_errors_are_query_errors(ix):
    with pytest.raises(QueryError, match="(?i)syntax"):
        ix.sql("SELEC 1")
    with pytest.raises(QueryError, match="nope"):
        ix.sql("SELECT nope FROM swaps")
    with pytest.raises(QueryError, match="exactly one statement"):
        ix.sql("")
    with pytest.raises(TypeError):
        ix.sql(None)


# ------------------------------------------------------------------------------------------------
# Replaced files


def test_catalog_replaced_by_rename_is_picked_up(lake):
    with connect(lake.catalog) as ix:
        assert ix.pool_state(P1)["price"][0] == 0.5
        stale = duckdb.connect(str(lake.catalog), read_only=True)  # another holder of the old file
        try:
            data2 = lake.root / "data2"
            build_lake(data2, tag=1)
            build_catalog(data2, lake.catalog, {"extra": "SELECT 42 AS answer"})
            assert ix.pool_state(P1)["price"][0] == 1.5  # same Indexer, new catalog
            assert "extra" in ix.views()
            assert ix.sql("SELECT answer FROM extra")["answer"][0] == 42
            # A second Indexer opened while the old file is still held sees the new file too
            # (duckdb.connect(path) would hand back the cached, old database here).
            with connect(lake.catalog) as other:
                assert other.pool_state(P1)["price"][0] == 1.5
        finally:
            stale.close()


def test_catalog_rebuilt_repeatedly_while_reading(lake):
    """A thread rebuilds the catalog 20 times while another queries: no query ever fails."""
    with connect(lake.catalog) as ix:
        done = threading.Event()
        errors: list[BaseException] = []

        def rebuild():
            try:
                for i in range(20):
                    build_catalog(lake.data, lake.catalog, {f"extra_{i}": "SELECT 1 AS x"})
            except BaseException as e:  # noqa: BLE001  # pragma: no cover - reported below
                errors.append(e)
            finally:
                done.set()

        t = threading.Thread(target=rebuild)
        t.start()
        reads = 0
        while not done.is_set() or reads < 20:
            assert ix.pool_state(P1).height == 1
            reads += 1
        t.join()
        assert not errors
        assert "extra_19" in ix.views()


def test_parquet_replaced_atomically_while_reading(lake):
    """A writer replaces swaps.parquet 50 times (rename) while a reader queries 200 times: every
    result is one whole version of the file - never an error, never rows of two versions."""
    path = lake.data / "mainnet/dex/swaps.parquet"
    blocks = list(range(1, 4001))

    def version(v: int) -> pl.DataFrame:
        return swaps_frame(1, P1, blocks).with_columns(pl.lit(v, pl.Int64).alias("transaction_index"))

    # Several row groups per file, so that one scan does several reads of it.
    write(path, version(0), row_group_size=500)
    reads = 0
    errors: list[BaseException] = []

    def writer():
        try:
            for v in range(1, 51):
                while reads < 4 * v - 3 and not errors:  # interleave with the reader
                    threading.Event().wait(0.0005)
                write(path, version(v), row_group_size=500)
        except BaseException as e:  # noqa: BLE001  # pragma: no cover - reported below
            errors.append(e)

    seen = []
    with connect(lake.catalog) as ix:
        t = threading.Thread(target=writer)
        t.start()
        try:
            for _ in range(200):
                df = ix.sql("SELECT transaction_index AS v, count(*) AS n, sum(block_number) AS s "
                            "FROM swaps WHERE chain_id = 1 GROUP BY ALL")
                assert df.height == 1, f"rows of several versions in one result: {df.rows()}"
                v, n, s = df.row(0)
                assert (n, s) == (len(blocks), sum(blocks))
                seen.append(v)
                reads += 1
        except BaseException as e:
            errors.append(e)
            raise
        finally:
            t.join()
    assert not errors
    assert seen == sorted(seen)  # versions never go backwards
    assert len(set(seen)) >= 10  # the writer really ran during the reads
