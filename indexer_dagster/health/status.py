"""The health of one chain's index, from plain facts: the node, the lake, the state store.

`gather_status(cfg)` reads the node's head (an unreachable node is reported, not raised), the highest
block in the lake's range files and live segments (from Parquet footers), the finality recorded in
`_meta/head.parquet`, the partitions done / partial / live / missing against the ranges from the start
block to the head, the reorg ledger, the durable RPC counters and the rows per table. Failed partitions
come from the orchestrator (Dagster's runs) and are passed in. No Dagster here.
"""

import asyncio
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from datetime import datetime

import polars as pl

from indexer_dagster.block_range import ranges_between
from indexer_dagster.chain.errors import RpcError, classify_exception
from indexer_dagster.chain.rpc import RetryPolicy, rpc_client
from indexer_dagster.config import IndexerConfig
from indexer_dagster.health.logs import get_logger, register_config, scrub
from indexer_dagster.health.rpc_stats import error_rate, read_rpc_stats
from indexer_dagster.persist.datasets import BLOCKS, LOGS, events, live, number_column
from indexer_dagster.persist.files import LakePath, column_span, data_files, scan_parquet
from indexer_dagster.persist.lake import Lake, open_lake
from indexer_dagster.persist.meta import read_head
from indexer_dagster.state import open_state

log = get_logger(__name__)
STATES = ("done", "partial", "live", "missing", "failed")


@dataclass
class ReorgSummary:
    id: int
    fork_block: int  # the common ancestor: blocks above it were replaced
    depth: int
    phase: str
    detected_at: str
    finished_at: str | None
    touched_confirmed: bool


@dataclass
class ChainStatus:
    chain: str
    chain_id: int
    start_block: int
    confirmations: int
    node_reachable: bool = False
    node_error: str | None = None
    node_head: int | None = None
    node_head_time: int | None = None       # unix seconds of the node's head block
    indexed_head: int | None = None         # the highest block in the lake (range files or live segments)
    indexed_head_time: int | None = None
    confirmed_head: int | None = None       # the views' `confirmed_through` (head last seen - confirmations)
    head_observed_at: float | None = None   # when the indexer last recorded the chain head
    lag_blocks: int | None = None
    lag_seconds: float | None = None
    partitions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    partitions_expected: int = 0
    missing_partitions: list[str] = field(default_factory=list)
    partial_partitions: list[str] = field(default_factory=list)
    failed_partitions: list[str] = field(default_factory=list)
    reorgs_total: int = 0
    reorg_max_depth: int = 0
    active_reorg_id: int | None = None
    last_reorg: ReorgSummary | None = None
    halted: str | None = None  # why the chain is halted for an operator (`indexer resume`)
    rpc_requests: dict[str, int] = field(default_factory=dict)   # by method
    rpc_retries: dict[str, int] = field(default_factory=dict)    # by method
    rpc_errors: dict[str, int] = field(default_factory=dict)     # by "method:kind"
    rpc_error_rate: float | None = None
    rpc_last_error_at: float | None = None
    rows: dict[str, int] = field(default_factory=dict)           # rows in the lake per dataset
    state_error: str | None = None
    observed_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return asdict(self)


def _spans(directory: LakePath, column: str = "number") -> dict[LakePath, tuple[int, int, int]]:
    """file -> (rows, lowest, highest block) for the non-empty data files of a dataset."""
    out = {}
    for p in data_files(directory):
        try:
            rows, lo, hi = column_span(p, column)
        except (OSError, ValueError):  # vanished (compaction, rollback) or being replaced
            continue
        if lo is not None and hi is not None:
            out[p] = (rows, int(lo), int(hi))
    return out


def _block_time(path: LakePath, number: int) -> int | None:
    df = scan_parquet(path).filter(pl.col("number") == number).select(
        pl.col("timestamp").dt.epoch("s")).collect()
    return int(df.item(0, 0)) if df.height else None


def _rows(cfg: IndexerConfig, lake: Lake) -> dict[str, int]:
    tables = {BLOCKS: BLOCKS, LOGS: LOGS, **{events(s.table): s.table for _, s in cfg.all_specs()}}
    out = {}
    for dataset, table in tables.items():
        total = 0
        for d in (lake.dir(dataset), lake.dir(live(dataset))):
            for p in data_files(d):
                try:
                    total += column_span(p, number_column(dataset))[0]
                except (OSError, ValueError):
                    continue
        out[table] = total
    return out


# --- the node ---------------------------------------------------------------------------------------------

async def _probe(cfg: IndexerConfig, timeout_s: float) -> tuple[int, int | None]:
    quick = RetryPolicy(max_retries=1, base_delay_s=0.2, max_delay_s=1.0)
    async with rpc_client(cfg, timeout_s=timeout_s, concurrency=1, retry=quick) as rpc:
        head = int(await rpc.call("eth_blockNumber"), 16)
        block = await rpc.call("eth_getBlockByNumber", [hex(head), False])
    return head, (int(block["timestamp"], 16) if block else None)


def probe_node(cfg: IndexerConfig, timeout_s: float = 5.0) -> tuple[int | None, int | None, str | None]:
    """(head, head timestamp, None) or (None, None, why the node did not answer) — never raises."""
    try:
        head, ts = asyncio.run(_probe(cfg, timeout_s))
        return head, ts, None
    except RpcError as e:
        return None, None, scrub(f"{e.info.kind.value}: {e.info.message}")
    except Exception as e:  # noqa: BLE001 - the status must still print
        info = classify_exception(e)
        return None, None, scrub(f"{info.kind.value}: {info.message}")


