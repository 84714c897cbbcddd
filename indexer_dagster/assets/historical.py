"""Historical-sync assets: raw `blocks` + `logs` per block range, then one decoded table per event.

A thin skin: the work is in `indexer_dagster.sync.historical`; these functions run it for every
range of the run (a backfill batches several ranges per run) and record what it did as metadata.
"""

import dagster as dg

from indexer_dagster.config import IndexerConfig
from indexer_dagster.monitor.rpc import RpcStats
from indexer_dagster.partitions import parse_key
from indexer_dagster.resources import IndexerConfigResource
from indexer_dagster.sync.historical import decode_range, sync_raw_range

RANGES_PER_RUN = 8
# Transient failures are retried inside the RPC client; this retries what escapes it (e.g. a node
# restart), with Dagster's own backoff and jitter.
RETRY = dg.RetryPolicy(max_retries=3, delay=5, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


def raw_keys(chain: str) -> tuple[dg.AssetKey, dg.AssetKey]:
    return dg.AssetKey([chain, "blocks"]), dg.AssetKey([chain, "logs"])


def build_historical_assets(cfg: IndexerConfig, partitions_def: dg.PartitionsDefinition) -> list:
    chain = cfg.chain.name
    blocks_key, logs_key = raw_keys(chain)
    policy = dg.BackfillPolicy.multi_run(max_partitions_per_run=RANGES_PER_RUN)

    @dg.multi_asset(
        name=f"{chain}_raw",
        specs=[
            dg.AssetSpec(blocks_key, group_name="raw", kinds={"parquet", "ethereum"},
                         description="Block headers (number, hash, parent_hash, timestamp) of each range."),
            dg.AssetSpec(logs_key, group_name="raw", kinds={"parquet", "ethereum"},
                         description="Every log of the configured contracts, checked against its block's hash."),
        ],
        partitions_def=partitions_def,
        backfill_policy=policy,
        retry_policy=RETRY,
        pool=f"rpc_{chain}",
    )
    def raw(context: dg.AssetExecutionContext, indexer: IndexerConfigResource):
        cfg = indexer.config
        stats = RpcStats()
        totals = {"blocks": 0, "logs": 0}
        for key in context.partition_keys:
            res = sync_raw_range(cfg, parse_key(key), stats=stats)
            totals["blocks"] += res.blocks
            totals["logs"] += res.logs
            common = {
                "block_range": f"{res.from_block}-{res.to_block}" if res.from_block is not None else "empty",
                "complete": res.complete,
                "chain_head": res.head,
                "last_block_hash": res.last_block_hash or "",
                "seconds": round(res.seconds, 3),
                "rpc_requests": stats.total_requests,
                "rpc_retries": stats.total_retries,
            }
            context.add_asset_metadata({**common, "rows": res.blocks}, asset_key=blocks_key, partition_key=key)
            context.add_asset_metadata({**common, "rows": res.logs}, asset_key=logs_key, partition_key=key)
            context.log.info(
                f"{chain} {key}: {res.blocks} blocks, {res.logs} logs in {res.seconds:.1f}s "
                f"({stats.total_requests} requests, {stats.total_retries} retries)"
            )
        context.log.info(f"{chain}: {totals['blocks']} blocks, {totals['logs']} logs in {len(context.partition_keys)} ranges")

    event_specs = [
        dg.AssetSpec(
            [chain, spec.table],
            deps=[logs_key],
            group_name="decoded",
            kinds={"parquet"},
            description=f"{contract.name}.{spec.signature} decoded from `logs`, one row per event.",
            metadata={"signature": spec.signature, "topic0": spec.topic0 or "anonymous"},
        )
        for contract, spec in cfg.all_specs()
    ]

    @dg.multi_asset(
        name=f"{chain}_decoded",
        specs=event_specs,
        partitions_def=partitions_def,
        backfill_policy=policy,
    )
    def decoded(context: dg.AssetExecutionContext, indexer: IndexerConfigResource):
        cfg = indexer.config
        for key in context.partition_keys:
            res = decode_range(cfg, parse_key(key))
            for table, n in res.rows.items():
                context.add_asset_metadata(
                    {"rows": n, "skipped_malformed": res.skipped[table], "seconds": round(res.seconds, 3)},
                    asset_key=dg.AssetKey([chain, table]),
                    partition_key=key,
                )

    return [raw, decoded]
