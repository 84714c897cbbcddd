"""Range checks on real data (an `indexer backfill` of the anvil devnet) and on tampered copies of it;
a failing check is visible in Dagster, keeps the range's rows unconfirmed, and a re-sync clears it."""

import shutil
import subprocess
import sys

import dagster as dg
import polars as pl
import pytest

from indexer_dagster.assets.ranges import raw_keys
from indexer_dagster.block_range import BlockRange
from indexer_dagster.config import load_config
from indexer_dagster.definitions import build_definitions
from indexer_dagster.devnet import write_config
from indexer_dagster.persist.catalog import build_catalog
from indexer_dagster.persist.lake import Lake
from indexer_dagster.persist.meta import failed_ranges
from indexer_dagster.persist.windows import windows as range_checks_windows
from indexer_dagster.query import query
from indexer_dagster.sync import range_checks
from indexer_dagster.sync.range_checks import CHECKS, verify_range
from indexer_dagster.sync.supervise import Facts, plan
from tests.conftest import cli_env

pytestmark = pytest.mark.slow

WIDTH = 25


@pytest.fixture(scope="module")
def indexed(devnet, tmp_path_factory):
    """One real backfill (through the CLI and Dagster) of blocks 0..49 of the devnet."""
    node, dep = devnet
    root = tmp_path_factory.mktemp("verify")
    path = write_config(root / "indexer.yaml", node.url, 31337, dep, "data", blocks_per_partition=WIDTH,
                        confirmations=5)
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    proc = subprocess.run([sys.executable, "-m", "indexer_dagster.cli", "backfill", "--config", str(path),
                           "--to", str(2 * WIDTH - 1)], env=cli_env(path, home), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return path


def copy_of(indexed, tmp_path):
    """A private copy of the indexed lake, to tamper with."""
    shutil.copytree(indexed.parent / "data", tmp_path / "data")
    cfg_path = tmp_path / "indexer.yaml"
    shutil.copy(indexed, cfg_path)
    if (indexed.parent / "abis").is_dir():
        shutil.copytree(indexed.parent / "abis", tmp_path / "abis")
    cfg = load_config(cfg_path)
    return cfg, Lake(cfg.data_dir, cfg.chain.name)


def failed(results) -> set[str]:
    return {c.name for c in results if not c.passed}


def rewrite(lake: Lake, dataset: str, key: str, fn) -> None:
    df = lake.read(dataset, key)
    lake.write(dataset, key, fn(df))


def block_with_logs(lake: Lake, key: str, min_logs: int = 2) -> int:
    counts = lake.read("logs", key).group_by("block_number").len().filter(pl.col("len") >= min_logs)
    return int(counts.sort("block_number")["block_number"][0])


R0, R1 = BlockRange(0, WIDTH - 1), BlockRange(WIDTH, 2 * WIDTH - 1)


@pytest.fixture(params=["one window", "windows of 2 rows"])
def windowed(request, monkeypatch):
    """The checks read a range window by window (a partition of any size holds one window); a range of the
    devnet is one window, unless windows are made tiny: then each holds a block or two, and every check
    must still see across them (a duplicate, a link between blocks, a log and its header)."""
    cut = []
    monkeypatch.setattr(range_checks, "windows", lambda *a, **k: cut.append(range_checks_windows(*a, **k)) or cut[-1])
    if request.param != "one window":
        monkeypatch.setattr(range_checks, "WINDOW_ROWS", 2)
    yield
    most = max(len(w) for w in cut)
    assert most == 1 if request.param == "one window" else most > WIDTH // 2, cut


def test_a_real_backfill_passes_every_check(indexed, windowed):
    cfg = load_config(indexed)
    lake = Lake(cfg.data_dir, cfg.chain.name)
    for r in (R0, R1):
        results = verify_range(cfg, r, to_block=r.end, samples=4, seed=1)
        assert [c.name for c in results] == list(CHECKS)
        assert failed(results) == set(), [c.description for c in results]
        by = {c.name: c for c in results}
        assert by["contiguous_blocks"].metadata["rows"] == WIDTH
        # The sample compared real blocks with logs against the node.
        assert len(by["row_counts_match_node"].metadata["sampled_blocks"]) == 4
        assert any(int(s.split(",")[0].split("stored ")[1]) > 0 for s in by["row_counts_match_node"].metadata["sampled"])
    # The second range's chain was checked across the first range's last block.
    assert verify_range(cfg, R1, to_block=R1.end)[1].metadata["across_ok"] is True
    # The backfill ran the checks as Dagster asset checks and recorded no failure.
    assert failed_ranges(lake) == {}


def test_a_deleted_block_fails_contiguity(indexed, tmp_path, windowed):
    cfg, lake = copy_of(indexed, tmp_path)
    gone = block_with_logs(lake, R0.key)  # every devnet block has logs
    rewrite(lake, "blocks", R0.key, lambda df: df.filter(pl.col("number") != gone))
    res = verify_range(cfg, R0, to_block=R0.end, sample=[R0.start])
    # The header is gone, so its logs have no header to match either.
    assert failed(res) == {"contiguous_blocks", "log_block_hashes"}
    c = res[0]
    assert c.metadata["missing_examples"] == [gone] and f"1 block(s) missing (e.g. [{gone}])" in c.description
    assert res[3].metadata["without_header_blocks"] == [gone]
    # The last block of a complete range missing is caught too (the run says the range reached its end).
    rewrite(lake, "blocks", R1.key, lambda df: df.filter(pl.col("number") != R1.end))
    assert "contiguous_blocks" in failed(verify_range(cfg, R1, to_block=R1.end, seed=1))


def test_a_duplicated_log_fails_uniqueness_and_the_node_count(indexed, tmp_path, windowed):
    cfg, lake = copy_of(indexed, tmp_path)
    n = block_with_logs(lake, R0.key)
    rewrite(lake, "logs", R0.key, lambda df: pl.concat([df, df.filter(pl.col("block_number") == n).head(1)])
            .sort("block_number", "log_index"))
    res = verify_range(cfg, R0, to_block=R0.end, sample=[n])
    assert failed(res) == {"unique_logs", "row_counts_match_node"}
    by = {c.name: c for c in res}
    assert by["unique_logs"].metadata["duplicated_keys"] == 1 and f"{n}:" in by["unique_logs"].description
    # A sample elsewhere does not see it; uniqueness still does.
    other = block_with_logs(lake, R1.key)
    assert failed(verify_range(cfg, R0, to_block=R0.end, sample=[R0.start])) == {"unique_logs"}
    assert other  # R1 untouched
    assert failed(verify_range(cfg, R1, to_block=R1.end, sample=[other])) == set()


def test_a_lost_log_fails_the_node_count(indexed, tmp_path, windowed):
    cfg, lake = copy_of(indexed, tmp_path)
    n = block_with_logs(lake, R1.key)
    rewrite(lake, "logs", R1.key, lambda df: df.filter(
        ~((pl.col("block_number") == n) & (pl.col("log_index") == df.filter(pl.col("block_number") == n)["log_index"].min()))))
    res = verify_range(cfg, R1, to_block=R1.end, sample=[n])
    assert failed(res) == {"row_counts_match_node"}
    assert f"block {n}:" in res[-1].description and "the node has" in res[-1].description


def test_an_altered_log_hash_fails_the_hash_check(indexed, tmp_path, windowed):
    cfg, lake = copy_of(indexed, tmp_path)
    n = block_with_logs(lake, R0.key)
    bad = "0x" + "ab" * 32
    rewrite(lake, "logs", R0.key, lambda df: df.with_columns(
        pl.when(pl.col("block_number") == n).then(pl.lit(bad)).otherwise(pl.col("block_hash")).alias("block_hash")))
    res = verify_range(cfg, R0, to_block=R0.end, sample=[R0.start])
    assert failed(res) == {"log_block_hashes"}
    assert res[3].metadata["wrong_hash_blocks"] == [n]


def test_a_broken_parent_hash_fails_the_chain_inside_and_across_ranges(indexed, tmp_path, windowed):
    cfg, lake = copy_of(indexed, tmp_path)
    bad = "0x" + "cd" * 32
    mid = R0.start + 10
    rewrite(lake, "blocks", R0.key, lambda df: df.with_columns(
        pl.when(pl.col("number") == mid).then(pl.lit(bad)).otherwise(pl.col("parent_hash")).alias("parent_hash")))
    res = verify_range(cfg, R0, to_block=R0.end, sample=[R0.start])
    assert failed(res) == {"parent_hash_chain"} and res[1].metadata["broken_examples"] == [mid]
    # The previous range's last block replaced by another hash: the next range no longer chains onto it.
    assert failed(verify_range(cfg, R1, to_block=R1.end, sample=[R1.start])) == set()
    rewrite(lake, "blocks", R0.key, lambda df: df.with_columns(
        pl.when(pl.col("number") == R0.end).then(pl.lit(bad)).otherwise(pl.col("hash")).alias("hash")))
    res = verify_range(cfg, R1, to_block=R1.end, sample=[R1.start])
    assert failed(res) == {"parent_hash_chain"}
    assert "previous range's last block hash" in res[1].description and res[1].metadata["across_ok"] is False


def test_a_missing_file_fails_every_check(indexed, tmp_path):
    cfg, lake = copy_of(indexed, tmp_path)
    lake.path("logs", R1.key).unlink()
    res = verify_range(cfg, R1, to_block=R1.end)
    assert failed(res) == set(CHECKS) and "is not stored" in res[0].description


def test_sensor_resyncs_a_failed_range():
    facts = Facts(node_head=100, start_block=0, blocks_per_partition=25, live_anchor=90, live_tip=100,
                  active_reorg_id=None, reorg_run_active=False, reorg_runs_before=0, live_run_active=True,
                  range_coverage={"000000000000-000000000024": 24, "000000000025-000000000049": 49,
                                  "000000000050-000000000074": 74, "000000000075-000000000099": 90},
                  range_keys_running=frozenset())
    assert plan(facts).range_runs == []
    failed_one = Facts(**{**facts.__dict__, "failed_check_ranges": frozenset({"000000000025-000000000049"})})
    assert plan(failed_one).range_runs == ["000000000025-000000000049"]
    running = Facts(**{**failed_one.__dict__, "range_keys_running": frozenset({"000000000025-000000000049"})})
    assert plan(running).range_runs == []


def _evaluations(instance, chain):
    blocks_key, logs_key = raw_keys(chain)
    keys = [dg.AssetCheckKey(blocks_key if ds == "blocks" else logs_key, name) for name, (ds, _) in CHECKS.items()]
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
    out = {}
    for k, rec in latest.items():
        ev = rec.event.dagster_event.event_specific_data
        out[k.name] = (rec.status.value, ev.passed, ev.description, ev.metadata)
    return out


def test_a_failing_check_shows_in_dagster_and_keeps_the_range_unconfirmed(indexed, tmp_path, monkeypatch):
    cfg, lake = copy_of(indexed, tmp_path)
    monkeypatch.setenv("INDEXER_CONFIG", str(tmp_path / "indexer.yaml"))
    defs = build_definitions(cfg)
    job = defs.resolve_job_def(f"{cfg.chain.name}_historical_sync")
    build_catalog(cfg)

    def statuses() -> dict[str, set[str]]:
        df = query(cfg.duckdb_path, "select number, status from blocks where number < 40 order by number")
        return {r.key: set(df.filter(pl.col("number").is_between(r.start, r.end))["status"]) for r in (R0, R1)}

    assert statuses() == {R0.key: {"confirmed"}, R1.key: {"confirmed"}}  # the head is ~60 blocks up
    # The first range's file now holds another fork's last block (as a corrupt or stale file would):
    # a real run of the second range fetches the node's blocks, which do not chain onto it.
    bad = "0x" + "ee" * 32
    rewrite(lake, "blocks", R0.key, lambda df: df.with_columns(
        pl.when(pl.col("number") == R0.end).then(pl.lit(bad)).otherwise(pl.col("hash")).alias("hash")))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(f"{cfg.chain.name}_block_ranges", [R0.key, R1.key])
        assert job.execute_in_process(instance=instance, partition_key=R1.key).success
        ev = _evaluations(instance, cfg.chain.name)
        assert ev["parent_hash_chain"][:2] == ("FAILED", False), ev
        assert "previous range's last block hash" in ev["parent_hash_chain"][2]
        assert ev["parent_hash_chain"][3]["failed_ranges"].value == [R1.key]
        assert {k for k, v in ev.items() if v[1]} == set(CHECKS) - {"parent_hash_chain"}
        # Durable: both sides of the broken link are recorded, and their rows stay unconfirmed.
        assert failed_ranges(lake) == {R0.key: ["parent_hash_chain"], R1.key: ["parent_hash_chain"]}
        assert statuses() == {R0.key: {"unconfirmed"}, R1.key: {"unconfirmed"}}
        assert query(cfg.duckdb_path, "select distinct status from logs where block_number < 50").rows() == [("unconfirmed",)]
        assert query(cfg.duckdb_path, "select range_key from failed_checks order by 1").rows() == [(R0.key,), (R1.key,)]
        # The re-syncs the sensor launches for failed ranges rewrite them, pass and clear them.
        assert job.execute_in_process(instance=instance, partition_key=R0.key).success
        assert failed_ranges(lake) == {R1.key: ["parent_hash_chain"]}
        assert statuses() == {R0.key: {"confirmed"}, R1.key: {"unconfirmed"}}
        assert job.execute_in_process(instance=instance, partition_key=R1.key).success
        ev = _evaluations(instance, cfg.chain.name)
        assert all(v[:2] == ("SUCCEEDED", True) for v in ev.values()), ev
        assert failed_ranges(lake) == {}
        assert statuses() == {R0.key: {"confirmed"}, R1.key: {"confirmed"}}


def test_backfill_cli_reports_failed_checks(indexed, tmp_path):
    """`indexer backfill` exits non-zero and names the ranges whose checks failed, and the re-run of the
    previous range then the same command heal it."""
    _cfg, lake = copy_of(indexed, tmp_path)
    bad = "0x" + "ee" * 32
    rewrite(lake, "blocks", R0.key, lambda df: df.with_columns(
        pl.when(pl.col("number") == R0.end).then(pl.lit(bad)).otherwise(pl.col("hash")).alias("hash")))
    home = tmp_path / "dagster_home"
    home.mkdir()
    path = tmp_path / "indexer.yaml"
    proc = subprocess.run([sys.executable, "-m", "indexer_dagster.cli", "backfill", "--config", str(path),
                           "--from", str(R1.start), "--to", str(R1.end)], env=cli_env(path, home),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "range checks failed (their rows stay unconfirmed)" in proc.stderr, proc.stderr
    assert f"{R1.key} parent_hash_chain" in proc.stderr and "re-run the same command" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "indexer_dagster.cli", "backfill", "--config", str(path),
                           "--to", str(R1.end)], env=cli_env(path, home), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert failed_ranges(lake) == {}


@pytest.mark.parametrize("order", ["sorted", "shuffled", "reversed"])
def test_unique_logs_finds_a_repeated_key_in_any_order(order):
    from indexer_dagster.sync.range_checks import check_unique_logs

    keys = pl.DataFrame({"block_number": [5, 5, 6, 6, 7], "log_index": [0, 1, 0, 1, 0], "block_hash": ["h"] * 5})
    dup = pl.concat([keys, keys.slice(2, 1)])
    arrange = {"sorted": lambda d: d.sort("block_number", "log_index"), "shuffled": lambda d: d.sample(
        fraction=1.0, shuffle=True, seed=3), "reversed": lambda d: d.reverse()}[order]
    assert check_unique_logs(arrange(keys)).passed
    bad = check_unique_logs(arrange(dup))
    assert not bad.passed and bad.metadata["duplicated_keys"] == 1 and bad.metadata["examples"] == ["6:0"]
    # A later log_index in an earlier block is not a duplicate, nor the same log_index in the next block.
    assert check_unique_logs(pl.DataFrame({"block_number": [5, 6], "log_index": [9, 9], "block_hash": ["h"] * 2})).passed