# --- partitions -------------------------------------------------------------------------------------------

def _covered(spans: list[tuple[int, int]], lo: int, hi: int) -> bool:
    """True when the union of the (first, last) spans covers lo..hi."""
    nxt = lo
    for a, b in sorted(spans):
        if a > nxt:
            break
        nxt = max(nxt, b + 1)
        if nxt > hi:
            return True
    return nxt > hi


def classify_partitions(
    start_block: int, width: int, head: int, coverage: dict[str, int], live: list[tuple[int, int]],
    failed: Collection[str] = (),
) -> dict[str, list[str]]:
    """Each range key from start_block to `head` by state: `done` (its range file reaches min(end, head)),
    `live` (the rest of it is in live segments), `partial` (a file that stops short), `failed` (its last
    run failed and it is not done), `missing` (nothing)."""
    out: dict[str, list[str]] = {s: [] for s in STATES}
    if head < start_block:
        return out
    failed = set(failed)
    for r in ranges_between(start_block, head, width):
        need = min(r.end, head)
        have = coverage.get(r.key, -1)
        if have >= need:
            state = "done"
        elif _covered([s for s in live if s[1] >= r.start and s[0] <= r.end], max(have + 1, r.start, start_block), need):
            state = "live"
        elif r.key in failed:
            state = "failed"
        elif r.key in coverage:
            state = "partial"
        else:
            state = "missing"
        out[state].append(r.key)
    return out


# --- everything -------------------------------------------------------------------------------------------

def gather_status(
    cfg: IndexerConfig, failed_partitions: Collection[str] = (), *, probe: bool = True, timeout_s: float = 5.0,
    rows: bool = True,
) -> ChainStatus:
    """The chain's numbers; see the module docstring. Reads only; never raises for an unreachable node.
    `rows=False` skips counting the rows of every file (the freshness sensor does not need them)."""
    register_config(cfg)
    c = cfg.chain
    st = ChainStatus(chain=c.name, chain_id=c.chain_id, start_block=cfg.start_block, confirmations=c.confirmations)
    if probe:
        st.node_head, st.node_head_time, st.node_error = probe_node(cfg, timeout_s)
        st.node_reachable = st.node_error is None
    lake = open_lake(cfg, c.name)

    ranges = _spans(lake.dir(BLOCKS))
    segments = _spans(lake.dir(live(BLOCKS)))
    coverage = {p.stem: hi for p, (_n, _lo, hi) in ranges.items()}
    top = max([*ranges.items(), *segments.items()], key=lambda kv: kv[1][2], default=None)
    if top is not None:
        st.indexed_head = top[1][2]
        st.indexed_head_time = _block_time(top[0], st.indexed_head)

    head = read_head(lake)
    if head is not None:
        st.confirmed_head = int(head["confirmed_through"])
        observed = head["observed_at"]
        st.head_observed_at = observed.timestamp() if isinstance(observed, datetime) else None

    if st.node_head is not None:
        indexed = st.indexed_head if st.indexed_head is not None else cfg.start_block - 1
        st.lag_blocks = max(0, st.node_head - indexed)
        if st.node_head_time is not None and st.indexed_head_time is not None:
            st.lag_seconds = float(max(0, st.node_head_time - st.indexed_head_time))

    reference = st.node_head if st.node_head is not None else st.indexed_head
    if reference is not None:
        parts = classify_partitions(cfg.start_block, c.blocks_per_partition, reference, coverage,
                                    [(lo, hi) for _n, lo, hi in segments.values()], failed_partitions)
        st.partitions = {s: len(keys) for s, keys in parts.items()}
        st.partitions_expected = sum(st.partitions.values())
        st.missing_partitions, st.partial_partitions = parts["missing"], parts["partial"]
        st.failed_partitions = parts["failed"]

    try:
        _reorgs(cfg, st)
    except Exception as e:  # noqa: BLE001 - an unreachable state database is reported, not raised
        st.state_error = scrub(f"{type(e).__name__}: {e}")

    stats = read_rpc_stats(cfg.data_dir, c.name)
    st.rpc_requests, st.rpc_retries, st.rpc_errors = stats["requests"], stats["retries"], stats["errors"]
    st.rpc_error_rate = error_rate(stats)
    st.rpc_last_error_at = stats.get("last_error_at")
    if rows:
        st.rows = _rows(cfg, lake)
    return st


def _reorgs(cfg: IndexerConfig, st: ChainStatus) -> None:
    store = open_state(cfg.state_url)
    try:
        reorgs = store.list_reorgs(cfg.chain.name)
        halt = store.halted(cfg.chain.name)
    finally:
        store.close()
    st.halted = halt.reason if halt is not None else None
    st.reorgs_total = len(reorgs)
    st.reorg_max_depth = max((r.depth for r in reorgs), default=0)
    active = [r for r in reorgs if not r.finished]
    st.active_reorg_id = active[-1].id if active else None
    if reorgs:
        r = max(reorgs, key=lambda x: x.id)
        st.last_reorg = ReorgSummary(
            id=r.id, fork_block=r.common_ancestor, depth=r.depth, phase=r.phase.value,
            detected_at=r.detected_at.isoformat(), finished_at=r.finished_at.isoformat() if r.finished_at else None,
            touched_confirmed=r.touched_confirmed,
        )


