"""Webhook alerts, received by a real local HTTP receiver: delivery with retries, the decisions, and the
Dagster sensors for a failed run, a failed asset check, a freshness breach, a failing RPC and a deep reorg.
No secret (RPC key, webhook token) ever reaches a payload or a log line."""

import asyncio
import json
import logging
from datetime import UTC
from pathlib import Path

import dagster as dg
import pytest
import yaml

from indexer_dagster.block_range import ranges_between
from indexer_dagster.chain.rpc import rpc_client
from indexer_dagster.config import AlertsConfig, load_config
from indexer_dagster.devnet import Anvil, build_devnet, write_config
from indexer_dagster.devnet.anvil import free_port
from indexer_dagster.devnet.uniswap import reorg as anvil_reorg
from indexer_dagster.health import alerts as A
from indexer_dagster.health.metrics import render
from indexer_dagster.health.status import ChainStatus, gather_status
from indexer_dagster.resources import IndexerConfigResource
from indexer_dagster.sensors.alerts import CHECK_FAILURE_SENSOR, RUN_FAILURE_SENSOR, build_alert_sensors
from indexer_dagster.sensors.freshness import build_freshness_sensor
from indexer_dagster.state import Phase, Reorg, open_state
from indexer_dagster.sync.historical import sync_range
from indexer_dagster.sync.range_checks import CHECKS
from indexer_dagster.sync.realtime import Follower
from tests.support.webhook import TOKEN, Receiver

KEY = "SECRETKEY123"


def add_alerts(path: Path, webhook: str, chain: dict | None = None, **alerts) -> Path:
    doc = yaml.safe_load(path.read_text())
    doc["alerts"] = {"webhook_url": webhook, **alerts}
    doc["chain"].update(chain or {})
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def tiny_config(tmp_path: Path, rpc_url: str, webhook: str, **alerts) -> Path:
    """A config needing no chain: one ERC-20 Transfer event of one address."""
    abi = [{"type": "event", "name": "Transfer", "anonymous": False, "inputs": [
        {"name": "from", "type": "address", "indexed": True}, {"name": "to", "type": "address", "indexed": True},
        {"name": "value", "type": "uint256", "indexed": False}]}]
    (tmp_path / "erc20.json").write_text(json.dumps(abi))
    doc = {
        "chain": {"name": "devnet", "chain_id": 31337, "rpc_url": rpc_url, "max_retries": 0, "request_timeout_s": 2,
                  "confirmations": 2},
        "contracts": [{"name": "Token", "abi": "erc20.json", "addresses": ["0x" + "11" * 20]}],
        "storage": {"data_dir": "data"},
        "alerts": {"webhook_url": webhook, **alerts},
    }
    path = tmp_path / "indexer.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def resources(path: Path) -> dict:
    return {"indexer": IndexerConfigResource(config_path=str(path))}


def no_secret(*things) -> None:
    text = json.dumps(things, default=str)
    assert KEY not in text and TOKEN not in text


# --- delivery --------------------------------------------------------------------------------------------------

def test_webhook_retries_with_backoff_then_delivers(caplog):
    r = Receiver(fail_first=2)
    try:
        sleeps: list[float] = []
        alert = A.Alert(A.FRESHNESS, "behind", chain="devnet", severity="warning", details={"lag_blocks": 60})
        assert A.send_alert(AlertsConfig(webhook_url=r.url, max_attempts=4), alert, sleep=sleeps.append)
        assert len(r.attempts) == 3 and len(sleeps) == 2 and all(0 < s <= 8 for s in sleeps)
        (body,) = r.alerts
        assert body["kind"] == "freshness" and body["chain"] == "devnet" and body["details"] == {"lag_blocks": 60}
        assert body["text"].startswith("[indexer/devnet] WARNING behind") and r.attempts[0]["path"] == f"/hooks/{TOKEN}"
    finally:
        r.server.shutdown()
        r.server.server_close()
    assert "alert freshness (devnet): behind" in caplog.text  # always logged too


