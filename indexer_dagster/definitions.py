"""Dagster definitions, built from the YAML config named by $INDEXER_CONFIG.

Everything here is a thin skin over plain modules (chain, parse, persist, sync, dex): assets say what
exists and in which partitions, resources say where the config lives.
"""

import dagster as dg

from indexer_dagster.assets.ranges import block_ranges, build_historical_assets, raw_keys
from indexer_dagster.config import IndexerConfig, load_config
from indexer_dagster.dex.assets import build_dex_assets
from indexer_dagster.dex.build import enabled as dex_enabled
from indexer_dagster.health.logs import configure_logging
from indexer_dagster.jobs.dex_follow import build_dex_follow_job
from indexer_dagster.jobs.live import build_live_jobs, reorg_asset_specs
from indexer_dagster.jobs.names import dex_follow_job_name, dex_job_name, historical_job_name
from indexer_dagster.resources import default_resources
from indexer_dagster.sensors.alerts import build_alert_sensors
from indexer_dagster.sensors.chain_head import build_chain_head_sensor
from indexer_dagster.sensors.freshness import build_freshness_sensor


def build_definitions(cfg: IndexerConfig) -> dg.Definitions:
    """Definitions of every chain in the config: each has its own partitions, jobs and sensor."""
    per_chain = [_chain_definitions(c) for c in cfg.chains]
    return dg.Definitions(
        assets=[a for assets, _, _ in per_chain for a in assets],
        jobs=[j for _, jobs, _ in per_chain for j in jobs],
        sensors=[s for _, _, sensors in per_chain for s in sensors] + build_alert_sensors(cfg),
        resources=default_resources(),
    )


def _chain_definitions(cfg: IndexerConfig) -> tuple[list, list, list]:
    parts = block_ranges(cfg.chain.name)
    assets = build_historical_assets(cfg, parts)
    historical = dg.define_asset_job(
        historical_job_name(cfg.chain.name),
        selection=dg.AssetSelection.assets(*assets),
        executor_def=dg.in_process_executor,
        description="Backfill block ranges: headers and logs, then decoded events (several ranges per run).",
    )
    historical_keys = [*raw_keys(cfg.chain.name), *[dg.AssetKey([cfg.chain.name, s.table]) for _, s in cfg.all_specs()]]
    live_jobs: list = build_live_jobs(cfg, historical_keys)  # plus the DEX asset job (an unresolved job)
    if dex_enabled(cfg):
        dex_assets = build_dex_assets(cfg)
        assets = [*assets, *dex_assets]
        live_jobs.append(build_dex_follow_job(cfg))
        live_jobs.append(dg.define_asset_job(
            dex_job_name(cfg.chain.name), selection=dg.AssetSelection.assets(*dex_assets),
            executor_def=dg.in_process_executor, tags={"indexer/singleton": f"dex-{cfg.chain.name}"},
            description="Recompute the DEX tables from the canonical events (by hand; live, the DEX run keeps them).",
        ))
    assert parts.name is not None  # block_ranges names its partitions
    sensor = build_chain_head_sensor(
        cfg, [historical, *live_jobs], historical_job_name(cfg.chain.name), parts.name,
        dex_job_name(cfg.chain.name) if dex_enabled(cfg) else None,
        dex_follow_job_name(cfg.chain.name) if dex_enabled(cfg) else None,
    )
    assets = [*assets, *reorg_asset_specs(cfg.chain.name)]
    return assets, [historical, *live_jobs], [sensor, build_freshness_sensor(cfg)]


@dg.definitions
def defs() -> dg.Definitions:
    configure_logging()  # the indexer's own log lines to stderr (captured per run), text or JSON
    return build_definitions(load_config())
