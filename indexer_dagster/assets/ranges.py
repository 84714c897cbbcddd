"""Historical-sync assets over one dynamic partition per block range: per range, `blocks` + `logs`, and one decoded table per event.

One multi-asset, so a range is fetched once and decoded while it streams to Parquet; the decoded
tables still depend on `logs` in the asset graph. Selecting only decoded tables (e.g. an event
added to the config) re-decodes the stored logs without any RPC call. The work itself is in
`indexer_dagster.sync.historical`; this skin runs it for every range of the run (a backfill batches
several ranges per run) and records what it did as per-partition metadata.
"""

import dagster as dg

from indexer_dagster.assets.table_metadata import (
    BLOCK_COLUMNS,
    KEY_COLUMNS,
    ROW_COUNT,
    chain_label,
    column_schema,
    emitters,
    event_columns,
    table_metadata,
)
from indexer_dagster.block_range import parse_key
from indexer_dagster.chain.fetch import ForkChanged
from indexer_dagster.chain.rpc import RpcStats
from indexer_dagster.config import IndexerConfig
from indexer_dagster.dex.build import build_dex
from indexer_dagster.dex.build import enabled as dex_enabled
from indexer_dagster.health.logs import bind
from indexer_dagster.persist import datasets as ds
from indexer_dagster.persist.catalog import build_catalog
from indexer_dagster.persist.lake import storage_problem
from indexer_dagster.resources import IndexerConfigResource, StateStoreResource
from indexer_dagster.sync.historical import decode_range
from indexer_dagster.sync.range_checks import CHECKS, COUNTERS, CheckResult, verify_and_record
from indexer_dagster.sync.realtime import range_lease, run_lease
from indexer_dagster.sync.supplement import fetch_range

