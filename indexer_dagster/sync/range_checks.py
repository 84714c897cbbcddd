"""Checks over one stored block range of the lake: is what we wrote a faithful copy of one chain?

Run after a range is written (the Dagster skin attaches them as asset checks on `blocks` and
`logs`), or on any stored range by hand. The checks read the range's Parquet files window by window of
blocks (`persist.windows`: a partition of any size costs one window of memory), each adding up what it
finds, and return a `CheckResult` with a one-line description and metadata a person can act on. A
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
from typing import Any

import polars as pl

from indexer_dagster.block_range import BlockRange, range_for_block
from indexer_dagster.chain.errors import RpcError
from indexer_dagster.chain.rpc import rpc_client
from indexer_dagster.config import IndexerConfig
from indexer_dagster.persist.datasets import in_log_order
from indexer_dagster.persist.lake import Lake, open_lake
from indexer_dagster.persist.meta import record_range_checks
from indexer_dagster.persist.windows import block_files, read_blocks, read_window, windows
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


class _Contiguous:
    """`first..last` must be stored exactly once each (None: nothing to index in this range)."""

    name = "contiguous_blocks"

    def __init__(self, first: int | None, last: int | None) -> None:
        self.first, self.last = first, last
        self.rows = 0
        self.counts = {"missing": 0, "duplicated": 0, "outside": 0}
        self.examples: dict[str, list[int]] = {k: [] for k in self.counts}

    def _found(self, kind: str, numbers: pl.Series) -> None:
        self.counts[kind] += numbers.len()
        self.examples[kind] += numbers.head(_EXAMPLES - len(self.examples[kind])).to_list()

    def add(self, blocks: pl.DataFrame, window: tuple[int, int]) -> None:
        numbers = blocks["number"]
        self.rows += blocks.height
        if self.first is None or self.last is None:
            return
        present = numbers.unique().sort()
        lo, hi = max(window[0], self.first), min(window[1], self.last)
        if lo <= hi:
            expected = pl.int_range(lo, hi + 1, eager=True, dtype=pl.Int64)
            self._found("missing", expected.filter(~expected.is_in(present.implode())))
        self._found("duplicated", numbers.filter(numbers.is_duplicated()).unique().sort())
        self._found("outside", present.filter(~present.is_between(self.first, self.last)))

    def result(self) -> CheckResult:
        first, last, rows, n, ex = self.first, self.last, self.rows, self.counts, self.examples
        if first is None or last is None:
            ok = rows == 0
            return _result(self.name, ok, "the range holds no block to index" + ("" if ok else f" but {rows} are stored"),
                           rows=rows)
        meta = dict(expected_first=first, expected_last=last, rows=rows, missing=n["missing"],
                    missing_examples=ex["missing"], duplicated=n["duplicated"], duplicated_examples=ex["duplicated"],
                    outside=n["outside"], outside_examples=ex["outside"])
        if not any(n.values()):
            return _result(self.name, True, f"blocks {first}..{last} stored once each ({rows} rows)", **meta)
        parts = []
        if n["missing"]:
            parts.append(f"{n['missing']} block(s) missing (e.g. {ex['missing']})")
        if n["duplicated"]:
            parts.append(f"{n['duplicated']} block(s) stored twice (e.g. {ex['duplicated']})")
        if n["outside"]:
            parts.append(f"{n['outside']} block(s) outside {first}..{last} (e.g. {ex['outside']})")
        return _result(self.name, False, f"blocks {first}..{last}: " + "; ".join(parts), **meta)


class _UniqueLogs:
    name = "unique_logs"

    def __init__(self) -> None:
        self.rows = self.duplicated = 0
        self.examples: list[str] = []

    def add(self, logs: pl.DataFrame) -> None:
        self.rows += logs.height
        if in_log_order(logs):  # a range file as written: no key twice, known without a hash table
            return
        dup = (logs.group_by("block_number", "log_index").len().filter(pl.col("len") > 1)
               .sort("block_number", "log_index"))
        self.duplicated += dup.height
        self.examples += [f"{b}:{i}" for b, i in dup.select("block_number", "log_index")
                          .head(_EXAMPLES - len(self.examples)).iter_rows()]

    def result(self) -> CheckResult:
        meta = dict(rows=self.rows, duplicated_keys=self.duplicated, examples=self.examples)
        if self.duplicated == 0:
            return _result(self.name, True, f"{self.rows} logs, no duplicate (block_number, log_index)", **meta)
        return _result(self.name, False, f"{self.duplicated} (block_number, log_index) key(s) stored more than once "
                                         f"(e.g. {self.examples})", **meta)


def check_unique_logs(logs: pl.DataFrame) -> CheckResult:
    """`unique_logs` over one frame of logs."""
    check = _UniqueLogs()
    check.add(logs)
    return check.result()


class _LogBlockHashes:
    name = "log_block_hashes"

    def __init__(self) -> None:
        self.rows = 0
        self.counts = {"without_header": 0, "wrong_hash": 0}
        self.blocks: dict[str, list[int]] = {k: [] for k in self.counts}

    def add(self, logs: pl.DataFrame, blocks: pl.DataFrame) -> None:
        self.rows += logs.height
        joined = logs.select("block_number", "log_index", "block_hash").join(
            blocks.select(pl.col("number").alias("block_number"), pl.col("hash")), on="block_number", how="left"
        )
        for kind, bad in (("without_header", pl.col("hash").is_null()),
                          ("wrong_hash", pl.col("hash").is_not_null() & (pl.col("hash") != pl.col("block_hash")))):
            found = joined.filter(bad)
            self.counts[kind] += found.height
            self.blocks[kind] += found["block_number"].unique().sort().head(_EXAMPLES - len(self.blocks[kind])).to_list()

    def result(self) -> CheckResult:
        n, ex = self.counts, self.blocks
        meta = dict(rows=self.rows, without_header=n["without_header"], wrong_hash=n["wrong_hash"],
                    without_header_blocks=ex["without_header"], wrong_hash_blocks=ex["wrong_hash"])
        if not any(n.values()):
            return _result(self.name, True, f"all {self.rows} logs carry their block header's hash", **meta)
        parts = []
        if n["wrong_hash"]:
            parts.append(f"{n['wrong_hash']} log(s) whose block_hash differs from the header (blocks "
                         f"{ex['wrong_hash']})")
        if n["without_header"]:
            parts.append(f"{n['without_header']} log(s) whose block has no stored header (blocks "
                         f"{ex['without_header']})")
        return _result(self.name, False, "; ".join(parts), **meta)


class _ParentChain:
    """Consecutive numbers must chain by hash (gaps are `contiguous_blocks`' business); `previous` is the
    stored block just below the range's first block, if any."""

    name = "parent_hash_chain"

    def __init__(self, previous: dict | None) -> None:
        self.previous = previous
        self.links = self.broken = 0
        self.examples: list[int] = []
        self.first: dict | None = None  # the range's lowest block (number, parent_hash)
        self.tail: dict | None = None  # the last block of the windows so far (number, hash)

    def add(self, blocks: pl.DataFrame) -> None:
        b = blocks.select("number", "hash", "parent_hash").unique("number", keep="first").sort("number")
        if b.height == 0:
            return
        if self.tail is not None:  # the link across the previous window
            b = pl.concat([pl.DataFrame([{**self.tail, "parent_hash": None}], schema=b.schema), b])
        links = b.with_columns(
            pl.col("number").shift(1).alias("prev_number"), pl.col("hash").shift(1).alias("prev_hash")
        ).filter(pl.col("prev_number") == pl.col("number") - 1)
        broken = links.filter(pl.col("parent_hash") != pl.col("prev_hash"))["number"]
        self.links += links.height
        self.broken += broken.len()
        self.examples += broken.head(_EXAMPLES - len(self.examples)).to_list()
        if self.first is None:
            self.first = b.row(0, named=True)
        self.tail = b.select("number", "hash").row(-1, named=True)

    def result(self) -> CheckResult:
        meta: dict[str, Any] = dict(links_checked=self.links, broken=self.broken, broken_examples=self.examples)
        across = ""
        first, previous = self.first, self.previous
        if first is not None and previous is not None and previous["number"] == first["number"] - 1:
            ok = first["parent_hash"] == previous["hash"]
            meta |= {"previous_block": previous["number"], "previous_hash": previous["hash"], "across_ok": ok}
            if not ok:
                across = (f"block {first['number']}'s parent_hash {first['parent_hash']} is not the previous "
                          f"range's last block hash {previous['hash']}")
        else:
            meta["previous_block"] = "not stored (checked when that range is)"
        if not self.broken and not across:
            return _result(self.name, True, f"{self.links} parent links unbroken"
                           + (" including the previous range's last block" if "across_ok" in meta else ""), **meta)
        desc = "; ".join(x for x in (
            across, f"{self.broken} block(s) whose parent_hash is not the previous block's hash (e.g. {self.examples})"
            if self.broken else "") if x)
        return _result(self.name, False, desc, **meta)


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


class _Sampler:
    """Up to k block numbers: half among blocks that have logs (where a loss shows), the rest among all.
    Drawn window by window: each block gets a random key (its number hashed with a random salt) and
    the smallest keys are kept, k or so of them."""

    def __init__(self, k: int, seed: int | None) -> None:
        self.k, self.salt = k, random.Random(seed).getrandbits(32)
        self.with_logs = self.all = pl.DataFrame(schema={"key": pl.UInt64, "number": pl.Int64})

    def _keep(self, kept: pl.DataFrame, numbers: pl.Series, n: int) -> pl.DataFrame:
        drawn = pl.DataFrame({"key": numbers.hash(seed=self.salt), "number": numbers})
        return pl.concat([kept, drawn]).bottom_k(n, by="key")

    def add(self, blocks: pl.DataFrame, logs: pl.DataFrame) -> None:
        numbers = blocks["number"].unique().sort()
        half = (self.k + 1) // 2
        self.with_logs = self._keep(self.with_logs, numbers.filter(numbers.is_in(logs["block_number"].unique().implode())), half)
        self.all = self._keep(self.all, numbers, self.k + half)

    def picked(self) -> list[int]:
        picked = set(self.with_logs["number"].to_list())
        rest = [n for n in self.all.sort("key")["number"].to_list() if n not in picked]
        return sorted(picked | set(rest[: self.k - len(picked)]))


def previous_block(lake: Lake, first: int, width: int) -> dict | None:
    """The stored header just below `first` (from the previous range's file), if there is one."""
    if first <= 0:
        return None
    path = lake.path("blocks", range_for_block(first - 1, width).key)
    if not path.is_file():
        return None
    with block_files([path], "number") as files:
        row = read_window(files, ["number", "hash"], first - 1, first - 1).head(1)
    return row.row(0, named=True) if row.height else None


BLOCK_COLUMNS = ["number", "hash", "parent_hash"]
LOG_COLUMNS = ["block_number", "log_index", "block_hash"]
# Rows of each file a window of the checks holds, about: what bounds their memory (~50 MB), whatever the
# partition's size. A default partition of a busy chain is one window.
WINDOW_ROWS = 250_000


def verify_range(
    cfg: IndexerConfig,
    r: BlockRange,
    *,
    to_block: int | None = None,
    samples: int = DEFAULT_SAMPLES,
    sample: Sequence[int] | None = None,
    seed: int | None = None,
) -> list[CheckResult]:
    """Run every check over range `r` as stored in `cfg`'s lake, window by window of its blocks.

    `to_block` is the last block the range should reach (a run's result says; a range cut at the chain
    head ends early); without it, the range's end, or the highest stored block if the file says the
    range stopped short of it. `sample` fixes the blocks compared with the node (else `samples` random ones).
    """
    lake = open_lake(cfg)
    blocks_path, logs_path = lake.path("blocks", r.key), lake.path("logs", r.key)
    # The range's logs file and its supplements (`<range>+<fingerprint>`: contracts added later).
    logs_paths = key_files(lake, "logs", r.key) if lake.exists("logs", r.key) else []
    if not blocks_path.is_file() or not logs_paths:
        missing = [str(p) for p in (blocks_path, logs_path) if not p.is_file()]
        return [_result(n, False, f"range {r.key} is not stored: {', '.join(missing)} missing; sync the range",
                        range=r.key) for n in CHECKS]
    with block_files([blocks_path], "number") as block_file, block_files(logs_paths, "block_number") as log_files:
        stored = block_file[0].span()  # (lowest, highest) stored block, from the footer
        clipped = r.clip(cfg.start_block, r.end)
        first = clipped.start if clipped else None
        if to_block is not None:
            last = min(to_block, r.end)
        elif first is None:
            last = None
        else:
            # No run result at hand: a range may legitimately stop at the head it saw; trust its highest block.
            last = max(stored[1] if stored else first - 1, first - 1)
            last = last if last >= first else None
            if last is None:
                first = None
        contiguous, chain = _Contiguous(first, last), _ParentChain(
            previous_block(lake, stored[0] if stored else 0, cfg.chain.blocks_per_partition))
        unique, hashes, sampler = _UniqueLogs(), _LogBlockHashes(), _Sampler(samples, seed)
        for window in windows([*block_file, *log_files], WINDOW_ROWS, first, last):
            blocks = read_window(block_file, BLOCK_COLUMNS, *window)
            logs = read_window(log_files, LOG_COLUMNS, *window)
            contiguous.add(blocks, window)
            chain.add(blocks)
            unique.add(logs)
            hashes.add(logs, blocks)
            if sample is None:
                sampler.add(blocks, logs)
        numbers = list(sample) if sample is not None else sampler.picked()
        sampled_blocks = read_blocks(block_file, BLOCK_COLUMNS, numbers)
        sampled_logs = read_blocks(log_files, LOG_COLUMNS, numbers)
    results = [contiguous.result(), chain.result(), unique.result(), hashes.result(),
               check_row_counts(cfg, sampled_logs, sampled_blocks, numbers)]
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
