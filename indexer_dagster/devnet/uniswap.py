"""Deploy the real Uniswap V2 contracts on a local node and generate realistic traffic.

Everything is sent with ``eth_sendTransaction`` from anvil's unlocked default accounts (no
signing).  Account 0 is the deployer and the only *trader*: every transaction that touches a
pair (swap, mint, burn and the token transfers that precede them) is sent by it with explicit
nonces, so inside a block their order is nonce order and the local bookkeeping (Uniswap's exact
integer math on reserves and LP supply) predicts the chain exactly: no transaction reverts.
Accounts 1..4 (the *holders*) make plain ERC20 transfers and approvals among themselves and the
trader; only a holder's balance at the start of a block is spent within that block, so the
order in which the pool interleaves different senders does not matter.

Speed: one block's transactions go out as ONE JSON-RPC batch with automine off, then
``evm_mine``.  Explicit ``gas`` limits avoid a gas estimation per transaction.

Replacement forks (``anvil_reorg``)
-----------------------------------
Observed with anvil 1.7.1 (see :func:`plan_reorg` / :func:`reorg`):

* params are ``[depth, [[tx, block_offset], ...]]``; ``depth`` must be a JSON integer (a hex
  string is rejected: ``invalid type: string "0x1", expected u64``) and ``>= 1``.
* ``tx`` is an unsigned transaction object from an unlocked account, exactly what the
  builders here return: ``{"from", "to", "data", "gas"}`` (``gas`` may be omitted, then it is
  estimated; ``"nonce"`` may be given and is honoured).  A raw signed tx hex string also works
  according to anvil's types, but is not used here.
* ``block_offset`` 0 is the first replacement block (common ancestor + 1); offsets up to
  ``depth - 1``; blocks without transactions stay empty.  The head number does not change.
* Without explicit nonces anvil takes them from the ancestor's state, in block order then list
  order.  Transactions that revert are NOT rejected: they are mined with ``status 0`` and no
  logs, so amounts must be computed against the ancestor's state (``plan_reorg`` reads it with
  ``eth_call`` at the ancestor block).
* All replacement blocks get the ancestor's timestamp.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import cast

from eth_abi import decode, encode
from eth_utils import keccak, to_checksum_address
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import Web3RPCError
from web3.types import BlockIdentifier

from .anvil import Anvil, batch, call, repo_root, web3_for
from .token import token_artifact_path

__all__ = [
    "ARTIFACT_NAMES",
    "ChainState",
    "Deployment",
    "PairInfo",
    "TrafficGenerator",
    "approve_tx",
    "artifact_dir",
    "artifact_paths",
    "burn_call_tx",
    "burn_txs",
    "count_logs",
    "deploy_uniswap",
    "event_topics",
    "generate_traffic",
    "get_amount_out",
    "load_artifact",
    "mint_call_tx",
    "mint_txs",
    "plan_reorg",
    "read_reserves",
    "reorg",
    "swap_call_tx",
    "swap_txs",
    "transfer_tx",
    "verify_traffic",
]

ARTIFACT_NAMES = ("UniswapV2Factory", "UniswapV2Pair", "ERC20")

# gas limits per transaction kind (measured gas used: transfer 51k, approve 46k, swap 63k,
# mint 70k (first mint 155k), burn 91k, createPair 2.52M, factory 3.05M, DevnetToken 0.72M).
GAS = {
    "transfer": 90_000,
    "approve": 80_000,
    "swap": 150_000,
    "mint": 220_000,
    "burn": 180_000,
    "create_pair": 3_000_000,
    "deploy_factory": 3_600_000,
    "deploy_token": 1_000_000,
}

TOKEN_SUPPLY = 10**12  # whole tokens minted to the deployer (the constructor's owner), of each token
HOLDER_GRANT = 10**9  # whole tokens each holder receives of each token at deployment
MINIMUM_LIQUIDITY = 1000


# ---------------------------------------------------------------------------------------------
# artifacts, selectors, topics
# ---------------------------------------------------------------------------------------------


def artifact_dir() -> Path:
    return repo_root() / "node_modules" / "@uniswap" / "v2-core" / "build"


def artifact_paths() -> dict[str, Path]:
    """``{"UniswapV2Factory": path, "UniswapV2Pair": path, "ERC20": path}``: v2-core's npm artifacts, and the
    tokens' DevnetToken (OpenZeppelin's ERC20 with a name, a symbol and decimals of its own, compiled by
    solc-js: see :mod:`.token`; v2-core's test ERC20 calls every token "UNI-V2")."""
    d = artifact_dir()
    out = {n: d / f"{n}.json" for n in ARTIFACT_NAMES if n != "ERC20"}
    out["ERC20"] = token_artifact_path()
    missing = [str(p) for p in out.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Uniswap V2 / OpenZeppelin artifacts missing ({', '.join(missing)}): run `npm ci` in {repo_root()}"
        )
    return out


@dataclass(frozen=True)
class TokenSpec:
    name: str
    symbol: str
    decimals: int
    usd: float  # a nominal price: the pools are seeded near it, so WETH/USDC starts around 3000


# The devnet's tokens, in deployment order: a pair reads like a market (WETH/USDC), with 18 and 6 decimals.
TOKENS = [TokenSpec("Wrapped Ether", "WETH", 18, 3000.0), TokenSpec("USD Coin", "USDC", 6, 1.0),
          TokenSpec("Dai Stablecoin", "DAI", 18, 1.0), TokenSpec("ChainLink Token", "LINK", 18, 15.0),
          TokenSpec("Uniswap", "UNI", 18, 8.0), TokenSpec("Aave Token", "AAVE", 18, 90.0),
          TokenSpec("Maker", "MKR", 18, 1500.0), TokenSpec("Tether USD", "USDT", 6, 1.0)]


