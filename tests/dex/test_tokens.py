"""Token metadata and pair tokens read from anvil by web3.py contract calls over the indexer's RpcClient."""

import asyncio
import json
import time
from pathlib import Path

import pytest
from eth_abi import encode

from indexer_dagster.chain.rpc import RpcClient
from indexer_dagster.devnet import Anvil, build_devnet
from indexer_dagster.devnet.token import compile_contract
from indexer_dagster.dex.tokens import pair_tokens, token_metadata

pytestmark = pytest.mark.slow

# An old-style token (MKR, SAI): symbol() returns bytes32, not string.
BYTES32_SYMBOL = """// SPDX-License-Identifier: MIT
pragma solidity ^0.8.0;
contract Bytes32Symbol {
    bytes32 public symbol;
    uint256 public decimals = 18;
    constructor(bytes32 symbol_) { symbol = symbol_; }
}
"""


def deploy(node: Anvil, artifact: Path, args: bytes) -> str:
    code = json.loads(artifact.read_text())["bytecode"]
    tx = node.rpc("eth_sendTransaction", [{"from": node.accounts()[0], "data": code + args.hex(), "gas": hex(3_000_000)}])
    for _ in range(500):  # automine: mined at once, the receipt a moment later
        if (receipt := node.rpc("eth_getTransactionReceipt", [tx])) is not None:
            return receipt["contractAddress"]
        time.sleep(0.01)
    raise AssertionError(f"{tx} not mined")


def test_metadata_of_string_and_bytes32_symbols_and_of_what_is_no_token(tmp_path):
    source = tmp_path / "Bytes32Symbol.sol"
    source.write_text(BYTES32_SYMBOL)
    with Anvil() as node:
        dep = build_devnet(node, blocks=0, n_tokens=2)
        mkr = deploy(node, compile_contract(source, "Bytes32Symbol"), encode(["bytes32"], [b"MKR"]))
        eoa = node.accounts()[3]
        wanted = [*dep.tokens, mkr, eoa, dep.pairs[0].address]

        async def read():
            async with RpcClient(node.url) as rpc:
                return await token_metadata(rpc, wanted), await pair_tokens(rpc, [dep.pairs[0].address, eoa])

        meta, pairs = asyncio.run(read())
    assert meta.rows() == [(dep.tokens[0].lower(), "WETH", 18), (dep.tokens[1].lower(), "USDC", 6),
                           (mkr.lower(), "MKR", 18), (eoa.lower(), None, None),
                           (dep.pairs[0].address.lower(), "UNI-V2", 18)]  # a pair is an ERC-20 (its LP token)
    p = dep.pairs[0]
    assert pairs.rows() == [(p.address.lower(), p.token0.lower(), p.token1.lower())]  # the account is no pair
