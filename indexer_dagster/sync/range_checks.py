"""Checks over one stored block range of the lake: is what we wrote a faithful copy of one chain?

Run after a range is written (the Dagster skin attaches them as asset checks on `blocks` and
`logs`), or on any stored range by hand. Each check reads the range's Parquet files with polars
and returns a `CheckResult` with a one-line description and metadata a person can act on. A
failing range is recorded in `persist.meta`, which keeps its rows `unconfirmed` and makes
the sensor sync it again; a later passing run clears it.

The checks:
- `contiguous_blocks`: every block from the range's first indexed block to its end (or the last
  block the range reached, if it stopped at the chain head) is stored exactly once.
- `unique_logs`: no two log rows share (block_number, log_index).
- `log_block_hashes`: every log carries the hash of its block's stored header.
- `parent_hash_chain`: each block's parent_hash is the previous block's hash, inside the range and
  across the previous range's last stored block.
- `row_counts_match_node`: for a few random blocks, the node's eth_getLogs (by block hash, for the
  configured addresses) returns exactly the stored log rows.
"""

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import polars as pl

from indexer_dagster.block_range import BlockRange, range_for_block
from indexer_dagster.chain.errors import RpcError
from indexer_dagster.chain.rpc import rpc_client
from indexer_dagster.config import IndexerConfig
from indexer_dagster.persist.datasets import in_log_order
from indexer_dagster.persist.files import LakePath, read_parquet
from indexer_dagster.persist.lake import Lake, open_lake
from indexer_dagster.persist.meta import record_range_checks
from indexer_dagster.sync.contracts import ContractSet, has_factories, key_files, stored_children

BLOCKS_ASSET = "blocks"
LOGS_ASSET = "logs"
# check name -> (the raw dataset it judges, what it guarantees); the Dagster skin builds its specs from this.
CHECKS: dict[str, tuple[str, str]] = {
    "contiguous_blocks": (BLOCKS_ASSET, "Every block of the range (up to the last one reached) is stored exactly once."),
    "parent_hash_chain": (BLOCKS_ASSET, "Each block's parent_hash is the previous block's hash, also across the "
                                        "previous range's last block."),
    "unique_logs": (LOGS_ASSET, "No duplicate (block_number, log_index) among the range's logs."),
    "log_block_hashes": (LOGS_ASSET, "Every log's block_hash equals its block header's hash."),
    "row_counts_match_node": (LOGS_ASSET, "For a sample of blocks, the node's eth_getLogs returns exactly the "
                                          "stored log rows."),
}
# Metadata keys of a CheckResult that count something (rows, offending blocks or logs): the Dagster skin
# sums them over a run's ranges as numbers, so the UI can plot them per evaluation.
COUNTERS = ("rows", "missing", "duplicated", "outside", "duplicated_keys", "without_header", "wrong_hash",
            "links_checked", "broken", "mismatches")
DEFAULT_SAMPLES = 3
_EXAMPLES = 5  # offending values listed in metadata


@dataclass(frozen=True)
class CheckResult:
    name: str
    asset: str  # "blocks" or "logs"
    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _result(name: str, passed: bool, description: str, **metadata: Any) -> CheckResult:
    return CheckResult(name, CHECKS[name][0], passed, description, metadata)