def test_webhook_failures_never_raise_and_never_log_the_token(caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="indexer_dagster")
    r = Receiver(fail_first=100, fail_status=404)
    try:
        # A refused request (4xx) is not retried.
        assert not A.send_alert(AlertsConfig(webhook_url=r.url, max_attempts=4), A.Alert(A.RUN_FAILURE, "x"),
                                sleep=lambda s: None)
        assert len(r.attempts) == 1
    finally:
        r.server.shutdown()
        r.server.server_close()
    dead = f"http://127.0.0.1:{free_port()}/hooks/{TOKEN}?token={TOKEN}"
    assert not A.send_alert(AlertsConfig(webhook_url=dead, max_attempts=3), A.Alert(A.RUN_FAILURE, "y"),
                            sleep=lambda s: None)
    assert "not delivered to the webhook http://127.0.0.1" in caplog.text and "after 3 attempt(s)" in caplog.text
    assert TOKEN not in caplog.text
    # A secret of the config in an alert's text is scrubbed from the payload.
    cfg = load_config(tiny_config(tmp_path, f"http://127.0.0.1:1/v2/{KEY}", dead))
    from indexer_dagster.health.logs import register_config

    register_config(cfg)
    payload = A.Alert(A.RUN_FAILURE, f"error calling {cfg.chain.rpc_url}", details={"e": KEY}).payload()
    no_secret(payload, caplog.text)


# --- decisions -------------------------------------------------------------------------------------------------

def test_watch_alerts_once_per_breach_and_once_when_it_clears(tmp_path):
    cfg = load_config(tiny_config(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2/x", max_lag_blocks=10,
                                  max_lag_seconds=600, rpc_failures=2))

    def st(lag=0, lag_s=0.0, up=True, requests=100, errors=0):
        return ChainStatus("devnet", 31337, 0, 2, node_reachable=up, node_error=None if up else "refused",
                           node_head=100 if up else None, lag_blocks=lag if up else None, lag_seconds=lag_s if up else None,
                           rpc_requests={"eth_getLogs": requests}, rpc_errors={"eth_getLogs:transient": errors})

    state, kinds = A.WatchState(), []
    for s in [st(5), st(11), st(30), st(lag_s=601), st(3), st(3)]:
        state, out = A.watch(cfg, s, state)
        kinds.append([a.kind for a in out])
    assert kinds == [[], ["freshness"], [], [], ["freshness_recovered"], []]
    # The node not answering: alerted after `rpc_failures` checks in a row, once; then its recovery.
    for s, want in [(st(up=False), []), (st(up=False), ["rpc_failing"]), (st(up=False), []), (st(), ["rpc_recovered"])]:
        state, out = A.watch(cfg, s, state)
        assert [a.kind for a in out] == want
    # Most of the indexer's own requests failing counts too; range-too-large answers do not.
    state, _ = A.watch(cfg, st(requests=200, errors=0), state)
    for _ in range(2):
        state, out = A.watch(cfg, st(requests=state.seen_requests + 40, errors=state.seen_errors + 30), state)
    assert [a.kind for a in out] == ["rpc_failing"] and "30 of the indexer's last 40" in out[0].summary
    s = st(requests=state.seen_requests + 40, errors=state.seen_errors)
    s.rpc_errors["eth_getLogs:range_too_large"] = 40
    state, out = A.watch(cfg, s, state)
    assert [a.kind for a in out] == ["rpc_recovered"]
    # The state survives a cursor round trip.
    assert A.WatchState.from_json(state.to_json()) == state and A.WatchState.from_json("garbage") == A.WatchState()


