"""Health status, Prometheus metrics and structured logs, against the real devnet chain.

The module backfills part of the chain (blocks 0..49, ranges of 25) through `indexer backfill` with an
RPC URL carrying a fake key in its path and query string (a forwarding proxy in front of anvil refuses
any request without it), then checks `indexer status` / `indexer metrics` against the node, and that
the key appears in no log line, CLI output, metric or Dagster event.
"""

import asyncio
import http.client
import http.server
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import dagster as dg
import polars as pl
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from indexer_dagster.block_range import ranges_between
from indexer_dagster.config import load_config
from indexer_dagster.devnet import write_config
from indexer_dagster.devnet.anvil import free_port
from indexer_dagster.health import metrics
from indexer_dagster.health.logs import JsonFormatter, log_context, scrub, url_secrets
from indexer_dagster.health.status import classify_partitions, gather_status
from indexer_dagster.persist.lake import Lake
from indexer_dagster.persist.meta import read_head
from indexer_dagster.state import open_state
from indexer_dagster.sync.historical import sync_range
from indexer_dagster.sync.realtime import Follower

REPO = Path(__file__).resolve().parents[2]
KEY = "SECRETKEY123"
INDEXER = [sys.executable, "-m", "indexer_dagster.cli"]


# --- unit tests (no chain) -----------------------------------------------------------------------------------

def test_partition_states():
    cov = {"000000000000-000000000009": 9, "000000000010-000000000019": 14}
    live = [(15, 19), (20, 23)]
    parts = classify_partitions(0, 10, 27, cov, live, failed={"000000000020-000000000029"})
    assert parts["done"] == ["000000000000-000000000009"]
    assert parts["live"] == ["000000000010-000000000019"]  # file to 14, live segments 15..19
    assert parts["failed"] == ["000000000020-000000000029"]  # live covers 20..23 only, its run failed
    parts = classify_partitions(0, 10, 27, {"000000000020-000000000029": 22}, [], failed=())
    assert parts["partial"] == ["000000000020-000000000029"] and len(parts["missing"]) == 2


def test_failed_partitions_are_the_ranges_whose_latest_run_failed():
    """Read from the Dagster instance's run history: partition runs and range (multi-partition) runs."""
    from dagster._core.test_utils import create_run_for_test

    from indexer_dagster.sensors.freshness import failed_partitions

    cfg = SimpleNamespace(chain=SimpleNamespace(name="devnet", blocks_per_partition=25))
    k = [r.key for r in ranges_between(0, 199, 25)]
    S = dg.DagsterRunStatus
    history = [  # oldest first
        (S.FAILURE, {"dagster/partition": k[0]}),
        (S.SUCCESS, {"dagster/partition": k[0]}),     # fixed by a later run
        (S.FAILURE, {"dagster/asset_partition_range_start": k[2], "dagster/asset_partition_range_end": k[4]}),
        (S.SUCCESS, {"dagster/partition": k[3]}),     # one range of the failed batch re-run
        (S.SUCCESS, {"dagster/partition": k[5]}),
        (S.FAILURE, {"dagster/partition": k[5]}),     # failed after an earlier success
        (S.STARTED, {"dagster/partition": k[6]}),     # still running: not failed
    ]
    with dg.instance_for_test() as instance:
        for status, tags in history:
            create_run_for_test(instance, job_name="devnet_historical_sync", status=status, tags=tags)
        create_run_for_test(instance, job_name="other_historical_sync", status=S.FAILURE,
                            tags={"dagster/partition": k[7]})
        assert failed_partitions(instance, cfg) == [k[2], k[4], k[5]]


def test_scrub_and_json_logs_carry_context(caplog):
    url = f"https://eth.example.org/v2/{KEY}?apikey={KEY}&chain=1"
    assert {KEY, url} <= url_secrets(url) and "v2" not in url_secrets(url)
    from indexer_dagster.health.logs import get_logger, register_url

    register_url(url)
    assert KEY not in scrub(f"failed to reach {url} with key {KEY}")
    log = get_logger("indexer_dagster.test_health")
    caplog.set_level(logging.INFO, logger="indexer_dagster")
    with log_context(chain="devnet", range="000000000000-000000000024", run_id="abc123"):
        log.info("calling %s", url)
        try:
            raise RuntimeError(f"boom at {url}")
        except RuntimeError:
            log.exception("failed")
    rec = [r for r in caplog.records if r.name == "indexer_dagster.test_health"]
    assert [r.chain for r in rec] == ["devnet", "devnet"] and rec[0].range == "000000000000-000000000024"
    line = json.loads(JsonFormatter().format(rec[1]))
    assert line["run_id"] == "abc123" and line["chain"] == "devnet" and "RuntimeError" in line["exception"]
    assert KEY not in caplog.text and all(KEY not in JsonFormatter().format(r) for r in rec)


