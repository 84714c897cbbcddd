"""ERC-20 metadata (symbol, decimals) and Uniswap V2 pair tokens, read from the chain once per contract.

The calls are web3.py contract calls (ABI encoding and decoding, checksummed addresses) sent through the
indexer's own `RpcClient` (`ClientProvider`), so they share its retries, endpoint failover and request budget.
"""

import asyncio
from typing import Any

import polars as pl
from eth_typing import ChecksumAddress
from web3 import AsyncWeb3
from web3.exceptions import Web3Exception
from web3.providers.async_base import AsyncBaseProvider
from web3.types import RPCEndpoint, RPCResponse

from indexer_dagster.chain.errors import RpcError
from indexer_dagster.chain.rpc import RpcClient
from indexer_dagster.persist.datasets import TOKEN_SCHEMA


def _view(name: str, out: str) -> dict:
    return {"type": "function", "name": name, "inputs": [], "outputs": [{"name": "", "type": out}],
            "stateMutability": "view"}


ERC20_METADATA_ABI = [_view("symbol", "string"), _view("decimals", "uint8")]
BYTES32_SYMBOL_ABI = [_view("symbol", "bytes32")]  # older tokens (MKR, SAI) return their symbol as bytes32
PAIR_TOKENS_ABI = [_view("token0", "address"), _view("token1", "address")]


class ClientProvider(AsyncBaseProvider):
    """web3.py's requests sent by the indexer's `RpcClient`; its `RpcError` goes through to the caller."""

    def __init__(self, rpc: RpcClient) -> None:
        super().__init__()
        self._rpc = rpc

    async def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        return {"jsonrpc": "2.0", "id": 0, "result": await self._rpc.call(method, list(params))}

    async def is_connected(self, show_traceback: bool = False) -> bool:
        return True


def web3_over(rpc: RpcClient) -> AsyncWeb3:
    """An AsyncWeb3 whose requests go through `rpc` (no middleware: no ENS lookups, no chain-id checks)."""
    return AsyncWeb3(ClientProvider(rpc), middleware=[])


async def _call(function) -> Any:
    try:
        return await function.call()
    except (RpcError, Web3Exception):
        return None  # not an ERC-20 (no code, reverts, another return type): stays unknown, amounts stay raw


async def _symbol(w3: AsyncWeb3, address: ChecksumAddress) -> str | None:
    text = await _call(w3.eth.contract(address, abi=ERC20_METADATA_ABI).functions.symbol())
    if text is None:
        raw = await _call(w3.eth.contract(address, abi=BYTES32_SYMBOL_ABI).functions.symbol())
        text = raw.rstrip(b"\0").decode("utf-8", "replace") if raw is not None else None
    return text or None


async def token_metadata(rpc: RpcClient, addresses: list[str]) -> pl.DataFrame:
    """symbol and decimals of each address (null where the call fails)."""
    w3 = web3_over(rpc)

    async def one(a: str) -> dict:
        address = w3.to_checksum_address(a)
        erc20 = w3.eth.contract(address, abi=ERC20_METADATA_ABI)
        symbol, decimals = await asyncio.gather(_symbol(w3, address), _call(erc20.functions.decimals()))
        return {"address": a.lower(), "symbol": symbol, "decimals": decimals}

    rows = await asyncio.gather(*[one(a) for a in addresses])
    return pl.DataFrame(rows, schema=TOKEN_SCHEMA)


async def pair_tokens(rpc: RpcClient, pairs: list[str]) -> pl.DataFrame:
    """token0/token1 of Uniswap-V2-style pairs (for pools whose PairCreated is not indexed)."""
    w3 = web3_over(rpc)

    async def one(p: str) -> dict | None:
        pair = w3.eth.contract(w3.to_checksum_address(p), abi=PAIR_TOKENS_ABI)
        t0, t1 = await asyncio.gather(_call(pair.functions.token0()), _call(pair.functions.token1()))
        if not t0 or not t1:
            return None
        return {"pool": p.lower(), "token0": t0.lower(), "token1": t1.lower()}

    rows = [r for r in await asyncio.gather(*[one(p) for p in pairs]) if r]
    return pl.DataFrame(rows, schema={"pool": pl.String, "token0": pl.String, "token1": pl.String})
