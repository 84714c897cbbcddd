"""The lake's atomic writes: a killed writer never leaves a visible partial file."""

import os
import signal
import subprocess
import sys

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest

from indexer_dagster.persist.lake import Lake

WRITER = """
import sys, time, polars as pl
from indexer_dagster.persist.lake import Lake
lake = Lake(sys.argv[1], "devnet")
with lake.writer("logs", "000000000000-000000000099", {"x": pl.Int64}) as w:
    w.write(pl.DataFrame({"x": list(range(1000))}))
    print("writing", flush=True)
    time.sleep(60)
"""


def test_killed_writer_leaves_old_file_and_no_partial(tmp_path):
    lake = Lake(tmp_path, "devnet")
    key = "000000000000-000000000099"
    lake.write("logs", key, pl.DataFrame({"x": [1, 2, 3]}))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The old content is intact and the glob readers use sees only it.
    assert lake.read("logs", key)["x"].to_list() == [1, 2, 3]
    assert duckdb.connect().execute(f"select count(*) from read_parquet('{lake.glob('logs')}')").fetchone()[0] == 3
    temps = list(lake.dir("logs").glob(".*.tmp"))
    assert len(temps) == 1
    # The next write of the same range replaces the file and sweeps the dead writer's temp file.
    lake.write("logs", key, pl.DataFrame({"x": [4]}))
    assert lake.read("logs", key)["x"].to_list() == [4]
    assert list(lake.dir("logs").glob(".*.tmp")) == []


def test_failed_write_keeps_previous_file(tmp_path):
    lake = Lake(tmp_path, "devnet")
    key = "000000000000-000000000099"
    lake.write("logs", key, pl.DataFrame({"x": [1]}))
    try:
        with lake.writer("logs", key, {"x": pl.Int64}) as w:
            w.write(pl.DataFrame({"x": [9, 9]}))
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert lake.read("logs", key)["x"].to_list() == [1]
    assert list(lake.dir("logs").glob(".*")) == []


def test_empty_range_still_writes_a_typed_file(tmp_path):
    lake = Lake(tmp_path, "devnet")
    with lake.writer("events/t", "000000000000-000000000099", {"a": pl.String, "b": pl.UInt64}):
        pass
    df = lake.read("events/t", "000000000000-000000000099")
    assert df.height == 0 and df.schema == pl.Schema({"a": pl.String, "b": pl.UInt64})


def test_catalog_build_retries_when_a_matched_file_vanishes(tmp_path, monkeypatch):
    """Binding a view reads the files its glob matched; one compacted away meanwhile means build again."""
    from types import SimpleNamespace

    import duckdb

    from indexer_dagster.persist import catalog

    good = tmp_path / "x.parquet"
    pl.DataFrame({"a": [1, 2]}).write_parquet(good)
    answers = [{"v": f"SELECT * FROM read_parquet('{tmp_path / 'gone.parquet'}')"},
               {"v": f"SELECT * FROM read_parquet('{good}')"}]
    monkeypatch.setattr(catalog, "view_statements", lambda cfg: answers.pop(0))
    target = catalog.build_catalog(SimpleNamespace(duckdb_path=tmp_path / "c.duckdb", lake_root=tmp_path))
    assert answers == []
    con = duckdb.connect(str(target), read_only=True)
    assert con.execute("select sum(a) from v").fetchone()[0] == 3
    con.close()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left

    # A file that stays missing is still an error after the bounded attempts.
    monkeypatch.setattr(catalog, "view_statements",
                        lambda cfg: {"v": f"SELECT * FROM read_parquet('{tmp_path / 'gone.parquet'}')"})
    with pytest.raises(duckdb.IOException, match="No files found"):
        catalog.build_catalog(SimpleNamespace(duckdb_path=tmp_path / "d.duckdb", lake_root=tmp_path))


def test_catalog_is_rebuilt_only_when_its_views_change(tmp_path, monkeypatch):
    """Views read their globs at query time: the same statements again leave the file as it is (a backfill
    builds the catalog several times; on object storage each build costs hundreds of requests)."""
    from types import SimpleNamespace

    import duckdb

    from indexer_dagster.persist import catalog

    data = tmp_path / "x.parquet"
    pl.DataFrame({"a": [1, 2]}).write_parquet(data)
    views = {"v": f"SELECT * FROM read_parquet('{data}')"}
    monkeypatch.setattr(catalog, "view_statements", lambda cfg: dict(views))
    cfg = SimpleNamespace(duckdb_path=tmp_path / "c.duckdb", lake_root=tmp_path)
    first = catalog.build_catalog(cfg).stat().st_ino
    assert catalog.build_catalog(cfg).stat().st_ino == first  # unchanged: not rewritten
    views["w"] = "SELECT 42 AS answer"
    assert catalog.build_catalog(cfg).stat().st_ino != first  # a new view: rebuilt
    con = duckdb.connect(str(cfg.duckdb_path), read_only=True)
    assert con.execute("select answer from w").fetchone()[0] == 42
    con.close()


def test_a_transaction_that_deletes_and_writes_the_same_file_leaves_the_new_file(tmp_path):
    """A reorg's restore deletes the live segments above the fork and writes the new fork's, which can
    have the same key (`20-20`): the write must win. Deletes were published after the files, so the
    new segment's event file was deleted with the old one (a swap missing from the views, found by the
    DEX Hypothesis test after a depth-1 reorg whose old block had no swap)."""
    lake = Lake(tmp_path, "c")
    lake.write("live/events/t", "000000000020-000000000020", pl.DataFrame({"x": []}, schema={"x": pl.Int64}))
    with lake.transaction() as tx:
        tx.delete(lake.path("live/events/t", "000000000020-000000000020"))
        tx.writer("live/events/t", "000000000020-000000000020", {"x": pl.Int64}).write(pl.DataFrame({"x": [1]}))
    assert lake.read("live/events/t", "000000000020-000000000020")["x"].to_list() == [1]


@pytest.mark.parametrize("dataset, skips_by_string", [
    ("logs", False), ("events/erc20_transfer", False), ("live/logs", False), ("orphaned/blocks", False),
    ("dex/pool_state", True),
])
def test_files_in_block_order_keep_statistics_a_reader_can_skip_by(tmp_path, dataset, skips_by_string):
    """Chain files are in block order: DuckDB skips their row groups by block (kept), never by a hash or an
    address spread over the whole range (not written: a third of a logs file's write). A DEX table sorted
    by pool keeps its string statistics, so a query of one pool skips the others' row groups."""
    lake = Lake(tmp_path, "devnet")
    df = pl.DataFrame({"block_number": [7, 9], "address": ["0xbb", "0xaa"]})
    lake.write(dataset, "000000000000-000000000099", df)
    path = lake.path(dataset, "000000000000-000000000099")
    stats = pq.read_metadata(path).row_group(0)
    assert (stats.column(0).statistics.min, stats.column(0).statistics.max) == (7, 9)
    assert (stats.column(1).statistics is not None and stats.column(1).statistics.has_min_max) is skips_by_string
    assert duckdb.connect().execute(f"select count(*) from read_parquet('{path}') where address = '0xaa'"
                                    ).fetchone()[0] == 1
