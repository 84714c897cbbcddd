"""Crashes and hostile conditions around `indexer backfill`: SIGKILL at random points, a full disk,
and two backfills of the same ranges at once. After each, the views equal the node (or still show
exactly what they showed before), with no partial file visible."""

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import polars as pl
import pytest

from indexer_dagster.config import load_config
from indexer_dagster.persist.lake import Lake
from indexer_dagster.persist.meta import failed_ranges
from indexer_dagster.query import query
from tests.conftest import REPO, cli_env
from tests.sync.test_historical import node_logs

pytestmark = pytest.mark.slow

INDEXER = [sys.executable, "-m", "indexer_dagster.cli"]


@pytest.fixture
def sqlite_home(tmp_path, monkeypatch):
    """A fresh SQLite Dagster instance (deploy/dagster.yaml): these tests are about the lake, so they run
    on one instance profile; the concurrent-backfill test runs on every profile (`dagster_home`)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "deploy" / "dagster.yaml").read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


def start_backfill(path: Path, home: Path, *args: str, log=None) -> subprocess.Popen:
    return subprocess.Popen([*INDEXER, "backfill", "--config", str(path), *args], env=cli_env(path, home),
                            stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def run_backfill(path: Path, home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*INDEXER, "backfill", "--config", str(path), *args], env=cli_env(path, home),
                          capture_output=True, text=True, timeout=timeout)


def visible_files(cfg) -> list[Path]:
    """Every Parquet file a view's glob can match (hidden names are temp and schema files)."""
    return sorted(p for p in cfg.data_dir.rglob("*.parquet") if not p.name.startswith("."))


def assert_views_equal_node(cfg, node, to_block: int | None = None) -> None:
    head = node.block_number() if to_block is None else to_block
    addresses = [a for c in cfg.contracts for a in c.addresses]
    expected = node_logs(node.url, addresses, 0, head)
    got = query(cfg.duckdb_path, f"select * from logs where block_number <= {head} order by block_number, log_index")
    assert got.height == expected.height > 100
    assert got.select(expected.columns).equals(expected)
    blocks = query(cfg.duckdb_path, f"select number, hash from blocks where number <= {head} order by number")
    assert blocks["number"].to_list() == list(range(head + 1))  # no gap, no duplicate
    ref = node.rpc("eth_getBlockByNumber", [hex(head), False])
    assert blocks["hash"][-1] == ref["hash"]
    assert failed_ranges(Lake(cfg.data_dir, cfg.chain.name)) == {}  # every range passed its checks


def slow_config(make_config) -> Path:
    """One block per request, one request in flight: a backfill long enough to be killed anywhere."""
    path = make_config()
    path.write_text(path.read_text().replace(
        "blocks_per_partition: 25",
        "blocks_per_partition: 25\n  blocks_per_request: 1\n  max_blocks_per_request: 1\n  concurrency: 1"))
    return path


def test_backfill_killed_at_random_points_then_rerun_is_exact(devnet, make_config, sqlite_home):
    """SIGKILL of the whole `indexer backfill` process group (the CLI, its Dagster run and any worker
    processes) at seeded random moments, four times, then the same command again."""
    node, _ = devnet
    path = slow_config(make_config)
    cfg = load_config(path)
    rng = random.Random(20261127)
    kills = []
    for i in range(4):
        workers = ["--workers", "2"] if i % 2 else []
        proc = start_backfill(path, sqlite_home, *workers)
        delay = rng.uniform(2.0, 9.0)  # from process start (~3 s of imports) into the runs' writes
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills.append(round(delay, 2))
        # After each kill: everything a view can read is a complete, readable file of the node's rows.
        addresses = [a for c in cfg.contracts for a in c.addresses]
        for f in visible_files(cfg):
            pl.read_parquet(f)  # not truncated
            if f.parent.name == "logs" and f.parent.parent.name == cfg.chain.name:
                start, end = (int(x) for x in f.stem.split("-"))
                got = pl.read_parquet(f).drop("chain_id", "block_timestamp")
                exp = node_logs(node.url, addresses, start, min(end, node.block_number()))
                assert got.select(exp.columns).equals(exp), f
    assert len(kills) >= 3, kills  # most attempts were really cut short
    done = run_backfill(path, sqlite_home)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_views_equal_node(cfg, node)
    # No temp file is left behind in the lake, and no run is left "started".
    assert not [p for p in cfg.data_dir.rglob("*.tmp") if p.suffix == ".tmp" and ".parquet." in p.name]
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        left = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING,
                                                         dg.DagsterRunStatus.QUEUED]))
        assert not left, [(r.run_id, r.status, r.tags.get("dagster/partition")) for r in left]


