"""The Parquet lake on object storage (`storage.lake_url: s3://...`), against a real S3-compatible
server run here (moto's server: the S3 HTTP API, spoken to by s3fs/botocore exactly as to AWS).

The guarantee is the local lake's: a reader sees a file whole or not at all, a killed or failed
writer leaves nothing in the bucket, and the views, after a backfill through Dagster and after a
live reorg, equal the node row for row.
"""

import os
import signal
import socket
import subprocess
import sys
import threading

import polars as pl
import pytest
import yaml

from indexer_dagster.config import ConfigError, load_config
from indexer_dagster.persist.files import read_parquet
from indexer_dagster.persist.lake import Lake
from indexer_dagster.query import query

BUCKET = "indexer-lake"
KEY = "000000000000-000000000099"


@pytest.fixture(scope="module")
def s3_endpoint():
    """A local S3 server (moto) for this module: its URL."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
    """A fresh bucket; credentials and endpoint in the environment (inherited by Dagster's run workers),
    as they would be for AWS. Returns an s3fs filesystem to look into the bucket."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    fs = s3fs.S3FileSystem(use_listings_cache=False)
    if fs.exists(BUCKET):
        fs.rm(BUCKET, recursive=True)
    fs.mkdir(BUCKET)
    return fs


def s3_lake(tmp_path, prefix="lake") -> Lake:
    from upath import UPath

    return Lake(UPath(f"s3://{BUCKET}/{prefix}", use_listings_cache=False), "devnet", local_dir=tmp_path / "local")


def objects(fs, prefix="") -> list[str]:
    return sorted(p.removeprefix(f"{BUCKET}/") for p in fs.find(f"{BUCKET}/{prefix}"))


def test_a_remote_write_appears_whole_and_a_failed_one_leaves_nothing(s3, tmp_path):
    lake = s3_lake(tmp_path)
    lake.write("logs", KEY, pl.DataFrame({"x": [1, 2, 3]}))
    assert objects(s3) == [f"lake/devnet/logs/{KEY}.parquet"]
    assert lake.read("logs", KEY)["x"].to_list() == [1, 2, 3]
    assert [p.name for p in lake.files("logs")] == [f"{KEY}.parquet"]

    # An error while writing: the old object stays, nothing new appears, the staging file is gone.
    with pytest.raises(RuntimeError, match="boom"):
        with lake.transaction() as tx:
            tx.writer("logs", KEY, {"x": pl.Int64}).write(pl.DataFrame({"x": [9, 9]}))
            tx.writer("blocks", KEY, {"x": pl.Int64}).write(pl.DataFrame({"x": [9]}))
            raise RuntimeError("boom")
    assert objects(s3) == [f"lake/devnet/logs/{KEY}.parquet"]
    assert lake.read("logs", KEY)["x"].to_list() == [1, 2, 3]
    assert list(lake.staging.iterdir()) == []

    # A guard that refuses at publish time (a reorg happened meanwhile): nothing becomes visible.
    def refuse():
        raise RuntimeError("reorg meanwhile")

    with pytest.raises(RuntimeError, match="reorg meanwhile"):
        with lake.transaction(guard=refuse) as tx:
            tx.writer("logs", KEY, {"x": pl.Int64}).write(pl.DataFrame({"x": [7]}))
    assert lake.read("logs", KEY)["x"].to_list() == [1, 2, 3]

    # Replace one file and delete another in one transaction.
    lake.write("logs", "000000000100-000000000199", pl.DataFrame({"x": [5]}))
    with lake.transaction() as tx:
        tx.writer("logs", KEY, {"x": pl.Int64}).write(pl.DataFrame({"x": [4]}))
        tx.delete(lake.path("logs", "000000000100-000000000199"))
    assert objects(s3) == [f"lake/devnet/logs/{KEY}.parquet"]
    assert lake.read("logs", KEY)["x"].to_list() == [4]
    assert list(lake.staging.iterdir()) == []


def test_readers_never_see_a_partial_object_while_it_is_replaced(s3, tmp_path):
    lake = s3_lake(tmp_path)
    versions = [pl.DataFrame({"x": list(range(v, v + 20_000))}) for v in range(0, 200_000, 20_000)]
    lake.write("logs", KEY, versions[0])
    seen, errors, stop = set(), [], threading.Event()

    def read_loop():
        while not stop.is_set():
            try:
                seen.add(read_parquet(lake.path("logs", KEY))["x"][0])
            except BaseException as e:  # noqa: BLE001 - a partial or mixed object would fail to parse
                errors.append(e)
                return

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        for v in versions[1:]:
            lake.write("logs", KEY, v)
    finally:
        stop.set()
        reader.join()
    assert errors == []
    assert seen <= {v["x"][0] for v in versions} and len(seen) >= 2
    assert lake.read("logs", KEY).equals(versions[-1])


def test_windows_of_a_remote_file_read_a_local_copy_of_one_version(s3, tmp_path, monkeypatch):
    """A check or a rollback reads a remote range file window by window from a downloaded copy (streamed to
    disk, not held in memory). A large download may be several ranged requests: a file replaced meanwhile
    is downloaded again, so the windows are of one version, the new one."""
    from indexer_dagster.persist import files
    from indexer_dagster.persist.windows import block_files, read_window, windows

    lake = s3_lake(tmp_path)
    old = pl.DataFrame({"block_number": list(range(0, 100)), "log_index": [0] * 100})
    new = old.with_columns(pl.lit(1, pl.Int64).alias("log_index"))
    lake.write("logs", KEY, old)
    path = lake.path("logs", KEY)
    with block_files([path], "block_number") as bf:
        local = bf[0].source
        assert local.is_file() and not str(local).startswith(f"{BUCKET}")
        assert pl.concat([read_window(bf, ["block_number", "log_index"], *w) for w in windows(bf, 10)]).equals(old)
    assert not local.exists()  # the copy goes with the block

    real_get, calls = path.fs.get_file, []

    def replaced_while_downloading(rpath, lpath, **kw):
        real_get(rpath, lpath, **kw)  # the old version's bytes...
        calls.append(rpath)
        if len(calls) == 1:  # ...then a writer replaces the object before the download is judged
            lake.write("logs", KEY, new)

    monkeypatch.setattr(path.fs, "get_file", replaced_while_downloading)
    with block_files([path], "block_number") as bf:
        assert read_window(bf, ["block_number", "log_index"], 0, 99).equals(new)
    assert len(calls) == 2
    with files.open_parquet(path) as pf:  # batch readers (a re-decode, a merge) read a local copy too
        assert pl.DataFrame(pf.read_row_group(0)).equals(new)
    assert len(calls) == 3

    def always_replaced(rpath, lpath, **kw):
        real_get(rpath, lpath, **kw)
        lake.write("logs", KEY, new.with_columns(pl.lit(len(calls) + 2, pl.Int64).alias("log_index")))
        calls.append(rpath)

    monkeypatch.setattr(path.fs, "get_file", always_replaced)
    with pytest.raises(OSError, match=f"replaced during each of {files.DOWNLOAD_ATTEMPTS} downloads"):
        with block_files([path], "block_number"):
            pass


def test_a_query_right_after_a_file_is_added_replaced_or_removed_reads_the_new_files(s3, tmp_path):
    """Each query lists the lake afresh (a listing cached across queries hid a live segment written a
    moment before: rows missing, no error); a query that meets a file changed while it ran (a republished
    range, a compacted live segment) is run again on a fresh listing, not failed."""
    import duckdb

    import indexer_dagster
    from indexer_dagster.persist.catalog import INTERNAL_SCHEMA, LAKE_VIEW, register_lake_filesystem

    lake = s3_lake(tmp_path)
    lake.write("logs", "a", pl.DataFrame({"x": list(range(10))}))
    lake.write("logs", "b", pl.DataFrame({"x": list(range(10))}))
    catalog = tmp_path / "catalog.duckdb"
    con = duckdb.connect(str(catalog))
    url = f"s3://{BUCKET}/lake"
    register_lake_filesystem(con, url, {})
    con.execute(f"CREATE SCHEMA {INTERNAL_SCHEMA}")
    con.execute(f"CREATE VIEW {LAKE_VIEW} AS SELECT '{url}' AS url, '{{}}' AS options")
    con.execute(f"CREATE VIEW logs AS SELECT * FROM read_parquet(['{lake.glob('logs')}'])")
    con.close()
    count = "select count(*) n from logs"
    with indexer_dagster.connect(catalog) as ix:
        assert ix.sql(count)["n"][0] == query(catalog, count)["n"][0] == 20
        lake.write("logs", "a", pl.DataFrame({"x": list(range(1000))}))  # replaced: another size and ETag
        assert ix.sql(count)["n"][0] == query(catalog, count)["n"][0] == 1010
        with lake.transaction() as tx:
            tx.delete(lake.path("logs", "b"))
        assert ix.sql(count)["n"][0] == query(catalog, count)["n"][0] == 1000
        # A file added (a new live segment): the next query sees it, however soon it comes.
        lake.write("logs", "c", pl.DataFrame({"x": list(range(5))}))
        assert ix.sql(count)["n"][0] == query(catalog, count)["n"][0] == 1005


WRITER = """
import sys, time, polars as pl
from pathlib import Path
from upath import UPath
from indexer_dagster.persist.lake import Lake
lake = Lake(UPath(sys.argv[1], use_listings_cache=False), "devnet", local_dir=Path(sys.argv[2]))
with lake.writer("logs", "000000000000-000000000099", {"x": pl.Int64}) as w:
    w.write(pl.DataFrame({"x": list(range(1000))}))
    print("writing", flush=True)
    time.sleep(60)
"""


def test_a_killed_writer_leaves_nothing_in_the_bucket(s3, tmp_path):
    lake = s3_lake(tmp_path)
    lake.write("logs", KEY, pl.DataFrame({"x": [1, 2, 3]}))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, f"s3://{BUCKET}/lake", str(tmp_path / "local")],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert objects(s3) == [f"lake/devnet/logs/{KEY}.parquet"]
    assert lake.read("logs", KEY)["x"].to_list() == [1, 2, 3]
    assert len(list(lake.staging.glob(".*.tmp"))) == 1  # the dead writer's local staging file
    lake.write("logs", KEY, pl.DataFrame({"x": [4]}))  # the next write of the range sweeps it
    assert list(lake.staging.glob(".*.tmp")) == []
    assert lake.read("logs", KEY)["x"].to_list() == [4]


