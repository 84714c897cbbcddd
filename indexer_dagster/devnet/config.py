"""Write a ready-to-use indexer YAML config for a devnet :class:`Deployment`."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import yaml
from eth_utils import to_checksum_address

from .uniswap import ARTIFACT_NAMES, Deployment, artifact_paths

__all__ = ["CONTRACT_EVENTS", "rpc_url_value", "write_config"]

#: contract name -> events the config asks the indexer for
CONTRACT_EVENTS: dict[str, list[str]] = {
    "UniswapV2Factory": ["PairCreated"],
    "UniswapV2Pair": ["Swap", "Sync", "Mint", "Burn", "Transfer"],
    "ERC20": ["Transfer", "Approval"],
}

_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def rpc_url_value(rpc_url_env_or_value: str) -> str:
    """``"DEVNET_RPC_URL"`` -> ``"${DEVNET_RPC_URL}"``; ``"${X}"`` and URLs are kept as they are."""
    v = rpc_url_env_or_value.strip()
    if _ENV_NAME.match(v):
        return "${" + v + "}"
    return v


def _rel(target: str | os.PathLike, base: Path) -> str:
    """``target`` relative to ``base`` ("./x" style); relative targets are taken as relative to
    ``base`` already."""
    t = Path(target)
    if not t.is_absolute():
        s = t.as_posix()
        return s if s.startswith(("./", "../")) or s == "." else f"./{s}"
    r = os.path.relpath(t.resolve(), base.resolve())
    r = Path(r).as_posix()
    return r if r.startswith("..") else f"./{r}"


def _scalar(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    s = str(v)
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", s) and s.lower() not in ("true", "false", "null", "yes", "no", "on", "off", "y", "n"):
        return s
    if "/" in s and re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_./-]*", s):
        return s  # plain relative paths
    return json.dumps(s)  # a JSON string is a valid YAML double-quoted scalar


def _dump(doc: dict) -> str:
    """Readable YAML: block mappings, one address per line, flow-style event lists."""
    lines: list[str] = ["chain:"]
    for k, v in doc["chain"].items():
        lines.append(f"  {k}: {_scalar(v)}")
    lines.append("contracts:")
    for c in doc["contracts"]:
        lines.append(f"  - name: {_scalar(c['name'])}")
        lines.append(f"    abi: {_scalar(c['abi'])}")
        lines.append("    addresses:")
        lines += [f"      - {_scalar(a)}" for a in c["addresses"]]
        lines.append(f"    events: [{', '.join(_scalar(e) for e in c['events'])}]")
    lines.append("storage:")
    for k, v in doc["storage"].items():
        lines.append(f"  {k}: {_scalar(v)}")
    return "\n".join(lines) + "\n"


def write_config(
    path: str | os.PathLike,
    rpc_url_env_or_value: str,
    chain_id: int,
    deployment: Deployment,
    data_dir: str | os.PathLike = "./data",
    *,
    chain_name: str = "devnet",
    confirmations: int = 12,
    start_block: int = 0,
    blocks_per_partition: int = 1000,
    duckdb_path: str | os.PathLike | None = None,
    include_tokens: bool = True,
    include_factory: bool = True,
) -> Path:
    """Write the indexer config to ``path`` and copy the artifacts it names into
    ``<dir of path>/abis/`` (the npm artifact JSONs as they are: they carry an ``"abi"`` key).

    ``rpc_url_env_or_value``: an environment variable name (``DEVNET_RPC_URL`` becomes
    ``${DEVNET_RPC_URL}``), a ``${...}`` reference, or a literal URL.  ``data_dir`` /
    ``duckdb_path``: relative paths are relative to the config's directory, absolute ones are
    rewritten relative to it.  Addresses are EIP-55 checksummed.  Returns the config path.
    """
    path = Path(path)
    base = path.parent
    base.mkdir(parents=True, exist_ok=True)
    abis = base / "abis"
    abis.mkdir(exist_ok=True)
    sources = artifact_paths()
    for name in ARTIFACT_NAMES:
        src = Path(deployment.artifacts.get(name) or sources[name])
        if not src.is_file():
            src = sources[name]
        dst = abis / f"{name}.json"
        if not (dst.exists() and dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes()):
            shutil.copyfile(src, dst)

    data_rel = _rel(data_dir, base)
    duck_rel = _rel(duckdb_path, base) if duckdb_path is not None else f"{data_rel.rstrip('/')}/indexer.duckdb"

    contracts = []
    if include_factory:
        contracts.append({
            "name": "UniswapV2Factory",
            "abi": "abis/UniswapV2Factory.json",
            "addresses": [to_checksum_address(deployment.factory)],
            "events": CONTRACT_EVENTS["UniswapV2Factory"],
        })
    contracts.append({
        "name": "UniswapV2Pair",
        "abi": "abis/UniswapV2Pair.json",
        "addresses": [to_checksum_address(p.address) for p in deployment.pairs],
        "events": CONTRACT_EVENTS["UniswapV2Pair"],
    })
    if include_tokens:
        contracts.append({
            "name": "ERC20",
            "abi": "abis/ERC20.json",
            "addresses": [to_checksum_address(t) for t in deployment.tokens],
            "events": CONTRACT_EVENTS["ERC20"],
        })
    doc = {
        "chain": {
            "name": chain_name,
            "chain_id": int(chain_id),
            "rpc_url": rpc_url_value(rpc_url_env_or_value),
            "confirmations": int(confirmations),
            "start_block": int(start_block),
            "blocks_per_partition": int(blocks_per_partition),
            # DEX volumes also in WETH (the first token), to rank the pools by one volume.
            "reference_token": to_checksum_address(deployment.tokens[0]),
        },
        "contracts": contracts,
        "storage": {"data_dir": data_rel, "duckdb_path": duck_rel},
    }
    header = (
        "# Indexer config for a local anvil devnet with the real Uniswap V2 contracts.\n"
        f"# factory deployed in block {deployment.factory_block}, pairs in blocks "
        f"{sorted({p.created_block for p in deployment.pairs})}, liquidity seeded in block {deployment.seed_block}.\n"
        "# Paths are relative to this file's directory.\n"
    )
    body = _dump(doc)
    if yaml.safe_load(body) != doc:  # our hand-written YAML must read back as the same data
        raise AssertionError("generated YAML does not round-trip")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + body)
    os.replace(tmp, path)
    return path