def token_spec(i: int) -> TokenSpec:
    t = TOKENS[i % len(TOKENS)]
    return t if i < len(TOKENS) else TokenSpec(f"{t.name} {i}", f"{t.symbol}{i}", t.decimals, t.usd)


@cache
def load_artifact(name: str) -> dict:
    with open(artifact_paths()[name], "rb") as f:
        return json.load(f)


def contract(w3: Web3, name: str) -> type[Contract]:
    """A web3.py contract class of one of ARTIFACT_NAMES (ABI and bytecode from its artifact): it encodes
    constructor and function calls. The traffic's own transactions are encoded with eth_abi directly:
    web3.py's ``encode_abi`` takes ~0.9 ms a call here, eth_abi ~0.03 ms, and a benchmark chain has a
    million transactions."""
    art = load_artifact(name)
    return w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])


def _sig(item: dict) -> str:
    return f"{item['name']}({','.join(_canonical_type(i) for i in item['inputs'])})"


def _canonical_type(inp: dict) -> str:
    t = inp["type"]
    if t.startswith("tuple"):
        return "(" + ",".join(_canonical_type(c) for c in inp["components"]) + ")" + t[5:]
    return t


@cache
def event_topics(contract: str) -> dict[str, str]:
    """``{event name: topic0 hex}`` from the artifact's ABI."""
    return {
        it["name"]: "0x" + keccak(text=_sig(it)).hex()
        for it in load_artifact(contract)["abi"]
        if it.get("type") == "event"
    }


def _selector(signature: str) -> bytes:
    return keccak(text=signature)[:4]


SEL = {
    "transfer": _selector("transfer(address,uint256)"),
    "approve": _selector("approve(address,uint256)"),
    "balanceOf": _selector("balanceOf(address)"),
    "totalSupply": _selector("totalSupply()"),
    "swap": _selector("swap(uint256,uint256,address,bytes)"),
    "mint": _selector("mint(address)"),
    "burn": _selector("burn(address)"),
    "getReserves": _selector("getReserves()"),
    "token0": _selector("token0()"),
    "token1": _selector("token1()"),
    "createPair": _selector("createPair(address,address)"),
    "getPair": _selector("getPair(address,address)"),
}


def _hex(b: bytes) -> str:
    return "0x" + b.hex()


def _addr_key(a: str) -> int:
    return int(a, 16)


# ---------------------------------------------------------------------------------------------
# unsigned transaction builders ({"from", "to", "data", "gas"}; usable with anvil_reorg)
# ---------------------------------------------------------------------------------------------


def _tx(sender: str, to: str, data: bytes, gas: int, nonce: int | None) -> dict:
    tx = {"from": sender, "to": to, "data": _hex(data), "gas": hex(gas)}
    if nonce is not None:
        tx["nonce"] = hex(nonce)
    return tx


def transfer_tx(sender: str, token: str, to: str, amount: int, nonce: int | None = None) -> dict:
    """ERC20 (or pair LP token) ``transfer(to, amount)``."""
    return _tx(sender, token, SEL["transfer"] + encode(["address", "uint256"], [to, amount]), GAS["transfer"], nonce)


def approve_tx(sender: str, token: str, spender: str, amount: int, nonce: int | None = None) -> dict:
    return _tx(sender, token, SEL["approve"] + encode(["address", "uint256"], [spender, amount]), GAS["approve"], nonce)


def swap_call_tx(sender: str, pair: str, amount0_out: int, amount1_out: int, to: str, nonce: int | None = None) -> dict:
    """``pair.swap(amount0Out, amount1Out, to, b"")`` (input tokens must already be in the pair)."""
    data = SEL["swap"] + encode(["uint256", "uint256", "address", "bytes"], [amount0_out, amount1_out, to, b""])
    return _tx(sender, pair, data, GAS["swap"], nonce)


def mint_call_tx(sender: str, pair: str, to: str, nonce: int | None = None) -> dict:
    """``pair.mint(to)`` (both tokens must already be in the pair)."""
    return _tx(sender, pair, SEL["mint"] + encode(["address"], [to]), GAS["mint"], nonce)


def burn_call_tx(sender: str, pair: str, to: str, nonce: int | None = None) -> dict:
    """``pair.burn(to)`` (LP tokens must already be in the pair)."""
    return _tx(sender, pair, SEL["burn"] + encode(["address"], [to]), GAS["burn"], nonce)


def get_amount_out(amount_in: int, reserve_in: int, reserve_out: int) -> int:
    """UniswapV2Library.getAmountOut (0.3% fee), exact integer math."""
    fee_in = amount_in * 997
    return fee_in * reserve_out // (reserve_in * 1000 + fee_in)


# ---------------------------------------------------------------------------------------------
# deployment
# ---------------------------------------------------------------------------------------------


@dataclass
class PairInfo:
    address: str
    token0: str
    token1: str
    created_block: int


