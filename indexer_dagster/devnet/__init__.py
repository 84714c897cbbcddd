"""A local EVM devnet for tests, demos and benchmarks (plain Python, no Dagster).

* :mod:`.anvil`   – start/stop anvil; JSON-RPC through web3.py (:func:`rpc`, :func:`call`, ``Anvil.w3``).
* :mod:`.uniswap` – deploy the real Uniswap V2 contracts, generate traffic, replacement forks.
* :mod:`.config`  – write an indexer YAML config (+ ABIs) for a deployment.

One call for tests::

    with Anvil() as node:
        dep = build_devnet(node, blocks=30, txs_per_block=20)

and :func:`run_devnet` for the ``indexer devnet`` CLI command.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from .anvil import Anvil, AnvilNotFoundError, AnvilStartError, batch, call, find_anvil, rpc, rpc_batch, web3_for
from .config import write_config
from .uniswap import (
    ChainState,
    Deployment,
    PairInfo,
    _url_client,
    approve_tx,
    burn_call_tx,
    burn_txs,
    count_logs,
    deploy_uniswap,
    generate_traffic,
    get_amount_out,
    mint_call_tx,
    mint_txs,
    plan_reorg,
    read_reserves,
    reorg,
    swap_call_tx,
    swap_txs,
    transfer_tx,
    verify_traffic,
)

__all__ = [
    "GENERATOR_VERSION",
    "Anvil",
    "AnvilNotFoundError",
    "AnvilStartError",
    "ChainState",
    "Deployment",
    "PairInfo",
    "approve_tx",
    "batch",
    "build_devnet",
    "burn_call_tx",
    "burn_txs",
    "call",
    "count_logs",
    "deploy_uniswap",
    "find_anvil",
    "generate_traffic",
    "get_amount_out",
    "mint_call_tx",
    "mint_txs",
    "plan_reorg",
    "read_reserves",
    "reorg",
    "rpc",
    "rpc_batch",
    "run_devnet",
    "swap_call_tx",
    "swap_txs",
    "transfer_tx",
    "verify_traffic",
    "web3_for",
    "write_config",
]

#: bump when deployment/traffic generation changes, so cached chain states are regenerated
GENERATOR_VERSION = 4  # 3: named OpenZeppelin tokens; 4: USDC (6 decimals), pools seeded at nominal prices


def build_devnet(
    anvil_or_url: Anvil | str,
    blocks: int = 200,
    txs_per_block: int = 50,
    seed: int = 0,
    n_tokens: int = 4,
    n_pairs: int | None = None,
    *,
    block_interval: int | None = None,
    verify: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Deployment:
    """Deploy Uniswap V2 (``n_tokens`` tokens, ``n_pairs`` pairs; default all pairs among the
    tokens) and mine ``blocks`` blocks of ``txs_per_block`` transactions of traffic.

    ``block_interval``: give consecutive blocks timestamps this many seconds apart (anvil's
    ``anvil_setBlockTimestampInterval``, removed afterwards); ``None`` = the node's clock
    (blocks mined within one second then share a timestamp).  The traffic statistics
    (expected logs, reserves, speed) are in ``deployment.traffic``.
    """
    c = _url_client(anvil_or_url)
    if block_interval:
        call(c, "anvil_setBlockTimestampInterval", [int(block_interval)])
    try:
        dep = deploy_uniswap(c, n_tokens=n_tokens, n_pairs=n_pairs, seed=seed)
        if blocks > 0:
            dep.traffic = generate_traffic(c, dep, blocks, txs_per_block, seed, verify=verify, progress=progress)
    finally:
        if block_interval:
            call(c, "anvil_removeBlockTimestampInterval")
    return dep


# ---------------------------------------------------------------------------------------------
# the `indexer devnet` command
# ---------------------------------------------------------------------------------------------


def _cache_files(state_cache: str | os.PathLike, key: str) -> tuple[Path, Path]:
    """(state file, meta file) for a cache directory or a cache file path."""
    p = Path(state_cache)
    if p.is_dir() or not p.suffix:
        p.mkdir(parents=True, exist_ok=True)
        return p / f"devnet-{key}.state.json.gz", p / f"devnet-{key}.meta.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    return p, p.with_name(p.name + ".meta.json")


def _write_state(node: Anvil, path: Path) -> int:
    """``anvil_dumpState`` (gzip) -> ``path`` (kept gzipped if the name ends in .gz)."""
    raw = node.rpc("anvil_dumpState")
    data = bytes.fromhex(raw[2:] if raw.startswith("0x") else raw)
    gz = data[:2] == b"\x1f\x8b"
    if path.name.endswith(".gz") and not gz:
        data = gzip.compress(data, compresslevel=3)
    elif not path.name.endswith(".gz") and gz:
        data = gzip.decompress(data)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data)


def _plain_state_file(path: Path) -> tuple[Path, bool]:
    """A file ``--load-state`` can read (anvil does not read gzip): (path, is_temporary)."""
    if not path.name.endswith(".gz"):
        return path, False
    tmp = path.with_name(f".{path.name[:-3]}.{os.getpid()}.tmp")
    with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    return tmp, True


def _start_from_state(state: Path, **kw) -> Anvil:
    plain, temporary = _plain_state_file(state)
    try:
        # A large dump (a million logs) takes anvil well over the default start-up wait to load.
        return Anvil(load_state=plain, startup_timeout=600.0, **kw).start()
    finally:
        if temporary:
            plain.unlink(missing_ok=True)


def _head(node: Anvil) -> tuple[int, str]:
    b = node.rpc("eth_getBlockByNumber", ["latest", False])
    return int(b["number"], 16), b["hash"]


def run_devnet(
    out_dir: str | os.PathLike,
    port: int | None = None,
    chain_id: int = 31337,
    blocks: int = 200,
    txs_per_block: int = 50,
    seed: int = 0,
    block_time: float | None = None,
    state_cache: str | os.PathLike | None = None,
    *,
    n_tokens: int = 4,
    n_pairs: int | None = None,
    rpc_url: str | None = None,
    block_interval: int | None = 12,
    confirmations: int = 12,
    blocks_per_partition: int = 1000,
    echo: Callable[[str], None] | None = print,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Anvil, Deployment, Path]:
    """Start anvil, deploy Uniswap V2, generate traffic, write ``out_dir/indexer.yaml`` (+ ABIs,
    + ``out_dir/devnet.json`` with the deployment and expected log counts) and print a summary.

    * ``port``: ``None`` = a free port.  ``rpc_url``: what the config's ``chain.rpc_url`` gets
      (an env var name like ``DEVNET_RPC_URL`` becomes ``${DEVNET_RPC_URL}``); default the
      node's literal URL.
    * ``block_time``: after generation, mine a block every ``block_time`` seconds
      (``None`` = no automatic mining).  Whole seconds are switched on with
      ``evm_setIntervalMining``; a fractional value needs anvil's ``--block-time``, so the
      generated chain is dumped and anvil restarted from it (same port).
    * ``state_cache``: a directory (files ``devnet-<key>.state.json.gz`` / ``.meta.json``)
      or a file path (+ ``<path>.meta.json``).  If a dump for the same parameters exists it is
      loaded instead of regenerating; otherwise the chain is generated and dumped there.
      Chains loaded from a dump serve blocks/logs/receipts identically, but ``eth_call`` at
      blocks before the load and ``anvil_reorg`` deeper than the loaded head fail
      (``BlockOutOfRangeError``): anvil keeps no historical states in the dump.
    * ``block_interval``: seconds between generated blocks' timestamps; genesis is back-dated
      so the generated chain ends around now.

    Returns ``(anvil, deployment, config_path)``; the caller owns the anvil (``anvil.stop()``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = echo or (lambda _s: None)
    params = {
        "chain_id": chain_id, "blocks": blocks, "txs_per_block": txs_per_block, "seed": seed,
        "n_tokens": n_tokens, "n_pairs": n_pairs, "block_interval": block_interval,
        "generator": GENERATOR_VERSION, "anvil": _anvil_version(),
    }
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    state_file = meta_file = None
    if state_cache is not None:
        state_file, meta_file = _cache_files(state_cache, key)

    t0 = time.perf_counter()
    node: Anvil | None = None
    try:
        dep: Deployment | None = None
        meta = None
        if state_file is not None and meta_file is not None and state_file.is_file() and meta_file.is_file():
            try:
                meta = json.loads(meta_file.read_text())
            except (OSError, ValueError):
                meta = None
            if not meta or meta.get("key") != key:
                meta = None
        if meta is not None:
            say(f"devnet: loading cached chain {state_file}")
            assert state_file is not None  # meta is only read next to a cached state
            node = _start_from_state(state_file, port=port, chain_id=chain_id, block_time=block_time)
            dep = Deployment.from_dict(meta["deployment"])
            head = _head(node)
            if [head[0], head[1]] != meta["head"]:
                say(f"devnet: cached state head {head} differs from its metadata; regenerating")
                node.stop()
                node = None
                dep = None
        if dep is None:
            genesis = None
            if block_interval:
                genesis = int(time.time()) - (blocks + 4) * int(block_interval)
            node = Anvil(port=port, chain_id=chain_id, timestamp=genesis).start()
            say(f"devnet: anvil at {node.url}; deploying Uniswap V2 and mining {blocks} blocks x {txs_per_block} txs")
            dep = build_devnet(node, blocks, txs_per_block, seed, n_tokens, n_pairs,
                               block_interval=block_interval, progress=progress)
            if block_interval:
                last_ts = int(node.rpc("eth_getBlockByNumber", ["latest", False])["timestamp"], 16)
                now = int(time.time())
                if last_ts < now:
                    node.rpc("evm_setNextBlockTimestamp", [now])
            if state_file is not None and meta_file is not None:
                size = _write_state(node, state_file)
                meta_file.write_text(json.dumps({
                    "key": key, "params": params, "head": list(_head(node)),
                    "deployment": dep.to_dict(), "written": time.time(),
                }, indent=1))
                say(f"devnet: cached chain state in {state_file} ({size / 1e6:.1f} MB)")
            if block_time:
                if float(block_time).is_integer():
                    node.rpc("evm_setIntervalMining", [int(block_time)])
                    node.block_time = block_time
                else:  # fractional: only --block-time can do it -> restart from a dump
                    used_port = node.port
                    tmp_state = out / ".devnet-restart.state.json"
                    if state_file is not None and not state_file.name.endswith(".gz"):
                        tmp_state = state_file
                    else:
                        _write_state(node, tmp_state)
                    node.stop()
                    node = None
                    try:
                        node = Anvil(port=used_port, chain_id=chain_id, block_time=block_time,
                                     load_state=tmp_state).start()
                    finally:
                        if tmp_state != state_file:
                            tmp_state.unlink(missing_ok=True)

        assert node is not None and dep is not None
        config_path = write_config(
            out / "indexer.yaml", rpc_url or node.url, chain_id, dep, data_dir="./data",
            confirmations=confirmations, blocks_per_partition=blocks_per_partition,
        )
        head_num, head_hash = _head(node)
        (out / "devnet.json").write_text(json.dumps({
            "rpc_url": node.url, "chain_id": chain_id, "head": head_num, "head_hash": head_hash,
            "params": params, "deployment": dep.to_dict(),
            "expected_deployment_logs": dep.expected_deployment_logs(),
        }, indent=1))
        tr = dep.traffic or {}
        say(
            f"devnet: {node.url} chain {chain_id}, head {head_num}; factory {dep.factory}, "
            f"{len(dep.tokens)} tokens, {len(dep.pairs)} pairs"
        )
        if tr:
            say(
                f"devnet: traffic blocks {tr['first_block']}..{tr['last_block']}: {tr['txs']} txs, "
                f"{tr['total_logs']} logs {tr['logs']}"
                + (f" ({tr['tx_per_s']:.0f} tx/s)" if tr.get("tx_per_s") and meta is None else "")
            )
        mining = f"a block every {block_time}s" if block_time else "no automatic mining"
        say(f"devnet: config {config_path}; {mining}; ready in {time.perf_counter() - t0:.1f}s")
        return node, dep, config_path
    except BaseException:
        if node is not None:
            node.stop()
        raise


def _anvil_version() -> str:
    import subprocess

    try:
        out = subprocess.run([find_anvil(), "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0].strip() if out.stdout else "unknown"
    except Exception:  # noqa: BLE001 - only a label in the output
        return "unknown"
