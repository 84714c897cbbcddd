"""indexer_dagster.dex.derive against plain-Python reference computations (ints, Fractions, loops)."""

import math
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import duckdb
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexer_dagster.dex import derive as dex

# --------------------------------------------------------------------------------------------
# Synthetic decoded tables (same column names and types as the decoder writes)

KEY_SCHEMA = {
    "chain_id": pl.Int64,
    "block_number": pl.Int64,
    "block_hash": pl.Utf8,
    "block_timestamp": pl.Datetime("us", "UTC"),
    "transaction_hash": pl.Utf8,
    "transaction_index": pl.Int64,
    "log_index": pl.Int64,
    "address": pl.Utf8,
}


def big_schema(*names):
    out = {}
    for n in names:
        out[n] = pl.Utf8
        out[f"{n}_f64"] = pl.Float64
    return out


SWAP_SCHEMA = {
    **KEY_SCHEMA,
    "sender": pl.Utf8,
    **big_schema("amount0_in", "amount1_in", "amount0_out", "amount1_out"),
    "to": pl.Utf8,
}
SYNC_SCHEMA = {**KEY_SCHEMA, **big_schema("reserve0", "reserve1")}
MINT_SCHEMA = {**KEY_SCHEMA, "sender": pl.Utf8, **big_schema("amount0", "amount1")}
BURN_SCHEMA = {**KEY_SCHEMA, "sender": pl.Utf8, **big_schema("amount0", "amount1"), "to": pl.Utf8}
PAIR_SCHEMA = {**KEY_SCHEMA, "token0": pl.Utf8, "token1": pl.Utf8, "pair": pl.Utf8, **big_schema("arg3")}


def addr(byte: str) -> str:
    return "0x" + byte * 20


A, B, C, D = addr("1a"), addr("2b"), addr("0c"), addr("3d")  # D has no metadata
P1, P2, P3, UNKNOWN_POOL = addr("a1"), addr("a2"), addr("a3"), addr("ff")
FACTORY = addr("fa")
ROUTER, ALICE, BOB = addr("e1"), addr("e2"), addr("e3")
POOL_TOKENS = {P1: (A, B), P2: (C, A), P3: (A, D)}  # A is token0 of P1 and token1 of P2
DECIMALS = {A: 18, B: 6, C: 18}

T0 = datetime(2024, 1, 1, 0, 58, 30, tzinfo=UTC)


def ts(block: int) -> datetime:
    # block 103 -> 00:59:06 (minute boundary after 102), 108 -> 01:00:06 (hour boundary after 107),
    # 8000 -> the next day.
    return T0 + timedelta(seconds=12 * (block - 100))


def key(block: int, log_index: int, address: str, chain_id: int = 1) -> dict:
    return {
        "chain_id": chain_id,
        "block_number": block,
        "block_hash": f"0x{block:064x}",
        "block_timestamp": ts(block),
        "transaction_hash": f"0x{block * 1000 + log_index:064x}",
        "transaction_index": log_index // 2,
        "log_index": log_index,
        "address": address,
    }


def big(**values) -> dict:
    out = {}
    for k, v in values.items():
        out[k] = str(v)
        out[f"{k}_f64"] = float(v)
    return out


def swap_row(pool, block, li, a0in, a1in, a0out, a1out, to=ALICE):
    return {
        **key(block, li, pool),
        "sender": ROUTER,
        **big(amount0_in=a0in, amount1_in=a1in, amount0_out=a0out, amount1_out=a1out),
        "to": to,
    }


def frame(rows, schema):
    return pl.DataFrame(rows, schema=schema)


E18, E6 = 10**18, 10**6