def with_lake_url(path, url, **options):
    raw = yaml.safe_load(path.read_text())
    raw["storage"]["lake_url"] = url
    raw["storage"]["lake_options"] = options
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_lake_url_errors_name_the_fix(make_config):
    path = make_config()
    with pytest.raises(ConfigError, match="unknown storage protocol 'nosuch'"):
        load_config(with_lake_url(path, "nosuch://bucket/x"))
    with pytest.raises(ConfigError, match="name a bucket"):
        load_config(with_lake_url(path, "s3://"))
    with pytest.raises(ConfigError, match="credentials do not belong in lake_options.*AWS_ACCESS_KEY_ID"):
        load_config(with_lake_url(path, "s3://b/x", key="AKIA...", secret="..."))
    # A local lake_url is a directory like data_dir.
    cfg = load_config(with_lake_url(path, "file://" + str(path.parent / "elsewhere")))
    assert cfg.lake_root == path.parent / "elsewhere"


def test_a_missing_bucket_is_refused_before_anything_is_written(s3, make_config, tmp_path):
    from tests.conftest import cli_env

    path = with_lake_url(make_config(), "s3://no-such-bucket/lake")
    home = tmp_path / "dagster_home"
    home.mkdir()
    for command in (["check"], ["backfill"]):
        proc = subprocess.run([sys.executable, "-m", "indexer_dagster.cli", *command], env=cli_env(path, home),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1
        assert "the bucket 'no-such-bucket' does not exist; create it or fix lake_url" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (path.parent / "data").exists() or not list((path.parent / "data").rglob("*.parquet"))


@pytest.mark.slow
def test_backfill_live_sync_and_reorg_on_object_storage(s3, tmp_path, monkeypatch):
    """`indexer backfill` (Dagster, multiprocess run workers) writes the lake to the bucket; the live
    follower extends it and repairs a reorg there; the views equal the node each time."""
    from indexer_dagster.devnet import Anvil, build_devnet, write_config
    from indexer_dagster.devnet.uniswap import generate_traffic
    from indexer_dagster.devnet.uniswap import reorg as anvil_reorg
    from indexer_dagster.dex.build import build_dex
    from indexer_dagster.state import Phase, open_state
    from indexer_dagster.sync.repair import repair
    from tests.conftest import cli_env
    from tests.dex.test_build import check_against_chain
    from tests.sync.test_reorg import assert_views_equal_node, follow_until_synced

    node = Anvil(chain_id=31337).start()
    try:
        dep = build_devnet(node, blocks=25, txs_per_block=8, seed=3)
        path = write_config(tmp_path / "indexer.yaml", node.url, 31337, dep, "data",
                            blocks_per_partition=10, confirmations=4)
        with_lake_url(path, f"s3://{BUCKET}/lake/")
        home = tmp_path / "dagster_home"
        home.mkdir()
        env = cli_env(path, home)
        proc = subprocess.run([sys.executable, "-m", "indexer_dagster.cli", "backfill", "--workers", "2"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        cfg = load_config(path)
        assert_views_equal_node(cfg, node)
        # The data is in the bucket, none on the local disk (which keeps the catalog, state and locks).
        keys = objects(s3, "lake/devnet")
        assert any(k.startswith("lake/devnet/logs/") for k in keys)
        assert any(k.startswith("lake/devnet/events/uniswap_v2_pair_swap/") for k in keys)
        assert not [k for k in keys if k.endswith(".tmp")]
        assert not list(cfg.data_dir.rglob("*.parquet"))

        # Live sync, then a reorg of depth 3 repaired in the bucket.
        store = open_state(cfg.state_url)
        follow_until_synced(cfg, store)
        generate_traffic(node.url, dep, blocks=5, txs_per_block=6, seed=11)
        follow_until_synced(cfg, store)
        assert_views_equal_node(cfg, node)
        before = query(cfg.duckdb_path, f"select * from logs where block_number > {node.block_number() - 3}")
        anvil_reorg(node.url, dep, depth=3, txs_per_block=5, seed=99)
        assert follow_until_synced(cfg, store)[-1].action == "reorg"
        r = store.active_reorg(cfg.chain.name)
        assert repair(cfg, store, r.id).reorg.phase is Phase.DONE
        assert_views_equal_node(cfg, node)
        orphaned = query(cfg.duckdb_path, "select * from orphaned_logs order by block_number, log_index")
        assert orphaned.height == before.height > 0
        assert any(k.startswith("lake/devnet/orphaned/logs/") for k in objects(s3, "lake/devnet"))
        assert not [k for k in objects(s3) if k.endswith(".tmp")]
        # The DEX tables, rebuilt on the new fork in the bucket, equal the pools' getReserves().
        build_dex(cfg)
        check_against_chain(cfg, node)
        assert any(k.startswith("lake/devnet/dex/") for k in objects(s3, "lake/devnet"))

        # The query API and `indexer status` read the bucket through the catalog alone.
        import indexer_dagster

        with indexer_dagster.connect(path) as ix:
            assert ix.sql("select count(*) n from logs")["n"][0] == query(
                cfg.duckdb_path, "select count(*) n from logs")["n"][0]
        proc = subprocess.run([sys.executable, "-m", "indexer_dagster.cli", "status", "--json"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        node.stop()
