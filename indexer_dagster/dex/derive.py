"""Uniswap V2 derived tables for DEX backends: pools, swaps, reserves, liquidity, volume, candles.

Why this module exists
----------------------
A DEX backend wants swaps with direction and price, pool reserves and spot prices, volume per
hour/day and price candles - not raw ``Swap``/``Sync``/``Mint``/``Burn`` logs. Everything here is
*derived data*: pure, deterministic functions of the canonical decoded event tables (plus token
metadata). `dex.incremental` applies them to the rows of a few blocks at a time (a row's values
depend on its own event, its pool and tokens; `pool_state` and the buckets are recomputed from the
rows they cover), and `dex.build.compute` to all rows at once: the two give the same tables. The
results do not depend on the order of the input rows: row tables are sorted by
``(chain_id, block_number, log_index)``, aggregates by ``(chain_id, pool, bucket_start)``, and
everything order-dependent (latest state, open/close) orders by ``(block_number, log_index)``.

Every row table keeps ``block_number`` and every aggregate keeps ``last_block`` so that a
confirmation ``status`` can be joined on later; this module does not compute status.

Exact amounts: ``Decimal(38, 0)``
---------------------------------
The decoder stores integers wider than 64 bits as exact base-10 ``Utf8`` (plus a lossy ``_f64``).
Here amounts, reserves and volumes are ``pl.Decimal(38, 0)`` (`EXACT`), chosen over ``Int128``
because it survives Arrow, Parquet and DuckDB unchanged (``decimal128(38, 0)`` / ``DECIMAL(38,0)``)
while polars' ``Int128`` cannot be exported to Arrow, and because polars *wraps silently* when
summing ``Int128`` in a group-by. The range is ``0 <= x < 10**38`` (10**38 ~ 2**126.2), far above
Uniswap V2's uint112 reserves and amounts (< 2**112 ~ 5.2e33).

* An input value that is not an integer in ``[0, 10**38)`` - e.g. anything >= 2**128, or a
  negative number - raises `ValueError` naming the table, column, row index, block number, log
  index and transaction. Nothing is silently rounded or clipped.
* Sums (volumes) are computed exactly: each value is split into two base-10**19 limbs summed in
  ``Int128`` (no wrap for fewer than ~10**19 rows), then recombined. A sum that reaches 10**38
  raises `ValueError` naming the pool and bucket (polars' own ``Decimal`` group-by sum would wrap).

Human-scaled values (columns ending ``_h``, and prices) are ``Float64``: the exact integer
correctly rounded to a double, divided by the correctly rounded double of ``10**decimals``.
They are null when a token's decimals are unknown (address missing from ``tokens``, or decimals
outside 0..255).

Joining to pools
----------------
Event tables are joined to `pools` on ``(chain_id, address) == (chain_id, pool)`` (inner join):
events of contracts that are not pools created by an indexed factory are dropped. Token metadata is
joined on the lower-cased token address (left join: unknown tokens give null symbols/decimals).
Addresses in outputs are lower-case.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import polars as pl

from indexer_dagster.parse.abi import KEY_SCHEMA as DECODED_KEYS

__all__ = [
    "EXACT",
    "EXACT_LIMIT",
    "INTERVALS",
    "label_pools",
    "liquidity_events",
    "pool_candles",
    "pool_reserves",
    "pool_state",
    "pool_volume",
    "pools",
    "swaps",
    "with_interval",
]

#: The exact type of amounts, reserves and volumes.
EXACT = pl.Decimal(38, 0)
#: Exact values must satisfy ``0 <= x < EXACT_LIMIT``.
EXACT_LIMIT = 10**38
#: Bucket sizes accepted by `pool_volume` and `pool_candles` (UTC, truncated).
INTERVALS = ("1m", "1h", "1d")

#: Key columns of a decoded event table (without ``address``), with their canonical types.
KEY_SCHEMA: dict[str, pl.DataType] = {k: v for k, v in DECODED_KEYS.items() if k != "address"}
_KEYS = list(KEY_SCHEMA)
_ROW_ORDER = ["chain_id", "block_number", "log_index"]
_IN_POOL_ORDER = ["block_number", "log_index"]
_POOL_COLUMNS = ["pool", "token0", "token1", "symbol0", "symbol1", "pair", "decimals0", "decimals1"]
#: The columns that name a pool's tokens for a reader, carried by every table a pool appears in.
_LABEL_COLUMNS = ["symbol0", "symbol1", "pair"]

_LIMB = 10**19  # limb base for exact sums: 10**38 == _LIMB**2
_SCALE_OLD = list(range(256))
_SCALE_NEW = [float(10**d) for d in _SCALE_OLD]  # correctly rounded 10**d (pow() is not, e.g. 1e23)

_SWAP_AMOUNTS = ("amount0_in", "amount1_in", "amount0_out", "amount1_out")


# --------------------------------------------------------------------------------------------
# Helpers


def _require(frame: pl.DataFrame, table: str, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{table}: missing column(s) {missing}; have {frame.columns}")


def _lit128(v: int) -> pl.Expr:
    return pl.lit(v, dtype=pl.Int128)


def _row_where(row: dict) -> str:
    parts = [f"{k}={row[k]!r}" for k in ("chain_id", "block_number", "log_index", "transaction_hash") if k in row]
    return ", ".join(parts)


def _exact(frame: pl.DataFrame, table: str, columns: Sequence[str]) -> pl.DataFrame:
    """Replace ``columns`` (exact base-10 Utf8, or integers) by `EXACT`; raise on any value that
    is not an integer in ``[0, EXACT_LIMIT)``. Nulls stay null."""
    parsed: dict[str, pl.Expr] = {}
    bad: dict[str, pl.Expr] = {}
    for c in columns:
        dtype = frame.schema[c]
        if dtype == pl.Utf8:
            v = pl.col(c).str.to_integer(base=10, dtype=pl.Int128, strict=False)
        elif dtype.is_integer() or (isinstance(dtype, pl.Decimal) and dtype.scale == 0):
            v = pl.col(c).cast(pl.Int128, strict=False)
        else:
            raise ValueError(
                f"{table}: column {c} has type {dtype}; expected exact base-10 Utf8 or an integer type"
            )
        ok = (v >= 0) & (v < _lit128(EXACT_LIMIT))
        parsed[c] = v
        bad[c] = pl.col(c).is_not_null() & ~ok.fill_null(False)
    if columns:
        counts = frame.select([e.sum().alias(c) for c, e in bad.items()]).row(0, named=True)
        for c, n in counts.items():
            if n:
                i = frame.with_row_index("__row").filter(bad[c])["__row"][0]
                row = frame.row(i, named=True)
                raise ValueError(
                    f"{table}: {c} = {row[c]!r} at row {i} ({_row_where(row)}) is not an integer in "
                    f"[0, 10**38): exact amounts are Decimal(38, 0) (10**38 ~ 2**126.2; Uniswap V2 values "
                    f"are < 2**112), refusing to lose precision ({n} row(s) affected)"
                )
    return frame.with_columns([e.cast(EXACT).alias(c) for c, e in parsed.items()])


def _keys() -> list[pl.Expr]:
    return [pl.col(c).cast(t) for c, t in KEY_SCHEMA.items()]


def _tokens(tokens: pl.DataFrame) -> pl.DataFrame:
    """Normalised token metadata: lower-case address, one row per address, decimals in 0..255 or null."""
    _require(tokens, "tokens", ["address", "symbol", "decimals"])
    dec = pl.col("decimals").cast(pl.Int64, strict=False)
    t = tokens.select(
        pl.col("address").cast(pl.Utf8).str.to_lowercase(),
        pl.col("symbol").cast(pl.Utf8),
        pl.when(dec.is_between(0, 255)).then(dec).alias("decimals"),
    ).unique(maintain_order=True)
    dup = t.filter(pl.col("address").is_duplicated())
    if dup.height:
        raise ValueError(f"tokens: conflicting metadata for {dup['address'].unique().sort().to_list()}")
    return t


def _short(address: str) -> pl.Expr:
    """`0x1a1a…1a1a`: a token without a symbol, in a pair label."""
    return pl.concat_str(pl.col(address).str.slice(0, 6), pl.lit("…"), pl.col(address).str.slice(-4))


def _pair_label() -> pl.Expr:
    """`WETH/USDC` (token0/token1, the order prices are quoted in); a short address where a symbol is unknown."""
    side0 = pl.coalesce(pl.col("symbol0"), _short("token0"))
    side1 = pl.coalesce(pl.col("symbol1"), _short("token1"))
    return pl.concat_str(side0, pl.lit("/"), side1).alias("pair")


def _pool_meta(pools_: pl.DataFrame, tokens: pl.DataFrame) -> pl.DataFrame:
    """pools x token metadata: chain_id, pool, token0, token1, symbol0, symbol1, pair, decimals0, decimals1."""
    _require(pools_, "pools", ["chain_id", "pool", "token0", "token1"])
    p = pools_.select(
        pl.col("chain_id").cast(pl.Int64),
        *[pl.col(c).cast(pl.Utf8).str.to_lowercase() for c in ("pool", "token0", "token1")],
    )
    if p.select(pl.struct("chain_id", "pool").is_duplicated().any()).item():
        raise ValueError("pools: a (chain_id, pool) appears more than once; pass the output of pools()")
    t = _tokens(tokens)
    for i in ("0", "1"):
        p = p.join(
            t.rename({"address": f"token{i}", "symbol": f"symbol{i}", "decimals": f"decimals{i}"}),
            on=f"token{i}",
            how="left",
        )
    return p.with_columns(_pair_label()).select("chain_id", *_POOL_COLUMNS)


def _attach(frame: pl.DataFrame, pools_: pl.DataFrame, tokens: pl.DataFrame) -> pl.DataFrame:
    """Inner-join events to their pool (on chain_id + emitting address) and token metadata."""
    f = frame.with_columns(pl.col("address").str.to_lowercase().alias("pool"))
    return f.join(_pool_meta(pools_, tokens), on=["chain_id", "pool"], how="inner")


def _scale(decimals: str) -> pl.Expr:
    """10**decimals as a correctly rounded Float64 (null when decimals is null)."""
    return pl.col(decimals).replace_strict(_SCALE_OLD, _SCALE_NEW, default=None, return_dtype=pl.Float64)


def _human(column: str, decimals: str) -> pl.Expr:
    return (pl.col(column).cast(pl.Float64) / _scale(decimals)).alias(f"{column}_h")


def _bucket(interval: str) -> pl.Expr:
    if interval not in INTERVALS:
        raise ValueError(f"interval must be one of {INTERVALS}, got {interval!r}")
    return pl.col("block_timestamp").cast(pl.Datetime("us", "UTC")).dt.truncate(interval).alias("bucket_start")


def _sum_parts(name: str, columns: Sequence[str]) -> list[pl.Expr]:
    """Aggregations for the exact sum of ``columns`` (all rows of the group): two Int128 limb sums."""
    limb = _lit128(_LIMB)
    xs = [pl.col(c).cast(pl.Int128) for c in columns]
    hi = functools.reduce(operator.add, [(x // limb).sum() for x in xs])
    lo = functools.reduce(operator.add, [(x % limb).sum() for x in xs])
    return [hi.alias(f"__{name}_hi"), lo.alias(f"__{name}_lo")]


def _finish_sums(frame: pl.DataFrame, names: Sequence[str], where: str) -> pl.DataFrame:
    """Recombine `_sum_parts` into `EXACT` columns; raise when a sum reaches 10**38."""
    limb = _lit128(_LIMB)
    frame = frame.with_columns(
        [(pl.col(f"__{n}_hi") + pl.col(f"__{n}_lo") // limb).alias(f"__{n}_hi") for n in names]
        + [(pl.col(f"__{n}_lo") % limb).alias(f"__{n}_lo") for n in names]
    )
    for n in names:
        over = frame.filter(pl.col(f"__{n}_hi") >= limb)
        if over.height:
            row = over.row(0, named=True)
            raise ValueError(
                f"{where}: exact {n} of pool {row['pool']} (chain_id={row['chain_id']}) in bucket "
                f"{row['bucket_start']} is >= 10**38 and does not fit Decimal(38, 0) "
                f"({over.height} bucket(s) affected)"
            )
    return frame.with_columns(
        [(pl.col(f"__{n}_hi") * limb + pl.col(f"__{n}_lo")).cast(EXACT).alias(n) for n in names]
    ).drop([f"__{n}_{p}" for n in names for p in ("hi", "lo")])


# --------------------------------------------------------------------------------------------
# Row tables


def pools(pair_created: pl.DataFrame) -> pl.DataFrame:
    """One row per pool from ``uniswap_v2_factory_pair_created``.

    Columns: chain_id, pool (the ``pair`` argument), token0, token1, factory (the emitting
    ``address``), pair_index (``arg3``, the factory's pair count after creation, Int64; null if it
    does not fit), created_block, created_timestamp, block_number (== created_block),
    log_index, transaction_hash. If a (chain_id, pool) occurs more than once, the earliest
    ``(block_number, log_index)`` is kept. Sorted by (chain_id, created_block, log_index).
    """
    table = "uniswap_v2_factory_pair_created"
    _require(pair_created, table, [*_KEYS, "address", "token0", "token1", "pair"])
    if "arg3" in pair_created.columns:
        idx = pl.col("arg3").cast(pl.Utf8).str.to_integer(base=10, dtype=pl.Int64, strict=False)
    else:
        idx = pl.lit(None, dtype=pl.Int64)
    return (
        pair_created.select(
            pl.col("chain_id").cast(pl.Int64),
            pl.col("pair").str.to_lowercase().alias("pool"),
            pl.col("token0").str.to_lowercase(),
            pl.col("token1").str.to_lowercase(),
            pl.col("address").str.to_lowercase().alias("factory"),
            idx.alias("pair_index"),
            pl.col("block_number").cast(pl.Int64).alias("created_block"),
            pl.col("block_timestamp").cast(pl.Datetime("us", "UTC")).alias("created_timestamp"),
            pl.col("block_number").cast(pl.Int64),
            pl.col("log_index").cast(pl.Int64),
            pl.col("transaction_hash").cast(pl.Utf8),
        )
        .sort(_ROW_ORDER)
        .unique(subset=["chain_id", "pool"], keep="first", maintain_order=True)
    )


def label_pools(pools_: pl.DataFrame, tokens: pl.DataFrame) -> pl.DataFrame:
    """`pools` with symbol0, symbol1 and pair (e.g. ``WETH/USDC``) after token1, so a reader of the pools
    table sees which market a pool is without joining `tokens`. Row order is kept."""
    meta = _pool_meta(pools_, tokens).select("chain_id", "pool", *_LABEL_COLUMNS)
    at = pools_.columns.index("token1") + 1
    order = [*pools_.columns[:at], *_LABEL_COLUMNS, *pools_.columns[at:]]
    keyed = pools_.with_columns(pl.col("pool").str.to_lowercase().alias("__pool"))
    out = keyed.join(meta.rename({"pool": "__pool"}), on=["chain_id", "__pool"], how="left", maintain_order="left")
    return out.select(order)


def swaps(swap: pl.DataFrame, pools: pl.DataFrame, tokens: pl.DataFrame) -> pl.DataFrame:
    """One row per ``Swap`` of a known pool.

    Columns: the key columns (chain_id, block_number, block_hash, block_timestamp,
    transaction_hash, transaction_index, log_index), pool, token0, token1, symbol0, symbol1, pair,
    decimals0, decimals1, sender, recipient (the event's ``to``), amount0_in, amount1_in,
    amount0_out, amount1_out (`EXACT`), the same with ``_h`` (Float64, raw / 10**decimals),
    direction, token_in, token_out, amount_in, amount_out (`EXACT`), amount_in_h, amount_out_h,
    price.

    Definitions (net0 = amount0_in - amount0_out, net1 = amount1_in - amount1_out, exact):

    * direction = "0to1" if net0_h >= net1_h else "1to0", where netX_h = float(netX) /
      10**decimalsX (raw floats when a token's decimals are unknown). For every ordinary swap
      (one token only in, the other only out) the two have opposite signs, so this is exactly
      "0to1 iff token0 went in". A swap with net input on both sides goes to the side with the
      larger human-scaled net input; ties (e.g. no net movement) are "0to1".
    * 0to1: token_in = token0, token_out = token1, amount_in = amount0_in,
      amount_out = amount1_out; 1to0: token_in = token1, token_out = token0,
      amount_in = amount1_in, amount_out = amount0_out (gross amounts, never negative).
    * price = token1's price in token0 = moved0_h / moved1_h with movedX_h =
      (amountX_in + amountX_out) / 10**decimalsX - the gross amounts, so for an ordinary swap
      exactly the execution price, and per swap the same ratio as `pool_volume` uses. Null when
      nothing of token1 moved or a token's decimals are unknown.

    Raises ValueError when an amount is not an integer in [0, 10**38) (see the module docstring).
    Sorted by (chain_id, block_number, log_index).
    """
    table = "uniswap_v2_pair_swap"
    _require(swap, table, [*_KEYS, "address", "sender", "to", *_SWAP_AMOUNTS])
    f = _attach(_exact(swap, table, _SWAP_AMOUNTS).with_columns(_keys()), pools, tokens)
    s0, s1 = _scale("decimals0"), _scale("decimals1")
    known = pl.col("decimals0").is_not_null() & pl.col("decimals1").is_not_null()
    net0 = (pl.col("amount0_in") - pl.col("amount0_out")).cast(pl.Float64)
    net1 = (pl.col("amount1_in") - pl.col("amount1_out")).cast(pl.Float64)
    cmp0 = pl.when(known).then(net0 / s0).otherwise(net0)
    cmp1 = pl.when(known).then(net1 / s1).otherwise(net1)
    moved0 = (pl.col("amount0_in").cast(pl.Float64) + pl.col("amount0_out").cast(pl.Float64)) / s0
    moved1 = (pl.col("amount1_in").cast(pl.Float64) + pl.col("amount1_out").cast(pl.Float64)) / s1
    f = f.with_columns(
        *[_human(c, f"decimals{c[6]}") for c in _SWAP_AMOUNTS],
        pl.when(cmp0 >= cmp1).then(pl.lit("0to1")).otherwise(pl.lit("1to0")).alias("direction"),
        pl.when(moved1 > 0).then(moved0 / moved1).alias("price"),
        pl.col("to").alias("recipient"),
    )
    z = pl.col("direction") == "0to1"
    f = f.with_columns(
        pl.when(z).then(pl.col("token0")).otherwise(pl.col("token1")).alias("token_in"),
        pl.when(z).then(pl.col("token1")).otherwise(pl.col("token0")).alias("token_out"),
        pl.when(z).then(pl.col("amount0_in")).otherwise(pl.col("amount1_in")).alias("amount_in"),
        pl.when(z).then(pl.col("amount1_out")).otherwise(pl.col("amount0_out")).alias("amount_out"),
        pl.when(z).then(pl.col("amount0_in_h")).otherwise(pl.col("amount1_in_h")).alias("amount_in_h"),
        pl.when(z).then(pl.col("amount1_out_h")).otherwise(pl.col("amount0_out_h")).alias("amount_out_h"),
    )
    return f.select(
        *_KEYS,
        *_POOL_COLUMNS,
        "sender",
        "recipient",
        *_SWAP_AMOUNTS,
        *[f"{c}_h" for c in _SWAP_AMOUNTS],
        "direction",
        "token_in",
        "token_out",
        "amount_in",
        "amount_out",
        "amount_in_h",
        "amount_out_h",
        "price",
    ).sort(_ROW_ORDER)


def pool_reserves(sync: pl.DataFrame, pools: pl.DataFrame, tokens: pl.DataFrame) -> pl.DataFrame:
    """One row per ``Sync`` of a known pool: the reserves right after that log.

    Columns: the key columns, pool, token0, token1, symbol0, symbol1, pair, decimals0, decimals1,
    reserve0, reserve1 (`EXACT`), reserve0_h, reserve1_h (Float64), price = reserve0_h /
    reserve1_h (spot price of token1 in token0, same convention as `swaps`' price; null when
    reserve1 is 0 or decimals unknown) and inverse_price = reserve1_h / reserve0_h (null when
    reserve0 is 0). Sorted by (chain_id, block_number, log_index).
    """
    table = "uniswap_v2_pair_sync"
    _require(sync, table, [*_KEYS, "address", "reserve0", "reserve1"])
    f = _attach(_exact(sync, table, ("reserve0", "reserve1")).with_columns(_keys()), pools, tokens)
    f = f.with_columns(_human("reserve0", "decimals0"), _human("reserve1", "decimals1"))
    f = f.with_columns(
        pl.when(pl.col("reserve1_h") > 0).then(pl.col("reserve0_h") / pl.col("reserve1_h")).alias("price"),
        pl.when(pl.col("reserve0_h") > 0).then(pl.col("reserve1_h") / pl.col("reserve0_h")).alias("inverse_price"),
    )
    return f.select(
        *_KEYS, *_POOL_COLUMNS, "reserve0", "reserve1", "reserve0_h", "reserve1_h", "price", "inverse_price"
    ).sort(_ROW_ORDER)


def pool_state(pool_reserves: pl.DataFrame) -> pl.DataFrame:
    """The latest reserves of each pool: per (chain_id, pool) the `pool_reserves` row with the
    greatest (block_number, log_index).

    Columns: chain_id, pool, token0, token1, symbol0, symbol1, pair, reserve0, reserve1, reserve0_h,
    reserve1_h, price, inverse_price, last_block (that row's block_number), last_log_index, last_timestamp (its
    block_timestamp). Sorted by (chain_id, pool).
    """
    carry = ["token0", "token1", *_LABEL_COLUMNS, "reserve0", "reserve1", "reserve0_h", "reserve1_h", "price", "inverse_price"]
    needed = ["chain_id", "pool", "block_number", "log_index", "block_timestamp", *carry]
    _require(pool_reserves, "pool_reserves", needed)

    def last(c: str) -> pl.Expr:
        return pl.col(c).sort_by(_IN_POOL_ORDER).last()

    return (
        pool_reserves.group_by(["chain_id", "pool"])
        .agg(
            *[last(c) for c in carry],
            last("block_number").alias("last_block"),
            last("log_index").alias("last_log_index"),
            last("block_timestamp").alias("last_timestamp"),
        )
        .sort(["chain_id", "pool"])
    )


def liquidity_events(
    mint: pl.DataFrame, burn: pl.DataFrame, pools: pl.DataFrame, tokens: pl.DataFrame
) -> pl.DataFrame:
    """One row per ``Mint`` or ``Burn`` of a known pool.

    Columns: the key columns, pool, token0, token1, symbol0, symbol1, pair, decimals0, decimals1, kind
    ("mint" / "burn"), sender, recipient (the burn's ``to``; null for mints, whose event has no
    recipient), amount0, amount1 (`EXACT`: tokens added for a mint, removed for a burn),
    amount0_h, amount1_h (Float64). Sorted by (chain_id, block_number, log_index).
    """
    amounts = ("amount0", "amount1")
    parts = []
    for kind, table, frame in (("mint", "uniswap_v2_pair_mint", mint), ("burn", "uniswap_v2_pair_burn", burn)):
        _require(frame, table, [*_KEYS, "address", "sender", *amounts] + (["to"] if kind == "burn" else []))
        recipient = pl.col("to").cast(pl.Utf8) if kind == "burn" else pl.lit(None, dtype=pl.Utf8)
        parts.append(
            _exact(frame, table, amounts).select(
                *_keys(),
                pl.col("address").cast(pl.Utf8),
                pl.lit(kind).alias("kind"),
                pl.col("sender").cast(pl.Utf8),
                recipient.alias("recipient"),
                *amounts,
            )
        )
    f = _attach(pl.concat(parts, how="vertical"), pools, tokens)
    f = f.with_columns(_human("amount0", "decimals0"), _human("amount1", "decimals1"))
    return f.select(
        *_KEYS, *_POOL_COLUMNS, "kind", "sender", "recipient", *amounts, "amount0_h", "amount1_h"
    ).sort(_ROW_ORDER)


# --------------------------------------------------------------------------------------------
# Aggregates over `swaps`


def _aggregate(swaps: pl.DataFrame, interval: str, where: str, extra: Sequence[pl.Expr] = ()) -> pl.DataFrame:
    tokens = ["token0", "token1", *_LABEL_COLUMNS, "decimals0", "decimals1"]
    _require(swaps, where, ["chain_id", "pool", *tokens, "block_number", "log_index", "block_timestamp",
                            *_SWAP_AMOUNTS])
    f = (
        swaps.with_columns(_bucket(interval))
        .group_by(["chain_id", "pool", "bucket_start"])
        .agg(
            *[pl.col(c).first() for c in tokens],
            pl.len().cast(pl.Int64).alias("swap_count"),
            *_sum_parts("volume_token0", ("amount0_in", "amount0_out")),
            *_sum_parts("volume_token1", ("amount1_in", "amount1_out")),
            *extra,
            pl.col("block_number").min().alias("first_block"),
            pl.col("block_number").max().alias("last_block"),
        )
    )
    f = _finish_sums(f, ["volume_token0", "volume_token1"], where)
    return f.with_columns(
        (pl.col("volume_token0").cast(pl.Float64) / _scale("decimals0")).alias("volume_token0_h"),
        (pl.col("volume_token1").cast(pl.Float64) / _scale("decimals1")).alias("volume_token1_h"),
    ).sort(["chain_id", "pool", "bucket_start"])


def value_in(swaps: pl.DataFrame, reserves: pl.DataFrame, reference: str | None) -> pl.DataFrame:
    """`swaps` with `volume_ref` (Float64): what each swap moved, valued in the `reference` token (human
    units), so pools of different tokens can be ranked by one volume.

    A pool holding the reference token: the reference token it moved (amount in + out). Another pool:
    its token0 moved (else its token1) times that token's price in the reference token at the swap —
    from the latest `Sync`, at or before the swap's (block, log index), of a pool pairing that token with
    the reference token (one hop; none: null). None for `reference`: the column, all null."""
    moved = [(pl.col(f"amount{i}_in_h") + pl.col(f"amount{i}_out_h")) for i in (0, 1)]
    if reference is None or swaps.height == 0:
        return swaps.with_columns(pl.lit(None, pl.Float64).alias("volume_ref"))
    ref = reference.lower()
    position = (pl.col("block_number") * (1 << 24) + pl.col("log_index")).alias("_at")
    # The reference token's price of each token paired with it, after each Sync of such a pool.
    quotes = reserves.filter((pl.col("token0") == ref) | (pl.col("token1") == ref)).select(
        "chain_id", position,
        pl.when(pl.col("token0") == ref).then(pl.col("token1")).otherwise(pl.col("token0")).alias("_token"),
        pl.when(pl.col("token0") == ref).then(pl.col("price")).otherwise(pl.col("inverse_price")).alias("_quote"),
    ).drop_nulls("_quote").sort("_at")
    out = swaps.with_columns(position).sort("_at")
    for i in (0, 1):
        out = out.join_asof(
            quotes.rename({"_token": f"token{i}", "_quote": f"_quote{i}"}), on="_at", by=["chain_id", f"token{i}"],
            strategy="backward", check_sortedness=False,  # both sides sorted by `_at` above
        )
    direct = (pl.when(pl.col("token0") == ref).then(moved[0])
              .when(pl.col("token1") == ref).then(moved[1]))
    via = pl.when(pl.col("_quote0").is_not_null()).then(moved[0] * pl.col("_quote0")).otherwise(
        moved[1] * pl.col("_quote1"))
    return out.with_columns(pl.coalesce(direct, via).alias("volume_ref")).drop(
        "_at", "_quote0", "_quote1").sort(_ROW_ORDER)


def with_interval(frames: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """One table of the buckets of several intervals (`pool_volume` or `pool_candles` per interval), each
    row tagged with its `interval`: how the lake stores them."""
    return pl.concat([f.with_columns(pl.lit(i).alias("interval")) for i, f in frames.items()], how="vertical")


def pool_volume(swaps: pl.DataFrame, interval: str) -> pl.DataFrame:
    """Volume per pool per time bucket, from the output of `swaps`.

    interval: "1h" or "1d" (also "1m"); buckets are ``block_timestamp`` truncated in UTC.
    Buckets without swaps are absent. Columns: chain_id, pool, token0, token1, symbol0, symbol1, pair,
    bucket_start
    (Datetime us UTC), swap_count (Int64), volume_token0 = sum over the bucket's swaps of
    amount0_in + amount0_out, volume_token1 = sum of amount1_in + amount1_out (`EXACT`, exact
    sums; ValueError if a sum reaches 10**38), volume_token0_h, volume_token1_h (Float64 =
    exact sum / 10**decimals), first_block, last_block (min / max block_number of the bucket).
    Sorted by (chain_id, pool, bucket_start).
    """
    valued = "volume_ref" in swaps.columns
    ref = pl.col("volume_ref")
    # A bucket holding a swap no price reaches has no reference volume (not a partial sum).
    extra = [pl.when(ref.null_count() == 0).then(ref.sum()).alias("volume_ref")] if valued else []
    f = _aggregate(swaps, interval, "pool_volume", extra)
    if not valued:
        f = f.with_columns(pl.lit(None, pl.Float64).alias("volume_ref"))
    return f.select(
        "chain_id", "pool", "token0", "token1", *_LABEL_COLUMNS, "bucket_start", "swap_count",
        "volume_token0", "volume_token1", "volume_token0_h", "volume_token1_h", "volume_ref", "first_block",
        "last_block",
    )


def pool_candles(swaps: pl.DataFrame, interval: str) -> pl.DataFrame:
    """Price candles per pool per time bucket, from the output of `swaps`.

    interval: "1m" or "1h" (also "1d"); buckets are ``block_timestamp`` truncated in UTC.
    Buckets without swaps are absent (no forward-filled candles; fill on read if needed).
    open / close = the ``price`` of the first / last swap of the bucket in (block_number,
    log_index) order, high / low = max / min price; swaps with a null price (nothing of token1
    moved, or unknown decimals) count in volume and swap_count but not in OHLC (all four null if
    no swap of the bucket has a price). Columns: chain_id, pool, token0, token1, symbol0, symbol1, pair,
    bucket_start,
    open, high, low, close (Float64, token1 in token0, human-scaled), volume_token0,
    volume_token1 (`EXACT`, as in `pool_volume`), volume_token0_h, volume_token1_h, swap_count,
    first_block, last_block. Sorted by (chain_id, pool, bucket_start).
    """
    _require(swaps, "pool_candles", ["price"])
    priced = pl.col("price").sort_by(_IN_POOL_ORDER).drop_nulls()
    f = _aggregate(
        swaps,
        interval,
        "pool_candles",
        [
            priced.first().alias("open"),
            pl.col("price").max().alias("high"),
            pl.col("price").min().alias("low"),
            priced.last().alias("close"),
        ],
    )
    return f.select(
        "chain_id", "pool", "token0", "token1", *_LABEL_COLUMNS, "bucket_start", "open", "high", "low", "close",
        "volume_token0", "volume_token1", "volume_token0_h", "volume_token1_h", "swap_count",
        "first_block", "last_block",
    )