RANGES_PER_RUN = 8
# Transient failures are retried inside the RPC client; this retries what escapes it (e.g. a node
# restart), with Dagster's own backoff and jitter.
RETRY = dg.RetryPolicy(max_retries=3, delay=5, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


def block_ranges(chain: str) -> dg.DynamicPartitionsDefinition:
    """The chain's block-range partitions (keys from `indexer_dagster.block_range`)."""
    return dg.DynamicPartitionsDefinition(name=f"{chain}_block_ranges")


def raw_keys(chain: str) -> tuple[dg.AssetKey, dg.AssetKey]:
    return dg.AssetKey([chain, "blocks"]), dg.AssetKey([chain, "logs"])


def historical_asset_keys(cfg: IndexerConfig) -> list[dg.AssetKey]:
    """The chain's range-partitioned assets: blocks, logs and one decoded table per event."""
    return [*raw_keys(cfg.chain.name), *[dg.AssetKey([cfg.chain.name, s.table]) for _, s in cfg.all_specs()]]


def build_historical_assets(cfg: IndexerConfig, partitions_def: dg.PartitionsDefinition) -> list:
    chain = cfg.chain.name
    blocks_key, logs_key = raw_keys(chain)
    table_of = {dg.AssetKey([chain, spec.table]): spec.table for _, spec in cfg.all_specs()}
    on = chain_label(cfg)
    specs = [
        dg.AssetSpec(blocks_key, group_name="raw", kinds={"parquet", "ethereum"},
                     description=f"Block headers (number, hash, parent_hash, timestamp) of {on}, per range.",
                     metadata={"dagster/column_schema": column_schema(ds.BLOCKS, ds.BLOCK_SCHEMA, KEY_COLUMNS | BLOCK_COLUMNS),
                               **table_metadata(cfg, "blocks", ds.BLOCKS)}),
        dg.AssetSpec(logs_key, group_name="raw", kinds={"parquet", "ethereum"},
                     description=f"Every log of the configured contracts ({', '.join(c.name for c in cfg.contracts)}) "
                                 f"on {on}, checked against its block's hash.",
                     metadata={"dagster/column_schema": column_schema(ds.LOGS, ds.LOG_SCHEMA, KEY_COLUMNS),
                               **table_metadata(cfg, "logs", ds.LOGS)}),
        *[
            dg.AssetSpec(
                [chain, spec.table], deps=[logs_key], group_name="decoded", kinds={"parquet"},
                description=f"{contract.name}.{spec.signature} on {on}, emitted by {emitters(cfg, contract)}; "
                            f"decoded from `logs`, one row per event.",
                metadata={"signature": spec.signature, "topic0": spec.topic0 or "anonymous",
                          "contract": contract.name, "dagster/column_schema": event_columns(spec),
                          **table_metadata(cfg, spec.table, ds.events(spec.table))},
            )
            for contract, spec in cfg.all_specs()
        ],
    ]

    # Checks of every range written (sync.range_checks); a failing range stays unconfirmed and is synced again.
    check_specs = [
        dg.AssetCheckSpec(name, asset=blocks_key if dataset == "blocks" else logs_key, description=doc)
        for name, (dataset, doc) in CHECKS.items()
    ]

    @dg.multi_asset(
        name=f"{chain}_historical",
        specs=specs,
        check_specs=check_specs,
        partitions_def=partitions_def,
        backfill_policy=dg.BackfillPolicy.multi_run(max_partitions_per_run=RANGES_PER_RUN),
        retry_policy=RETRY,
        can_subset=True,
        pool=f"rpc_{chain}",
    )
    def historical(context: dg.AssetExecutionContext, indexer: IndexerConfigResource, state: StateStoreResource):
        cfg = indexer.for_chain(chain)
        bind(run_id=context.run.run_id, chain=chain)  # the indexer's own log lines name the run
        selected = context.selected_asset_keys
        tables = [t for k, t in table_of.items() if k in selected]
        fetch = blocks_key in selected or logs_key in selected
        stats = RpcStats()
        try:
            store = state.store
        except Exception as e:
            _fail_fast_on_storage(cfg, e)
            raise
        # The run's lease, held from here to its last result: the chain-head sensor fails a started run
        # whose lease it does not see (its process died), so it must see it for the whole step.
        with store.writer_lock(run_lease(context.run.run_id), timeout_s=60):
            checks = {k.name for k in context.selected_asset_check_keys}
            checked: dict[str, list[CheckResult]] = {name: [] for name in checks}
            for key in context.partition_keys:
                r = parse_key(key)
                # One writer per range at a time.
                with store.writer_lock(range_lease(chain, key), timeout_s=3600):
                    if fetch or tables:
                        # A stored range lacking only added contracts/events gets a supplement / a decode.
                        try:
                            res = (fetch_range(cfg, r, tables, stats=stats, store=store) if fetch
                                   else decode_range(cfg, r, tables, store=store))
                        except Exception as e:
                            _fail_fast_on_storage(cfg, e)
                            raise
                    if checks:
                        # A failed range stays unconfirmed and the sensor syncs it again (recorded durably).
                        results = verify_and_record(cfg, r, to_block=res.to_block if fetch else None)
                        for c in results:
                            if c.name in checks:
                                checked[c.name].append(c)
                            if not c.passed:
                                context.log.error(f"{chain} {key}: check {c.name} failed: {c.description}")
                if not (fetch or tables):
                    continue
                common = {"block_range": f"{res.from_block}-{res.to_block}" if res.from_block is not None else "empty",
                          "seconds": round(res.seconds, 3)}
                if fetch:
                    common |= {
                        "complete": res.complete,
                        "chain_head": res.head,
                        "last_block_hash": res.last_block_hash or "",
                        "rpc_requests": stats.total_requests,
                        "rpc_retries": stats.total_retries,
                        "sync_mode": res.mode,  # full, or supplement/decode (only added contracts/events)
                    }
                    context.add_asset_metadata({**common, ROW_COUNT: res.blocks}, asset_key=blocks_key, partition_key=key)
                    context.add_asset_metadata({**common, ROW_COUNT: res.logs}, asset_key=logs_key, partition_key=key)
                for asset_key, table in table_of.items():
                    if asset_key in selected:
                        context.add_asset_metadata(
                            {**common, ROW_COUNT: res.events[table], "skipped_malformed": res.skipped[table]},
                            asset_key=asset_key, partition_key=key,
                        )
                context.log.info(
                    f"{chain} {key}: {res.blocks} blocks, {res.logs} logs, {sum(res.events.values())} events "
                    f"in {res.seconds:.1f}s ({stats.total_requests} requests, {stats.total_retries} retries)"
                )
            # New tables appear in the catalog; existing views pick up new files by themselves.
            try:
                build_catalog(cfg)
            except Exception as e:
                _fail_fast_on_storage(cfg, e)
                raise
            if fetch and dex_enabled(cfg):
                _derive_dex(context, cfg, store)
            spec: dg.AssetSpec | dg.AssetCheckSpec  # the loops below go over both kinds
            for spec in specs:  # in spec order, which is topological (raw before decoded)
                if spec.key in selected:
                    yield dg.MaterializeResult(asset_key=spec.key)
            # One result per check and run (a check may not be yielded twice in a step), over all its ranges.
            for spec in check_specs:
                if spec.name in checks:
                    yield check_result(spec, checked[spec.name])

    return [historical]


def _derive_dex(context: dg.AssetExecutionContext, cfg: IndexerConfig, store) -> None:
    """The DEX tables derived in the same runs as the ranges (a backfill's runs take turns): through the
    highest block up to which every range is in. A reorg beginning meanwhile leaves it to the next run."""
    try:
        res = build_dex(cfg, store=store, count_rows=False)
    except ForkChanged as e:
        context.log.info(f"{cfg.chain.name}: DEX tables not derived ({e}); the next run or the DEX run will")
        return
    if res.blocks is not None:
        context.log.info(f"{cfg.chain.name}: DEX tables derived for blocks {res.blocks[0]}..{res.blocks[1]} "
                         f"({res.steps} steps, {res.seconds:.2f} s)")


def _fail_fast_on_storage(cfg: IndexerConfig, e: Exception) -> None:
    """A full or read-only data directory does not heal in seconds: fail at once (no retries) with the
    message that names the directory and the fix."""
    if (problem := storage_problem(cfg.data_dir, e)) is not None:
        raise dg.Failure(description=str(problem), allow_retries=False) from None


def check_evaluation(asset_key: dg.AssetKey, result: CheckResult, reason: str) -> dg.AssetCheckEvaluation:
    """One range's check as an event of another job (the reorg job restores ranges outside this asset)."""
    return dg.AssetCheckEvaluation(
        asset_key=asset_key, check_name=result.name, passed=result.passed, partition=result.metadata["range"],
        description=f"{reason}: {result.description}",
        metadata={k: v for k, v in result.metadata.items() if k != "range"},
    )


def check_asset(name: str, chain: str) -> dg.AssetKey:
    """The asset a range check belongs to (blocks or logs)."""
    blocks_key, logs_key = raw_keys(chain)
    return blocks_key if CHECKS[name][0] == "blocks" else logs_key


def check_result(spec: dg.AssetCheckSpec, results: list[CheckResult]) -> dg.AssetCheckResult:
    """The run's verdict of one check over its ranges: failed if any range failed, naming them."""
    failed = [c for c in results if not c.passed]
    if len(results) == 1:
        description = results[0].description
    elif failed:
        description = f"{len(failed)} of {len(results)} ranges failed: " + "; ".join(
            f"{c.metadata['range']}: {c.description}" for c in failed)
    else:
        description = f"{len(results)} ranges passed"
    # Numbers, not text, so the check's plots work: ranges judged and failed, and each counter's total.
    totals = {k: sum(int(c.metadata[k]) for c in results if k in c.metadata)
              for k in COUNTERS if any(k in c.metadata for c in results)}
    return dg.AssetCheckResult(
        asset_key=spec.asset_key, check_name=spec.name, passed=not failed, description=description,
        metadata={
            "ranges_checked": len(results),
            "ranges_failed": len(failed),
            **totals,
            "ranges": [c.metadata["range"] for c in results],
            "failed_ranges": [c.metadata["range"] for c in failed],
            "details": {c.metadata["range"]: {k: v for k, v in c.metadata.items() if k != "range"} for c in results},
        },
    )
