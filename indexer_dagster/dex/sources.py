"""What the DEX tables are derived from: the decoded Uniswap V2 event tables of the config, read through
the catalog's canonical views, and the facts read from contracts once (pair tokens, token metadata)."""

import asyncio
from collections.abc import Sequence

import polars as pl

from indexer_dagster.block_range import parse_key
from indexer_dagster.chain.rpc import rpc_client
from indexer_dagster.config import IndexerConfig
from indexer_dagster.persist.catalog import read_views
from indexer_dagster.persist.datasets import BLOCKS, CHILDREN, DEX, POOL_SCHEMA, TOKEN_SCHEMA, events, live
from indexer_dagster.persist.files import read_parquet, read_small_file
from indexer_dagster.persist.lake import Lake
from indexer_dagster.persist.windows import block_files

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


def read_events(cfg: IndexerConfig, tables: list[str], blocks: tuple[int, int] | None = None) -> pl.DataFrame | None:
    """The canonical rows of `tables` (one event kind) on this chain, of `blocks` (first, last) or all,
    through the catalog's views; None when the config has no such table."""
    if not tables:
        return None
    where = f"chain_id = {int(cfg.chain.chain_id)}"
    if blocks is not None:
        where += f" AND block_number BETWEEN {int(blocks[0])} AND {int(blocks[1])}"
    # The views span every chain of the config; this chain's DEX tables come from its own rows.
    sql = " UNION ALL ".join(f'SELECT * EXCLUDE (status) FROM "{t}" WHERE {where}' for t in tables)
    return read_views(cfg.duckdb_path, sql)


def cached_tokens(lake: Lake) -> pl.DataFrame:
    """Token metadata read so far (`dex/tokens.parquet`)."""
    return read_parquet(lake.path(DEX, "tokens")) if lake.exists(DEX, "tokens") else pl.DataFrame(schema=TOKEN_SCHEMA)


async def missing_tokens(cfg: IndexerConfig, cached: pl.DataFrame, wanted: set[str]) -> pl.DataFrame:
    """Metadata of the `wanted` tokens not in `cached`, read with eth_call (symbol, decimals)."""
    missing = sorted(wanted - set(cached["address"]))
    if not missing:
        return pl.DataFrame(schema=TOKEN_SCHEMA)
    from indexer_dagster.dex.tokens import token_metadata  # web3 (~0.4 s to import): only when a token is new

    async with rpc_client(cfg) as rpc:
        return await token_metadata(rpc, missing)


