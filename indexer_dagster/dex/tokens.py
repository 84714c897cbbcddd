"""ERC-20 metadata (symbol, decimals) read from the chain with eth_call, once per token."""

import asyncio

import polars as pl
from eth_abi import decode as abi_decode

from indexer_dagster.chain.errors import RpcError
from indexer_dagster.chain.rpc import RpcClient
from indexer_dagster.persist.datasets import TOKEN_SCHEMA

SYMBOL = "0x95d89b41"    # symbol()
DECIMALS = "0x313ce567"  # decimals()
TOKEN0 = "0x0dfe1681"    # token0() of a Uniswap V2 pair
TOKEN1 = "0xd21220a7"    # token1()


def _symbol(ret: str | None) -> str | None:
    if not ret or ret == "0x":
        return None
    raw = bytes.fromhex(ret[2:])
    try:
        return abi_decode(["string"], raw)[0]
    except Exception:  # noqa: BLE001 - older tokens (MKR) return bytes32
        return raw[:32].rstrip(b"\0").decode("utf-8", "replace") or None


def _uint(ret: str | None) -> int | None:
    if not ret or len(ret) < 66:
        return None
    value = int(ret[2:66], 16)
    return value if value <= 255 else None


async def _call(rpc: RpcClient, to: str, data: str) -> str | None:
    try:
        return await rpc.call("eth_call", [{"to": to, "data": data}, "latest"])
    except RpcError:
        return None  # not an ERC-20 (or it reverts): metadata stays unknown, amounts stay raw


async def token_metadata(rpc: RpcClient, addresses: list[str]) -> pl.DataFrame:
    """symbol and decimals of each address (null where the call fails)."""
    async def one(a: str):
        sym, dec = await asyncio.gather(_call(rpc, a, SYMBOL), _call(rpc, a, DECIMALS))
        return {"address": a.lower(), "symbol": _symbol(sym), "decimals": _uint(dec)}

    rows = await asyncio.gather(*[one(a) for a in addresses])
    return pl.DataFrame(rows, schema=TOKEN_SCHEMA)


async def pair_tokens(rpc: RpcClient, pairs: list[str]) -> pl.DataFrame:
    """token0/token1 of Uniswap-V2-style pairs (for pools whose PairCreated is not indexed)."""
    async def one(p: str):
        t0, t1 = await asyncio.gather(_call(rpc, p, TOKEN0), _call(rpc, p, TOKEN1))
        if not t0 or not t1 or len(t0) < 66 or len(t1) < 66:
            return None
        return {"pool": p.lower(), "token0": "0x" + t0[-40:].lower(), "token1": "0x" + t1[-40:].lower()}

    rows = [r for r in await asyncio.gather(*[one(p) for p in pairs]) if r]
    return pl.DataFrame(rows, schema={"pool": pl.String, "token0": pl.String, "token1": pl.String})