def test_deep_reorg_decision(tmp_path):
    from datetime import datetime

    cfg = load_config(tiny_config(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2/x"))  # confirmations 2
    now = datetime.now(UTC)

    def reorg(depth):
        return Reorg(7, "devnet", now, 100, "0xa", depth, 100 + depth, "0xb", 100 + depth, "0xc", [], Phase.DETECTED,
                     ["000000000100-000000000199"], {}, True, now, None)

    assert A.deep_reorg_alert(cfg, reorg(2)) is None
    alert = A.deep_reorg_alert(cfg, reorg(3))
    assert alert.kind == "deep_reorg" and alert.details["depth"] == 3 and alert.details["fork_block"] == 100
    assert "rows that were `confirmed`" in alert.summary


# --- Dagster sensors -------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_run_failure_sensor_posts_a_failed_run(tmp_path, receiver, monkeypatch):
    """A live-sync run against an unreachable node (its URL carries a key) fails; the real sensor posts it."""
    from indexer_dagster.definitions import build_definitions

    path = tiny_config(tmp_path, f"http://127.0.0.1:{free_port()}/v2/{KEY}?apikey={KEY}", receiver.url)
    monkeypatch.setenv("INDEXER_CONFIG", str(path))
    cfg = load_config(path)
    defs = build_definitions(cfg)
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("devnet_live_sync").execute_in_process(instance=instance, raise_on_error=False)
        assert not result.success
        sensor = next(s for s in defs.sensors if s.name == RUN_FAILURE_SENSOR)
        context = dg.build_run_status_sensor_context(
            sensor_name=RUN_FAILURE_SENSOR, dagster_event=result.get_run_failure_event(), dagster_instance=instance,
            dagster_run=result.dagster_run, resources=resources(path))
        sensor(context)
        events = [e for run in instance.get_runs() for e in instance.all_logs(run.run_id)]
        from dagster._serdes import serialize_value

        assert events and not [e for e in events if KEY in serialize_value(e)]
    (alert,) = receiver.alerts
    assert alert["kind"] == "run_failure" and alert["chain"] == "devnet" and alert["severity"] == "error"
    assert alert["details"]["run_id"] == result.run_id and alert["details"]["job"] == "devnet_live_sync"
    assert "connection failed" in alert["details"]["errors"][0] and result.run_id[:8] in alert["summary"]
    no_secret(alert)


@pytest.mark.slow
def test_check_failure_sensor_posts_each_failed_check_once(tmp_path, receiver):
    path = tiny_config(tmp_path, "http://127.0.0.1:1", receiver.url)

    @dg.asset(key=["devnet", "blocks"])
    def blocks():
        return 1

    @dg.asset_check(asset=blocks, name="parent_hash_chain")
    def chained():
        return dg.AssetCheckResult(passed=False, description="block 12's parent hash is not block 11's hash",
                                   metadata={"first_bad_block": 12})

    @dg.asset_check(asset=blocks, name="row_count")
    def rows():
        return dg.AssetCheckResult(passed=True)

    sensor = next(s for s in build_alert_sensors(load_config(path)) if s.name == CHECK_FAILURE_SENSOR)
    defs = dg.Definitions(assets=[blocks], asset_checks=[chained, rows], sensors=[sensor], resources=resources(path))

    def tick(instance, cursor):
        return sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs,
                                                            resources=resources(path)))

    with dg.instance_for_test() as instance:
        assert "0 new failures" in tick(instance, None).skip_message  # nothing evaluated yet
        dg.materialize([blocks, chained, rows], instance=instance, raise_on_error=False)
        first = tick(instance, None)
        assert first.cursor and "1 new failures alerted" in first.skip_message
        again = tick(instance, first.cursor)
        assert "0 new failures" in again.skip_message and again.cursor == first.cursor
    (alert,) = receiver.alerts
    assert alert["kind"] == "asset_check_failed" and alert["chain"] == "devnet"
    assert alert["details"]["check"] == "parent_hash_chain" and alert["details"]["asset"] == "devnet/blocks"
    assert "parent hash" in alert["summary"] and alert["details"]["metadata"] == {"first_bad_block": "12"}


def evaluate(sensor, instance, path, cursor):
    tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources(path)))
    return tick.cursor


@pytest.mark.slow
def test_freshness_sensor_alerts_once_per_breach(devnet, tmp_path, receiver):
    node, deployment = devnet
    path = add_alerts(write_config(tmp_path / "indexer.yaml", node.url, 31337, deployment, "data",
                                   blocks_per_partition=25, confirmations=5),
                      receiver.url, max_lag_blocks=10, max_lag_seconds=86400)
    cfg = load_config(path)
    sensor = build_freshness_sensor(cfg)
    with dg.instance_for_test() as instance:
        cursor = evaluate(sensor, instance, path, None)      # nothing indexed yet: far behind
        cursor = evaluate(sensor, instance, path, cursor)    # still behind: no second alert
        assert receiver.kinds() == ["freshness"]
        first = receiver.alerts[0]
        assert first["details"]["indexed_head"] is None and first["details"]["lag_blocks"] == first["details"]["node_head"] + 1
        for r in ranges_between(0, node.block_number(), 25):
            sync_range(cfg, r)
        cursor = evaluate(sensor, instance, path, cursor)
        assert receiver.kinds() == ["freshness", "freshness_recovered"]
        assert receiver.alerts[1]["details"]["lag_blocks"] == 0
        evaluate(sensor, instance, path, cursor)
        assert len(receiver.alerts) == 2