def check_contiguous(blocks: pl.DataFrame, first: int | None, last: int | None) -> CheckResult:
    """`first..last` must be stored exactly once each (None: nothing to index in this range)."""
    name = "contiguous_blocks"
    numbers = blocks["number"]
    if first is None or last is None:
        ok = blocks.height == 0
        return _result(name, ok, "the range holds no block to index" + ("" if ok else f" but {blocks.height} are stored"),
                       rows=blocks.height)
    present = set(numbers.to_list())
    missing = pl.Series("number", sorted(set(range(first, last + 1)) - present), dtype=pl.Int64)
    extra = pl.Series("number", sorted(n for n in present if not first <= n <= last), dtype=pl.Int64)
    dups = numbers.filter(numbers.is_duplicated()).unique().sort()
    meta = dict(expected_first=first, expected_last=last, rows=blocks.height, missing=missing.len(),
                missing_examples=missing.head(_EXAMPLES).to_list(), duplicated=dups.len(),
                duplicated_examples=dups.head(_EXAMPLES).to_list(), outside=extra.len(),
                outside_examples=extra.head(_EXAMPLES).to_list())
    if missing.len() == 0 and dups.len() == 0 and extra.len() == 0:
        return _result(name, True, f"blocks {first}..{last} stored once each ({blocks.height} rows)", **meta)
    parts = []
    if missing.len():
        parts.append(f"{missing.len()} block(s) missing (e.g. {missing.head(_EXAMPLES).to_list()})")
    if dups.len():
        parts.append(f"{dups.len()} block(s) stored twice (e.g. {dups.head(_EXAMPLES).to_list()})")
    if extra.len():
        parts.append(f"{extra.len()} block(s) outside {first}..{last} (e.g. {extra.head(_EXAMPLES).to_list()})")
    return _result(name, False, f"blocks {first}..{last}: " + "; ".join(parts), **meta)


def check_unique_logs(logs: pl.DataFrame) -> CheckResult:
    name = "unique_logs"
    if in_log_order(logs):  # a range file as written: no key twice, known without a hash table
        return _result(name, True, f"{logs.height} logs, no duplicate (block_number, log_index)",
                       rows=logs.height, duplicated_keys=0, examples=[])
    dup = (logs.group_by("block_number", "log_index").len().filter(pl.col("len") > 1)
           .sort("block_number", "log_index"))
    examples = [f"{b}:{i}" for b, i in dup.select("block_number", "log_index").head(_EXAMPLES).iter_rows()]
    meta = dict(rows=logs.height, duplicated_keys=dup.height, examples=examples)
    if dup.height == 0:
        return _result(name, True, f"{logs.height} logs, no duplicate (block_number, log_index)", **meta)
    return _result(name, False, f"{dup.height} (block_number, log_index) key(s) stored more than once "
                                f"(e.g. {examples})", **meta)


def check_log_block_hashes(logs: pl.DataFrame, blocks: pl.DataFrame) -> CheckResult:
    name = "log_block_hashes"
    joined = logs.select("block_number", "log_index", "block_hash").join(
        blocks.select(pl.col("number").alias("block_number"), pl.col("hash")), on="block_number", how="left"
    )
    no_header = joined.filter(pl.col("hash").is_null())
    wrong = joined.filter(pl.col("hash").is_not_null() & (pl.col("hash") != pl.col("block_hash")))
    meta = dict(rows=logs.height, without_header=no_header.height, wrong_hash=wrong.height,
                without_header_blocks=no_header["block_number"].unique().sort().head(_EXAMPLES).to_list(),
                wrong_hash_blocks=wrong["block_number"].unique().sort().head(_EXAMPLES).to_list())
    if no_header.height == 0 and wrong.height == 0:
        return _result(name, True, f"all {logs.height} logs carry their block header's hash", **meta)
    parts = []
    if wrong.height:
        parts.append(f"{wrong.height} log(s) whose block_hash differs from the header (blocks "
                     f"{meta['wrong_hash_blocks']})")
    if no_header.height:
        parts.append(f"{no_header.height} log(s) whose block has no stored header (blocks "
                     f"{meta['without_header_blocks']})")
    return _result(name, False, "; ".join(parts), **meta)