def test_two_backfills_of_the_same_ranges_at_once(devnet, make_config, dagster_home):
    """Two `indexer backfill` processes on the same config and Dagster instance: both finish (one waits
    for the other's range lease), the lake is never corrupt, and the views equal the node."""
    node, _ = devnet
    path = make_config()
    cfg = load_config(path)
    a = start_backfill(path, dagster_home)
    b = start_backfill(path, dagster_home)
    out_a, _ = a.communicate(timeout=300)
    out_b, _ = b.communicate(timeout=300)
    assert a.returncode == 0, out_a
    assert b.returncode == 0, out_b
    assert_views_equal_node(cfg, node)
    # Each range is one file per dataset, written whole by whichever run came last.
    names = [f.name for f in Lake(cfg.data_dir, cfg.chain.name).files("logs")]
    assert len(names) == node.block_number() // 25 + 1
    assert not list(cfg.data_dir.rglob("*.tmp"))


def _mount_tmpfs(where: Path, size_kib: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)],
                         capture_output=True, text=True)
    return res.returncode == 0


def test_disk_full_fails_clearly_and_keeps_what_was_written(devnet, make_config, sqlite_home, tmp_path):
    """The data directory on a small filesystem that fills up: the backfill stops with a message that
    names the directory and the cause, and the ranges written before stay readable and unchanged."""
    _node, _ = devnet
    path = make_config()
    cfg = load_config(path)
    data = cfg.data_dir
    if not _mount_tmpfs(data, 4096):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        first = run_backfill(path, sqlite_home, "--to", "24")
        assert first.returncode == 0, first.stdout + first.stderr
        before = query(cfg.duckdb_path, "select * from logs order by block_number, log_index")
        before_blocks = query(cfg.duckdb_path, "select number, hash from blocks order by number")
        assert before.height > 50 and before_blocks["number"].to_list() == list(range(25))
        files_before = {p: p.read_bytes() for p in visible_files(cfg)}
        # Fill the filesystem to the last byte.
        with open(data / f"filler-{uuid.uuid4().hex}", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
            try:
                while True:
                    f.write(b"\0")
                    f.flush()
            except OSError:
                pass
        res = run_backfill(path, sqlite_home)
        out = res.stdout + res.stderr
        assert res.returncode != 0, out
        assert "no space left" in out.lower() and str(data) in out, out
        assert "Traceback" not in res.stderr, res.stderr
        # What was written before is intact and the views still show exactly it.
        for p, content in files_before.items():
            if "_meta" not in p.parts:
                assert p.read_bytes() == content, p
        assert not [p for p in visible_files(cfg) if p not in files_before and "_meta" not in p.parts]
        assert query(cfg.duckdb_path, "select * from logs order by block_number, log_index").equals(before)
        assert query(cfg.duckdb_path, "select number, hash from blocks order by number").equals(before_blocks)
        assert not list(data.rglob(".*.parquet.*.tmp"))  # the failed writes removed their temp files
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def _descendants(root: int) -> list[int]:
    """PIDs below `root` in the process tree (from /proc: children are found by their parent's id)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, frontier = [], [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _run_workers(daemon_pid: int) -> list[int]:
    """The Dagster run workers launched under this test's daemon (never found by name machine-wide):
    the code server starts each run in a process of its own with multiprocessing's spawn."""
    return [p for p in _descendants(daemon_pid) if "execute_run" in _cmdline(p) or "spawn_main" in _cmdline(p)]


def kill_daemon_and_runs(daemon: subprocess.Popen | None, *others: subprocess.Popen) -> None:
    """SIGKILL the daemon's process group, its run workers (each in a session of its own: they outlive the
    group) and `others` (a webserver)."""
    from tests.skin.test_live_daemon import kill_tree

    workers = _run_workers(daemon.pid) if daemon is not None else []
    for p in [daemon, *others]:
        if p is not None:
            kill_tree(p)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def live_instance(tmp_path: Path, config: Path) -> dict[str, str]:
    """A fresh SQLite Dagster instance, its storages created first (as `indexer backfill` and the demo do: a
    daemon and a webserver creating one at once can both stamp its schema and then fail to open it); the
    environment to start the daemon with."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((REPO / "deploy" / "dagster.yaml").read_text())
    env = {**os.environ, "DAGSTER_HOME": str(home), "INDEXER_CONFIG": str(config)}
    subprocess.run([sys.executable, "-c", "from indexer_dagster.launch import open_instance; open_instance()"],
                   env=env, check=True, timeout=120)
    return env


def follower_started(cfg, node, dep, rng: random.Random, seconds: int) -> bool:
    """A block a second until the sensor's follower holds a tip: what happens next hits live data."""
    from indexer_dagster.devnet.uniswap import generate_traffic
    from indexer_dagster.state import open_state

    for _ in range(seconds + 1):
        store = open_state(cfg.state_url)
        try:
            if store.tip(cfg.chain.name) is not None:
                return True
        finally:
            store.close()
        generate_traffic(node.url, dep, blocks=1, txs_per_block=2, seed=rng.randrange(10**6), verify=False)
        time.sleep(1)
    return False


def _webserver_up(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_webserver_and_run_worker_killed_during_live_sync_with_reorgs(tmp_path):
    """The real daemon and webserver follow a live anvil (a block a second, Uniswap traffic, reorgs);
    the webserver is killed with SIGKILL and restarted, and run workers (the live follower, and any
    reorg or range run alive at that moment) are killed at seeded random moments. The views end equal
    to the node, every reorg is `done`, and the restarted webserver serves the instance again.
    (tests/skin/test_live_daemon.py kills the daemon itself.)"""
    from indexer_dagster.devnet import Anvil, build_devnet, write_config
    from indexer_dagster.devnet.anvil import free_port
    from indexer_dagster.devnet.uniswap import generate_traffic
    from indexer_dagster.devnet.uniswap import reorg as anvil_reorg
    from tests.skin.test_live_daemon import kill_tree, start_daemon, wait_until_consistent

    node = Anvil(chain_id=31337).start()
    procs: dict[str, subprocess.Popen] = {}
    log = open(tmp_path / "dagster.log", "w")
    try:
        dep = build_devnet(node, blocks=10, txs_per_block=6, seed=5)
        path = write_config(tmp_path / "indexer.yaml", node.url, 31337, dep, "data",
                            blocks_per_partition=50, confirmations=3)
        cfg = load_config(path)
        env = live_instance(tmp_path, path)
        port = free_port()

        def start_webserver() -> subprocess.Popen:
            return subprocess.Popen(
                [str(Path(sys.executable).parent / "dagster-webserver"), "-w", str(REPO / "workspace.yaml"),
                 "-h", "127.0.0.1", "-p", str(port)],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        procs["daemon"] = start_daemon(env, log)
        procs["web"] = start_webserver()
        rng = random.Random(7)
        assert follower_started(cfg, node, dep, rng, 60), (tmp_path / "dagster.log").read_text()[-3000:]
        t0 = time.monotonic()
        kill_web_at, kill_worker_at = rng.uniform(3, 12), rng.uniform(6, 15)
        reorgs, worker_kills, web_killed = 0, 0, False
        while time.monotonic() - t0 < 25:
            generate_traffic(node.url, dep, blocks=1, txs_per_block=4, seed=rng.randrange(10**6), verify=False)
            if rng.random() < 0.3:
                anvil_reorg(node.url, dep, depth=rng.randint(1, 5), txs_per_block=3, seed=rng.randrange(10**6),
                            verify=False)
                reorgs += 1
            now = time.monotonic() - t0
            if not web_killed and now > kill_web_at:
                kill_tree(procs["web"])
                procs["web"] = start_webserver()
                web_killed = True
            if now > kill_worker_at and not worker_kills:
                for pid in _run_workers(procs["daemon"].pid):
                    os.kill(pid, signal.SIGKILL)
                    worker_kills += 1
                if not worker_kills:
                    kill_worker_at += 1  # no run alive this second: try the next one
            time.sleep(1)
        assert reorgs >= 2 and web_killed and worker_kills >= 1, (reorgs, web_killed, worker_kills, [_cmdline(p)[:150] for p in _descendants(procs["daemon"].pid)])
        ok, active, why = wait_until_consistent(cfg, node)
        assert ok and active is None, why + "\n" + (tmp_path / "dagster.log").read_text()[-3000:]
        from tests.sync.test_reorg import assert_views_equal_node as hashes_and_tables_equal_node

        hashes_and_tables_equal_node(cfg, node)
        ledger = query(cfg.duckdb_path, "select phase from reorgs")
        assert ledger.height >= 1 and set(ledger["phase"]) == {"done"}
        assert query(cfg.duckdb_path, "select count(*) n from failed_checks")["n"][0] == 0
        for _ in range(60):
            if _webserver_up(port):
                break
            time.sleep(1)
        assert _webserver_up(port), (tmp_path / "dagster.log").read_text()[-3000:]
    finally:
        kill_daemon_and_runs(procs.pop("daemon", None), *procs.values())
        node.stop()
        log.close()
