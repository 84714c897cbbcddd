"""Derived DEX tables (stage 4): recomputed as a whole from the canonical decoded events.

The decoded views already hold exactly the canonical rows (range files and live segments merged,
orphans moved out by the reorg job), so rebuilding from them after every reorg gives the same
tables as a computation from scratch on the new fork. Each table is one Parquet file per chain,
`<chain>/dex/<table>.parquet`, replaced atomically; token metadata is read once per token.
"""

import asyncio
import time
from dataclasses import dataclass, field
from graphlib import TopologicalSorter

import polars as pl

from indexer_dagster.chain.rpc import rpc_client
from indexer_dagster.config import IndexerConfig
from indexer_dagster.dex import derive as dex
from indexer_dagster.dex.tokens import pair_tokens, token_metadata
from indexer_dagster.persist.catalog import build_catalog, read_views
from indexer_dagster.persist.datasets import (
    CANDLE_INTERVALS,
    DEX,
    DEX_TABLES,
    POOL_SCHEMA,
    TOKEN_SCHEMA,
    VOLUME_INTERVALS,
)
from indexer_dagster.persist.files import read_parquet
from indexer_dagster.persist.lake import Lake, open_lake
from indexer_dagster.reorg.guard import publish_guard
from indexer_dagster.state import StateStore, store_or_open

# The Uniswap V2 events the DEX tables are derived from, by canonical signature (any contract name).
UNISWAP_V2 = {
    "swap": "Swap(address,uint256,uint256,uint256,uint256,address)",
    "sync": "Sync(uint112,uint112)",
    "mint": "Mint(address,uint256,uint256)",
    "burn": "Burn(address,uint256,uint256,address)",
    "pair_created": "PairCreated(address,address,address,uint256)",
}


@dataclass
class DexResult:
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    top_pools: pl.DataFrame | None = None


def source_tables(cfg: IndexerConfig) -> dict[str, list[str]]:
    """Decoded tables holding each Uniswap V2 event kind."""
    out: dict[str, list[str]] = {k: [] for k in UNISWAP_V2}
    for _, spec in cfg.all_specs():
        for kind, sig in UNISWAP_V2.items():
            if spec.signature == sig:
                out[kind].append(spec.table)
    return out


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


def enabled(cfg: IndexerConfig) -> bool:
    t = source_tables(cfg)
    return bool(t["swap"] and t["sync"])


def _read(cfg: IndexerConfig, tables: list[str]) -> pl.DataFrame | None:
    if not tables:
        return None
    # The views span every chain of the config; this chain's DEX tables come from its own rows.
    sql = " UNION ALL ".join(
        f'SELECT * EXCLUDE (status) FROM "{t}" WHERE chain_id = {int(cfg.chain.chain_id)}' for t in tables
    )
    return read_views(cfg.duckdb_path, sql)


def _with_interval(frames: dict[str, pl.DataFrame]) -> pl.DataFrame:
    return pl.concat([f.with_columns(pl.lit(i).alias("interval")) for i, f in frames.items()], how="vertical")


async def _tokens(cfg: IndexerConfig, lake: Lake, wanted: set[str]) -> pl.DataFrame:
    cached = read_parquet(lake.path(DEX, "tokens")) if lake.exists(DEX, "tokens") else pl.DataFrame(
        schema=TOKEN_SCHEMA)
    missing = sorted(wanted - set(cached["address"]))
    if missing:
        async with rpc_client(cfg) as rpc:
            fresh = await token_metadata(rpc, missing)
        cached = pl.concat([cached, fresh], how="vertical")
    return cached.filter(pl.col("address").is_in(sorted(wanted))).sort("address")


async def _extra_pools(cfg: IndexerConfig, pools: pl.DataFrame, pair_addresses: set[str]) -> pl.DataFrame:
    """Pools whose PairCreated is not indexed: token0/token1 read from the pair contracts."""
    known = set(pools["pool"]) if pools.height else set()
    missing = sorted(pair_addresses - known)
    if not missing:
        return pools
    async with rpc_client(cfg) as rpc:
        found = await pair_tokens(rpc, missing)
    extra = found.with_columns(pl.lit(cfg.chain.chain_id, pl.Int64).alias("chain_id"))
    # Unknown creation: the columns PairCreated would give stay null.
    extra = extra.with_columns([pl.lit(None, t).alias(c) for c, t in POOL_SCHEMA.items() if c not in extra.columns])
    return pl.concat([pools, extra.select(list(POOL_SCHEMA))], how="vertical_relaxed")


def compute(cfg: IndexerConfig) -> dict[str, pl.DataFrame]:
    """All DEX tables from the catalog's canonical event views."""
    src = source_tables(cfg)
    lake = open_lake(cfg)
    swap, sync = _read(cfg, src["swap"]), _read(cfg, src["sync"])
    mint, burn = _read(cfg, src["mint"]), _read(cfg, src["burn"])
    created = _read(cfg, src["pair_created"])
    if swap is None or sync is None:
        raise ValueError("the DEX tables need the Uniswap V2 Swap and Sync events in the config (see `enabled`)")
    pools = dex.pools(created) if created is not None and created.height else pl.DataFrame(schema=POOL_SCHEMA)
    pair_addresses = set(swap["address"]) | set(sync["address"])
    pools = asyncio.run(_extra_pools(cfg, pools, pair_addresses))
    tokens = asyncio.run(_tokens(cfg, lake, set(pools["token0"]) | set(pools["token1"])))
    reserves = dex.pool_reserves(sync, pools, tokens)
    swaps = dex.value_in(dex.swaps(swap, pools, tokens), reserves, cfg.chain.reference_token)
    out = {
        "pools": dex.label_pools(pools, tokens),
        "tokens": tokens,
        "swaps": swaps,
        "pool_reserves": reserves,
        "pool_state": dex.pool_state(reserves),
        "pool_volume": _with_interval({i: dex.pool_volume(swaps, i) for i in VOLUME_INTERVALS}),
        "pool_candles": _with_interval({i: dex.pool_candles(swaps, i) for i in CANDLE_INTERVALS}),
    }
    if mint is not None and burn is not None:
        out["liquidity_events"] = dex.liquidity_events(mint, burn, pools, tokens)
    return out


def build_dex(cfg: IndexerConfig, *, store: StateStore | None = None) -> DexResult:
    """Recompute and publish the DEX tables; refused (ForkChanged) if a reorg began meanwhile.
    `store`: the run's state store (None: one opened for this call)."""
    with store_or_open(cfg.state_url, store) as s:
        return _build(cfg, s)


def _build(cfg: IndexerConfig, store: StateStore) -> DexResult:
    started = time.perf_counter()
    guard = publish_guard(store, cfg.chain.name, "a reorg happened while the DEX tables were computed; recompute")
    build_catalog(cfg)
    tables = compute(cfg)
    lake = open_lake(cfg)

    with lake.transaction(guard) as tx:
        for name, frame in tables.items():
            tx.writer(DEX, name, dict(frame.schema)).write(frame)
    build_catalog(cfg)  # DEX views appear once their files exist
    res = DexResult(rows={k: v.height for k, v in tables.items()}, seconds=time.perf_counter() - started)
    state = tables["pool_state"]
    if state.height:
        vol = tables["swaps"].group_by("pool").agg(pl.len().alias("swaps"))
        res.top_pools = (
            state.join(vol, on="pool", how="left")
            .sort("swaps", descending=True, nulls_last=True)
            .select("pool", "pair", "swaps", "reserve0_h", "reserve1_h", "price", "last_block")
            .head(10)
        )
    return res