@dataclass
class Deployment:
    chain_id: int
    factory: str
    factory_block: int
    tokens: list[str]
    token_blocks: list[int]
    pairs: list[PairInfo]
    seed_block: int  # block holding the initial liquidity (first mints) and holder grants
    trader: str  # account 0: deployer, sends every pair-touching tx
    holders: list[str]  # accounts making plain ERC20 transfers / approvals
    token_decimals: list[int] = field(default_factory=list)  # decimals() of each token, as deployed
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> artifact JSON path
    traffic: dict = field(default_factory=dict)  # stats of the last generate_traffic (build_devnet)

    @property
    def start_block(self) -> int:
        return min([self.factory_block, *self.token_blocks])

    @property
    def pair_addresses(self) -> list[str]:
        return [p.address for p in self.pairs]

    def decimals_of(self, token: str) -> int:
        """``decimals()`` of one of the deployment's tokens."""
        return self.token_decimals[self.tokens.index(token)] if self.token_decimals else 18

    def grant(self, token: str) -> int:
        """A holder's grant of ``token`` in its smallest unit (HOLDER_GRANT whole tokens)."""
        return HOLDER_GRANT * 10 ** self.decimals_of(token)

    def contract_kind(self) -> dict[str, str]:
        """lower-case address -> "UniswapV2Factory" | "UniswapV2Pair" | "ERC20"."""
        out = {self.factory.lower(): "UniswapV2Factory"}
        out.update({t.lower(): "ERC20" for t in self.tokens})
        out.update({p.address.lower(): "UniswapV2Pair" for p in self.pairs})
        return out

    def expected_deployment_logs(self) -> dict[str, dict[str, int]]:
        """Logs of the deployment blocks (``start_block..seed_block``) by contract and event:
        token constructor mints, PairCreated, first mints (2 LP Transfers each: MINIMUM_LIQUIDITY
        to address(0) and the rest to the trader) and the holder grants."""
        n_p, n_t = len(self.pairs), len(self.tokens)
        c = _new_counts()
        c["UniswapV2Factory"]["PairCreated"] = n_p
        c["UniswapV2Pair"].update(Transfer=2 * n_p, Sync=n_p, Mint=n_p)
        c["ERC20"]["Transfer"] = n_t + 2 * n_p + len(self.holders) * n_t
        return c

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Deployment:
        d = dict(d)
        d["pairs"] = [PairInfo(**p) for p in d["pairs"]]
        return cls(**d)


def _url_client(node: str | Anvil | Web3) -> Web3:
    if isinstance(node, Web3):
        return node
    if isinstance(node, Anvil):
        if node.block_time and not float(node.block_time).is_integer():
            # anvil_getIntervalMining reports 0 for a fractional --block-time, so it cannot be
            # paused and restored: blocks would be mined in the middle of a batch
            raise ValueError(
                "anvil was started with a fractional --block-time; start it without block_time, "
                "deploy/generate, then enable mining (evm_setIntervalMining or a restart)"
            )
        return node.w3
    return web3_for(node)


def _mine(c: Web3) -> None:
    call(c, "evm_mine", [])


def _send_block(c: Web3, txs: Sequence[dict]) -> list[str]:
    """Send txs as one batch (automine must be off), mine one block, return the tx hashes."""
    hashes = batch(c, [("eth_sendTransaction", [tx]) for tx in txs]) if txs else []
    _mine(c)
    return hashes


def _receipts(c: Web3, hashes: Sequence[str]) -> list[dict]:
    out = batch(c, [("eth_getTransactionReceipt", [h]) for h in hashes])
    for _ in range(200):  # receipts appear right after evm_mine, but be patient
        if all(r is not None for r in out):
            break
        time.sleep(0.02)
        out = batch(c, [("eth_getTransactionReceipt", [h]) for h in hashes])
    bad = [(h, r and r.get("status")) for h, r in zip(hashes, out) if r is None or r.get("status") != "0x1"]
    if bad:
        raise RuntimeError(f"{len(bad)} deployment transaction(s) failed or were not mined: {bad[:3]}")
    return out


class _Automine:
    """Manual mining for the duration (automine off, interval mining paused), then restore."""

    def __init__(self, c: Web3):
        self.c = c
        self.prev_auto = True
        self.prev_interval = 0

    def __enter__(self) -> _Automine:
        try:
            self.prev_auto = bool(call(self.c, "anvil_getAutomine"))
        except Web3RPCError:
            self.prev_auto = True
        try:
            self.prev_interval = int(call(self.c, "anvil_getIntervalMining") or 0)
        except (Web3RPCError, TypeError, ValueError):
            self.prev_interval = 0
        if self.prev_interval:
            call(self.c, "evm_setIntervalMining", [0])
        call(self.c, "evm_setAutomine", [False])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.prev_interval:
            call(self.c, "evm_setIntervalMining", [self.prev_interval])
        else:
            call(self.c, "evm_setAutomine", [self.prev_auto])


def _block_gas_limit(c: Web3) -> int:
    return int(call(c, "eth_getBlockByNumber", ["latest", False])["gasLimit"], 16)


def _chunks_by_gas(txs: Sequence[dict], budget: int) -> list[list[dict]]:
    out: list[list[dict]] = [[]]
    used = 0
    for tx in txs:
        g = int(tx["gas"], 16)
        if out[-1] and used + g > budget:
            out.append([])
            used = 0
        out[-1].append(tx)
        used += g
    return out


