"""Adding a contract (or an event) to the config and backfilling again fetches only what is new.

A real anvil behind a small counting JSON-RPC proxy: after the ERC20 tokens are added, `indexer
backfill` sends no range eth_getLogs naming the already indexed factory or pairs, the stored files are
byte-identical, the views equal the node for all contracts, and live sync includes the tokens. Adding
only an event re-decodes without any eth_getLogs. Removing a contract hides it from the views and
keeps its files.
"""

import hashlib
import json
import threading
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest
import yaml

from indexer_dagster.block_range import parse_key, ranges_between
from indexer_dagster.config import load_config
from indexer_dagster.devnet import Anvil, build_devnet, write_config
from indexer_dagster.devnet.uniswap import event_topics, generate_traffic
from indexer_dagster.persist.catalog import build_catalog
from indexer_dagster.persist.files import data_files
from indexer_dagster.query import query
from indexer_dagster.state import open_state
from indexer_dagster.sync.historical import sync_range
from indexer_dagster.sync.supervise import Facts, plan
from indexer_dagster.sync.supplement import fetch_range, plan_range, ranges_to_supplement
from tests.sync.test_factories import follow
from tests.sync.test_historical import backfill, node_logs

pytestmark = pytest.mark.slow


class CountingProxy:
    """Forwards JSON-RPC to the node and records every call (method, params)."""

    def __init__(self, upstream: str) -> None:
        calls = self.calls = []
        body_bytes = self.body_bytes = Counter()  # response bytes per method (a batch counts as its first call's)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                doc = json.loads(body)
                for c in doc if isinstance(doc, list) else [doc]:
                    calls.append((c.get("method"), c.get("params")))
                req = urllib.request.Request(upstream, data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as resp:
                    out = resp.read()
                first = doc[0] if isinstance(doc, list) and doc else doc
                body_bytes[first.get("method") if isinstance(first, dict) else None] += len(out)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def range_get_logs(self) -> list[dict]:
        """eth_getLogs filters by block range (not the by-hash samples of the range checks)."""
        return [p[0] for m, p in self.calls if m == "eth_getLogs" and "fromBlock" in p[0]]

    def close(self) -> None:
        self.server.shutdown()


def rewrite(path: Path, edit) -> Path:
    doc = yaml.safe_load(path.read_text())
    edit(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def contract(doc, name):
    return next(c for c in doc["contracts"] if c["name"] == name)


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for ds in ("blocks", "logs", "events") for p in sorted((root / ds).rglob("*.parquet"))
            if not p.name.startswith(".")}


def last_sync_mode(partition: str) -> str:
    """`sync_mode` of the latest materialization of devnet/logs for `partition` in $DAGSTER_HOME."""
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        events = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(["devnet", "logs"]), asset_partitions=[partition]), limit=1
        ).records
        return events[0].asset_materialization.metadata["sync_mode"].value


