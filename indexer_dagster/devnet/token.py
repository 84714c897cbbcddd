"""The devnet's ERC-20: OpenZeppelin's ERC20 with the decimals as a constructor argument (``DevnetToken.sol``).

OpenZeppelin's compiled presets are fixed at 18 decimals, so a USDC-like token (6 decimals) is compiled
here, from the OpenZeppelin sources in ``node_modules``, by solc-js (the ``solc`` npm package: the compiler
ships inside it, nothing is downloaded). The artifact (``{"contractName", "abi", "bytecode"}``, the shape of
the npm artifacts) is kept under ``node_modules/.cache`` by a hash of the source and the compiler, so it is
compiled once per checkout (about a second).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

from .anvil import repo_root

SOURCE = Path(__file__).with_name("DevnetToken.sol")
CONTRACT = "DevnetToken"
# anvil runs with --hardfork cancun: no opcode of a later EVM in the bytecode
SETTINGS = {"optimizer": {"enabled": True, "runs": 200}, "evmVersion": "cancun"}

# Compiles the standard JSON input on stdin; imports ("@openzeppelin/...") are read from node_modules.
_COMPILE_JS = r"""
const fs = require('fs'), path = require('path'), solc = require('solc');
const root = path.join(process.cwd(), 'node_modules');
const imports = (p) => {
  try { return {contents: fs.readFileSync(path.join(root, p), 'utf8')}; } catch (e) { return {error: 'not found: ' + p}; }
};
const out = JSON.parse(solc.compile(fs.readFileSync(0, 'utf8'), {import: imports}));
process.stdout.write(JSON.stringify({version: solc.version(), output: out}));
"""


def _node_package_version(name: str) -> str:
    pkg = repo_root() / "node_modules" / name / "package.json"
    if not pkg.is_file():
        raise FileNotFoundError(f"{pkg} missing: run `npm ci` in {repo_root()} (it installs {name})")
    return json.loads(pkg.read_text())["version"]


def token_artifact_path() -> Path:
    """The compiled DevnetToken artifact (compiled now if this checkout has not compiled this source yet)."""
    return compile_contract(SOURCE, CONTRACT)


@cache
def compile_contract(source_file: Path, contract: str) -> Path:
    """The artifact of `contract` in the Solidity file `source_file` (imports from node_modules), compiled by
    solc-js unless this checkout already holds it."""
    source = source_file.read_text()
    versions = {n: _node_package_version(n) for n in ("solc", "@openzeppelin/contracts")}
    key = hashlib.sha256(json.dumps([source, SETTINGS, versions], sort_keys=True).encode()).hexdigest()[:16]
    path = repo_root() / "node_modules" / ".cache" / "indexer-dagster" / f"{contract}-{key}.json"
    if path.is_file():
        return path
    node = shutil.which("node")
    if node is None:
        raise FileNotFoundError("node is not on PATH: the devnet compiles its ERC-20 with solc-js (`npm ci` needs node too)")
    standard_input = {
        "language": "Solidity",
        "sources": {source_file.name: {"content": source}},
        "settings": {**SETTINGS, "outputSelection": {source_file.name: {contract: ["abi", "evm.bytecode.object"]}}},
    }
    done = subprocess.run([node, "-e", _COMPILE_JS], input=json.dumps(standard_input), capture_output=True,
                          text=True, cwd=repo_root(), timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"solc-js failed (exit {done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    errors = [e for e in result["output"].get("errors", []) if e.get("severity") == "error"]
    if errors:
        raise RuntimeError(f"{source_file.name} does not compile: " + "; ".join(e["formattedMessage"] for e in errors))
    compiled = result["output"]["contracts"][source_file.name][contract]
    artifact = {"contractName": contract, "compiler": result["version"], "abi": compiled["abi"],
                "bytecode": "0x" + compiled["evm"]["bytecode"]["object"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # two processes compiling at once: one rename wins
    tmp.write_text(json.dumps(artifact))
    os.replace(tmp, path)
    return path