def check_parent_chain(blocks: pl.DataFrame, previous: dict | None) -> CheckResult:
    """Consecutive numbers must chain by hash (gaps are `contiguous_blocks`' business); `previous` is the
    stored block just below the range's first block, if any."""
    name = "parent_hash_chain"
    b = blocks.select("number", "hash", "parent_hash").unique("number", keep="first").sort("number")
    links = b.with_columns(
        pl.col("number").shift(1).alias("prev_number"), pl.col("hash").shift(1).alias("prev_hash")
    ).filter(pl.col("prev_number") == pl.col("number") - 1)
    broken = links.filter(pl.col("parent_hash") != pl.col("prev_hash"))["number"].to_list()
    meta: dict[str, Any] = dict(links_checked=links.height, broken=len(broken), broken_examples=broken[:_EXAMPLES])
    across = ""
    if b.height and previous is not None and previous["number"] == b["number"][0] - 1:
        ok = b["parent_hash"][0] == previous["hash"]
        meta |= {"previous_block": previous["number"], "previous_hash": previous["hash"], "across_ok": ok}
        if not ok:
            broken.insert(0, b["number"][0])
            across = (f"block {b['number'][0]}'s parent_hash {b['parent_hash'][0]} is not the previous range's "
                      f"last block hash {previous['hash']}")
    else:
        meta["previous_block"] = "not stored (checked when that range is)"
    if not broken:
        return _result(name, True, f"{links.height} parent links unbroken"
                       + (" including the previous range's last block" if "across_ok" in meta else ""), **meta)
    inside = meta["broken_examples"]  # inside the range (the link across is reported above)
    desc = "; ".join(x for x in (
        across, f"{len(inside)} block(s) whose parent_hash is not the previous block's hash (e.g. {inside})"
        if inside else "") if x)
    return _result(name, False, desc, **meta)


async def _node_logs(cfg: IndexerConfig, hashes: dict[int, str]) -> dict[int, list[int] | str]:
    """Log indexes per sampled block from the node (by block hash), or an error text."""
    # The addresses the range was fetched for: static ones and factory children, each from its start.
    contracts = ContractSet(cfg, stored_children(cfg)) if has_factories(cfg) else ContractSet(cfg)
    out: dict[int, list[int] | str] = {}
    async with rpc_client(cfg) as rpc:
        async def one(number: int, block_hash: str) -> None:
            starts = {a.lower(): s for a, s in contracts.starts(up_to=number).items()}
            addresses = sorted(starts)
            try:
                logs = await rpc.call("eth_getLogs", [{"blockHash": block_hash, "address": addresses}]) if addresses else []
            except RpcError as e:
                out[number] = (f"the node did not return the logs of block {number} {block_hash} "
                               f"(reorged away?): {e.info.message}")
                return
            out[number] = sorted(int(x["logIndex"], 16) for x in logs
                                 if number >= starts.get(x["address"].lower(), 0))
        await asyncio.gather(*(one(n, h) for n, h in hashes.items()))
    return out


def check_row_counts(
    cfg: IndexerConfig, logs: pl.DataFrame, blocks: pl.DataFrame, numbers: Sequence[int]
) -> CheckResult:
    name = "row_counts_match_node"
    hashes = {n: h for n, h in blocks.filter(pl.col("number").is_in(list(numbers)))
              .unique("number", keep="first").select("number", "hash").iter_rows()}
    if not hashes:
        return _result(name, True, "no stored block to sample", sampled=[])
    node = asyncio.run(_node_logs(cfg, hashes))
    mismatches, sampled = [], []
    for n in sorted(hashes):
        stored = sorted(logs.filter(pl.col("block_number") == n)["log_index"].to_list())
        expected = node[n]
        sampled.append(f"{n}: stored {len(stored)}, node " + (str(len(expected)) if isinstance(expected, list) else "?"))
        if isinstance(expected, str):
            mismatches.append(expected)
        elif stored != expected:
            mismatches.append(f"block {n}: {len(stored)} stored log rows, the node has {len(expected)}")
    meta = dict(sampled_blocks=sorted(hashes), sampled=sampled, mismatches=len(mismatches))
    if not mismatches:
        return _result(name, True, f"{len(hashes)} sampled block(s) match the node's eth_getLogs", **meta)
    return _result(name, False, "; ".join(mismatches), **meta)


