"""Which addresses a block range is indexed for: the config's static addresses plus factory children.

A contract configured with `factory: {contract, event, parameter}` has no fixed addresses: every
address the factory's creation event names is one of its instances ("children"), indexed from the
block it was created in. The child registry is a lake dataset, `children`, written beside `logs`
in the same transaction (range files and live segments alike) and derived from the factory's own
logs in that file; so it is always of the same fork as the logs, a reorg archives it with the other
datasets (sync.repair rolls back every dataset of `persist.datasets.live_datasets`), and the new fork
re-creates it.

Before a range is fetched, `resolve_range` reads the registry and scans the factory's creation
events (one `eth_getLogs` by factory address + topic0, cheap) over every block up to the range's end
that no stored `children` file covers, the range itself included; the range is then fetched for all
addresses with per-address start blocks. The follower instead finds creations in the logs of the new
blocks it has just fetched (the factory is one of its addresses) and fetches the new children's logs
of those blocks at once (`Follower.fetch_blocks`).
"""

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import polars as pl

from indexer_dagster.chain.errors import RpcError, RpcErrorKind
from indexer_dagster.chain.fetch import parse_logs_body
from indexer_dagster.chain.rpc import RpcClient
from indexer_dagster.config import IndexerConfig
from indexer_dagster.parse.decode import decode_logs
from indexer_dagster.persist.datasets import CHILD_SCHEMA, CHILDREN, LIVE
from indexer_dagster.persist.files import data_files, file_state, parquet_metadata, read_small_file, scan_parquet
from indexer_dagster.persist.lake import Lake, open_lake

# Blocks per eth_getLogs of a discovery scan (one address + one topic: sparse); halved on "too large".
_SCAN_SPAN = 100_000


def has_factories(cfg: IndexerConfig) -> bool:
    return any(c.factory is not None for c in cfg.contracts)


def _factory_addresses(cfg: IndexerConfig) -> dict[str, list[str]]:
    by_name = {c.name: c for c in cfg.contracts}
    return {c.name: by_name[c.factory.contract].addresses for c in cfg.contracts if c.factory is not None}


def empty_children() -> pl.DataFrame:
    return pl.DataFrame(schema=CHILD_SCHEMA)


def discover(cfg: IndexerConfig, logs: pl.DataFrame) -> pl.DataFrame:
    """Children created by the configured factories' creation events among `logs` (any log frame
    with the `logs` columns); one row per (contract, child), earliest creation first."""
    frames = []
    factories = _factory_addresses(cfg)
    if logs.height == 0 or not factories:
        return empty_children()
    if "block_timestamp" not in logs.columns:  # raw logs before their block's timestamp is joined
        logs = logs.with_columns(pl.lit(None, pl.Datetime("us", "UTC")).alias("block_timestamp"))
    for c in cfg.contracts:
        for spec, column in cfg.factory_events(c):
            res = decode_logs(logs, [spec], {spec.table: factories[c.name]})[spec.table].frame
            if res.height:
                frames.append(res.select(
                    "chain_id", "block_number", "block_hash", "transaction_hash", "log_index",
                    pl.lit(c.name).alias("contract"), pl.col("address").alias("factory"),
                    pl.col(column).str.to_lowercase().alias("address"),
                ))
    if not frames:
        return empty_children()
    return dedupe_children(pl.concat(frames, how="vertical"))


def dedupe_children(children: pl.DataFrame) -> pl.DataFrame:
    """One row per (contract, child): its earliest creation."""
    return (children.sort("block_number", "log_index")
            .unique(subset=["contract", "address"], keep="first", maintain_order=True)
            .select(list(CHILD_SCHEMA)))


def stored_children(cfg: IndexerConfig) -> pl.DataFrame:
    """The registry: every child in the lake's `children` range files and live segments."""

    lake = open_lake(cfg)
    files = lake.files(CHILDREN) + lake.files(f"{LIVE}/{CHILDREN}")
    if not files:
        return empty_children()
    return dedupe_children(pl.concat([read_small_file(p) for p in files], how="vertical_relaxed").cast(CHILD_SCHEMA))  # type: ignore[arg-type]  # polars stubs: Mapping key type is invariant


def covered_intervals(cfg: IndexerConfig) -> list[tuple[int, int]]:
    """Block intervals whose creation events the registry holds: ranges and live segments whose
    `children` files were written for every configured factory rule (a range's span is that of its
    `blocks` file)."""

    lake = open_lake(cfg)
    rules = set(wanted_coverage(cfg)["factories"])

    def holds_rules(paths) -> bool:
        have: set[str] = set()
        for p in paths:
            cov = file_coverage(p)
            have |= set(cov["factories"]) if cov else set()
        return rules <= have

    out = []
    by_key: dict[str, list] = {}
    for p in lake.files(CHILDREN):  # one directory listing, grouped by range (file + supplements)
        by_key.setdefault(base_key(p.stem), []).append(p)
    blocks_files = {p.stem: p for p in lake.files("blocks")}  # one listing, not a request per range
    for key, paths in sorted(by_key.items()):
        blocks = blocks_files.get(key)
        if blocks is not None and holds_rules(paths):
            lo, hi = block_span(blocks)
            if lo is not None and hi is not None:
                out.append((int(lo), int(hi)))
    for p in data_files(lake.dir(f"{LIVE}/{CHILDREN}")):
        if holds_rules([p]):
            a, b = p.stem.split("-")
            out.append((int(a), int(b)))
    return _merge(out)