@pytest.mark.slow
def test_freshness_sensor_alerts_when_the_rpc_keeps_failing(tmp_path, receiver, caplog):
    path = tiny_config(tmp_path, f"http://127.0.0.1:{free_port()}/v2/{KEY}?apikey={KEY}", receiver.url,
                       rpc_failures=2)
    sensor = build_freshness_sensor(load_config(path))
    with dg.instance_for_test() as instance:
        cursor = evaluate(sensor, instance, path, None)
        assert receiver.alerts == []
        cursor = evaluate(sensor, instance, path, cursor)
        evaluate(sensor, instance, path, cursor)
    (alert,) = receiver.alerts
    assert alert["kind"] == "rpc_failing" and alert["details"]["consecutive_failures"] == 2
    assert "connection failed" in alert["summary"]
    no_secret(alert, caplog.text)


def follow_until_synced(cfg, store, max_ticks=50):
    """Tick the follower until its tip is the node's head, or a reorg is recorded; the last tick's result."""
    async def go():
        f = Follower(cfg, store)
        async with rpc_client(cfg) as rpc:
            await f.seed(rpc)
            for _ in range(max_ticks):
                res = await f.tick(rpc)
                if res.action == "reorg" or (res.action == "idle" and res.tip == int(await rpc.call("eth_blockNumber"), 16)):
                    return res
        raise AssertionError(f"the follower did not reach the head: {res}")
    return asyncio.run(go())


@pytest.mark.slow
def test_deep_reorg_is_posted_by_the_reorg_job(tmp_path, receiver, monkeypatch):
    """A real reorg of depth 4 > confirmations 2 on a fresh anvil: detected by the follower, repaired by the
    reorg job, which posts it; `status` and the metrics then show it."""
    from indexer_dagster.definitions import build_definitions

    node = Anvil(chain_id=31337).start()
    try:
        dep = build_devnet(node, blocks=8, txs_per_block=4, seed=5)
        path = add_alerts(write_config(tmp_path / "indexer.yaml", node.url, 31337, dep, "data",
                                       blocks_per_partition=10, confirmations=2), receiver.url)
        monkeypatch.setenv("INDEXER_CONFIG", str(path))
        cfg = load_config(path)
        for r in ranges_between(0, node.block_number(), 10):
            sync_range(cfg, r)
        store = open_state(cfg.state_url)
        follow_until_synced(cfg, store)
        head = node.block_number()
        anvil_reorg(node.url, dep, depth=4, txs_per_block=3, seed=42)
        assert follow_until_synced(cfg, store).action == "reorg"
        detected = store.active_reorg("devnet")
        assert detected.depth == 4 and detected.common_ancestor == head - 4
        store.close()
        job = build_definitions(cfg).resolve_job_def("devnet_reorg")
        with dg.instance_for_test() as instance:
            result = job.execute_in_process(
                instance=instance, run_config={"ops": {"devnet_repair_reorg": {"config": {"reorg_id": detected.id}}}})
            assert result.success
            # The restored ranges' range checks are reported as the historical assets' check results.
            restored = {m.partition for m in result.asset_materializations_for_node("devnet_repair_reorg")
                        if m.partition}  # the ranges (the ledger and archive assets have none)
            evaluations = result.get_asset_check_evaluations()
            assert restored and evaluations and all(e.passed for e in evaluations)
            assert {(e.partition, e.check_name) for e in evaluations} == {(k, n) for k in restored for n in CHECKS}
    finally:
        node.stop()
    (alert,) = receiver.alerts
    assert alert["kind"] == "deep_reorg" and alert["chain"] == "devnet"
    d = alert["details"]
    assert (d["reorg_id"], d["depth"], d["fork_block"], d["confirmations"]) == (detected.id, 4, head - 4, 2)
    assert d["old_head_hash"] == detected.old_head_hash and d["new_head_hash"] == detected.new_head_hash
    st = gather_status(cfg, probe=False)
    assert st.reorgs_total == 1 and st.reorg_max_depth == 4
    assert (st.last_reorg.id, st.last_reorg.fork_block, st.last_reorg.depth, st.last_reorg.phase) == (
        detected.id, head - 4, 4, "done")
    text = render(cfg)
    assert 'indexer_reorg_max_depth{chain="devnet"} 4.0' in text and 'indexer_reorgs_total{chain="devnet"} 1.0' in text
