"""What the DEX tables are derived from: the decoded Uniswap V2 event tables of the config, read through
the catalog's canonical views, and the facts read from contracts once (pair tokens, token metadata)."""

import asyncio

import polars as pl

from indexer_dagster.chain.rpc import rpc_client
from indexer_dagster.config import IndexerConfig
from indexer_dagster.dex.tokens import pair_tokens, token_metadata
from indexer_dagster.persist.catalog import ViewReader, read_views
from indexer_dagster.persist.datasets import DEX, POOL_SCHEMA, TOKEN_SCHEMA
from indexer_dagster.persist.files import read_parquet
from indexer_dagster.persist.lake import Lake

# The Uniswap V2 events the DEX tables are derived from, by canonical signature (any contract name).
UNISWAP_V2 = {
    "swap": "Swap(address,uint256,uint256,uint256,uint256,address)",
    "sync": "Sync(uint112,uint112)",
    "mint": "Mint(address,uint256,uint256)",
    "burn": "Burn(address,uint256,uint256,address)",
    "pair_created": "PairCreated(address,address,address,uint256)",
}


def source_tables(cfg: IndexerConfig) -> dict[str, list[str]]:
    """Decoded tables holding each Uniswap V2 event kind."""
    out: dict[str, list[str]] = {k: [] for k in UNISWAP_V2}
    for _, spec in cfg.all_specs():
        for kind, sig in UNISWAP_V2.items():
            if spec.signature == sig:
                out[kind].append(spec.table)
    return out


def enabled(cfg: IndexerConfig) -> bool:
    t = source_tables(cfg)
    return bool(t["swap"] and t["sync"])


def read_events(cfg: IndexerConfig, tables: list[str], blocks: tuple[int, int] | None = None,
                read: ViewReader | None = None) -> pl.DataFrame | None:
    """The canonical rows of `tables` (one event kind) on this chain, of `blocks` (first, last) or all;
    None when the config has no such table. `read`: a `view_reader` to ask through."""
    if not tables:
        return None
    where = f"chain_id = {int(cfg.chain.chain_id)}"
    if blocks is not None:
        where += f" AND block_number BETWEEN {int(blocks[0])} AND {int(blocks[1])}"
    # The views span every chain of the config; this chain's DEX tables come from its own rows.
    sql = " UNION ALL ".join(f'SELECT * EXCLUDE (status) FROM "{t}" WHERE {where}' for t in tables)
    return read(sql) if read is not None else read_views(cfg.duckdb_path, sql)


def cached_tokens(lake: Lake) -> pl.DataFrame:
    """Token metadata read so far (`dex/tokens.parquet`)."""
    return read_parquet(lake.path(DEX, "tokens")) if lake.exists(DEX, "tokens") else pl.DataFrame(schema=TOKEN_SCHEMA)


async def missing_tokens(cfg: IndexerConfig, cached: pl.DataFrame, wanted: set[str]) -> pl.DataFrame:
    """Metadata of the `wanted` tokens not in `cached`, read with eth_call (symbol, decimals)."""
    missing = sorted(wanted - set(cached["address"]))
    if not missing:
        return pl.DataFrame(schema=TOKEN_SCHEMA)
    async with rpc_client(cfg) as rpc:
        return await token_metadata(rpc, missing)


def tokens_of(cfg: IndexerConfig, lake: Lake, wanted: set[str]) -> pl.DataFrame:
    """Metadata of the `wanted` tokens: from the cache, the rest read from the chain."""
    cached = cached_tokens(lake)
    cached = pl.concat([cached, asyncio.run(missing_tokens(cfg, cached, wanted))], how="vertical")
    return cached.filter(pl.col("address").is_in(sorted(wanted))).sort("address")


async def _pair_tokens(cfg: IndexerConfig, pairs: list[str]) -> pl.DataFrame:
    async with rpc_client(cfg) as rpc:
        return await pair_tokens(rpc, pairs)


def with_unindexed_pools(cfg: IndexerConfig, pools: pl.DataFrame, pair_addresses: set[str]) -> pl.DataFrame:
    """`pools` plus the pairs of `pair_addresses` it lacks (their PairCreated is not indexed): token0/token1
    read from the pair contracts; the columns PairCreated would give stay null."""
    known = set(pools["pool"]) if pools.height else set()
    missing = sorted(pair_addresses - known)
    if not missing:
        return pools
    found = asyncio.run(_pair_tokens(cfg, missing))
    extra = found.with_columns(pl.lit(cfg.chain.chain_id, pl.Int64).alias("chain_id"))
    extra = extra.with_columns([pl.lit(None, t).alias(c) for c, t in POOL_SCHEMA.items() if c not in extra.columns])
    return pl.concat([pools, extra.select(list(POOL_SCHEMA))], how="vertical_relaxed")