def known_tokens(cfg: IndexerConfig, lake: Lake, wanted: set[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(every token's metadata: the cache plus those of `wanted` it lacks, read from the chain now; those
    read now alone, which the cache file must get)."""
    cached = cached_tokens(lake)
    fresh = asyncio.run(missing_tokens(cfg, cached, wanted))
    return pl.concat([cached, fresh], how="vertical"), fresh


def tokens_of(cfg: IndexerConfig, lake: Lake, wanted: set[str]) -> pl.DataFrame:
    """Metadata of the `wanted` tokens: from the cache, the rest read from the chain."""
    every, _fresh = known_tokens(cfg, lake, wanted)
    return every.filter(pl.col("address").is_in(sorted(wanted))).sort("address")


async def _pair_tokens(cfg: IndexerConfig, pairs: list[str]) -> pl.DataFrame:
    from indexer_dagster.dex.tokens import pair_tokens  # web3: only when a pair is new

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


# -- the rows of a few blocks, from the files that hold them --------------------------------------


def file_blocks(path) -> tuple[int, int]:
    """(first, last) block of a file named by its blocks: a range file (`<first>-<last>[+<fingerprint>]`),
    a live segment or a DEX step file (`<first>-<last>`)."""
    r = parse_key(path.stem.split("+", 1)[0])
    return r.start, r.end


def overlapping(lake: Lake, dataset: str, first: int, last: int) -> list:
    return [p for p in lake.files(dataset) if file_blocks(p)[0] <= last and file_blocks(p)[1] >= first]


def rows_between(paths: list, column: str, first: int, last: int, columns: list[str] | None = None
                 ) -> pl.DataFrame | None:
    """The rows of `paths` whose `column` is in first..last (only the row groups that can hold them; a remote
    file from a local copy), all their columns or `columns`."""
    if not paths:
        return None
    with block_files(paths, column) as files:
        frames = [f.read(columns, first, last) for f in files]
    return pl.concat(frames, how="diagonal_relaxed")


def _children(lake: Lake) -> pl.DataFrame:
    """(contract, address) of the factory children in the lake's registry (range files and live segments)."""
    out = [read_small_file(p).select("contract", "address")
           for p in [*lake.files(CHILDREN), *lake.files(live(CHILDREN))]]
    return pl.concat(out, how="vertical") if out else pl.DataFrame(schema={"contract": pl.String, "address": pl.String})


def table_addresses(cfg: IndexerConfig, table: str, children: pl.DataFrame | None) -> set[str]:
    """The addresses whose rows of decoded `table` the views show: its contracts' static addresses and
    the `children` (the lake's registry, `_children`) of those that are factories' (the views'
    `_contract_addresses`)."""
    contracts = [c for c, spec in cfg.all_specs() if spec.table == table]
    out = {a.lower() for c in contracts for a in c.addresses}
    spawned = [c.name for c in contracts if c.factory is not None]
    if spawned and children is not None:
        out |= set(children.filter(pl.col("contract").is_in(spawned))["address"].str.to_lowercase())
    return out


def canonical_blocks(lake: Lake, first: int, last: int) -> pl.DataFrame:
    """(number, hash) of the blocks first..last the lake holds, as the views give them (a block a range
    file holds from there, else from a live segment), sorted: read from the files that hold them only."""
    ranged = rows_between(overlapping(lake, BLOCKS, first, last), "number", first, last)
    live_rows = rows_between(overlapping(lake, live(BLOCKS), first, last), "number", first, last)
    parts = []
    if ranged is not None:
        parts.append(ranged.select("number", "hash"))
    if live_rows is not None:
        known = ranged["number"] if ranged is not None else pl.Series([], dtype=pl.Int64)
        parts.append(live_rows.filter(~pl.col("number").is_in(known.implode())).select("number", "hash"))
    if not parts:
        return pl.DataFrame(schema={"number": pl.Int64, "hash": pl.String})
    return pl.concat(parts, how="vertical").unique("number", keep="first").sort("number")


def window_events(cfg: IndexerConfig, lake: Lake, kinds: Sequence[str], first: int, last: int
                  ) -> dict[str, pl.DataFrame | None]:
    """The canonical rows of each event kind's decoded tables (`source_tables`) in blocks first..last: the
    rows the views give for those blocks, read from the range files and live segments that can hold them
    instead of every file of the history (a DEX step costs what its blocks hold). None for a kind the
    config has no table of."""
    in_ranges = rows_between(overlapping(lake, BLOCKS, first, last), "number", first, last)
    ranged_numbers = in_ranges["number"].implode() if in_ranges is not None else pl.Series([], dtype=pl.Int64).implode()
    children = _children(lake) if any(c.factory is not None for c in cfg.contracts) else None
    src = source_tables(cfg)
    out: dict[str, pl.DataFrame | None] = {}
    for kind in kinds:
        tables = src[kind]
        if not tables:
            out[kind] = None
            continue
        parts = []
        for table in tables:
            dataset = events(table)
            ranged = rows_between(overlapping(lake, dataset, first, last), "block_number", first, last)
            live_rows = rows_between(overlapping(lake, live(dataset), first, last), "block_number", first, last)
            if live_rows is not None:
                live_rows = live_rows.filter(~pl.col("block_number").is_in(ranged_numbers))
            rows = [f for f in (ranged, live_rows) if f is not None]
            if rows:
                allowed = sorted(table_addresses(cfg, table, children))
                parts.append(pl.concat(rows, how="diagonal_relaxed").filter(pl.col("address").is_in(allowed)))
        if parts:
            out[kind] = pl.concat(parts, how="diagonal_relaxed").filter(pl.col("chain_id") == cfg.chain.chain_id)
        else:
            out[kind] = pl.DataFrame(schema=next(s for _, s in cfg.all_specs() if s.table == tables[0]).schema())
    return out