SWAP_ROWS = [
    # P1: token0 = A (18 decimals), token1 = B (6 decimals)
    swap_row(P1, 100, 1, 3 * E18 // 2, 0, 0, 2_990_000_000),  # 0to1
    swap_row(P1, 100, 3, 0, 1_000 * E6, 498 * E18 // 1000, 0),  # 1to0
    swap_row(P1, 102, 0, 2 * E18, 0, 0, 3_950 * E6),  # 00:58:54
    swap_row(P1, 103, 2, 0, 500 * E6, 251 * E18 // 1000, 0),  # 00:59:06, next minute
    swap_row(P1, 100, 0, 5, 0, 0, 0),  # nothing of token1 moved: price null (first of its buckets)
    swap_row(P1, 107, 5, E18 // 10, 0, 0, 197 * E6 // 1000 * 1000),  # 00:59:54
    swap_row(P1, 108, 1, 0, 2_000 * E6, 1_003 * E18 // 1000, 0, to=BOB),  # 01:00:06, next hour
    swap_row(P1, 108, 4, E18, 3 * E6, 4 * E18 // 10, E6),  # in and out on both sides -> 1to0
    swap_row(P1, 8000, 0, 7 * E18, 0, 0, 13_000 * E6),  # next day
    # P2: token0 = C (18), token1 = A (18); values near 2**112
    swap_row(P2, 101, 2, 2**112 - 1, 0, 0, 2**111 + 12345),
    swap_row(P2, 103, 0, 0, 2**112 - 5, 2**110, 0),
    swap_row(P2, 108, 0, 10**15, 0, 0, 999 * 10**12),
    swap_row(P2, 108, 3, 0, 0, 0, 0),  # no movement at all: a tie, "0to1", price null
    # P3: token1 = D has no metadata -> human values and price null
    swap_row(P3, 104, 0, 10**17, 0, 0, 12345),
    # not a known pool -> dropped
    swap_row(UNKNOWN_POOL, 105, 0, 1, 0, 0, 1),
]

SYNC_ROWS = [
    {**key(99, 0, P1), **big(reserve0=0, reserve1=0)},
    {**key(100, 2, P1), **big(reserve0=1001 * E18, reserve1=2_000_000 * E6)},
    {**key(100, 4, P1), **big(reserve0=1000 * E18, reserve1=2_001_000 * E6)},
    {**key(108, 5, P1), **big(reserve0=999 * E18, reserve1=2_003_000 * E6)},
    {**key(108, 2, P1), **big(reserve0=998 * E18, reserve1=2_004_000 * E6)},  # earlier log of the same block
    {**key(101, 3, P2), **big(reserve0=2**112 - 1, reserve1=2**112 - 3)},
    {**key(103, 1, P2), **big(reserve0=2**111, reserve1=2**112 - 2)},
    {**key(104, 1, P3), **big(reserve0=10**18, reserve1=10**9)},
    {**key(105, 1, UNKNOWN_POOL), **big(reserve0=1, reserve1=1)},
]

MINT_ROWS = [
    {**key(98, 0, P1), "sender": ROUTER, **big(amount0=1000 * E18, amount1=2_000_000 * E6)},
    {**key(97, 5, P2), "sender": ROUTER, **big(amount0=2**112 - 7, amount1=2**112 - 9)},
    {**key(106, 1, P3), "sender": ROUTER, **big(amount0=E18, amount1=5)},
]
BURN_ROWS = [
    {**key(109, 2, P1), "sender": ROUTER, **big(amount0=E18 // 3, amount1=666_666), "to": BOB},
    {**key(97, 9, P2), "sender": ROUTER, **big(amount0=2**100, amount1=3), "to": ALICE},
    {**key(106, 3, UNKNOWN_POOL), "sender": ROUTER, **big(amount0=1, amount1=1), "to": ALICE},
]

PAIR_ROWS = [
    {**key(90, 0, FACTORY), "token0": A, "token1": B, "pair": P1, **big(arg3=1)},
    {**key(91, 0, FACTORY), "token0": C, "token1": A, "pair": P2.upper().replace("0X", "0x"), **big(arg3=2)},
    {**key(92, 1, FACTORY), "token0": A, "token1": D, "pair": P3, **big(arg3=3)},
    {**key(95, 0, FACTORY), "token0": B, "token1": A, "pair": P1, **big(arg3=4)},  # duplicate: earliest wins
]

TOKENS = pl.DataFrame(
    {"address": [A, B, C, A], "symbol": ["AAA", "BBB", "CCC", "AAA"], "decimals": [18, 6, 18, 18]},
    schema={"address": pl.Utf8, "symbol": pl.Utf8, "decimals": pl.Int64},
)


def swap_frame(rows=SWAP_ROWS):
    return frame(rows, SWAP_SCHEMA)


@pytest.fixture(scope="module")
def pools_df():
    return dex.pools(frame(PAIR_ROWS, PAIR_SCHEMA))


@pytest.fixture(scope="module")
def swaps_df(pools_df):
    return dex.swaps(swap_frame(), pools_df, TOKENS)


# --------------------------------------------------------------------------------------------
# Reference computations


def scaled(raw: int, decimals):
    return None if decimals is None else Fraction(raw, 10**decimals)


def ref_swaps(rows):
    out = []
    for r in rows:
        if r["address"] not in POOL_TOKENS:
            continue
        t0, t1 = POOL_TOKENS[r["address"]]
        d0, d1 = DECIMALS.get(t0), DECIMALS.get(t1)
        a0i, a1i, a0o, a1o = (int(r[c]) for c in ("amount0_in", "amount1_in", "amount0_out", "amount1_out"))
        n0, n1 = a0i - a0o, a1i - a1o
        if d0 is not None and d1 is not None:
            c0, c1 = Fraction(n0, 10**d0), Fraction(n1, 10**d1)
        else:
            c0, c1 = n0, n1
        zero_to_one = c0 >= c1
        m0, m1 = scaled(a0i + a0o, d0), scaled(a1i + a1o, d1)
        price = m0 / m1 if m0 is not None and m1 else None
        out.append(
            {
                "block_number": r["block_number"],
                "log_index": r["log_index"],
                "block_timestamp": r["block_timestamp"],
                "pool": r["address"],
                "token0": t0,
                "token1": t1,
                "d0": d0,
                "d1": d1,
                "recipient": r["to"],
                "a0i": a0i,
                "a1i": a1i,
                "a0o": a0o,
                "a1o": a1o,
                "direction": "0to1" if zero_to_one else "1to0",
                "token_in": t0 if zero_to_one else t1,
                "token_out": t1 if zero_to_one else t0,
                "amount_in": a0i if zero_to_one else a1i,
                "amount_out": a1o if zero_to_one else a0o,
                "price": price,
            }
        )
    out.sort(key=lambda s: (s["block_number"], s["log_index"]))
    return out


def bucket_of(t: datetime, interval: str) -> datetime:
    if interval == "1m":
        return t.replace(second=0, microsecond=0)
    if interval == "1h":
        return t.replace(minute=0, second=0, microsecond=0)
    return t.replace(hour=0, minute=0, second=0, microsecond=0)


def ref_buckets(ref, interval):
    """(pool, bucket) -> dict of count, exact volumes, first/last block, OHLC over non-null prices."""
    groups = {}
    for s in ref:
        groups.setdefault((s["pool"], bucket_of(s["block_timestamp"], interval)), []).append(s)
    out = {}
    for k, rows in groups.items():
        rows = sorted(rows, key=lambda s: (s["block_number"], s["log_index"]))
        v0 = v1 = 0
        for s in rows:
            v0 += s["a0i"] + s["a0o"]
            v1 += s["a1i"] + s["a1o"]
        prices = [s["price"] for s in rows if s["price"] is not None]
        out[k] = {
            "swap_count": len(rows),
            "v0": v0,
            "v1": v1,
            "d0": rows[0]["d0"],
            "d1": rows[0]["d1"],
            "first_block": min(s["block_number"] for s in rows),
            "last_block": max(s["block_number"] for s in rows),
            "ohlc": (prices[0], max(prices), min(prices), prices[-1]) if prices else (None,) * 4,
        }
    return out


def close(actual, expected):
    if expected is None:
        return actual is None
    return actual is not None and math.isclose(actual, float(expected), rel_tol=1e-12)


# --------------------------------------------------------------------------------------------
# pools


def test_pools(pools_df):
    assert pools_df.columns == [
        "chain_id", "pool", "token0", "token1", "factory", "pair_index", "created_block",
        "created_timestamp", "block_number", "log_index", "transaction_hash",
    ]
    rows = {r["pool"]: r for r in pools_df.iter_rows(named=True)}
    assert set(rows) == {P1, P2, P3}  # P2 given upper-case, lower-cased
    for p, (t0, t1) in POOL_TOKENS.items():
        assert (rows[p]["token0"], rows[p]["token1"]) == (t0, t1)
        assert rows[p]["factory"] == FACTORY
    assert rows[P1]["created_block"] == rows[P1]["block_number"] == 90  # not the duplicate at 95
    assert rows[P1]["pair_index"] == 1
    assert rows[P2]["created_timestamp"] == ts(91)


# --------------------------------------------------------------------------------------------
# swaps


def test_swaps_match_reference(swaps_df):
    ref = ref_swaps(SWAP_ROWS)
    got = swaps_df.to_dicts()
    assert len(got) == len(ref) == len(SWAP_ROWS) - 1  # the unknown pool's swap is dropped
    for g, r in zip(got, ref, strict=True):
        where = (g["block_number"], g["log_index"])
        assert (g["block_number"], g["log_index"], g["block_timestamp"]) == (
            r["block_number"], r["log_index"], r["block_timestamp"]), where
        assert (g["pool"], g["token0"], g["token1"]) == (r["pool"], r["token0"], r["token1"]), where
        assert (g["decimals0"], g["decimals1"]) == (r["d0"], r["d1"]), where
        assert g["recipient"] == r["recipient"] and g["sender"] == ROUTER, where
        for col, rk, d in (("amount0_in", "a0i", "d0"), ("amount1_in", "a1i", "d1"),
                           ("amount0_out", "a0o", "d0"), ("amount1_out", "a1o", "d1")):
            assert isinstance(g[col], Decimal) and int(g[col]) == r[rk], (where, col)
            assert close(g[f"{col}_h"], scaled(r[rk], r[d])), (where, col)
        assert g["direction"] == r["direction"], where
        assert (g["token_in"], g["token_out"]) == (r["token_in"], r["token_out"]), where
        assert (int(g["amount_in"]), int(g["amount_out"])) == (r["amount_in"], r["amount_out"]), where
        d_in, d_out = (r["d0"], r["d1"]) if r["direction"] == "0to1" else (r["d1"], r["d0"])
        assert close(g["amount_in_h"], scaled(r["amount_in"], d_in)), where
        assert close(g["amount_out_h"], scaled(r["amount_out"], d_out)), where
        assert close(g["price"], r["price"]), where


def test_swaps_specific_cases(swaps_df):
    by = {(r["block_number"], r["log_index"]): r for r in swaps_df.iter_rows(named=True)}
    first = by[(100, 1)]  # 1.5 A in for 2990 B out
    assert first["direction"] == "0to1" and first["token_in"] == A and first["token_out"] == B
    assert first["price"] == pytest.approx(1.5 / 2990, rel=1e-12)
    second = by[(100, 3)]  # 1000 B in for 0.498 A out
    assert second["direction"] == "1to0" and second["token_in"] == B and int(second["amount_in"]) == 1000 * E6
    assert second["price"] == pytest.approx(0.498 / 1000, rel=1e-12)
    both = by[(108, 4)]  # net in: 0.6 A vs 2 B -> B is the input
    assert both["direction"] == "1to0" and int(both["amount_in"]) == 3 * E6 and int(both["amount_out"]) == 4 * E18 // 10
    assert both["price"] == pytest.approx(1.4 / 4, rel=1e-12)
    assert by[(100, 0)]["price"] is None and by[(100, 0)]["direction"] == "0to1"
    assert by[(108, 3)]["price"] is None and by[(108, 3)]["direction"] == "0to1"
    # A is token1 of P2: a swap paying C for A is "0to1" with token_out A
    p2 = by[(101, 2)]
    assert p2["pool"] == P2 and p2["direction"] == "0to1" and p2["token_out"] == A
    assert int(p2["amount0_in"]) == 2**112 - 1
    unknown = by[(104, 0)]
    assert unknown["symbol1"] is None and unknown["amount1_out_h"] is None and unknown["price"] is None
    assert unknown["direction"] == "0to1" and unknown["amount0_in_h"] == pytest.approx(0.1)


def test_swaps_types(swaps_df):
    s = swaps_df.schema
    for c in ("amount0_in", "amount1_in", "amount0_out", "amount1_out", "amount_in", "amount_out"):
        assert s[c] == pl.Decimal(38, 0), c
    for c in ("amount0_in_h", "amount1_out_h", "amount_in_h", "amount_out_h", "price"):
        assert s[c] == pl.Float64, c
    assert s["block_timestamp"] == pl.Datetime("us", "UTC") and s["block_number"] == pl.Int64
    assert swaps_df.columns[:7] == list(KEY_SCHEMA)[:7]


# --------------------------------------------------------------------------------------------
# reserves and state


def ref_reserves():
    out = []
    for r in SYNC_ROWS:
        if r["address"] not in POOL_TOKENS:
            continue
        t0, t1 = POOL_TOKENS[r["address"]]
        r0, r1 = int(r["reserve0"]), int(r["reserve1"])
        h0, h1 = scaled(r0, DECIMALS.get(t0)), scaled(r1, DECIMALS.get(t1))
        out.append({
            "pool": r["address"], "block_number": r["block_number"], "log_index": r["log_index"],
            "block_timestamp": r["block_timestamp"], "r0": r0, "r1": r1, "h0": h0, "h1": h1,
            "price": h0 / h1 if h0 is not None and h1 else None,
            "inverse": h1 / h0 if h1 is not None and h0 else None,
        })
    return sorted(out, key=lambda x: (x["block_number"], x["log_index"]))


def check_reserve_row(g, r):
    assert int(g["reserve0"]) == r["r0"] and int(g["reserve1"]) == r["r1"]
    assert close(g["reserve0_h"], r["h0"]) and close(g["reserve1_h"], r["h1"])
    assert close(g["price"], r["price"]) and close(g["inverse_price"], r["inverse"])


def test_pool_reserves_and_state(pools_df):
    res = dex.pool_reserves(frame(SYNC_ROWS, SYNC_SCHEMA), pools_df, TOKENS)
    ref = ref_reserves()
    assert res.schema["reserve0"] == pl.Decimal(38, 0)
    got = res.to_dicts()
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        assert (g["pool"], g["block_number"], g["log_index"], g["block_timestamp"]) == (
            r["pool"], r["block_number"], r["log_index"], r["block_timestamp"])
        check_reserve_row(g, r)

    state = dex.pool_state(res)
    latest = {}
    for r in ref:
        if r["pool"] not in latest or (r["block_number"], r["log_index"]) > (
                latest[r["pool"]]["block_number"], latest[r["pool"]]["log_index"]):
            latest[r["pool"]] = r
    got = {g["pool"]: g for g in state.iter_rows(named=True)}
    assert set(got) == set(latest)
    for p, r in latest.items():
        g = got[p]
        check_reserve_row(g, r)
        assert (g["last_block"], g["last_log_index"], g["last_timestamp"]) == (
            r["block_number"], r["log_index"], r["block_timestamp"])
        assert (g["token0"], g["token1"]) == POOL_TOKENS[p]
    assert got[P1]["last_log_index"] == 5 and int(got[P1]["reserve0"]) == 999 * E18  # not the log_index 2 row
    assert got[P1]["price"] == pytest.approx(999 / 2_003_000, rel=1e-12)


def test_every_pool_table_names_its_pair(pools_df, swaps_df):
    """symbol0, symbol1 and a `pair` label (token0/token1) sit beside token1 wherever a pool appears; an
    unknown symbol shows as a short address."""
    reserves = dex.pool_reserves(frame(SYNC_ROWS, SYNC_SCHEMA), pools_df, TOKENS)
    liquidity = dex.liquidity_events(frame(MINT_ROWS, MINT_SCHEMA), frame(BURN_ROWS, BURN_SCHEMA), pools_df, TOKENS)
    tables = {
        "pools": dex.label_pools(pools_df, TOKENS), "swaps": swaps_df, "pool_reserves": reserves,
        "pool_state": dex.pool_state(reserves), "liquidity_events": liquidity,
        "pool_volume": dex.pool_volume(swaps_df, "1h"), "pool_candles": dex.pool_candles(swaps_df, "1m"),
    }
    expected = {P1: ("AAA", "BBB", "AAA/BBB"), P2: ("CCC", "AAA", "CCC/AAA"), P3: ("AAA", None, "AAA/0x3d3d…3d3d")}
    for name, table in tables.items():
        at = table.columns.index("token1")
        assert table.columns[at + 1: at + 4] == ["symbol0", "symbol1", "pair"], name
        labels = {p: (s0, s1, pair) for p, s0, s1, pair in table.select("pool", "symbol0", "symbol1", "pair").iter_rows()}
        assert labels == {p: e for p, e in expected.items() if p in labels} and labels, name
    assert set(tables["pools"]["pool"]) == set(expected)
    assert dex.label_pools(pools_df, TOKENS).drop("symbol0", "symbol1", "pair").equals(pools_df)


# --------------------------------------------------------------------------------------------
# liquidity


def test_liquidity_events(pools_df):
    out = dex.liquidity_events(frame(MINT_ROWS, MINT_SCHEMA), frame(BURN_ROWS, BURN_SCHEMA), pools_df, TOKENS)
    ref = []
    for kind, rows in (("mint", MINT_ROWS), ("burn", BURN_ROWS)):
        for r in rows:
            if r["address"] not in POOL_TOKENS:
                continue
            t0, t1 = POOL_TOKENS[r["address"]]
            ref.append((r["block_number"], r["log_index"], kind, r["address"], t0, t1, r.get("to"),
                        int(r["amount0"]), int(r["amount1"]),
                        scaled(int(r["amount0"]), DECIMALS.get(t0)), scaled(int(r["amount1"]), DECIMALS.get(t1))))
    ref.sort()
    got = out.to_dicts()
    assert len(got) == len(ref) == 5
    for g, r in zip(got, ref, strict=True):
        assert (g["block_number"], g["log_index"], g["kind"], g["pool"], g["token0"], g["token1"], g["recipient"]) == r[:7]
        assert int(g["amount0"]) == r[7] and int(g["amount1"]) == r[8]
        assert close(g["amount0_h"], r[9]) and close(g["amount1_h"], r[10])
    assert out.schema["amount0"] == pl.Decimal(38, 0)
    assert out["kind"].to_list()[:2] == ["mint", "burn"]  # block 97: log 5 (mint) then log 9 (burn)


# --------------------------------------------------------------------------------------------
# aggregates


@pytest.mark.parametrize("interval", ["1h", "1d"])
def test_pool_volume(swaps_df, interval):
    vol = dex.pool_volume(swaps_df, interval)
    ref = ref_buckets(ref_swaps(SWAP_ROWS), interval)
    got = {(g["pool"], g["bucket_start"]): g for g in vol.iter_rows(named=True)}
    assert set(got) == set(ref)
    for k, r in ref.items():
        g = got[k]
        assert g["swap_count"] == r["swap_count"], k
        assert int(g["volume_token0"]) == r["v0"] and int(g["volume_token1"]) == r["v1"], k
        assert close(g["volume_token0_h"], scaled(r["v0"], r["d0"])), k
        assert close(g["volume_token1_h"], scaled(r["v1"], r["d1"])), k
        assert (g["first_block"], g["last_block"]) == (r["first_block"], r["last_block"]), k
    assert vol.schema["volume_token0"] == pl.Decimal(38, 0) and vol.schema["bucket_start"] == pl.Datetime("us", "UTC")
    if interval == "1h":  # P1 straddles 01:00: blocks 100..107 then 108
        p1 = vol.filter(pl.col("pool") == P1).sort("bucket_start")
        assert p1["last_block"].to_list() == [107, 108, 8000]


@pytest.mark.parametrize("interval", ["1m", "1h"])
def test_pool_candles(swaps_df, interval):
    candles = dex.pool_candles(swaps_df, interval)
    ref = ref_buckets(ref_swaps(SWAP_ROWS), interval)
    got = {(g["pool"], g["bucket_start"]): g for g in candles.iter_rows(named=True)}
    assert set(got) == set(ref)
    for k, r in ref.items():
        g = got[k]
        for name, expected in zip(("open", "high", "low", "close"), r["ohlc"], strict=True):
            assert close(g[name], expected), (k, name)
        assert int(g["volume_token0"]) == r["v0"] and int(g["volume_token1"]) == r["v1"], k
        assert g["swap_count"] == r["swap_count"], k
        assert (g["first_block"], g["last_block"]) == (r["first_block"], r["last_block"]), k
    if interval == "1m":  # 00:58 holds blocks 100-102 (first swap has no price), 00:59 holds 103-107
        p1 = candles.filter(pl.col("pool") == P1).sort("bucket_start")
        assert p1["bucket_start"][0] == datetime(2024, 1, 1, 0, 58, tzinfo=UTC)
        assert p1["swap_count"].to_list()[:2] == [4, 2]
        assert p1["open"][0] == pytest.approx(1.5 / 2990, rel=1e-12)
        assert p1["close"][1] == pytest.approx(0.1 / 197, rel=1e-12)


def test_outputs_independent_of_input_order(pools_df, swaps_df):
    rows = list(SWAP_ROWS)
    random.Random(3).shuffle(rows)
    shuffled = dex.swaps(swap_frame(rows), pools_df.reverse(), TOKENS.reverse())
    assert shuffled.equals(swaps_df)
    for f in (dex.pool_volume, dex.pool_candles):
        assert f(shuffled.reverse(), "1h").equals(f(swaps_df, "1h"))
    sync = frame(SYNC_ROWS, SYNC_SCHEMA)
    a = dex.pool_state(dex.pool_reserves(sync, pools_df, TOKENS))
    b = dex.pool_state(dex.pool_reserves(sync.reverse(), pools_df, TOKENS).reverse())
    assert a.equals(b)


# --------------------------------------------------------------------------------------------
# errors and edge cases


@pytest.mark.parametrize("value", [str(2**128 + 1), str(10**38), "-1", "12x"])
def test_value_that_does_not_fit_raises(pools_df, value):
    rows = [dict(r) for r in SWAP_ROWS]
    rows[4]["amount1_out"] = value
    with pytest.raises(ValueError, match=r"uniswap_v2_pair_swap: amount1_out = .* at row 4 \(chain_id=1, block_number=100, log_index=0"):
        dex.swaps(swap_frame(rows), pools_df, TOKENS)


def test_big_value_in_other_tables_raises(pools_df):
    sync = [dict(r) for r in SYNC_ROWS]
    sync[2]["reserve0"] = str(2**200)
    with pytest.raises(ValueError, match=r"uniswap_v2_pair_sync: reserve0 .* at row 2"):
        dex.pool_reserves(frame(sync, SYNC_SCHEMA), pools_df, TOKENS)
    burn = [dict(r) for r in BURN_ROWS]
    burn[1]["amount0"] = str(2**129)
    with pytest.raises(ValueError, match=r"uniswap_v2_pair_burn: amount0 .* at row 1"):
        dex.liquidity_events(frame(MINT_ROWS, MINT_SCHEMA), frame(burn, BURN_SCHEMA), pools_df, TOKENS)


def test_volume_sum_overflow_raises(pools_df):
    near = 6 * 10**37  # each fits Decimal(38, 0), their sum does not; polars' own sum would wrap
    rows = [swap_row(P2, 101, 0, near, 0, 0, 1), swap_row(P2, 102, 0, near, 0, 0, 1)]
    s = dex.swaps(swap_frame(rows), pools_df, TOKENS)
    with pytest.raises(ValueError, match=r"pool_volume: exact volume_token0 of pool 0xa2"):
        dex.pool_volume(s, "1h")
    with pytest.raises(ValueError, match=r"pool_candles: exact volume_token0"):
        dex.pool_candles(s, "1m")
    just_fits = [swap_row(P2, 101, 0, 10**38 - 1 - near, 0, 0, 1), swap_row(P2, 102, 0, near, 0, 0, 1)]
    v = dex.pool_volume(dex.swaps(swap_frame(just_fits), pools_df, TOKENS), "1h")
    assert int(v["volume_token0"][0]) == 10**38 - 1


def test_empty_inputs(pools_df):
    s = dex.swaps(swap_frame([]), pools_df, TOKENS)
    assert s.height == 0 and s.schema["amount_in"] == pl.Decimal(38, 0)
    for f, interval in ((dex.pool_volume, "1d"), (dex.pool_candles, "1m")):
        out = f(s, interval)
        assert out.height == 0 and out.schema["volume_token1"] == pl.Decimal(38, 0)
    r = dex.pool_reserves(frame([], SYNC_SCHEMA), pools_df, TOKENS)
    assert dex.pool_state(r).height == 0
    liq = dex.liquidity_events(frame([], MINT_SCHEMA), frame([], BURN_SCHEMA), pools_df, TOKENS)
    assert liq.height == 0 and liq.schema["amount1"] == pl.Decimal(38, 0)
    assert dex.pools(frame([], PAIR_SCHEMA)).height == 0


def test_bad_interval_and_tokens(swaps_df, pools_df):
    with pytest.raises(ValueError, match="interval"):
        dex.pool_volume(swaps_df, "5m")
    bad = pl.concat([TOKENS, pl.DataFrame({"address": [B], "symbol": ["BBB"], "decimals": [18]})])
    with pytest.raises(ValueError, match="conflicting metadata"):
        dex.swaps(swap_frame(), pools_df, bad)


def test_exact_columns_survive_duckdb(swaps_df):
    vol = dex.pool_volume(swaps_df, "1d")
    con = duckdb.connect()
    try:
        con.register("vol", vol.to_arrow())
        [total] = con.execute("select sum(volume_token0)::varchar, typeof(any_value(volume_token0)) from vol").fetchall()
    finally:
        con.close()
    assert int(Decimal(total[0])) == sum(int(v) for v in vol["volume_token0"]) and total[1] == "DECIMAL(38,0)"


# --------------------------------------------------------------------------------------------
# Property: volume sums are exact


@st.composite
def random_swaps(draw):
    n = draw(st.integers(0, 40))
    amount = st.one_of(st.just(0), st.integers(1, 10**6), st.integers(0, 2**112 - 1))
    rows = []
    for i in range(n):
        pool = draw(st.sampled_from([P1, P2, P3]))
        block = 100 + draw(st.integers(0, 12_000))  # up to ~40 hours
        rows.append(swap_row(pool, block, i, draw(amount), draw(amount), draw(amount), draw(amount)))
    return rows


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=random_swaps(), interval=st.sampled_from(["1h", "1d"]))
def test_pool_volume_sums_are_exact(rows, interval):
    pools_df = dex.pools(frame(PAIR_ROWS, PAIR_SCHEMA))
    vol = dex.pool_volume(dex.swaps(swap_frame(rows), pools_df, TOKENS), interval)
    expected = {}
    for r in rows:
        k = (r["address"], bucket_of(r["block_timestamp"], interval))
        e = expected.setdefault(k, [0, 0, 0, r["block_number"], r["block_number"]])
        e[0] += 1
        e[1] += int(r["amount0_in"]) + int(r["amount0_out"])
        e[2] += int(r["amount1_in"]) + int(r["amount1_out"])
        e[3] = min(e[3], r["block_number"])
        e[4] = max(e[4], r["block_number"])
    got = {
        (g["pool"], g["bucket_start"]): [g["swap_count"], int(g["volume_token0"]), int(g["volume_token1"]),
                                         g["first_block"], g["last_block"]]
        for g in vol.iter_rows(named=True)
    }
    assert got == expected


def test_volume_in_a_reference_token_uses_the_pools_prices_at_swap_time(pools_df):
    """Issue 15: ranking pools by volume needs one unit. With B as the reference token, P1 (A/B) is valued
    directly (B moved); P2 (C/A) through A, at the B-per-A price of P1's latest Sync at or before each
    swap (block, log index); P3 (A/D) likewise through A. A bucket with a swap no price reaches is null."""
    syncs = frame([
        {**key(100, 0, P1), **big(reserve0=1000 * E18, reserve1=2000 * E6)},  # 2 B per A
        {**key(105, 0, P1), **big(reserve0=1000 * E18, reserve1=3000 * E6)},  # 3 B per A
    ], SYNC_SCHEMA)
    reserves = dex.pool_reserves(syncs, pools_df, TOKENS)
    swaps = dex.swaps(swap_frame([
        swap_row(P1, 104, 2, 0, 7 * E6, E18, 0),                 # B moved: 7
        swap_row(P2, 103, 1, 0, 10 * E18, 4 * E18, 0),           # A moved: 10, at 2 B per A -> 20
        swap_row(P2, 106, 1, 0, 5 * E18, 2 * E18, 0),            # 5 A at 3 B per A -> 15
        swap_row(P2, 100, 1, 0, E18, E18, 0),                    # before P1's first Sync at (100, 0)? no: after
        swap_row(P2, 99, 9, 0, E18, E18, 0),                     # before any B-per-A price: no value
    ]), pools_df, TOKENS)
    valued = dex.value_in(swaps, reserves, B)
    got = dict(zip(valued["block_number"], valued["volume_ref"]))
    assert got[104] == pytest.approx(7.0) and got[103] == pytest.approx(20.0)
    assert got[106] == pytest.approx(15.0) and got[100] == pytest.approx(2.0) and got[99] is None
    vol = dex.pool_volume(valued, "1h")
    per_pool = {p: v for p, v in zip(vol["pool"], vol["volume_ref"])}
    assert per_pool[P1] == pytest.approx(7.0)
    assert per_pool[P2] is None  # its hour holds the swap no price reaches: not a partial sum
    # Without a reference token the column is there, empty.
    assert dex.pool_volume(dex.value_in(swaps, reserves, None), "1h")["volume_ref"].null_count() == vol.height