# --- a forwarding proxy that demands the key -------------------------------------------------------------------

class KeyProxy:
    """Forwards JSON-RPC POSTs to anvil only when the path and the query string carry the key."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.with_key = 0
        self.refused = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path != f"/v2/{KEY}?apikey={KEY}":
                    proxy.refused += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                proxy.with_key += 1
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                conn.request("POST", "/", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/v2/{KEY}?apikey={KEY}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def edit_yaml(path: Path, **chain_overrides) -> Path:
    doc = yaml.safe_load(path.read_text())
    doc["chain"].update(chain_overrides)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_cli(*args, env, timeout=180, check=True):
    proc = subprocess.run([*INDEXER, *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def backfilled(devnet, tmp_path_factory):
    """Blocks 0..49 of the devnet indexed by `indexer backfill --to 49` through the key-checking proxy."""
    node, deployment = devnet
    tmp = tmp_path_factory.mktemp("health")
    proxy = KeyProxy(node.url)
    saved = {k: os.environ.get(k) for k in ("HEALTH_RPC_URL", "HEALTH_BAD_RPC_URL")}
    os.environ["HEALTH_RPC_URL"] = proxy.url
    # An unreachable node, its URL carrying the same key; few retries so it fails in seconds.
    os.environ["HEALTH_BAD_RPC_URL"] = f"http://127.0.0.1:{free_port()}/v2/{KEY}?apikey={KEY}"
    path = write_config(tmp / "indexer.yaml", "HEALTH_RPC_URL", 31337, deployment, "data",
                        blocks_per_partition=25, confirmations=5)
    bad_path = edit_yaml(write_config(tmp / "bad.yaml", "HEALTH_BAD_RPC_URL", 31337, deployment, "data",
                                      blocks_per_partition=25, confirmations=5),
                         max_retries=1, request_timeout_s=2)
    home = tmp / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "INDEXER_CONFIG": str(path), "DAGSTER_HOME": str(home),
           "INDEXER_LOG_LEVEL": "DEBUG", "INDEXER_LOG_FORMAT": "json"}
    head_before = node.block_number()
    proc = run_cli("backfill", "--config", str(path), "--to", "49", env=env)
    # Without a Dagster instance the CLI does not import Dagster (faster; no failed-run lookup).
    plain_env = {k: v for k, v in env.items() if k != "DAGSTER_HOME"}
    ns = SimpleNamespace(node=node, deployment=deployment, path=path, bad_path=bad_path, home=home, env=env, plain_env=plain_env, proxy=proxy,
                         cfg=load_config(path), bad_cfg=load_config(bad_path), head_before=head_before,
                         head_after=node.block_number(), outputs=[proc.stdout, proc.stderr])
    try:
        yield ns
    finally:
        proxy.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def block(node, n: int) -> dict:
    return node.rpc("eth_getBlockByNumber", [hex(n), False])


def node_log_counts(node, cfg, last: int) -> tuple[int, dict[str, int]]:
    addresses = [a for c in cfg.contracts for a in c.addresses]
    raw = node.rpc("eth_getLogs", [{"fromBlock": "0x0", "toBlock": hex(last), "address": addresses}])
    by_topic: dict[str, int] = {}
    for log in raw:
        by_topic[log["topics"][0].lower()] = by_topic.get(log["topics"][0].lower(), 0) + 1
    return len(raw), by_topic


# --- status against the chain ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_status_numbers_match_the_chain(backfilled):
    b, node, cfg = backfilled, backfilled.node, backfilled.cfg
    before = node.block_number()
    st = gather_status(cfg)
    after = node.block_number()
    assert st.node_reachable and before <= st.node_head <= after and st.node_error is None
    assert st.indexed_head == 49
    assert st.lag_blocks == st.node_head - 49
    assert st.lag_seconds == int(block(node, st.node_head)["timestamp"], 16) - int(block(node, 49)["timestamp"], 16)
    # Finality is what the views use: the head the backfill saw, minus confirmations.
    recorded = read_head(Lake(cfg.data_dir, "devnet"))["head_number"]
    assert b.head_before <= recorded <= b.head_after and st.confirmed_head == recorded - 5
    # Missing partitions are exactly the ranges above block 49, up to the node's head.
    assert st.missing_partitions == [r.key for r in ranges_between(0, st.node_head, 25) if r.start >= 50]
    assert st.partitions == {"done": 2, "partial": 0, "live": 0, "missing": len(st.missing_partitions), "failed": 0}
    assert st.partitions_expected == len(ranges_between(0, st.node_head, 25))
    # Rows per table equal what the node returns for blocks 0..49.
    n_logs, by_topic = node_log_counts(node, cfg, 49)
    assert st.rows["blocks"] == 50 and st.rows["logs"] == n_logs > 100
    swap = next(s for _, s in cfg.all_specs() if s.table == "uniswap_v2_pair_swap")
    assert st.rows["uniswap_v2_pair_swap"] == by_topic[swap.topic0] > 0
    # The backfill's RPC counters were recorded durably; no errors, no reorgs.
    assert st.rpc_requests["eth_getLogs"] >= 2 and st.rpc_requests["eth_getBlockByNumber"] >= 2
    assert st.rpc_errors == {} and st.rpc_error_rate == 0.0
    assert st.reorgs_total == 0 and st.last_reorg is None and st.active_reorg_id is None

    # `indexer status --json` says the same.
    out = run_cli("status", "--json", env=b.env).stdout
    b.outputs.append(out)
    (js,) = json.loads(out)
    assert js["chain"] == "devnet" and js["indexed_head"] == 49 and js["node_head"] == st.node_head
    assert js["lag_blocks"] == st.lag_blocks and js["missing_partitions"] == st.missing_partitions
    assert js["partitions"] == st.partitions and js["rows"] == st.rows and js["rpc_requests"] == st.rpc_requests


def parse_metrics(text: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def check_metrics(values: dict, st) -> None:
    ch = (("chain", "devnet"),)
    assert values[("indexer_blocks_behind_head", ch)] == st.lag_blocks
    assert values[("indexer_seconds_behind_head", ch)] == st.lag_seconds
    assert values[("indexer_indexed_head_block", ch)] == 49 and values[("indexer_node_up", ch)] == 1
    assert values[("indexer_node_head_block", ch)] == st.node_head
    assert values[("indexer_confirmed_head_block", ch)] == st.confirmed_head
    assert values[("indexer_partitions", (("chain", "devnet"), ("state", "missing")))] == len(st.missing_partitions)
    assert values[("indexer_partitions", (("chain", "devnet"), ("state", "done")))] == 2
    assert values[("indexer_reorgs_total", ch)] == 0 and values[("indexer_reorg_max_depth", ch)] == 0
    for method, n in st.rpc_requests.items():
        assert values[("indexer_rpc_requests_total", (("chain", "devnet"), ("method", method)))] == n
    for table, n in st.rows.items():
        assert values[("indexer_rows", (("chain", "devnet"), ("table", table)))] == n


@pytest.mark.slow
def test_prometheus_metrics_textfile_and_http(backfilled, tmp_path):
    b = backfilled
    st = gather_status(b.cfg)
    text = metrics.render(b.cfg)
    b.outputs.append(text)
    check_metrics(parse_metrics(text), st)

    prom = tmp_path / "indexer.prom"
    run_cli("metrics", "--textfile", str(prom), env=b.plain_env)
    check_metrics(parse_metrics(prom.read_text()), st)
    b.outputs.append(prom.read_text())

    port = free_port()
    server = subprocess.Popen([*INDEXER, "metrics", "--port", str(port), "--host", "127.0.0.1"], env=b.plain_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                    body = resp.read().decode()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "metrics server did not start"
                time.sleep(0.3)
        check_metrics(parse_metrics(body), st)
        b.outputs.append(body)
    finally:
        server.terminate()
        out, err = server.communicate(timeout=30)
        b.outputs += [out, err]


@pytest.mark.slow
def test_unreachable_node_is_reported_not_raised(backfilled):
    b = backfilled
    st = gather_status(b.bad_cfg, timeout_s=2)
    assert not st.node_reachable and st.node_head is None and "connection" in st.node_error
    assert KEY not in st.node_error
    # What the lake holds is still reported; the lag is unknown.
    assert st.indexed_head == 49 and st.lag_blocks is None and st.partitions["done"] == 2
    human = run_cli("status", "--config", str(b.bad_path), env=b.plain_env)
    b.outputs += [human.stdout, human.stderr]
    assert "unreachable: " in human.stdout and "connection failed" in human.stdout, human.stdout
    assert "│ 49 (head recorded" in human.stdout and "2 of 2 done" in human.stdout
    values = parse_metrics(metrics.render(b.bad_cfg))
    assert values[("indexer_node_up", (("chain", "devnet"),))] == 0


@pytest.mark.slow
def test_no_secret_is_ever_logged(backfilled, caplog):
    """Backfill, live ticks and failures with the key in the RPC URL: no log line, CLI output or Dagster
    event carries it (and the key was really used: the proxy refuses requests without it)."""
    b = backfilled
    caplog.set_level(logging.DEBUG, logger="indexer_dagster")
    # Live ticks through the proxy (into a data dir of their own: the follower writes the head block).
    live_cfg = load_config(write_config(b.path.parent / "live.yaml", "HEALTH_RPC_URL", 31337, b.deployment,
                                        "live_data", blocks_per_partition=25, confirmations=5))
    store = open_state(live_cfg.state_url)
    ticks = []
    stats = asyncio.run(Follower(live_cfg, store).run(lambda: len(ticks) >= 3, poll_s=0.05, on_tick=ticks.append))
    assert stats.ticks == 3
    store.close()
    # A failing node whose URL carries the key: the follower, a range sync, and the CLI.
    store = open_state(b.bad_cfg.state_url)
    with pytest.raises(Exception):  # noqa: B017 - any error: the point is that the URL is not in it
        asyncio.run(Follower(b.bad_cfg, store).run(lambda: False, poll_s=0.05))
    store.close()
    with pytest.raises(Exception):  # noqa: B017 - any error: the point is that the URL is not in it
        sync_range(b.bad_cfg, ranges_between(50, 60, 25)[0])
    bad = run_cli("backfill", "--config", str(b.bad_path), env=b.env, check=False)
    assert bad.returncode != 0 and "did not answer" in bad.stdout + bad.stderr
    b.outputs += [bad.stdout, bad.stderr]

    # Positive controls: the key was used, logs were written, and they carry their context.
    assert b.proxy.with_key > 10 and b.proxy.refused == 0
    ours = [r for r in caplog.records if r.name.startswith("indexer_dagster")]
    assert any(r.getMessage().startswith("following the head") for r in ours)
    assert any("live sync stopped" in r.getMessage() for r in ours)
    assert any("failed" in r.getMessage() and getattr(r, "range", None) for r in ours)
    assert all(getattr(r, "chain", None) == "devnet" for r in ours if r.name.startswith("indexer_dagster.sync"))
    json_lines = [json.loads(line) for line in b.outputs[1].splitlines() if line.startswith("{")]
    ranged = [line for line in json_lines if line.get("range") == "000000000025-000000000049"]
    assert ranged and all(line["chain"] == "devnet" and line.get("run_id") for line in ranged)

    # The key appears nowhere.
    texts = [caplog.text, *[JsonFormatter().format(r) for r in ours], *b.outputs]
    assert not [t for t in texts if KEY in t]
    instance = dg.DagsterInstance.from_config(str(b.home))
    runs = instance.get_runs()
    assert runs
    from dagster._serdes import serialize_value

    for run in runs:
        for entry in instance.all_logs(run.run_id):
            assert KEY not in serialize_value(entry)
    instance.dispose()
    # The lake's own files (RPC counters, head) hold no key either.
    for p in (b.cfg.data_dir / "devnet" / "_meta").iterdir():
        if p.is_file():
            assert KEY.encode() not in p.read_bytes()
    assert pl.read_parquet(b.cfg.data_dir / "devnet" / "_meta" / "head.parquet").height == 1
