"""The chain-head sensor: the supervisor of live sync (see `sync.supervise` for the decisions)."""

import time

import dagster as dg

from indexer_dagster.chain.rpc import rpc_client
from indexer_dagster.config import IndexerConfig
from indexer_dagster.dex.incremental import dex_lease
from indexer_dagster.jobs.live import IN_PROGRESS, ReorgConfig
from indexer_dagster.jobs.names import (
    CHAIN_TAG,
    DEX_ROLE,
    LIVE_ROLE,
    REORG_ID_TAG,
    REORG_ROLE,
    ROLE_TAG,
    live_job_name,
    reorg_job_name,
)
from indexer_dagster.persist.datasets import BLOCKS, live_segments
from indexer_dagster.persist.lake import open_lake
from indexer_dagster.persist.meta import failed_ranges
from indexer_dagster.resources import IndexerConfigResource
from indexer_dagster.state import open_state
from indexer_dagster.sync.realtime import ANCHOR, follower_alive, lease_held, run_lease
from indexer_dagster.sync.supervise import Facts, plan, range_coverage, ranges_with_live_segments
from indexer_dagster.sync.supplement import ranges_to_supplement

RESYNC_BACKOFF_S = 10.0  # a range whose checks failed is synced again once its failure is this old


def _runs(instance: dg.DagsterInstance, chain: str, role: str, statuses=None, extra: dict | None = None):
    tags = {CHAIN_TAG: chain, ROLE_TAG: role, **(extra or {})}
    return instance.get_runs(dg.RunsFilter(tags=tags, statuses=statuses or []), limit=200)


def run_alive(store, run: dg.DagsterRun) -> bool:
    """Whether a range or reorg run's process is alive, as the sensor judges it (a dead one is failed):
    its step holds the run's lease from its start to its last result."""
    return lease_held(store, run_lease(run.run_id))


def fail_dead_runs(
    instance: dg.DagsterInstance, store, chain: str, historical_job: str, dex_job: str | None, grace_s: float = 15.0
) -> None:
    """A run whose process died (killed with its daemon, OOM, ...) stays "started" in the instance
    forever; its lease died with it, so mark it failed and let it be replaced. Each kind of run shows
    it is alive by a lease: the follower's, the run's own (range and reorg runs), the DEX build's."""
    if not follower_alive(store, chain):
        _fail_dead(instance, _runs(instance, chain, LIVE_ROLE, IN_PROGRESS),
                   "the live follower process is gone (no lease held)", grace_s)
    history_runs = instance.get_runs(dg.RunsFilter(job_name=historical_job, statuses=IN_PROGRESS), limit=100)
    _fail_dead(instance, [r for r in history_runs if not run_alive(store, r)],
               "the range run's process is gone (no lease held)", grace_s)
    # Reorg runs (one left "started" would keep every writer of the chain waiting for good) and the
    # long-running DEX run hold their run's lease too.
    for role, what in ((REORG_ROLE, "reorg run"), (DEX_ROLE, "DEX run")):
        runs = _runs(instance, chain, role, IN_PROGRESS)
        _fail_dead(instance, [r for r in runs if not run_alive(store, r)],
                   f"the {what}'s process is gone (no lease held)", grace_s)
    if dex_job and not lease_held(store, dex_lease(chain)):
        dex_runs = instance.get_runs(dg.RunsFilter(job_name=dex_job, statuses=IN_PROGRESS), limit=10)
        _fail_dead(instance, dex_runs, "the DEX run's process is gone (no lease held)", grace_s)


def _fail_dead(instance: dg.DagsterInstance, runs, why: str, grace_s: float = 15.0) -> None:
    """Mark runs failed that have been started for a while (a new one takes its lease in seconds)."""
    for run in runs:
        record = instance.get_run_record_by_id(run.run_id)
        if record is None:  # deleted since it was listed
            continue
        started = record.start_time or record.create_timestamp.timestamp()
        # STARTING too: a run whose worker died while starting (e.g. with the daemon) never leaves it;
        # a live one may take a while to start on a busy machine, so it gets more time. NOT_STARTED too:
        # a run created and never launched (its creator killed in between: the follower about to run a
        # reorg in process, a daemon between creating and submitting) stays so for good. QUEUED runs are
        # left alone: the queue starts them.
        limit = {dg.DagsterRunStatus.STARTED: grace_s, dg.DagsterRunStatus.STARTING: 4 * grace_s,
                 dg.DagsterRunStatus.NOT_STARTED: 4 * grace_s}.get(run.status)
        if limit is not None and time.time() - started > limit:
            instance.report_run_failed(run, why)


