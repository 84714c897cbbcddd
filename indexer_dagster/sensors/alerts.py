"""Alert sensors: failed runs and failed asset checks go to the webhook (`health.alerts`).

One of each per code location (they watch every job and check of the location, whatever the chain).
Sending never raises, so a broken webhook cannot stop a sensor; every alert is also logged.
"""

import time

import dagster as dg
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

from indexer_dagster.config import IndexerConfig
from indexer_dagster.health.alerts import check_failed_alert, run_failure_alert, send_alert
from indexer_dagster.health.logs import register_config, scrub
from indexer_dagster.jobs.names import CHAIN_TAG
from indexer_dagster.resources import IndexerConfigResource

RUN_FAILURE_SENSOR = "indexer_run_failure_alerts"
CHECK_FAILURE_SENSOR = "indexer_check_failure_alerts"
FIRST_LOOKBACK_S = 3600       # a new check sensor reports failures of the last hour, not all history
MAX_EVENTS_PER_TICK = 50      # per check


def chain_of(cfg: IndexerConfig, job_name: str | None, tags: dict | None = None, asset_path: list[str] | None = None):
    """The chain a run or asset belongs to: its chain tag, else the chain prefix of its job or asset key."""
    names = [c.chain.name for c in cfg.chains]
    tag = (tags or {}).get(CHAIN_TAG)
    if tag in names:
        return tag
    if asset_path and asset_path[0] in names:
        return asset_path[0]
    for name in sorted(names, key=len, reverse=True):
        if job_name and job_name.startswith(f"{name}_"):
            return name
    return None


def error_messages(events) -> list[str]:
    """The innermost error message of each step failure (the cause a user can act on)."""
    out = []
    for ev in events:
        err = getattr(ev.event_specific_data, "error", None)
        while err is not None and err.cause is not None:
            err = err.cause
        if err is not None:
            out.append(scrub(err.message.strip()))
    return out


def build_alert_sensors(cfg: IndexerConfig) -> list:
    @dg.run_failure_sensor(
        name=RUN_FAILURE_SENSOR,
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=10,
        description="Posts every failed run (job, partition, first error) to alerts.webhook_url.",
    )
    def run_failure_alerts(context: dg.RunFailureSensorContext, indexer: IndexerConfigResource):
        cfg = indexer.config
        register_config(cfg)
        run = context.dagster_run
        alert = run_failure_alert(
            chain_of(cfg, run.job_name, dict(run.tags)), run.run_id, run.job_name,
            scrub(context.failure_event.message or ""), dict(run.tags),
            error_messages(context.get_step_failure_events()),
        )
        send_alert(cfg.alerts, alert)

    @dg.sensor(
        name=CHECK_FAILURE_SENSOR,
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=30,
        description="Posts every failed asset check evaluation to alerts.webhook_url.",
    )
    def check_failure_alerts(context: dg.SensorEvaluationContext, indexer: IndexerConfigResource):
        cfg = indexer.config
        register_config(cfg)
        # The asset-check execution index (one table with increasing ids, on SQLite and Postgres alike)
        # holds each evaluation; the cursor is the highest id already looked at.
        after = int(context.cursor) if context.cursor else None
        since = time.time() - FIRST_LOOKBACK_S
        keys = sorted(context.repository_def.asset_graph.asset_check_keys, key=str) if context.repository_def else []
        found = []
        for key in keys:
            for rec in context.instance.event_log_storage.get_asset_check_execution_history(
                key, limit=MAX_EVENTS_PER_TICK, status={AssetCheckExecutionRecordStatus.FAILED}
            ):  # newest first
                if after is not None and rec.id <= after:
                    break
                found.append(rec)
        top = max((r.id for r in found), default=after)
        fresh = sorted((r for r in found if after is not None or r.create_timestamp >= since), key=lambda r: r.id)
        for rec in fresh:
            ev = rec.event.dagster_event if rec.event is not None else None
            evaluation = ev.event_specific_data if ev is not None else None
            if ev is None or not isinstance(evaluation, dg.AssetCheckEvaluation) or evaluation.passed:
                continue
            path = list(evaluation.asset_key.path)
            send_alert(cfg.alerts, check_failed_alert(
                chain_of(cfg, ev.job_name, asset_path=path), evaluation.check_name, "/".join(path),
                rec.run_id, evaluation.partition or rec.partition, evaluation.severity.value, evaluation.description,
                {k: str(getattr(v, "value", v)) for k, v in (evaluation.metadata or {}).items()},
            ))
        if top is not None:
            context.update_cursor(str(top))
        return dg.SkipReason(f"{len(keys)} checks looked at, {len(fresh)} new failures alerted")

    return [run_failure_alerts, check_failure_alerts]