def sample_blocks(blocks: pl.DataFrame, logs: pl.DataFrame, k: int, rng: random.Random) -> list[int]:
    """Up to k block numbers: half among blocks that have logs (where a loss shows), the rest among all."""
    with_logs = sorted(set(logs["block_number"].unique().to_list()) & set(blocks["number"].to_list()))
    picked = set(rng.sample(with_logs, min(len(with_logs), (k + 1) // 2)))
    rest = sorted(set(blocks["number"].to_list()) - picked)
    picked |= set(rng.sample(rest, min(len(rest), k - len(picked))))
    return sorted(picked)


def _read(path: LakePath, schema_cols: Sequence[str]) -> pl.DataFrame | None:
    return read_parquet(path, columns=list(schema_cols)) if path.is_file() else None


def previous_block(lake: Lake, first: int, width: int) -> dict | None:
    """The stored header just below `first` (from the previous range's file), if there is one."""
    if first <= 0:
        return None
    prev = range_for_block(first - 1, width)
    df = _read(lake.path("blocks", prev.key), ["number", "hash"])
    if df is None:
        return None
    row = df.filter(pl.col("number") == first - 1).head(1)
    return row.row(0, named=True) if row.height else None


def verify_range(
    cfg: IndexerConfig,
    r: BlockRange,
    *,
    to_block: int | None = None,
    samples: int = DEFAULT_SAMPLES,
    sample: Sequence[int] | None = None,
    seed: int | None = None,
) -> list[CheckResult]:
    """Run every check over range `r` as stored in `cfg`'s lake.

    `to_block` is the last block the range should reach (a run's result says; a range cut at the chain
    head ends early); without it, the range's end, or the highest stored block if the file says the
    range stopped short of it. `sample` fixes the blocks compared with the node (else `samples` random ones).
    """
    lake = open_lake(cfg)
    blocks_path, logs_path = lake.path("blocks", r.key), lake.path("logs", r.key)
    blocks = _read(blocks_path, ["number", "hash", "parent_hash"])

    # The range's logs file and its supplements (`<range>+<fingerprint>`: contracts added later).
    parts = [read_parquet(p, columns=["block_number", "log_index", "block_hash"]) for p in key_files(lake, "logs", r.key)]
    logs = pl.concat(parts, how="vertical") if parts and lake.exists("logs", r.key) else None
    if blocks is None or logs is None:
        missing = [str(p) for p in (blocks_path, logs_path) if not p.is_file()]
        return [_result(n, False, f"range {r.key} is not stored: {', '.join(missing)} missing; sync the range",
                        range=r.key) for n in CHECKS]
    clipped = r.clip(cfg.start_block, r.end)
    first = clipped.start if clipped else None
    if to_block is not None:
        last = min(to_block, r.end)
    elif first is None:
        last = None
    else:
        # No run result at hand: a range may legitimately stop at the head it saw; trust its highest block.
        last = max(int(cast(int, blocks["number"].max())) if blocks.height else first - 1, first - 1)
        last = last if last >= first else None
        if last is None:
            first = None
    results = [
        check_contiguous(blocks, first, last),
        check_parent_chain(blocks, previous_block(lake, cast(int, blocks["number"].min()) if blocks.height else 0,
                                                  cfg.chain.blocks_per_partition)),
        check_unique_logs(logs),
        check_log_block_hashes(logs, blocks),
    ]
    numbers = list(sample) if sample is not None else sample_blocks(blocks, logs, samples, random.Random(seed))
    results.append(check_row_counts(cfg, logs, blocks, numbers))
    return [CheckResult(c.name, c.asset, c.passed, c.description, {"range": r.key, **c.metadata}) for c in results]


def verify_and_record(cfg: IndexerConfig, r: BlockRange, *, to_block: int | None = None) -> list[CheckResult]:
    """`verify_range`, then the durable verdict: a failed range stays unconfirmed and is synced again.

    A broken link to the previous range marks that range too: either side may be on the wrong fork."""
    results = verify_range(cfg, r, to_block=to_block)
    lake = open_lake(cfg)
    record_range_checks(lake, cfg.chain.chain_id, r, [(c.name, c.description) for c in results if not c.passed])
    link = next(c for c in results if c.name == "parent_hash_chain")
    if link.metadata.get("across_ok") is False:
        record_range_checks(lake, cfg.chain.chain_id, range_for_block(r.start - 1, r.end - r.start + 1),
                            [(link.name, f"the next range {r.key} does not chain onto this range's "
                                         f"last block: {link.description}")], add=True)
    return results


def failures(results: Sequence[CheckResult]) -> list[CheckResult]:
    return [c for c in results if not c.passed]
