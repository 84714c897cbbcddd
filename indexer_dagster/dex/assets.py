"""DEX assets (group `dex`): swaps, reserves, pool state, liquidity, volume, candles, pools, tokens.

One multi-asset brings them up to the indexed tip together, deriving the blocks since the last step
(`dex.build.build_dex`, `dex.incremental`): by hand from the UI. Backfills derive them in their range
runs, and live the long-running DEX run (`jobs.dex_follow`) does.
"""

import dagster as dg

from indexer_dagster.assets.table_metadata import ROW_COUNT, chain_label, table_metadata
from indexer_dagster.config import IndexerConfig
from indexer_dagster.dex.build import build_dex, build_order, inputs_of
from indexer_dagster.persist.datasets import DEX, DEX_DAY_TABLES, DEX_ROW_TABLES
from indexer_dagster.persist.datasets import dex as dex_dataset
from indexer_dagster.resources import IndexerConfigResource, StateStoreResource

DESCRIPTIONS = {
    "pools": "Uniswap V2 pools (PairCreated, or token0()/token1() of configured pairs).",
    "tokens": "symbol and decimals of every pool token, read once with eth_call.",
    "swaps": "One row per swap: direction, exact amounts in/out, human amounts, execution price.",
    "pool_reserves": "Reserves after each Sync, exact and human-scaled, with the spot price.",
    "pool_state": "Latest reserves, price and block per pool.",
    "liquidity_events": "Mints and burns with exact and human amounts.",
    "pool_volume": "Volume and swap count per pool per hour (`1h`) and day (`1d`).",
    "pool_candles": "OHLC execution price and volume per pool per minute (`1m`) and hour (`1h`).",
}


def build_dex_assets(cfg: IndexerConfig) -> list:
    chain = cfg.chain.name
    specs = [
        dg.AssetSpec([chain, "dex", t], deps=_deps(cfg, t), group_name="dex", kinds={"parquet", "duckdb"},
                     description=f"{DESCRIPTIONS[t]} On {chain_label(cfg)}.",
                     metadata=_where(cfg, t))
        for t in build_order()  # a multi-asset yields its assets after those they depend on
    ]

    @dg.multi_asset(name=f"{chain}_dex_tables", specs=specs,
                    retry_policy=dg.RetryPolicy(max_retries=3, delay=2))
    def dex_tables(context: dg.AssetExecutionContext, indexer: IndexerConfigResource, state: StateStoreResource):
        cfg = indexer.for_chain(chain)
        # Its lease (taken by build_dex) tells the sensor this run is alive (one killed with its daemon is replaced).
        res = build_dex(cfg, store=state.store)
        preview = _markdown(res.top_pools)
        for spec in specs:
            table = spec.key.path[-1]
            meta: dict[str, float | dg.MetadataValue] = {ROW_COUNT: res.rows.get(table, 0), "seconds": round(res.seconds, 3)}
            if table == "pool_state" and preview:
                meta["top_pools"] = dg.MetadataValue.md(preview)
            yield dg.MaterializeResult(asset_key=spec.key, metadata=meta)

    return [dex_tables]


def _where(cfg: IndexerConfig, table: str) -> dict:
    """The view, and the table's Parquet: a directory of step or day files, or one file (pool_state, tokens)."""
    if table in (*DEX_ROW_TABLES, *DEX_DAY_TABLES):
        return table_metadata(cfg, table, dex_dataset(table))
    return table_metadata(cfg, table, DEX, table)


def _deps(cfg: IndexerConfig, table: str) -> list[dg.AssetKey]:
    """Only the decoded and DEX tables `table` is computed from (`dex.build.READS`), so the graph shows
    which event feeds which table instead of every table hanging off every Uniswap event."""
    decoded, dex = inputs_of(cfg, table)
    chain = cfg.chain.name
    return [dg.AssetKey([chain, t]) for t in decoded] + [dg.AssetKey([chain, "dex", t]) for t in dex]


def _markdown(df) -> str:
    if df is None or df.height == 0:
        return ""
    cols = df.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.iter_rows():
        lines.append("| " + " | ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)