def test_adding_a_contract_fetches_only_it_and_removing_hides_it(tmp_path, dagster_home):
    node = Anvil(chain_id=31337).start()
    proxy = CountingProxy(node.url)
    try:
        dep = build_devnet(node, blocks=22, txs_per_block=6, seed=4)
        path = write_config(tmp_path / "indexer.yaml", proxy.url, 31337, dep, "data",
                            blocks_per_partition=10, confirmations=3, include_tokens=False)
        # First: factory and pairs, without the pairs' Sync event.
        rewrite(path, lambda d: contract(d, "UniswapV2Pair").update(events=["Swap", "Mint", "Burn", "Transfer"]))
        to = (node.block_number() + 1) // 10 * 10 - 1  # whole ranges only: every stored range is complete
        cfg = load_config(path)
        for r in ranges_between(cfg.start_block, to, 10):  # (the CLI runs below are what is tested)
            sync_range(cfg, r)
        lake = cfg.data_dir / cfg.chain.name
        # Live sync with this config too: live segments (and the top range) above the stored ranges.
        store = open_state(cfg.state_url)
        follow(cfg, store)
        generate_traffic(node.url, dep, blocks=3, txs_per_block=6, seed=8)
        follow(cfg, store)
        before = digests(lake)
        assert len([k for k in before if k.startswith("logs/")]) >= (to + 1) // 10
        old = {dep.factory.lower(), *(a.lower() for a in dep.pair_addresses)}
        tokens = [t.lower() for t in dep.tokens]

        # Add the ERC20 tokens: only their logs are fetched, beside the stored files.
        rewrite(path, lambda d: d["contracts"].append({
            "name": "ERC20", "abi": "abis/ERC20.json", "addresses": dep.tokens, "events": ["Transfer", "Approval"]}))
        cfg = load_config(path)
        assert ranges_to_supplement(cfg) == sorted(p.stem for p in data_files(lake / "logs"))
        proxy.calls.clear()
        backfill(path, dagster_home, "--to", str(to))
        fetched = proxy.range_get_logs()
        assert fetched, "the tokens' logs were not fetched"
        named = {a.lower() for f in fetched for a in f["address"]}
        assert named == set(tokens), named  # never the factory or a pair: their ranges are stored
        after = digests(lake)
        assert {k: v for k, v in after.items() if k in before} == before  # old files byte-identical
        assert any("+" in k for k in after if k.startswith("logs/"))
        assert last_sync_mode("000000000000-000000000009") == "supplement"  # recorded in Dagster
        stems = sorted(p.stem for p in data_files(lake / "logs") if "+" not in p.stem)
        assert ranges_to_supplement(cfg) == [k for k in stems if parse_key(k).start > to]  # not asked for yet
        build_catalog(cfg)
        expected = node_logs(node.url, sorted(old | set(tokens)), 0, to)
        got = query(cfg.duckdb_path, f"select * from logs where block_number <= {to} order by block_number, log_index")
        assert got.select(expected.columns).equals(expected)
        transfer = event_topics("ERC20")["Transfer"]
        erc = query(cfg.duckdb_path, f"select block_number, log_index from erc20_transfer where block_number <= {to} "
                                     "order by 1, 2")
        want = expected.filter(pl.col("address").is_in(tokens) & (pl.col("topic0") == transfer))
        assert erc.equals(want.select("block_number", "log_index")) and erc.height > 20

        # Add only an event (the pairs' Sync): stored logs are decoded again, no eth_getLogs at all.
        rewrite(path, lambda d: contract(d, "UniswapV2Pair")["events"].append("Sync"))
        cfg = load_config(path)
        assert plan_range(cfg, parse_key("000000000000-000000000009")) == "decode"
        proxy.calls.clear()
        backfill(path, dagster_home, "--to", str(to))
        assert proxy.range_get_logs() == []
        assert last_sync_mode("000000000000-000000000009") == "decode"
        build_catalog(cfg)
        sync_topic = event_topics("UniswapV2Pair")["Sync"]
        syncs = query(cfg.duckdb_path, "select block_number, log_index, address from uniswap_v2_pair_sync "
                                       f"where block_number <= {to} order by 1, 2")
        want = expected.filter(pl.col("address").is_in(sorted(old)) & (pl.col("topic0") == sync_topic))
        assert syncs.equals(want.select("block_number", "log_index", "address")) and syncs.height > 5

        # Live sync with the new config includes the tokens and Sync; the ranges of the live segments
        # written with the old config are what the sensor asks for next, and a run of each (as the
        # sensor launches) leaves the views equal to the node for every block.
        follow(cfg, store)
        generate_traffic(node.url, dep, blocks=3, txs_per_block=6, seed=9)
        follow(cfg, store)
        store.close()
        due = ranges_to_supplement(cfg)
        assert due and all(parse_key(k).end > to for k in due)
        head = node.block_number()
        stored = {k: parse_key(k).end for k in stems if parse_key(k).end <= to}
        facts = Facts(node_head=head, start_block=cfg.start_block, blocks_per_partition=10, live_anchor=to,
                      live_tip=None, active_reorg_id=None, reorg_run_active=False, reorg_runs_before=0,
                      live_run_active=True, range_coverage=stored, range_keys_running=frozenset(),
                      supplement_ranges=frozenset(due))
        assert plan(facts).range_runs == due
        for key in due:
            fetch_range(cfg, parse_key(key))
        assert ranges_to_supplement(cfg) == []
        build_catalog(cfg)
        live = node_logs(node.url, sorted(old | set(tokens)), 0, head)
        got = query(cfg.duckdb_path, "select * from logs order by block_number, log_index")
        assert got.select(live.columns).equals(live)
        assert live.filter((pl.col("block_number") > to + 1) & pl.col("address").is_in(tokens)).height > 0
        syncs = query(cfg.duckdb_path, "select block_number, log_index, address from uniswap_v2_pair_sync order by 1, 2")
        want = live.filter(pl.col("address").is_in(sorted(old)) & (pl.col("topic0") == sync_topic))
        assert syncs.equals(want.select("block_number", "log_index", "address"))

        # Remove the tokens again: hidden from the views, files kept.
        rewrite(path, lambda d: d["contracts"].remove(contract(d, "ERC20")))
        cfg = load_config(path)
        build_catalog(cfg)
        got = query(cfg.duckdb_path, "select count(*) n, count(*) filter (where address in "
                                     f"({', '.join(repr(t) for t in tokens)})) t from logs")
        assert got["t"][0] == 0 and got["n"][0] == live.filter(pl.col("address").is_in(sorted(old))).height
        views = set(query(cfg.duckdb_path, "select view_name from duckdb_views() where not internal")["view_name"])
        assert "erc20_transfer" not in views
        assert any((lake / "events" / "erc20_transfer").glob("*.parquet"))
    finally:
        proxy.close()
        node.stop()
