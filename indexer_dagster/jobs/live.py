"""Live sync and reorg jobs: thin Dagster skins over `sync.realtime` and `sync.repair`."""

import threading
import time

import dagster as dg

from indexer_dagster.assets.ranges import block_ranges, check_asset, check_evaluation
from indexer_dagster.chain.fetch import ForkChanged
from indexer_dagster.config import IndexerConfig
from indexer_dagster.health.alerts import deep_reorg_alert, send_alert
from indexer_dagster.health.logs import bind
from indexer_dagster.jobs.names import (
    CHAIN_TAG,
    LIVE_ROLE,
    REORG_ID_TAG,
    REORG_ROLE,
    ROLE_TAG,
    SINGLETON_TAG,
    live_job_name,
    reorg_job_name,
)
from indexer_dagster.persist.catalog import build_catalog
from indexer_dagster.resources import IndexerConfigResource, StateStoreResource, default_resources
from indexer_dagster.state import Phase
from indexer_dagster.sync.live_report import Written, range_reports
from indexer_dagster.sync.realtime import Follower, run_lease
from indexer_dagster.sync.repair import repair

_FORK_ATTEMPTS = 5  # a repair whose fork keeps changing is retried in the run before it fails


def _repair_reporting_forks(context, cfg, store, reorg_id: int, restored: list[str]):
    """`repair`, its phases logged as what they did; a fork that changes under it (expected on a live
    chain) is an info line and another attempt, not a failure with a traceback."""
    for attempt in range(1, _FORK_ATTEMPTS + 1):
        try:
            return repair(cfg, store, reorg_id, on_partition=restored.append,
                          on_report=lambda line: context.log.info(f"reorg {reorg_id}: {line}"))
        except ForkChanged as e:
            if attempt == _FORK_ATTEMPTS:
                raise
            context.log.info(f"reorg {reorg_id}: the chain changed under the repair ({e}); attempt "
                             f"{attempt + 1} of {_FORK_ATTEMPTS} in 1 s")
            time.sleep(1.0)
    raise AssertionError("unreachable")


IN_PROGRESS = [
    dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
]
LAUNCHED_BY_TAG = "indexer/launched_by"


class FollowConfig(dg.Config):
    minutes: float = 30.0  # the run ends after this long; the sensor starts the next one
    poll_seconds: float = 0.25
    log_seconds: float = 30.0  # a log line saying what the polls since the last one wrote
    report_seconds: float = 60.0  # the range partitions the follower filled get a materialization
    # The follower, which sees a fork first, runs the reorg job at once in its own process (a run in the
    # UI like any other) rather than waiting for the sensor's tick and a new process: seconds sooner.
    repair_in_process: bool = True


def repair_now(context: dg.OpExecutionContext, chain: str, reorg_id: int, reorg_job: dg.JobDefinition) -> None:
    """Run the reorg job for `reorg_id` in this process, unless a run of it is already in progress. The
    chain-head sensor stays the supervisor: if this process dies mid-repair, the run's lease goes with
    it, the sensor fails the run and launches the next attempt the usual way."""
    instance = context.instance
    if instance.get_runs(dg.RunsFilter(job_name=reorg_job.name, statuses=IN_PROGRESS,
                                       tags={REORG_ID_TAG: str(reorg_id)}), limit=1):
        return
    done: dict = {}

    def run() -> None:  # in a thread: the repair runs event loops of its own
        done["result"] = reorg_job.execute_in_process(
            run_config={"ops": {f"{chain}_repair_reorg": {"config": {"reorg_id": reorg_id}}}},
            instance=instance, resources=default_resources(), raise_on_error=False,
            tags={REORG_ID_TAG: str(reorg_id), LAUNCHED_BY_TAG: "follower"})

    worker = threading.Thread(target=run, name=f"reorg-{reorg_id}")
    worker.start()
    worker.join()
    result = done.get("result")
    if result is not None:
        outcome = "repaired" if result.success else "not repaired (the sensor launches the next attempt)"
        context.log.info(f"{chain}: reorg {reorg_id} {outcome} by run {result.run_id}, started by the follower")


