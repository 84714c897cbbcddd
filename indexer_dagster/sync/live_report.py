"""What live sync has written, per block range: the figures the Dagster asset pages show for a range
the follower fills (the backfill's materialization of a tip range goes stale within minutes).

Plain module (no Dagster): the live job turns these into materializations of the range partitions."""

from collections.abc import Iterable
from dataclasses import dataclass, field

from indexer_dagster.block_range import BlockRange, ranges_between
from indexer_dagster.config import IndexerConfig
from indexer_dagster.persist.catalog import build_catalog, read_views
from indexer_dagster.persist.datasets import BLOCKS, LOGS


@dataclass
class RangeReport:
    range: BlockRange
    first: int  # the range's first block, or the chain's start block inside it
    last: int  # the highest block indexed in the range
    last_hash: str
    complete: bool  # the range's last block is indexed
    rows: dict[str, int] = field(default_factory=dict)  # dataset (blocks, logs, event table) -> rows


class Written:
    """Blocks the follower wrote since the last report: the ranges they fall in, and a poll summary."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.ranges: set[BlockRange] = set()
        self.blocks = self.logs = 0
        self.first: int | None = None
        self.tip: tuple[int, str] | None = None

    def add(self, blocks: int, logs: int, tip: int, tip_hash: str) -> None:
        first = tip - blocks + 1
        self.ranges.update(ranges_between(first, tip, self.width))  # a catch-up can span several ranges
        self.blocks, self.logs = self.blocks + blocks, self.logs + logs
        self.first = first if self.first is None else self.first
        self.tip = (tip, tip_hash)

    def summary(self) -> str:
        if self.tip is None:
            return "no new blocks"
        return (f"wrote {self.blocks} blocks ({self.first}..{self.tip[0]}) and {self.logs} logs; "
                f"tip {self.tip[0]} {self.tip[1][:10]}…")

    def take(self) -> tuple[list[BlockRange], tuple[int, str] | None]:
        """The ranges written and the tip since the last call; starts counting afresh."""
        out = sorted(self.ranges), self.tip
        self.ranges, self.blocks, self.logs, self.first, self.tip = set(), 0, 0, None, None
        return out


def range_reports(cfg: IndexerConfig, ranges: Iterable[BlockRange], tip: int, tip_hash: str,
                  tables: list[str], hashes: dict[int, str]) -> list[RangeReport]:
    """Rows per dataset in each of `ranges` as the views show them (range files and live segments),
    up to `tip`. `hashes`: block hashes the caller knows (the stored headers) for ranges that end below
    the tip. One query for all ranges and datasets: the cost is the ranges', not the history's."""
    ranges = sorted(ranges)
    if not ranges:
        return []
    build_catalog(cfg)
    parts = []
    for r in ranges:
        for ds, col in [(BLOCKS, "number"), (LOGS, "block_number"), *[(t, "block_number") for t in tables]]:
            parts.append(f"SELECT '{r.key}' AS key, '{ds}' AS ds, count(*) AS n FROM {ds} "
                         f"WHERE {col} BETWEEN {r.start} AND {min(r.end, tip)}")
    counts = read_views(cfg.duckdb_path, " UNION ALL ".join(parts))
    out = []
    for r in ranges:
        last = min(r.end, tip)
        mine = counts.filter(counts["key"] == r.key)
        out.append(RangeReport(
            range=r, first=max(r.start, cfg.start_block), last=last,
            last_hash=tip_hash if last == tip else hashes.get(last, ""), complete=last == r.end,
            rows=dict(zip(mine["ds"].to_list(), mine["n"].to_list())),
        ))
    return out
