"""The real dagster-daemon follows a live anvil (a block a second, Uniswap traffic, random reorgs),
survives being killed, and ends with views equal to the node."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from indexer_dagster.config import load_config
from indexer_dagster.devnet import Anvil, build_devnet, write_config
from indexer_dagster.devnet.uniswap import generate_traffic
from indexer_dagster.devnet.uniswap import reorg as anvil_reorg
from indexer_dagster.persist.catalog import build_catalog
from indexer_dagster.query import query
from indexer_dagster.state import open_state
from tests.sync.test_historical import node_logs
from tests.sync.test_reorg import assert_views_equal_node

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def start_daemon(env, log):
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def kill_tree(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def views_equal_node(cfg, node) -> tuple[bool, str]:
    build_catalog(cfg)
    head = node.block_number()
    addresses = [a for c in cfg.contracts for a in c.addresses]
    expected = node_logs(node.url, addresses, 0, head)
    try:
        got = query(cfg.duckdb_path, "select * from logs order by block_number, log_index")
        blocks = query(cfg.duckdb_path, "select number, hash from blocks order by number")
    except Exception as e:  # noqa: BLE001 - not ready yet
        return False, str(e)
    if blocks["number"].to_list() != list(range(head + 1)):
        return False, f"blocks {blocks.height} vs head {head}"
    if got.height != expected.height or not got.select(expected.columns).equals(expected):
        return False, f"logs {got.height} vs node {expected.height}"
    return True, ""


def wait_until_consistent(cfg, node, seconds: int = 90):
    """Poll until the views equal the node and no reorg is unfinished: (views ok, active reorg, why not)."""
    ok, why, active = False, "", None
    for _ in range(seconds):
        ok, why = views_equal_node(cfg, node)
        store = open_state(cfg.state_url)
        active = store.active_reorg(cfg.chain.name)
        store.close()
        if ok and active is None:
            break
        time.sleep(1)
    return ok, active, why


def dex_matches_chain(cfg, node) -> bool:
    try:
        state = query(cfg.duckdb_path, "select pool, reserve0, reserve1 from pool_state")
    except Exception:  # noqa: BLE001 - not built yet
        return False
    for pool, r0, r1 in state.iter_rows():
        ret = node.rpc("eth_call", [{"to": pool, "data": "0x0902f1ac"}, "latest"])  # getReserves()
        if (int(r0), int(r1)) != (int(ret[2:66], 16), int(ret[66:130], 16)):
            return False
    return state.height == 6


def test_daemon_follows_live_chain_with_random_reorgs(tmp_path, dagster_home):
    """On both instance profiles (sqlite and postgres: queue, tag limits, pools under a real daemon)."""
    node = Anvil(chain_id=31337).start()
    daemon = None
    log = open(tmp_path / "daemon.log", "w")
    try:
        dep = build_devnet(node, blocks=10, txs_per_block=6, seed=5)
        path = write_config(tmp_path / "indexer.yaml", node.url, 31337, dep, "data",
                            blocks_per_partition=50, confirmations=3)
        cfg = load_config(path)
        env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "INDEXER_CONFIG": str(path)}
        daemon = start_daemon(env, log)
        rng = random.Random(1)
        deadline = time.monotonic() + 60
        reorgs = 0
        killed = False
        while time.monotonic() < deadline:
            generate_traffic(node.url, dep, blocks=1, txs_per_block=4, seed=rng.randrange(10**6), verify=False)
            if rng.random() < 0.15 and node.block_number() > 20:
                anvil_reorg(node.url, dep, depth=rng.randint(1, 5), txs_per_block=3, seed=rng.randrange(10**6),
                            verify=False)
                reorgs += 1
            if not killed and time.monotonic() > deadline - 35:
                kill_tree(daemon)  # the daemon dies while following the head; the same command restarts it
                daemon = start_daemon(env, log)
                killed = True
            time.sleep(1)
        assert reorgs >= 2
        ok, active, why = wait_until_consistent(cfg, node)
        assert ok, why + "\n" + (tmp_path / "daemon.log").read_text()[-3000:]
        assert active is None, f"reorg {active.id} left unfinished ({active.phase})"
        assert_views_equal_node(cfg, node)  # block hashes and every decoded table too
        ledger = query(cfg.duckdb_path, "select * from reorgs")
        assert ledger.height >= 1 and set(ledger["phase"]) == {"done"}
        orphaned = query(cfg.duckdb_path, "select distinct reorg_id from orphaned_logs")
        assert set(orphaned["reorg_id"]) <= set(ledger["reorg_id"])
        # The sensor rebuilds the DEX tables after the tip moves and after reorgs: they reach the chain.
        for _ in range(120):
            if dex_matches_chain(cfg, node):
                break
            time.sleep(1)
        assert dex_matches_chain(cfg, node), (tmp_path / "daemon.log").read_text()[-3000:]
    finally:
        if daemon is not None:
            kill_tree(daemon)
        subprocess.run(["pkill", "-9", "-f", str(tmp_path)], check=False)
        node.stop()
        log.close()
