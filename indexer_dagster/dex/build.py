"""Derived DEX tables (stage 4): what each reads, the order they materialize in, and where they are built.

Live and in backfills they are kept current step by step (`dex.incremental`: each step derives the new
blocks only). `compute` derives them all at once from the canonical views: the reference a step-by-step
build must equal (the tests and `bench/dex.py` compare the two).
"""

from graphlib import TopologicalSorter

import polars as pl

from indexer_dagster.config import IndexerConfig
from indexer_dagster.dex import derive as dex
from indexer_dagster.dex.incremental import DexResult, advance, dex_lease
from indexer_dagster.dex.sources import (
    UNISWAP_V2,
    enabled,
    read_events,
    source_tables,
    tokens_of,
    with_unindexed_pools,
)
from indexer_dagster.persist.catalog import build_catalog
from indexer_dagster.persist.datasets import (
    CANDLE_INTERVALS,
    DEX_TABLES,
    POOL_SCHEMA,
    VOLUME_INTERVALS,
)
from indexer_dagster.persist.lake import open_lake
from indexer_dagster.state import StateStore, store_or_open

__all__ = ["UNISWAP_V2", "DexResult", "build_dex", "build_order", "compute", "enabled", "inputs_of", "source_tables"]


# What `compute` reads to build each DEX table: Uniswap V2 event kinds (keys of UNISWAP_V2, i.e. their
# decoded tables) and other DEX tables. The asset graph draws these edges, so keep them in step with it.
READS: dict[str, tuple[str, ...]] = {
    "pools": ("pair_created", "swap", "sync"),  # PairCreated, plus pairs seen in Swap/Sync without one
    "tokens": ("pools",),
    "swaps": ("swap", "pools", "tokens", "pool_reserves"),  # reserves: `volume_ref` prices (dex.value_in)
    "pool_reserves": ("sync", "pools", "tokens"),
    "pool_state": ("pool_reserves",),
    "liquidity_events": ("mint", "burn", "pools", "tokens"),
    "pool_volume": ("swaps",),
    "pool_candles": ("swaps",),
}


def build_order() -> list[str]:
    """The DEX tables, each after the DEX tables it reads (`READS`): the order their asset materializes."""
    return list(TopologicalSorter({t: [r for r in READS[t] if r in DEX_TABLES] for t in DEX_TABLES}).static_order())


def inputs_of(cfg: IndexerConfig, table: str) -> tuple[list[str], list[str]]:
    """(decoded tables, DEX tables) that `table` is computed from under this config."""
    src = source_tables(cfg)
    reads = READS[table]
    return [t for kind in reads if kind in src for t in src[kind]], [t for t in reads if t not in src]


def compute(cfg: IndexerConfig, through: int | None = None) -> dict[str, pl.DataFrame]:
    """All DEX tables at once from the catalog's canonical event views (the reference; see the module),
    of the blocks up to `through` (None: all)."""
    build_catalog(cfg)
    src = source_tables(cfg)
    blocks = (cfg.start_block, through) if through is not None else None
    swap, sync = read_events(cfg, src["swap"], blocks), read_events(cfg, src["sync"], blocks)
    mint, burn = read_events(cfg, src["mint"], blocks), read_events(cfg, src["burn"], blocks)
    created = read_events(cfg, src["pair_created"], blocks)
    if swap is None or sync is None:
        raise ValueError("the DEX tables need the Uniswap V2 Swap and Sync events in the config (see `enabled`)")
    pools = dex.pools(created) if created is not None and created.height else pl.DataFrame(schema=POOL_SCHEMA)
    pools = with_unindexed_pools(cfg, pools, set(swap["address"]) | set(sync["address"]))
    tokens = tokens_of(cfg, open_lake(cfg), set(pools["token0"]) | set(pools["token1"]))
    reserves = dex.pool_reserves(sync, pools, tokens)
    swaps = dex.value_in(dex.swaps(swap, pools, tokens), reserves, cfg.chain.reference_token)
    out = {
        "pools": dex.label_pools(pools, tokens),
        "tokens": tokens,
        "swaps": swaps,
        "pool_reserves": reserves,
        "pool_state": dex.pool_state(reserves),
        "pool_volume": dex.with_interval({i: dex.pool_volume(swaps, i) for i in VOLUME_INTERVALS}),
        "pool_candles": dex.with_interval({i: dex.pool_candles(swaps, i) for i in CANDLE_INTERVALS}),
    }
    if mint is not None and burn is not None:
        out["liquidity_events"] = dex.liquidity_events(mint, burn, pools, tokens)
    return out


def build_dex(cfg: IndexerConfig, *, store: StateStore | None = None, max_steps: int | None = None,
              count_rows: bool = True) -> DexResult:
    """Bring the DEX tables up to the indexed tip, deriving only the blocks since the last call
    (`dex.incremental`); refused (ForkChanged) if a reorg began meanwhile. `store`: the run's state store
    (None: one opened for this call); `count_rows`: report the tables' rows (a look at every file)."""
    with store_or_open(cfg.state_url, store) as s, s.writer_lock(dex_lease(cfg.chain.name), timeout_s=600):
        return advance(cfg, s, max_steps=max_steps, count_rows=count_rows)