def report_live_ranges(context: dg.OpExecutionContext, cfg: IndexerConfig, store, written: Written) -> None:
    """Materialize the range partitions the follower wrote into (registered ones), with their rows as the
    views show them, their last block and whether the range is complete: the asset pages stay current."""
    ranges, tip = written.take()
    if tip is None:
        return
    chain = cfg.chain.name
    partitions = block_ranges(chain).name
    assert partitions is not None  # a named dynamic partitions definition
    known = [r for r in ranges if context.instance.has_dynamic_partition(partitions, r.key)]
    hashes = {h.number: h.hash for r in known if r.end < tip[0] for h in store.headers(chain, r.end, r.end)}
    tables = [spec.table for _, spec in cfg.all_specs()]
    for rep in range_reports(cfg, known, tip[0], tip[1], tables, hashes):
        for dataset, rows in rep.rows.items():
            context.log_event(dg.AssetMaterialization(
                asset_key=dg.AssetKey([chain, dataset]), partition=rep.range.key,
                description="written by live sync" + ("" if rep.complete else f", filled up to block {rep.last}"),
                metadata={"dagster/row_count": rows, "block_range": f"{rep.first}-{rep.last}",
                          "last_block": rep.last, "last_block_hash": rep.last_hash, "complete": rep.complete,
                          "source": "live sync"}))


class ReorgConfig(dg.Config):
    reorg_id: int


def reorg_asset_specs(chain: str) -> list[dg.AssetSpec]:
    """The reorg ledger and the orphan archive as assets (group `reorgs`): where an operator looks, each
    repaired reorg shows as a materialization with its fork point, depth and rows archived per dataset."""
    return [
        dg.AssetSpec([chain, "reorgs"], group_name="reorgs", kinds={"parquet"},
                     description=f"The reorg ledger of {chain} (the `reorgs` view): one row per reorg with its "
                                 "fork point, depth, phase and rows archived."),
        dg.AssetSpec([chain, "orphaned"], group_name="reorgs", kinds={"parquet"},
                     description=f"Rows reorgs of {chain} removed from the canonical views, kept with their reorg "
                                 "id (the `orphaned_*` views)."),
    ]


def _reorg_materializations(chain: str, r, ledger_rows: int) -> list[dg.AssetMaterialization]:
    about = {"reorg_id": r.id, "phase": r.phase.value, "common_ancestor": r.common_ancestor, "depth": r.depth,
             "touched_confirmed": r.touched_confirmed}
    return [
        dg.AssetMaterialization(asset_key=dg.AssetKey([chain, "reorgs"]), description=f"reorg {r.id} {r.phase.value}",
                                metadata={**about, "dagster/row_count": ledger_rows}),
        dg.AssetMaterialization(
            asset_key=dg.AssetKey([chain, "orphaned"]), description=f"rows archived by reorg {r.id}",
            metadata={**about, "rows_archived": sum(r.rows_archived.values()),
                      **{f"rows_archived/{ds}": n for ds, n in sorted(r.rows_archived.items())}}),
    ]