def deploy_uniswap(
    node: str | Anvil | Web3,
    n_tokens: int = 4,
    n_pairs: int | None = None,
    seed: int = 0,
    n_holders: int = 4,
) -> Deployment:
    """Deploy UniswapV2Factory (feeToSetter = account 0), ``n_tokens`` ERC20s and ``n_pairs``
    pairs (default: every pair among the tokens, taken in order (0,1), (0,2), ... ), seed each
    pair with liquidity and grant tokens to the holder accounts.

    Takes 3+ blocks: factory and tokens, createPair calls, seeding.  Needs ``n_tokens >= 2``.
    """
    if n_tokens < 2:
        raise ValueError("need at least 2 tokens")
    combos = list(itertools.combinations(range(n_tokens), 2))
    if n_pairs is None:
        n_pairs = len(combos)
    if not 1 <= n_pairs <= len(combos):
        raise ValueError(f"n_pairs must be in 1..{len(combos)} for {n_tokens} tokens")
    c = _url_client(node)
    chain_id = int(call(c, "eth_chainId"), 16)
    accounts: list[str] = [to_checksum_address(a) for a in call(c, "eth_accounts")]
    if len(accounts) < 2:
        raise RuntimeError("the node has no unlocked accounts (anvil's default accounts expected)")
    trader = accounts[0]
    holders = accounts[1 : 1 + n_holders]
    rng = random.Random(f"deploy-{seed}")
    budget = int(_block_gas_limit(c) * 0.9)
    nonce = int(call(c, "eth_getTransactionCount", [trader, "pending"]), 16)

    def nxt() -> int:
        nonlocal nonce
        nonce += 1
        return nonce - 1

    with _Automine(c):
        # 1. factory + tokens (constructor calls encoded by web3.py from the artifacts' ABIs)
        fac = contract(c, "UniswapV2Factory")
        erc = contract(c, "ERC20")
        txs = [{"from": trader, "data": fac.constructor(trader).data_in_transaction,
                "gas": hex(GAS["deploy_factory"]), "nonce": hex(nxt())}]
        specs = [token_spec(i) for i in range(n_tokens)]
        for spec in specs:
            data = erc.constructor(spec.name, spec.symbol, spec.decimals, TOKEN_SUPPLY * 10**spec.decimals,
                                   trader).data_in_transaction
            txs.append({"from": trader, "data": data, "gas": hex(GAS["deploy_token"]), "nonce": hex(nxt())})
        receipts: list[dict] = []
        for chunk in _chunks_by_gas(txs, budget):
            receipts += _receipts(c, _send_block(c, chunk))
        factory = to_checksum_address(receipts[0]["contractAddress"])
        factory_block = int(receipts[0]["blockNumber"], 16)
        tokens: list[str] = [to_checksum_address(r["contractAddress"]) for r in receipts[1:]]
        token_blocks = [int(r["blockNumber"], 16) for r in receipts[1:]]

        # 2. pairs
        wanted = combos[:n_pairs]
        factory_contract = c.eth.contract(factory, abi=fac.abi)
        txs = [{"from": trader, "to": factory, "data": factory_contract.encode_abi("createPair", [tokens[i], tokens[j]]),
                "gas": hex(GAS["create_pair"]), "nonce": hex(nxt())} for i, j in wanted]
        receipts = []
        for chunk in _chunks_by_gas(txs, budget):
            receipts += _receipts(c, _send_block(c, chunk))
        pair_created = event_topics("UniswapV2Factory")["PairCreated"]
        pairs: list[PairInfo] = []
        for r in receipts:
            log = next(lg for lg in r["logs"] if lg["topics"][0] == pair_created)
            t0 = to_checksum_address("0x" + log["topics"][1][-40:])
            t1 = to_checksum_address("0x" + log["topics"][2][-40:])
            addr = to_checksum_address("0x" + log["data"][2 + 24 : 2 + 64])
            assert _addr_key(t0) < _addr_key(t1)
            pairs.append(PairInfo(addr, t0, t1, int(r["blockNumber"], 16)))

        # 3. initial liquidity (1M..50M USD a side, at the tokens' nominal prices) + holder grants
        spec_of = dict(zip(tokens, specs))
        txs = []
        for p in pairs:
            usd = rng.randint(10**6, 50 * 10**6)
            for t in (p.token0, p.token1):
                s = spec_of[t]
                txs.append(transfer_tx(trader, t, p.address, usd * 10**s.decimals * 100 // round(s.usd * 100), nxt()))
            txs.append(mint_call_tx(trader, p.address, trader, nxt()))
        for h in holders:
            for t, s in zip(tokens, specs):
                txs.append(transfer_tx(trader, t, h, HOLDER_GRANT * 10**s.decimals, nxt()))
        receipts = []
        for chunk in _chunks_by_gas(txs, budget):
            receipts += _receipts(c, _send_block(c, chunk))
        seed_block = max(int(r["blockNumber"], 16) for r in receipts)

    return Deployment(
        chain_id=chain_id,
        factory=factory,
        factory_block=factory_block,
        tokens=tokens,
        token_blocks=token_blocks,
        pairs=pairs,
        seed_block=seed_block,
        trader=trader,
        holders=holders,
        token_decimals=[s.decimals for s in specs],
        artifacts={k: str(v) for k, v in artifact_paths().items()},
    )


# ---------------------------------------------------------------------------------------------
# chain state (read from the node, then tracked locally)
# ---------------------------------------------------------------------------------------------


@dataclass
class PoolState:
    address: str
    token0: str
    token1: str
    reserve0: int
    reserve1: int
    total_supply: int  # LP tokens
    lp_balance: int  # LP tokens held by the trader


@dataclass
class ChainState:
    """What the generator needs to predict the chain: reserves, LP supply, balances, nonces."""

    pools: list[PoolState]
    balances: dict[tuple[str, str], int]  # (account, token) -> balance
    nonces: dict[str, int]
    block: int  # the block this state is at

    @classmethod
    def load(cls, node: str | Anvil | Web3, deployment: Deployment, block: int | str = "latest") -> ChainState:
        """Read the state at ``block`` (``"latest"``: the head, nonces include the pool)."""
        c = _url_client(node)
        tag = block if isinstance(block, str) else hex(block)
        accounts = [deployment.trader, *deployment.holders]
        calls: list[tuple[str, list]] = []
        for p in deployment.pairs:
            calls.append(("eth_call", [{"to": p.address, "data": _hex(SEL["getReserves"])}, tag]))
            calls.append(("eth_call", [{"to": p.address, "data": _hex(SEL["totalSupply"])}, tag]))
            calls.append(("eth_call", [{"to": p.address, "data": _hex(SEL["balanceOf"] + encode(["address"], [deployment.trader]))}, tag]))
        for a in accounts:
            for t in deployment.tokens:
                calls.append(("eth_call", [{"to": t, "data": _hex(SEL["balanceOf"] + encode(["address"], [a]))}, tag]))
        ntag = "pending" if tag == "latest" else tag
        for a in accounts:
            calls.append(("eth_getTransactionCount", [a, ntag]))
        calls.append(("eth_getBlockByNumber", [tag, False]))
        res = batch(c, calls)
        it = iter(res)
        pools = []
        for p in deployment.pairs:
            r0, r1, _ = decode(["uint112", "uint112", "uint32"], bytes.fromhex(next(it)[2:]))
            ts = int(next(it), 16)
            lp = int(next(it), 16)
            pools.append(PoolState(p.address, p.token0, p.token1, r0, r1, ts, lp))
        balances = {}
        for a in accounts:
            for t in deployment.tokens:
                balances[(a, t)] = int(next(it), 16)
        nonces = {a: int(next(it), 16) for a in accounts}
        blk = int(next(it)["number"], 16)
        return cls(pools, balances, nonces, blk)


def read_reserves(node: str | Anvil | Web3, deployment: Deployment, block: int | str = "latest") -> list[tuple[int, int]]:
    """``getReserves()`` of every pair (web3.py contract calls): ``[(reserve0, reserve1), ...]``."""
    c = _url_client(node)
    pair = contract(c, "UniswapV2Pair")
    # a number, a hex number ("0x3e8") or a tag ("latest")
    at = cast(BlockIdentifier, int(block, 16) if isinstance(block, str) and block.startswith("0x") else block)
    return [tuple(pair(address=to_checksum_address(p.address)).functions.getReserves().call(block_identifier=at)[:2])
            for p in deployment.pairs]


# ---------------------------------------------------------------------------------------------
# op builders that update the local state (each returns the txs, in order)
# ---------------------------------------------------------------------------------------------


def _take_nonce(state: ChainState, sender: str) -> int:
    n = state.nonces[sender]
    state.nonces[sender] = n + 1
    return n


def _new_counts() -> dict[str, dict[str, int]]:
    return {
        "UniswapV2Factory": {"PairCreated": 0},
        "UniswapV2Pair": {"Swap": 0, "Sync": 0, "Mint": 0, "Burn": 0, "Transfer": 0, "Approval": 0},
        "ERC20": {"Transfer": 0, "Approval": 0},
    }


def swap_txs(state: ChainState, pool_index: int, zero_for_one: bool, amount_in: int, sender: str,
             to: str | None = None, counts: dict | None = None) -> list[dict]:
    """Transfer ``amount_in`` of the input token to the pair, then ``pair.swap``.

    Uses getAmountOut on the tracked reserves; raises ValueError if the output would be 0 or
    the sender lacks the input token.  Updates ``state``.
    """
    p = state.pools[pool_index]
    to = to or sender
    t_in, t_out = (p.token0, p.token1) if zero_for_one else (p.token1, p.token0)
    r_in, r_out = (p.reserve0, p.reserve1) if zero_for_one else (p.reserve1, p.reserve0)
    out = get_amount_out(amount_in, r_in, r_out)
    if amount_in <= 0 or out <= 0 or out >= r_out:
        raise ValueError("swap amount too small or too large for the reserves")
    if state.balances.get((sender, t_in), 0) < amount_in:
        raise ValueError("sender lacks the input token")
    txs = [
        transfer_tx(sender, t_in, p.address, amount_in, _take_nonce(state, sender)),
        swap_call_tx(sender, p.address, 0 if zero_for_one else out, out if zero_for_one else 0, to,
                     _take_nonce(state, sender)),
    ]
    state.balances[(sender, t_in)] -= amount_in
    if (to, t_out) in state.balances:
        state.balances[(to, t_out)] += out
    if zero_for_one:
        p.reserve0, p.reserve1 = r_in + amount_in, r_out - out
    else:
        p.reserve1, p.reserve0 = r_in + amount_in, r_out - out
    if counts is not None:
        counts["ERC20"]["Transfer"] += 2
        counts["UniswapV2Pair"]["Sync"] += 1
        counts["UniswapV2Pair"]["Swap"] += 1
    return txs


def mint_txs(state: ChainState, pool_index: int, amount0: int, sender: str, counts: dict | None = None) -> list[dict]:
    """Add liquidity at the current price: transfer token0/token1 to the pair, ``pair.mint``.

    ``amount1`` follows from the reserves; LP tokens go to ``sender``.  Updates ``state``.
    """
    p = state.pools[pool_index]
    if p.total_supply == 0:
        raise ValueError("pool has no liquidity yet")
    amount1 = amount0 * p.reserve1 // p.reserve0 + 1
    liquidity = min(amount0 * p.total_supply // p.reserve0, amount1 * p.total_supply // p.reserve1)
    if liquidity <= 0:
        raise ValueError("mint too small")
    if state.balances.get((sender, p.token0), 0) < amount0 or state.balances.get((sender, p.token1), 0) < amount1:
        raise ValueError("sender lacks tokens")
    txs = [
        transfer_tx(sender, p.token0, p.address, amount0, _take_nonce(state, sender)),
        transfer_tx(sender, p.token1, p.address, amount1, _take_nonce(state, sender)),
        mint_call_tx(sender, p.address, sender, _take_nonce(state, sender)),
    ]
    state.balances[(sender, p.token0)] -= amount0
    state.balances[(sender, p.token1)] -= amount1
    p.reserve0 += amount0
    p.reserve1 += amount1
    p.total_supply += liquidity
    p.lp_balance += liquidity  # lp_balance tracks the LP tokens of the (single) trader
    if counts is not None:
        counts["ERC20"]["Transfer"] += 2
        counts["UniswapV2Pair"]["Transfer"] += 1
        counts["UniswapV2Pair"]["Sync"] += 1
        counts["UniswapV2Pair"]["Mint"] += 1
    return txs


def burn_txs(state: ChainState, pool_index: int, liquidity: int, sender: str, counts: dict | None = None) -> list[dict]:
    """Remove liquidity: transfer LP tokens to the pair, ``pair.burn(sender)``.  Updates ``state``."""
    p = state.pools[pool_index]
    if not 0 < liquidity <= p.lp_balance:
        raise ValueError("not enough LP tokens")
    a0 = liquidity * p.reserve0 // p.total_supply
    a1 = liquidity * p.reserve1 // p.total_supply
    if a0 <= 0 or a1 <= 0:
        raise ValueError("burn too small")
    txs = [
        transfer_tx(sender, p.address, p.address, liquidity, _take_nonce(state, sender)),
        burn_call_tx(sender, p.address, sender, _take_nonce(state, sender)),
    ]
    p.lp_balance -= liquidity
    p.total_supply -= liquidity
    p.reserve0 -= a0
    p.reserve1 -= a1
    for t, a in ((p.token0, a0), (p.token1, a1)):
        if (sender, t) in state.balances:
            state.balances[(sender, t)] += a
    if counts is not None:
        counts["UniswapV2Pair"]["Transfer"] += 2
        counts["ERC20"]["Transfer"] += 2
        counts["UniswapV2Pair"]["Sync"] += 1
        counts["UniswapV2Pair"]["Burn"] += 1
    return txs


# ---------------------------------------------------------------------------------------------
# traffic
# ---------------------------------------------------------------------------------------------

# op -> (weight, txs per op)
OP_MIX = {"swap": (0.50, 2), "transfer": (0.28, 1), "mint": (0.09, 3), "burn": (0.08, 2), "approve": (0.05, 1)}


class TrafficGenerator:
    """Plans blocks of Uniswap traffic against a :class:`ChainState` (which it updates)."""

    def __init__(self, deployment: Deployment, state: ChainState, seed: int = 0):
        self.d = deployment
        self.state = state
        self.rng = random.Random(seed)
        self.counts = _new_counts()
        self.ops = {k: 0 for k in OP_MIX}
        self.txs = 0
        self._names = list(OP_MIX)
        self._weights = [OP_MIX[k][0] for k in self._names]

    def plan_block(self, n_txs: int) -> list[dict]:
        """Exactly ``n_txs`` transactions (as long as ``n_txs >= 1``) for one block."""
        rng, st, d = self.rng, self.state, self.d
        trader = d.trader
        out: list[dict] = []
        pending_in: list[tuple[str, str, int]] = []  # holder credits applied after the block
        guard = 0
        while len(out) < n_txs:
            guard += 1
            if guard > 50 * n_txs + 100:
                raise RuntimeError("traffic planner cannot make progress (balances exhausted?)")
            left = n_txs - len(out)
            op = rng.choices(self._names, self._weights)[0]
            if OP_MIX[op][1] > left:
                op = "transfer" if left == 1 or rng.random() < 0.5 else "swap"
                if OP_MIX[op][1] > left:
                    op = "transfer"
            try:
                if op == "swap":
                    i = rng.randrange(len(st.pools))
                    p = st.pools[i]
                    z = rng.random() < 0.5
                    r_in = p.reserve0 if z else p.reserve1
                    amount_in = max(1, int(r_in * rng.uniform(1e-5, 4e-3)))
                    to = trader if rng.random() < 0.85 or not d.holders else rng.choice(d.holders)
                    bal_to_before = None
                    if to != trader:
                        t_out = p.token1 if z else p.token0
                        bal_to_before = st.balances[(to, t_out)]
                    txs = swap_txs(st, i, z, amount_in, trader, to, self.counts)
                    if bal_to_before is not None:  # holder credit only usable from the next block
                        gained = st.balances[(to, t_out)] - bal_to_before
                        st.balances[(to, t_out)] = bal_to_before
                        pending_in.append((to, t_out, gained))
                elif op == "mint":
                    i = rng.randrange(len(st.pools))
                    p = st.pools[i]
                    txs = mint_txs(st, i, max(1, int(p.reserve0 * rng.uniform(1e-4, 3e-3))), trader, self.counts)
                elif op == "burn":
                    i = rng.randrange(len(st.pools))
                    p = st.pools[i]
                    txs = burn_txs(st, i, max(1, int(p.lp_balance * rng.uniform(1e-4, 3e-3))), trader, self.counts)
                elif op == "transfer":
                    # the trader tops the holders up now and then so long runs stay balanced
                    s = rng.choice([*d.holders, trader])
                    t = rng.choice(d.tokens)
                    bal = st.balances[(s, t)]
                    amount = int(min(bal, d.grant(t)) * rng.uniform(1e-4, 2e-2))
                    if amount <= 0:
                        raise ValueError("holder has no tokens")
                    r = rng.choice([a for a in [trader, *d.holders] if a != s] or [trader])
                    txs = [transfer_tx(s, t, r, amount, _take_nonce(st, s))]
                    st.balances[(s, t)] -= amount
                    pending_in.append((r, t, amount))
                    self.counts["ERC20"]["Transfer"] += 1
                else:  # approve
                    s = rng.choice(d.holders or [trader])
                    t = rng.choice(d.tokens)
                    spender = rng.choice([trader, *d.holders, *d.pair_addresses])
                    txs = [approve_tx(s, t, spender, rng.randrange(10**24), _take_nonce(st, s))]
                    self.counts["ERC20"]["Approval"] += 1
            except ValueError:
                continue
            self.ops[op] += 1
            out.extend(txs)
        for acct, tok, amt in pending_in:
            st.balances[(acct, tok)] = st.balances.get((acct, tok), 0) + amt
        st.block += 1
        self.txs += len(out)
        return out


def generate_traffic(
    url: str | Anvil | Web3,
    deployment: Deployment,
    blocks: int,
    txs_per_block: int,
    seed: int = 0,
    *,
    verify: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Mine ``blocks`` blocks of ``txs_per_block`` transactions each (swaps both ways, mints,
    burns, ERC20 transfers and approvals) and return what to expect::

        {"blocks", "txs", "first_block", "last_block", "seconds", "tx_per_s", "logs_per_s",
         "ops": {op: n}, "logs": {event: n},            # summed over contract kinds
         "logs_by_contract": {"UniswapV2Pair": {...}, "ERC20": {...}, "UniswapV2Factory": {...}},
         "total_logs", "reserves": [(r0, r1), ...]}

    ``verify`` (default) counts the logs of the generated range with ``eth_getLogs`` and
    compares them, and the pairs' ``getReserves``, with the local tracking (a reverted tx would
    show up as missing logs); raises ``AssertionError`` on a mismatch.
    """
    if blocks < 0 or txs_per_block < 1:
        raise ValueError("blocks >= 0 and txs_per_block >= 1 required")
    c = _url_client(url)
    state = ChainState.load(c, deployment)
    gen = TrafficGenerator(deployment, state, seed)
    gas_limit = _block_gas_limit(c)
    worst = max(GAS["swap"], GAS["mint"], GAS["burn"], GAS["transfer"]) * txs_per_block
    first_block = state.block + 1
    t0 = time.perf_counter()
    prev_count_check: str | None = None
    expected_per_block: dict[str, int] = {}
    with _Automine(c):
        for b in range(blocks):
            txs = gen.plan_block(txs_per_block)
            if worst > gas_limit:
                g = sum(int(tx["gas"], 16) for tx in txs)
                if g > gas_limit:
                    raise ValueError(
                        f"{txs_per_block} txs need {g} gas > block gas limit {gas_limit}: "
                        "start anvil with a larger --gas-limit (Anvil(gas_limit=...))"
                    )
            calls: list[tuple[str, list]] = [("eth_sendTransaction", [tx]) for tx in txs]
            if prev_count_check is not None:  # piggy-back: did the previous block take everything?
                calls.append(("eth_getBlockTransactionCountByNumber", [prev_count_check]))
            res = batch(c, calls)
            if prev_count_check is not None:
                n = int(res[-1], 16)
                if n != expected_per_block[prev_count_check]:
                    raise RuntimeError(f"block {prev_count_check} holds {n} txs, expected "
                                       f"{expected_per_block[prev_count_check]}")
            _mine(c)
            num = hex(first_block + b)
            expected_per_block = {num: len(txs)}
            prev_count_check = num
            if progress is not None:
                progress(b + 1, blocks)
        if prev_count_check is not None:
            n = int(call(c, "eth_getBlockTransactionCountByNumber", [prev_count_check]), 16)
            if n != expected_per_block[prev_count_check]:
                raise RuntimeError(f"block {prev_count_check} holds {n} txs, expected {expected_per_block[prev_count_check]}")
    seconds = time.perf_counter() - t0
    head = int(call(c, "eth_blockNumber"), 16)
    if head != first_block + blocks - 1:
        raise RuntimeError(f"head is {head}, expected {first_block + blocks - 1} (someone else mining?)")
    by_contract = gen.counts
    logs: dict[str, int] = {}
    for kind in ("UniswapV2Pair", "ERC20"):
        for ev, n in by_contract[kind].items():
            logs[ev] = logs.get(ev, 0) + n
    total = sum(logs.values())
    stats = {
        "blocks": blocks,
        "txs": gen.txs,
        "first_block": first_block,
        "last_block": first_block + blocks - 1,
        "seconds": round(seconds, 3),
        "tx_per_s": round(gen.txs / seconds, 1) if seconds > 0 else None,
        "logs_per_s": round(total / seconds, 1) if seconds > 0 else None,
        "ops": dict(gen.ops),
        "logs": logs,
        "logs_by_contract": {k: dict(v) for k, v in by_contract.items()},
        "total_logs": total,
        "reserves": [(p.reserve0, p.reserve1) for p in state.pools],
    }
    if verify and blocks:
        verify_traffic(c, deployment, stats)
    return stats


# ---------------------------------------------------------------------------------------------
# checking against the chain
# ---------------------------------------------------------------------------------------------


def count_logs(
    node: str | Anvil | Web3,
    deployment: Deployment,
    from_block: int,
    to_block: int,
    max_blocks_per_call: int = 2000,
    target_logs_per_call: int = 20_000,
) -> dict[str, dict[str, int]]:
    """Count the deployment's logs in ``[from_block, to_block]`` with ``eth_getLogs``, by
    contract kind and event name (unknown topics are counted under ``"?"``)."""
    c = _url_client(node)
    kind_of = deployment.contract_kind()
    names = {kind: {t: n for n, t in event_topics(kind).items()} for kind in ARTIFACT_NAMES}
    counts = _new_counts()
    addresses = [deployment.factory, *deployment.tokens, *deployment.pair_addresses]
    step = max_blocks_per_call
    lo = from_block
    while lo <= to_block:
        hi = min(to_block, lo + step - 1)
        logs = call(c, "eth_getLogs", [{"fromBlock": hex(lo), "toBlock": hex(hi), "address": addresses}])
        for lg in logs:
            kind = kind_of.get(lg["address"].lower())
            if kind is None or not lg["topics"]:
                continue
            ev = names[kind].get(lg["topics"][0], "?")
            counts[kind][ev] = counts[kind].get(ev, 0) + 1
        # aim for ~target_logs_per_call per request
        per_block = len(logs) / (hi - lo + 1)
        if per_block > 0:
            step = max(1, min(max_blocks_per_call, int(target_logs_per_call / per_block)))
        lo = hi + 1
    return counts


def verify_traffic(node: str | Anvil | Web3, deployment: Deployment, stats: dict) -> None:
    """Assert that the chain holds exactly the logs ``stats`` expects for its block range and
    that every pair's ``getReserves`` equals the tracked reserves."""
    got = count_logs(node, deployment, stats["first_block"], stats["last_block"])
    want = stats["logs_by_contract"]
    for kind in ("UniswapV2Pair", "ERC20"):
        g = {k: v for k, v in got[kind].items() if v}
        w = {k: v for k, v in want[kind].items() if v}
        if g != w:
            raise AssertionError(f"{kind} logs on chain {g} != expected {w} (a tx reverted?)")
    # sampled receipts: first, middle and last block (a revert would also show in the counts)
    c = _url_client(node)
    lo, hi = stats["first_block"], stats["last_block"]
    for n in sorted({lo, (lo + hi) // 2, hi}):
        try:
            receipts = call(c, "eth_getBlockReceipts", [hex(n)]) or []
        except Web3RPCError:
            blk = call(c, "eth_getBlockByNumber", [hex(n), False])
            receipts = batch(c, [("eth_getTransactionReceipt", [h]) for h in blk["transactions"]])
        failed = [r["transactionHash"] for r in receipts if r.get("status") != "0x1"]
        if failed:
            raise AssertionError(f"block {n}: {len(failed)} reverted tx(s), e.g. {failed[0]}")
    chain = [tuple(r) for r in read_reserves(node, deployment, hex(stats["last_block"]))]
    mine = [tuple(r) for r in stats["reserves"]]
    if chain != mine:
        raise AssertionError(f"reserves on chain {chain} != tracked {mine}")


# ---------------------------------------------------------------------------------------------
# replacement forks
# ---------------------------------------------------------------------------------------------


def plan_reorg(
    node: str | Anvil | Web3,
    deployment: Deployment,
    depth: int,
    txs_per_block: int = 4,
    seed: int = 1,
    blocks_with_txs: Sequence[int] | None = None,
) -> tuple[list[list], dict]:
    """Build ``[[tx, block_offset], ...]`` for ``anvil_reorg(depth, ...)``: different Uniswap
    traffic (seeded by ``seed``) computed against the common ancestor's state (head - depth),
    with explicit nonces.  ``blocks_with_txs`` picks the offsets that get transactions (default
    all ``0..depth-1``).  Returns ``(pairs, expected)`` where ``expected`` has the same shape as
    :func:`generate_traffic`'s ``logs_by_contract`` / ``reserves``."""
    if depth < 1:
        raise ValueError("anvil_reorg needs depth >= 1")
    c = _url_client(node)
    head = int(call(c, "eth_blockNumber"), 16)
    ancestor = head - depth
    if ancestor < deployment.seed_block:
        raise ValueError(f"reorg depth {depth} would cut into the deployment (seed block {deployment.seed_block})")
    state = ChainState.load(c, deployment, ancestor)
    gen = TrafficGenerator(deployment, state, seed)
    offsets = range(depth) if blocks_with_txs is None else sorted(blocks_with_txs)
    pairs: list[list] = []
    for off in offsets:
        if not 0 <= off < depth:
            raise ValueError(f"block offset {off} outside 0..{depth - 1}")
        for tx in gen.plan_block(txs_per_block):
            pairs.append([tx, off])
    expected = {
        "ancestor": ancestor,
        "first_block": ancestor + 1,
        "last_block": head,
        "txs": gen.txs,
        "ops": dict(gen.ops),
        "logs_by_contract": {k: dict(v) for k, v in gen.counts.items()},
        "reserves": [(p.reserve0, p.reserve1) for p in state.pools],
    }
    return pairs, expected


def reorg(
    node: str | Anvil | Web3,
    deployment: Deployment,
    depth: int,
    txs_per_block: int = 4,
    seed: int = 1,
    blocks_with_txs: Sequence[int] | None = None,
    verify: bool = True,
) -> dict:
    """Replace the last ``depth`` blocks with a fork carrying different Uniswap transactions
    (``anvil_reorg``); returns :func:`plan_reorg`'s ``expected`` plus ``old_hashes`` /
    ``new_hashes`` of the replaced block numbers.  ``verify`` checks logs and reserves."""
    c = _url_client(node)
    pairs, expected = plan_reorg(c, deployment, depth, txs_per_block, seed, blocks_with_txs)
    nums = range(expected["first_block"], expected["last_block"] + 1)
    old = [b["hash"] for b in batch(c, [("eth_getBlockByNumber", [hex(n), False]) for n in nums])]
    call(c, "anvil_reorg", [int(depth), pairs])
    new = [b["hash"] for b in batch(c, [("eth_getBlockByNumber", [hex(n), False]) for n in nums])]
    expected["old_hashes"] = old
    expected["new_hashes"] = new
    if verify:
        verify_traffic(c, deployment, expected)
    return expected
