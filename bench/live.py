#!/usr/bin/env python
"""Live-sync benchmark: the real stack (dagster-daemon, chain-head sensor, follower and reorg runs)
against anvil mining a block of Uniswap traffic every second.

Measures
  - head-to-queryable: block mined on the node -> its logs visible in the DuckDB views (p50/p95);
  - reorg-to-consistent: anvil_reorg applied -> the views' blocks equal the node's new fork (p50/p95),
    for depths 1..12;
  - backlog: whether the indexed head keeps up at 1 block/s.

    .venv/bin/python bench/live.py [--blocks 120 --txs-per-block 25 --reorg-rounds 1]
"""

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer_dagster.config import load_config  # noqa: E402
from indexer_dagster.devnet import Anvil, build_devnet, write_config  # noqa: E402
from indexer_dagster.devnet.uniswap import generate_traffic, reorg  # noqa: E402
from indexer_dagster.persist.catalog import build_catalog  # noqa: E402


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


class ViewPoller:
    """Polls the DuckDB views every `period` s and records when each block number first shows logs."""

    def __init__(self, duckdb_path: Path, period: float = 0.1) -> None:
        self.path, self.period = duckdb_path, period
        self.first_seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "ViewPoller":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last = -1
        while not self._stop.is_set():
            try:
                con = duckdb.connect(str(self.path), read_only=True)
                rows = con.execute("select distinct block_number from logs where block_number > ?", [last]).fetchall()
                con.close()
                now = time.monotonic()
                for (n,) in rows:
                    self.first_seen.setdefault(n, now)
                    last = max(last, n)
            except duckdb.Error:
                pass
            time.sleep(self.period)


def views_match_node(cfg, node, first: int) -> bool:
    head = node.block_number()
    try:
        con = duckdb.connect(str(cfg.duckdb_path), read_only=True)
        got = dict(con.execute("select number, hash from blocks where number >= ?", [first]).fetchall())
        con.close()
    except duckdb.Error:
        return False
    hashes = node.batch([("eth_getBlockByNumber", [hex(n), False]) for n in range(first, head + 1)])
    return all(got.get(first + i) == h["hash"] for i, h in enumerate(hashes))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=120, help="blocks mined at 1/s for head-to-queryable")
    ap.add_argument("--txs-per-block", type=int, default=25, help="~2 logs per tx: 25 txs ~ 50 logs")
    ap.add_argument("--reorg-rounds", type=int, default=1, help="rounds of reorgs at depths 1..12")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-live-"))
    node = Anvil(chain_id=31337).start()
    daemon = None
    try:
        dep = build_devnet(node, blocks=20, txs_per_block=10, seed=1)
        path = write_config(work / "indexer.yaml", node.url, 31337, dep, "data", blocks_per_partition=1000,
                            confirmations=12)
        cfg = load_config(path)
        home = work / "dagster_home"
        home.mkdir()
        shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
        env = {**os.environ, "DAGSTER_HOME": str(home), "INDEXER_CONFIG": str(path)}
        log = open(work / "daemon.log", "w")
        daemon = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(REPO / "workspace.yaml")],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        # Warm up: wait until the follower has caught up with the node.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            build_catalog(cfg)
            if views_match_node(cfg, node, 0):
                break
            time.sleep(1)
        else:
            raise SystemExit("the indexer never caught up; see " + str(work / "daemon.log"))
        print(f"warm: indexed head {node.block_number()}", flush=True)

        poller = ViewPoller(cfg.duckdb_path).start()
        mined: dict[int, float] = {}
        seed = 100
        t_next = time.monotonic()
        for _ in range(args.blocks):
            seed += 1
            generate_traffic(node.url, dep, blocks=1, txs_per_block=args.txs_per_block, seed=seed, verify=False)
            mined[node.block_number()] = time.monotonic()
            t_next += 1.0
            time.sleep(max(0.0, t_next - time.monotonic()))
        time.sleep(5)
        poller.stop()
        lat = [poller.first_seen[n] - t for n, t in mined.items() if n in poller.first_seen]
        missing = [n for n in mined if n not in poller.first_seen]
        # Backlog: latency of the last 20 blocks vs the first 20.
        ordered = [poller.first_seen[n] - mined[n] for n in sorted(mined) if n in poller.first_seen]

        reorg_lat: dict[int, list[float]] = {}
        for _round in range(args.reorg_rounds):
            for depth in range(1, 13):
                seed += 1
                generate_traffic(node.url, dep, blocks=1, txs_per_block=args.txs_per_block, seed=seed, verify=False)
                time.sleep(2)
                ancestor = node.block_number() - depth
                t0 = time.monotonic()
                reorg(node.url, dep, depth=depth, txs_per_block=4, seed=seed * 13, verify=False)
                while time.monotonic() - t0 < 120:
                    if views_match_node(cfg, node, ancestor + 1):
                        break
                    time.sleep(0.1)
                reorg_lat.setdefault(depth, []).append(time.monotonic() - t0)
                print(f"reorg depth {depth}: consistent after {reorg_lat[depth][-1]:.1f}s", flush=True)

        all_reorg = [x for v in reorg_lat.values() for x in v]
        print()
        print(f"head-to-queryable over {len(lat)} blocks ({args.txs_per_block} txs each): "
              f"p50 {pct(lat, 50):.2f}s  p95 {pct(lat, 95):.2f}s  max {max(lat):.2f}s  (missing {len(missing)})")
        print(f"backlog: first 20 blocks mean {statistics.mean(ordered[:20]):.2f}s, "
              f"last 20 blocks mean {statistics.mean(ordered[-20:]):.2f}s")
        print(f"reorg-to-consistent over {len(all_reorg)} reorgs (depth 1-12): "
              f"p50 {pct(all_reorg, 50):.1f}s  p95 {pct(all_reorg, 95):.1f}s  max {max(all_reorg):.1f}s")
    finally:
        if daemon is not None:
            try:
                os.killpg(daemon.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["pkill", "-9", "-f", str(work)], check=False)
        node.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
