"""Chaos (issue 13): the real dagster-daemon follows a live anvil (a block a second, Uniswap traffic) while
the chain reorganizes at random — some reorgs deeper than `confirmations`, some across partition
boundaries, the node's head dropping — and the daemon and the run workers (the follower, reorg runs,
range runs) are killed with SIGKILL at random moments. Readers query all along and check, on every read,
that no row is there twice, no row is both canonical and orphaned, the blocks they see form one chain
and no repair is half done. At the end every view equals the node, the DEX reserves equal the pairs', the
DEX rows are those of the canonical events, and every reorg of the ledger is done."""

import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from indexer_dagster.config import load_config
from indexer_dagster.devnet import Anvil, build_devnet, write_config
from indexer_dagster.devnet.uniswap import generate_traffic
from indexer_dagster.devnet.uniswap import reorg as anvil_reorg
from indexer_dagster.query import QueryError, query
from tests.skin.test_live_daemon import dex_matches_chain, kill_tree, start_daemon, wait_until_consistent
from tests.sync.test_reorg import assert_views_equal_node
from tests.system.test_crashes import _run_workers, follower_started, kill_daemon_and_runs, live_instance

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CONFIRMATIONS = 3
PARTITION = 10


def invariants_sql(tables: list[str]) -> str:
    """One statement (one read of the lake): each column counts rows breaking one invariant."""
    twice = [f"(SELECT count(*) FROM (SELECT block_hash, log_index FROM {t} GROUP BY ALL HAVING count(*) > 1)) "
             f"AS twice_in_{t}" for t in ["logs", *tables]]
    return "SELECT " + ",\n".join([
        "(SELECT count(*) - count(DISTINCT number) FROM blocks) AS blocks_twice",
        *twice,
        "(SELECT count(*) FROM blocks b JOIN orphaned_blocks o ON o.hash = b.hash) AS blocks_canonical_and_orphaned",
        "(SELECT count(*) FROM logs l JOIN orphaned_logs o ON o.block_hash = l.block_hash "
        "AND o.log_index = l.log_index) AS logs_canonical_and_orphaned",
        "(SELECT count(*) FROM blocks b JOIN blocks p ON p.number = b.number - 1 "
        "WHERE b.parent_hash <> p.hash) AS blocks_off_the_chain",
        "(SELECT count(*) FROM logs l ANTI JOIN blocks b ON b.number = l.block_number AND b.hash = l.block_hash) "
        "AS logs_without_their_block",
        # Rows are archived only while a reorg is repaired: one seen with its reorg unfinished in the ledger
        # means the read fell in the middle of a repair (rolled back, not yet restored).
        *[f"(SELECT count(*) FROM orphaned_{ds} WHERE reorg_id NOT IN (SELECT reorg_id FROM reorgs "
          f"WHERE phase = 'done')) AS {ds}_archived_by_an_unfinished_repair" for ds in ("blocks", "logs")],
    ])


def dex_rows_equal_events(cfg) -> bool:
    """The DEX row tables hold one row per canonical event they come from (the decoded tables, which
    `assert_views_equal_node` compares with the node): swaps from Swap, reserves from Sync, liquidity
    events from Mint and Burn, keyed by block and log index."""
    tables = {spec.name: spec.table for _, spec in cfg.all_specs() if spec.contract == "UniswapV2Pair"}
    sources = {"swaps": ["Swap"], "pool_reserves": ["Sync"], "liquidity_events": ["Mint", "Burn"]}
    for dex, events in sources.items():
        events_sql = " UNION ALL ".join(f"SELECT block_number, log_index FROM {tables[e]}" for e in events)
        try:
            got = query(cfg.duckdb_path, f"SELECT block_number, log_index FROM {dex} ORDER BY ALL")
        except QueryError:
            return False  # not built yet
        if got.height == 0 or not got.equals(query(cfg.duckdb_path, f"{events_sql} ORDER BY ALL")):
            return False
    return True


def runs_by_pid(dagster_home: str) -> list[tuple[int, str]]:
    """(process id, job) of the runs in progress, from the process ids Dagster logs for each run (a reorg
    run the follower executes in its own process logs the follower's)."""
    import dagster as dg

    from indexer_dagster.jobs.live import IN_PROGRESS

    pid = re.compile(r"(?:Started process for run|Executing steps in process) \(pid: (\d+)\)")
    with dg.DagsterInstance.from_config(dagster_home) as instance:
        return [(int(m.group(1)), run.job_name)
                for run in instance.get_runs(dg.RunsFilter(statuses=IN_PROGRESS), limit=50)
                for event in instance.all_logs(run.run_id) if (m := pid.search(event.message or ""))]


class Readers(threading.Thread):
    """Queries the catalog every ~50 ms through the query API, as an analyst or a DEX backend does."""

    def __init__(self, cfg) -> None:
        super().__init__(daemon=True)
        self.cfg = cfg
        self.sql = invariants_sql(sorted({spec.table for _, spec in cfg.all_specs()}))
        self.stop = threading.Event()
        self.reads = 0
        self.violations: list[dict] = []
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                row = query(self.cfg.duckdb_path, self.sql).row(0, named=True)
            except QueryError as e:  # the catalog not built yet, a view not there yet
                self.errors.append(str(e).splitlines()[0][:200])
            else:
                self.reads += 1
                if any(row.values()):
                    self.violations.append({k: v for k, v in row.items() if v})
            time.sleep(0.05)