def build_live_jobs(cfg: IndexerConfig, historical_keys: list[dg.AssetKey]) -> list[dg.JobDefinition]:
    chain = cfg.chain.name

    @dg.op(name=f"{chain}_follow_head", description="Write each new block within a second; pause during reorgs.")
    def follow_head(context: dg.OpExecutionContext, config: FollowConfig, indexer: IndexerConfigResource,
                    state: StateStoreResource):
        import asyncio

        cfg = indexer.for_chain(chain)
        bind(run_id=context.run_id, chain=chain)
        follower = Follower(cfg, state.store)
        deadline = time.monotonic() + config.minutes * 60
        last_log, last_report = [time.monotonic()], [time.monotonic()]
        catalog_built = [False]
        since_log, since_report = Written(cfg.chain.blocks_per_partition), Written(cfg.chain.blocks_per_partition)

        def on_tick(res) -> None:
            if res.action == "extended":
                if not catalog_built[0]:
                    build_catalog(cfg)  # once per run: new live tables appear in the views
                    catalog_built[0] = True
                since_log.add(res.blocks, res.logs, res.tip, res.tip_hash)
                since_report.add(res.blocks, res.logs, res.tip, res.tip_hash)
            now = time.monotonic()
            if res.action == "reorg" and config.repair_in_process and res.reorg_id is not None:
                context.log.info(f"{chain}: {res.detail}; repairing reorg {res.reorg_id} now")
                repair_now(context, chain, res.reorg_id, reorg)
            if res.action == "reorg" or now - last_log[0] > config.log_seconds:
                last_log[0] = now
                line = f"{chain}: {since_log.summary()} in the last {config.log_seconds:.0f} s"
                if res.action not in ("extended", "idle"):
                    line += f"; {res.action}: {res.detail}"
                context.log.info(line)
                since_log.take()
            if now - last_report[0] > config.report_seconds:
                last_report[0] = now
                report_live_ranges(context, cfg, state.store, since_report)

        stats = asyncio.run(follower.run(lambda: time.monotonic() > deadline, config.poll_seconds, on_tick))
        report_live_ranges(context, cfg, state.store, since_report)
        context.add_output_metadata({"blocks": stats.blocks, "logs": stats.logs, "ticks": stats.ticks,
                                     "reorgs_detected": ",".join(map(str, stats.reorgs))})

    @dg.op(name=f"{chain}_repair_reorg", retry_policy=dg.RetryPolicy(max_retries=3, delay=2),
           description="Suspend, roll back (archive orphaned rows), restore from the new fork.")
    def repair_reorg(context: dg.OpExecutionContext, config: ReorgConfig, indexer: IndexerConfigResource,
                     state: StateStoreResource):
        cfg = indexer.for_chain(chain)
        bind(run_id=context.run_id, chain=chain)
        store = state.store
        restored: list[str] = []
        # The run's lease for the whole repair: the chain-head sensor fails a started reorg run whose
        # lease it does not see (its process died with the daemon) and launches the next attempt.
        with store.writer_lock(run_lease(context.run_id), timeout_s=60):
            before = store.get_reorg(config.reorg_id)
            # Alert once, when the repair starts (a retried run finds the reorg past `detected`).
            deep = deep_reorg_alert(cfg, before) if before is not None and before.phase is Phase.DETECTED else None
            if deep is not None:
                send_alert(cfg.alerts, deep)
            res = _repair_reporting_forks(context, cfg, store, config.reorg_id, restored)
            build_catalog(cfg)
        r = res.reorg
        if before is not None and before.depth <= cfg.chain.confirmations and (late := deep_reorg_alert(cfg, r)):
            send_alert(cfg.alerts, late)  # a deeper reorg merged into this one during the repair
        # The restored ranges were re-materialized from the new fork: record them as such.
        for key in restored:
            for asset_key in historical_keys:
                context.log_event(dg.AssetMaterialization(
                    asset_key=asset_key, partition=key,
                    metadata={"reorg_id": r.id, "reason": "restored after a reorg"}))
            for result in res.checks.get(key, []):
                context.log_event(check_evaluation(check_asset(result.name, chain), result,  # type: ignore[arg-type]  # dagster: UserEvent omits AssetCheckEvaluation, which log_event handles
                                                   f"restored after reorg {r.id}"))
        failed = sorted({k for k, results in res.checks.items() for c in results if not c.passed})
        if failed:
            context.log.warning(f"restored ranges failed their checks (kept unconfirmed, synced again): {failed}")
        summary = (f"reorg {r.id} {r.phase.value}: fork point {r.common_ancestor}, depth {r.depth}, "
                   f"{sum(r.rows_archived.values())} rows archived, ranges restored: {', '.join(restored) or 'none'}, "
                   f"{res.seconds:.2f} s")
        context.log.info(summary)
        for event in _reorg_materializations(chain, r, len(store.list_reorgs(chain))):
            context.log_event(event)
        context.add_output_metadata({
            "summary": summary, "reorg_id": r.id, "phase": r.phase.value, "common_ancestor": r.common_ancestor,
            "depth": r.depth, "old_head": r.old_head, "new_head": r.new_head, "touched_confirmed": r.touched_confirmed,
            "rows_archived": sum(r.rows_archived.values()),
            **{f"rows_archived/{ds}": n for ds, n in sorted(r.rows_archived.items())},
            "restored_partitions": ",".join(restored),
            "live_blocks": "-".join(map(str, res.restored.live_blocks)) if res.restored.live_blocks else "",
            "live_logs": res.restored.live_logs, "seconds": round(res.seconds, 3),
            **{f"seconds/{phase}": round(t, 3) for phase, t in res.phase_seconds.items()},
            "ranges_failing_checks": ",".join(failed),
        })

    tags = {CHAIN_TAG: chain}

    @dg.job(
        name=live_job_name(chain), executor_def=dg.in_process_executor,
        tags={**tags, ROLE_TAG: LIVE_ROLE, SINGLETON_TAG: f"{LIVE_ROLE}-{chain}"},
        description="The long-running follower of the chain head (the sensor keeps one alive).",
    )
    def live():
        follow_head()

    @dg.job(
        name=reorg_job_name(chain), executor_def=dg.in_process_executor,
        tags={**tags, ROLE_TAG: REORG_ROLE, SINGLETON_TAG: f"{REORG_ROLE}-{chain}"},
        description="The singleton reorg job: one reorg at a time, resumable from its recorded phase.",
    )
    def reorg():
        repair_reorg()

    return [live, reorg]
