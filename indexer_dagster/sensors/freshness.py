"""The freshness sensor: is the index keeping up with the node, and does the node answer?

Every ~30 s it gathers the chain's status (`health.status`), and `health.alerts.watch` decides: alert
once when the indexed head falls more than `alerts.max_lag_blocks` / `max_lag_seconds` behind, once
when the node keeps failing (or most RPC requests fail), and once when either clears. What was already
alerted lives in the sensor's cursor, so a daemon restart does not repeat an alert.
"""

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from indexer_dagster.block_range import parse_key, ranges_between
from indexer_dagster.config import IndexerConfig
from indexer_dagster.health.alerts import WatchState, send_alert, watch
from indexer_dagster.health.logs import get_logger, log_context, register_config, scrub
from indexer_dagster.health.status import gather_status
from indexer_dagster.jobs.names import historical_job_name
from indexer_dagster.resources import IndexerConfigResource

log = get_logger(__name__)
PARTITION_TAG = "dagster/partition"
FINISHED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]


def freshness_sensor_name(chain: str) -> str:
    return f"{chain}_freshness"


def run_partitions(tags: dict, width: int) -> list[str]:
    """The range keys a historical run covered: its partition tag, or its range start..end tags."""
    if tags.get(PARTITION_TAG):
        return [tags[PARTITION_TAG]]
    start, end = tags.get(ASSET_PARTITION_RANGE_START_TAG), tags.get(ASSET_PARTITION_RANGE_END_TAG)
    if not (start and end):
        return []
    try:
        return [r.key for r in ranges_between(parse_key(start).start, parse_key(end).end, width)]
    except ValueError:
        return []


def failed_partitions(instance: dg.DagsterInstance, cfg: IndexerConfig, limit: int = 1000) -> list[str]:
    """Range keys whose latest finished historical run failed (a later success or a file clears them)."""

    runs = instance.get_runs(
        dg.RunsFilter(job_name=historical_job_name(cfg.chain.name), statuses=FINISHED), limit=limit)  # newest first
    seen: set[str] = set()
    failed: list[str] = []
    for run in runs:
        for key in run_partitions(dict(run.tags), cfg.chain.blocks_per_partition):
            if key not in seen:
                seen.add(key)
                if run.status == dg.DagsterRunStatus.FAILURE:
                    failed.append(key)
    return sorted(failed)


def build_freshness_sensor(cfg: IndexerConfig):
    chain = cfg.chain.name

    @dg.sensor(
        name=freshness_sensor_name(chain),
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Alerts (once per breach) when the indexed head lags the node by more than "
                    "alerts.max_lag_blocks / max_lag_seconds, or when the node keeps failing.",
    )
    def freshness(context: dg.SensorEvaluationContext, indexer: IndexerConfigResource):
        cfg = indexer.for_chain(chain)
        register_config(cfg)
        with log_context(chain=chain):
            try:
                status = gather_status(cfg, failed_partitions(context.instance, cfg), rows=False)
            except Exception as e:  # noqa: BLE001 - report and try again next tick (the cursor stays)
                log.warning("status unavailable: %s", e)
                return dg.SkipReason(scrub(f"{chain}: status unavailable: {type(e).__name__}: {e}"))
            state, alerts = watch(cfg, status, WatchState.from_json(context.cursor))
            for alert in alerts:
                send_alert(cfg.alerts, alert)
        context.update_cursor(state.to_json())
        if not status.node_reachable:
            summary = f"node unreachable ({status.node_error}), indexed head {status.indexed_head}"
        else:
            summary = (f"node head {status.node_head}, indexed head {status.indexed_head}, {status.lag_blocks} blocks"
                       f"{f' / {status.lag_seconds:.0f} s' if status.lag_seconds is not None else ''} behind, "
                       f"{status.partitions['missing']} ranges missing")
        return dg.SkipReason(f"{chain}: {summary}; {len(alerts)} alert(s) sent")

    return freshness
