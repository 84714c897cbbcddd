"""The long-running DEX run: keeps the DEX tables at the indexed tip, one run per half hour instead of
one run per new block (each paying a process start and adding a run to the instance's history).

A thin skin over `dex.build`: it derives the new blocks when the tip or the reorg epoch moved, never while a reorg is
being repaired or the chain is halted, and materializes the DEX assets every `report_seconds` with the
latest build's figures (not per build: at a block a second that would be thousands of events an hour).
"""

import time

import dagster as dg

from indexer_dagster.chain.fetch import ForkChanged
from indexer_dagster.config import IndexerConfig
from indexer_dagster.dex.build import DexResult, build_dex
from indexer_dagster.dex.incremental import table_rows
from indexer_dagster.health.logs import bind
from indexer_dagster.jobs.names import CHAIN_TAG, DEX_ROLE, ROLE_TAG, SINGLETON_TAG, dex_follow_job_name
from indexer_dagster.persist.datasets import DEX_TABLES
from indexer_dagster.persist.lake import open_lake
from indexer_dagster.resources import IndexerConfigResource, StateStoreResource
from indexer_dagster.state import ChainHalted
from indexer_dagster.sync.realtime import run_lease


class DexFollowConfig(dg.Config):
    minutes: float = 30.0  # the run ends after this long; the sensor starts the next one
    poll_seconds: float = 1.0
    report_seconds: float = 60.0


def build_dex_follow_job(cfg: IndexerConfig) -> dg.JobDefinition:
    chain = cfg.chain.name

    @dg.op(name=f"{chain}_keep_dex_current",
           description="Derive the DEX tables of each new block as the indexed tip moves; pause during reorgs.")
    def keep_dex_current(context: dg.OpExecutionContext, config: DexFollowConfig, indexer: IndexerConfigResource,
                         state: StateStoreResource):
        cfg = indexer.for_chain(chain)
        bind(run_id=context.run_id, chain=chain)
        store = state.store
        deadline = time.monotonic() + config.minutes * 60
        built_for: tuple | None = None
        pending: tuple[DexResult, int, str] | None = None  # the latest build not yet reported
        last_report = time.monotonic()
        builds = 0
        # The run's lease for its whole life: the chain-head sensor fails a started run whose lease
        # it does not see (its process died with the daemon) and starts the next one.
        with store.writer_lock(run_lease(context.run_id), timeout_s=60):
            while time.monotonic() < deadline:
                tip = store.tip(chain)
                now_at = (tip.number, tip.hash, store.reorg_epoch(chain)) if tip is not None else None
                idle = (now_at is None or now_at == built_for or store.active_reorg(chain) is not None
                        or store.halted(chain) is not None)
                if not idle:
                    assert tip is not None and now_at is not None
                    try:
                        res = build_dex(cfg, store=store, count_rows=False)  # counted when reported
                    except (ForkChanged, ChainHalted) as e:
                        context.log.info(f"{chain}: DEX build at tip {tip.number} not published ({e}); again")
                    else:
                        built_for, pending, builds = now_at, (res, tip.number, tip.hash), builds + 1
                if pending is not None and time.monotonic() - last_report > config.report_seconds:
                    _report(context, cfg, *pending, builds)
                    pending, last_report, builds = None, time.monotonic(), 0
                time.sleep(config.poll_seconds)
        if pending is not None:
            _report(context, cfg, *pending, builds)

    @dg.job(
        name=dex_follow_job_name(chain), executor_def=dg.in_process_executor,
        tags={CHAIN_TAG: chain, ROLE_TAG: DEX_ROLE, SINGLETON_TAG: f"{DEX_ROLE}-{chain}"},
        description="The long-running DEX run: the DEX tables follow the indexed tip (the sensor keeps one alive).",
    )
    def dex_follow():
        keep_dex_current()

    return dex_follow


def _report(context: dg.OpExecutionContext, cfg: IndexerConfig, res: DexResult, tip: int, tip_hash: str,
            builds: int) -> None:
    chain = cfg.chain.name
    res.rows = table_rows(open_lake(cfg))
    context.log.info(f"{chain}: DEX tables at tip {tip} ({builds} updates since the last report, the last in "
                     f"{res.seconds:.2f} s): " + ", ".join(f"{t} {res.rows.get(t, 0)}" for t in DEX_TABLES))
    for table in DEX_TABLES:
        context.log_event(dg.AssetMaterialization(
            asset_key=dg.AssetKey([chain, "dex", table]), description=f"kept current by the DEX run at tip {tip}",
            metadata={"dagster/row_count": res.rows.get(table, 0), "tip": tip, "tip_hash": tip_hash,
                      "seconds": round(res.seconds, 3), "updates": builds}))