def build_chain_head_sensor(
    cfg: IndexerConfig, jobs: list, historical_job: str, partitions_name: str, dex_job: str | None = None,
    dex_follow_job: str | None = None,
):
    chain = cfg.chain.name

    @dg.sensor(
        name=f"{chain}_chain_head",
        minimum_interval_seconds=2,
        default_status=dg.DefaultSensorStatus.RUNNING,
        jobs=jobs,
        description="Keeps the live follower running, launches the reorg job for unfinished reorgs, "
                    "and fills history below the live anchor with range runs.",
    )
    def chain_head(context: dg.SensorEvaluationContext, indexer: IndexerConfigResource):
        import asyncio


        cfg = indexer.for_chain(chain)
        instance = context.instance

        async def head() -> int:
            async with rpc_client(cfg) as rpc:
                return int(await rpc.call("eth_blockNumber"), 16)

        node_head = asyncio.run(head())
        store = open_state(cfg.state_url)
        try:
            active = store.active_reorg(chain)
            anchor = store.get_cursor(chain, ANCHOR)
            tip = store.tip(chain)
            halt = store.halted(chain)
            fail_dead_runs(instance, store, chain, historical_job, dex_job)
            live_runs = _runs(instance, chain, LIVE_ROLE, IN_PROGRESS)
        finally:
            store.close()
        reorg_runs = _runs(instance, chain, REORG_ROLE, extra={REORG_ID_TAG: str(active.id)}) if active else []
        lake = open_lake(cfg, chain)
        coverage = range_coverage(lake.dir("blocks"))
        seg_ranges = ranges_with_live_segments(
            [(first, last) for first, last, _p in live_segments(lake, BLOCKS)],
            coverage, cfg.chain.blocks_per_partition)
        running = frozenset(
            part for r in instance.get_runs(
                dg.RunsFilter(job_name=historical_job, statuses=IN_PROGRESS), limit=100)
            if (part := r.tags.get("dagster/partition"))
        )
        assert cfg.chain.reorg_window is not None  # ChainConfig sets its default
        facts = Facts(
            node_head=node_head, start_block=cfg.start_block, blocks_per_partition=cfg.chain.blocks_per_partition,
            live_anchor=anchor[0] if anchor else None, live_tip=tip.number if tip else None,
            active_reorg_id=active.id if active else None,
            reorg_run_active=any(r.status in IN_PROGRESS for r in reorg_runs),
            reorg_runs_before=sum(1 for r in reorg_runs if r.status not in IN_PROGRESS),
            live_run_active=bool(live_runs),
            range_coverage=coverage, range_keys_running=running, live_segment_ranges=seg_ranges,
            reorg_window=cfg.chain.reorg_window,
            failed_check_ranges=frozenset(failed_ranges(lake, older_than_s=RESYNC_BACKOFF_S)),
            supplement_ranges=frozenset(ranges_to_supplement(cfg)),  # contracts/events added to the config
            halted=halt.reason if halt is not None else None,
        )
        p = plan(facts)
        known = set(instance.get_dynamic_partitions(partitions_name))
        new_keys = [k for k in p.register_keys if k not in known]
        requests = []
        if p.launch_reorg is not None:
            requests.append(dg.RunRequest(
                job_name=reorg_job_name(chain),
                run_key=f"reorg-{p.launch_reorg}-{p.reorg_attempt}",
                run_config={"ops": {f"{chain}_repair_reorg": {"config": ReorgConfig(reorg_id=p.launch_reorg).model_dump()}}},
                tags={REORG_ID_TAG: str(p.launch_reorg)},
            ))
        if p.launch_live:
            requests.append(dg.RunRequest(job_name=live_job_name(chain), run_key=f"live-{time.time_ns()}"))
        if dex_follow_job and active is None and halt is None and tip is not None and not instance.get_runs(
            dg.RunsFilter(job_name=dex_follow_job, statuses=IN_PROGRESS), limit=1
        ):
            # Derived tables follow the canonical events: one long-running DEX run derives the new blocks
            # when the tip moves or a reorg was repaired (not a run per block).
            requests.append(dg.RunRequest(job_name=dex_follow_job, run_key=f"dex-follow-{time.time_ns()}"))
        for key in p.range_runs:
            # No run key: a range that failed is asked for again (one run per range at a time).
            requests.append(dg.RunRequest(job_name=historical_job, partition_key=key))
        if not requests and not new_keys:
            why = p.reason if halt is not None else "nothing to launch"
            return dg.SkipReason(f"{chain}: head {node_head}, follower tip {facts.live_tip}, {why}")
        return dg.SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=[dg.AddDynamicPartitionsRequest(partitions_name, new_keys)] if new_keys else [],
        )

    return chain_head