def test_daemon_with_random_reorgs_head_drops_and_kills_while_readers_read(tmp_path):
    node = Anvil(chain_id=31337).start()
    daemon = None
    log = open(tmp_path / "daemon.log", "w")
    readers = None
    try:
        dep = build_devnet(node, blocks=10, txs_per_block=6, seed=21)
        path = write_config(tmp_path / "indexer.yaml", node.url, 31337, dep, "data",
                            blocks_per_partition=PARTITION, confirmations=CONFIRMATIONS)
        cfg = load_config(path)
        env = live_instance(tmp_path, path)
        daemon = start_daemon(env, log)
        rng = random.Random(13)
        assert follower_started(cfg, node, dep, rng, 90), (tmp_path / "daemon.log").read_text()[-3000:]
        readers = Readers(cfg)
        readers.start()

        done = {"reorgs": 0, "deeper_than_confirmations": 0, "across_partitions": 0, "head_drops": 0,
                "daemon_kills": 0, "worker_kills": 0}
        killed_runs: list[str] = []  # the jobs of the runs in progress in the processes killed
        t0 = time.monotonic()
        daemon_kill_at = rng.uniform(15, 30)
        depths = rng.sample([1, 2, 3, 5, 7, 12], 6)  # shuffled; deeper than confirmations and across partitions
        while time.monotonic() - t0 < 45:
            generate_traffic(node.url, dep, blocks=1, txs_per_block=4, seed=rng.randrange(10**6), verify=False)
            head = node.block_number()
            roll = rng.random()
            if roll < 0.25 and head > 30:
                depth = depths[done["reorgs"] % len(depths)]
                anvil_reorg(node.url, dep, depth=depth, txs_per_block=3, seed=rng.randrange(10**6), verify=False)
                done["reorgs"] += 1
                done["deeper_than_confirmations"] += depth > CONFIRMATIONS
                done["across_partitions"] += (head - depth + 1) // PARTITION != head // PARTITION
            elif roll < 0.33 and head > 30:
                node.rpc("anvil_rollback", [rng.randint(1, 3)])  # the node's head drops
                done["head_drops"] += 1
            if rng.random() < 0.2:  # a moment later, whatever runs: the follower, a reorg run, a range run
                time.sleep(rng.uniform(0, 1.5))
                workers = _run_workers(daemon.pid)
                killed_runs += [job for pid, job in runs_by_pid(env["DAGSTER_HOME"]) if pid in workers]
                for pid in workers:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        done["worker_kills"] += 1
                    except ProcessLookupError:
                        pass
            if not done["daemon_kills"] and time.monotonic() - t0 > daemon_kill_at:
                kill_tree(daemon)  # the daemon, its code server and its sensors die; the same command restarts
                daemon = start_daemon(env, log)
                done["daemon_kills"] += 1
            time.sleep(1)
        assert done["reorgs"] >= 4 and done["deeper_than_confirmations"] >= 1 and done["across_partitions"] >= 1, done
        assert done["head_drops"] >= 1 and done["daemon_kills"] == 1 and done["worker_kills"] >= 2, done
        assert f"{cfg.chain.name}_live_sync" in killed_runs, killed_runs  # the follower, and what it ran
        print("chaos:", done, "runs killed:", {job: killed_runs.count(job) for job in sorted(set(killed_runs))})

        ok, active, why = wait_until_consistent(cfg, node, seconds=150)
        tail = (tmp_path / "daemon.log").read_text()[-4000:]
        assert ok and active is None, f"{why}; active reorg {active}\n{tail}"
        readers.stop.set()
        readers.join(30)
        assert readers.reads >= 30, (readers.reads, readers.errors[-5:])
        assert not readers.violations, readers.violations[:5]

        assert_views_equal_node(cfg, node)  # blocks with hashes, logs, every decoded table
        ledger = query(cfg.duckdb_path, "select reorg_id, phase from reorgs")
        assert ledger.height >= 1 and set(ledger["phase"]) == {"done"}, ledger
        orphaned = query(cfg.duckdb_path, "select distinct reorg_id from orphaned_logs")
        assert set(orphaned["reorg_id"]) <= set(ledger["reorg_id"])
        for _ in range(120):  # the DEX tables follow the canonical events
            if dex_matches_chain(cfg, node) and dex_rows_equal_events(cfg):
                break
            time.sleep(1)
        assert dex_matches_chain(cfg, node) and dex_rows_equal_events(cfg), tail
    finally:
        if readers is not None:
            readers.stop.set()
        kill_daemon_and_runs(daemon)
        subprocess.run(["pkill", "-9", "-f", str(tmp_path)], check=False)
        node.stop()
        log.close()
