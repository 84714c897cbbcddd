"""Dagster definitions, built from the YAML config named by $INDEXER_CONFIG.

Everything here is a thin skin over plain modules (monitor, parse, persist, sync): assets say what
exists and in which partitions, resources say where the config lives.
"""

import dagster as dg

from indexer_dagster.assets.historical import build_historical_assets
from indexer_dagster.assets.partitions import block_ranges
from indexer_dagster.config import IndexerConfig, load_config
from indexer_dagster.resources import default_resources


def historical_job_name(chain: str) -> str:
    return f"{chain}_historical_sync"


def build_definitions(cfg: IndexerConfig) -> dg.Definitions:
    parts = block_ranges(cfg.chain.name)
    assets = build_historical_assets(cfg, parts)
    historical = dg.define_asset_job(
        historical_job_name(cfg.chain.name),
        selection=dg.AssetSelection.assets(*assets),
        executor_def=dg.in_process_executor,
        description="Backfill block ranges: headers and logs, then decoded events (several ranges per run).",
    )
    return dg.Definitions(assets=assets, jobs=[historical], resources=default_resources())


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(load_config())