def _merge(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def gaps(start: int, end: int, covered: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [start, end] outside `covered` (sorted, merged intervals)."""
    out, at = [], start
    for a, b in covered:
        if b < at:
            continue
        if a > end:
            break
        if a > at:
            out.append((at, a - 1))
        at = max(at, b + 1)
    if at <= end:
        out.append((at, end))
    return out


@dataclass
class ContractSet:
    """Every address to fetch and decode, with the block each counts from."""

    cfg: IndexerConfig
    children: pl.DataFrame = field(default_factory=empty_children)

    def __post_init__(self) -> None:
        names = {c.name for c in self.cfg.contracts if c.factory is not None}
        self.children = dedupe_children(self.children.filter(pl.col("contract").is_in(sorted(names))))

    def add(self, children: pl.DataFrame) -> pl.DataFrame:
        """Register `children`; returns those that were new."""
        known = self.children.select("contract", "address")
        new = children.join(known, on=["contract", "address"], how="anti")
        if new.height:
            self.children = dedupe_children(pl.concat([self.children, new.select(list(CHILD_SCHEMA))], how="vertical"))
        return new

    def addresses_of(self, contract_name: str, up_to: int | None = None) -> list[str]:
        c = next(c for c in self.cfg.contracts if c.name == contract_name)
        if c.factory is None:
            return list(c.addresses)
        ch = self.children.filter(pl.col("contract") == contract_name)
        if up_to is not None:
            ch = ch.filter(pl.col("block_number") <= up_to)
        return ch["address"].to_list()

    def table_addresses(self) -> dict[str, set[str]]:
        """Decoded table -> the addresses allowed to emit its event (decode_logs' `addresses`)."""
        return {s.table: set(self.addresses_of(c.name)) for c, s in self.cfg.all_specs()}

    def starts(self, up_to: int | None = None) -> dict[str, int]:
        """Address -> first block whose logs count (the contract's start block, or its creation)."""
        out: dict[str, int] = {}
        for c in self.cfg.contracts:
            start = self.cfg.contract_start(c)
            if c.factory is None:
                for a in c.addresses:
                    out[a] = min(out.get(a, start), start)
        for contract, block, address in self.children.select("contract", "block_number", "address").iter_rows():
            if up_to is not None and block > up_to:
                continue
            c = next(c for c in self.cfg.contracts if c.name == contract)
            s = max(block, self.cfg.contract_start(c))
            out[address] = min(out.get(address, s), s)
        return out

    def addresses(self, up_to: int | None = None) -> list[str]:
        return sorted(self.starts(up_to))


async def scan_creations(cfg: IndexerConfig, rpc: RpcClient, from_block: int, to_block: int) -> pl.DataFrame:
    """The factories' creation events in [from_block, to_block] (eth_getLogs by address + topic0),
    halving the span on "range too large" errors."""
    factories = sorted({a for addrs in _factory_addresses(cfg).values() for a in addrs})
    topics = sorted({spec.topic0 for c in cfg.contracts for spec, _ in cfg.factory_events(c) if spec.topic0})
    if not factories or not topics or from_block > to_block:
        return empty_children()
    frames = []
    todo = [(a, min(a + _SCAN_SPAN - 1, to_block)) for a in range(from_block, to_block + 1, _SCAN_SPAN)]
    while todo:
        a, b = todo.pop(0)
        try:
            # Parsed inside the retries: a truncated 200 body is fetched again, not a crash.
            frame = await rpc.call_raw(
                "eth_getLogs", [{"fromBlock": hex(a), "toBlock": hex(b), "address": factories, "topics": [topics]}],
                parse=lambda body: parse_logs_body(body, cfg.chain.chain_id),
            )
        except RpcError as e:
            if e.info.kind is not RpcErrorKind.RANGE_TOO_LARGE or a == b:
                raise
            mid = (a + b) // 2
            todo[:0] = [(a, mid), (mid + 1, b)]
            continue
        frames.append(frame)
    logs = pl.concat(frames, how="vertical") if frames else pl.DataFrame()
    if logs.height == 0:
        return empty_children()
    return discover(cfg, logs)


async def resolve_range(cfg: IndexerConfig, rpc: RpcClient, start: int, end: int) -> ContractSet:
    """The contract set for fetching [start, end]: the stored registry plus a scan of every block up
    to `end` whose creation events no stored file covers (always including [start, end] itself)."""
    cs = ContractSet(cfg, stored_children(cfg))
    if not has_factories(cfg):
        return cs
    covered = covered_intervals(cfg)
    todo = [*gaps(cfg.start_block, start - 1, covered), (start, end)] if start > cfg.start_block else [(start, end)]
    for a, b in _merge(todo):
        cs.add(await scan_creations(cfg, rpc, a, b))
    return cs


# -- coverage: which addresses / factories a stored file holds the logs of ---------------------------

COVERAGE_KEY = "indexer.coverage"


def rule_id(cfg: IndexerConfig, contract) -> str:
    """A factory rule's identity: the factory addresses, the creation event(s) and the child column."""
    factories = ",".join(sorted(_factory_addresses(cfg)[contract.name]))
    events = ",".join(sorted(f"{s.topic0}:{col}" for s, col in cfg.factory_events(contract)))
    return f"{factories}|{events}"


def wanted_coverage(cfg: IndexerConfig) -> dict:
    """What a range fetched with this config holds: every static address (from its start block) and
    every factory rule (its children from their creation, and at least from the rule's start)."""
    addresses: dict[str, int] = {}
    rules: dict[str, int] = {}
    for c in cfg.contracts:
        start = cfg.contract_start(c)
        if c.factory is None:
            for a in c.addresses:
                addresses[a] = min(addresses.get(a, start), start)
        else:
            rid = rule_id(cfg, c)
            rules[rid] = min(rules.get(rid, start), start)
    return {"addresses": addresses, "factories": rules}


def coverage_metadata(coverage: dict) -> dict[str, str]:
    return {COVERAGE_KEY: json.dumps(coverage, sort_keys=True)}


def file_coverage(path) -> dict | None:
    """The coverage recorded in a file's Parquet metadata (None: written before coverage was recorded)."""
    raw = _coverage_of(path, file_state(path))
    return json.loads(raw) if raw else None


# Footers are read once per file state and process: a range resolves its children over all stored files.
@lru_cache(maxsize=65536)
def _coverage_of(path, _state: tuple) -> bytes | None:
    return (parquet_metadata(path).schema.to_arrow_schema().metadata or {}).get(COVERAGE_KEY.encode())


def block_span(path) -> tuple[int | None, int | None]:
    """(lowest, highest) block number of a `blocks` file, from its footer statistics."""
    return _span_of(path, file_state(path))


@lru_cache(maxsize=65536)
def _span_of(path, _state: tuple) -> tuple[int | None, int | None]:
    span = scan_parquet(path).select(pl.col("number").min().alias("lo"), pl.col("number").max().alias("hi"))
    lo, hi = span.collect().row(0)
    return (None, None) if lo is None else (int(lo), int(hi))


def merge_coverage(items: Iterable[dict]) -> dict:
    out: dict = {"addresses": {}, "factories": {}}
    for cov in items:
        for kind in ("addresses", "factories"):
            for k, v in cov.get(kind, {}).items():
                out[kind][k] = min(out[kind].get(k, v), v)
    return out


def key_files(lake: Lake, dataset: str, key: str) -> list:
    """A range's file of `dataset` and its supplements (`<key>+<fingerprint>.parquet`)."""
    main = lake.path(dataset, key)
    return ([main] if main.is_file() else []) + sorted(lake.dir(dataset).glob(f"{key}+*.parquet"))


def base_key(stem: str) -> str:
    """`000000000000-000000000009+ab12cd34` -> the range key `000000000000-000000000009`."""
    return stem.split("+", 1)[0]


def stored_coverage(cfg: IndexerConfig, key: str, dataset: str = "logs", files: list | None = None) -> dict | None:
    """What the range's stored files hold (`files`: its files of `dataset`, main one first, if known);
    None when it has no file or one predates coverage records (taken to hold what the config asks for)."""
    files = key_files(open_lake(cfg), dataset, key) if files is None else files
    if not files:
        return None
    covs = [file_coverage(p) for p in files]
    if covs[0] is None:
        return None
    return merge_coverage(c for c in covs if c is not None)


def missing_coverage(wanted: dict, stored: dict | None) -> dict:
    """Sources of `wanted` that `stored` lacks: {"addresses": {a: start}, "factories": {rule: start}}
    (a source stored from a later start than wanted counts as missing; see `supplement`)."""
    if stored is None:
        return {"addresses": {}, "factories": {}}
    return {
        kind: {k: v for k, v in wanted[kind].items() if k not in stored[kind] or stored[kind][k] > v}
        for kind in ("addresses", "factories")
    }


def fingerprint(coverage: dict) -> str:
    return hashlib.sha1(json.dumps(coverage, sort_keys=True).encode()).hexdigest()[:10]
