"""What the chain-head sensor should launch, decided from plain facts (no Dagster here).

The sensor is a supervisor, not the data path: a long-running follower run writes new blocks within
a second (a sensor ticks every ~5 s and each run pays a process start, too slow for the head), and
the sensor keeps that follower alive, launches the singleton reorg job when the ledger has an
unfinished reorg, and fills history below the follower's anchor with range runs.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from indexer_dagster.block_range import BlockRange, ranges_between
from indexer_dagster.persist.files import LakePath, column_span, data_files


@dataclass(frozen=True)
class Facts:
    node_head: int
    start_block: int
    blocks_per_partition: int
    live_anchor: int | None          # lowest block of the local chain window when the follower was seeded
    live_tip: int | None
    active_reorg_id: int | None
    reorg_run_active: bool
    reorg_runs_before: int            # finished runs of the active reorg (a crashed one is retried)
    live_run_active: bool
    range_coverage: dict[str, int]    # range key -> highest block its range file holds
    range_keys_running: frozenset[str]
    live_segment_ranges: frozenset[str] = frozenset()  # ranges that still have live segment files
    reorg_window: int = 64
    max_new_range_runs: int = 4
    failed_check_ranges: frozenset[str] = frozenset()  # ranges whose last checks failed: sync them again
    # Stored ranges (or ranges with live segments) lacking contracts/events added to the config.
    supplement_ranges: frozenset[str] = frozenset()
    halted: str | None = None  # why the chain is halted for an operator (nothing is launched)


@dataclass
class Plan:
    register_keys: list[str] = field(default_factory=list)
    launch_reorg: int | None = None
    reorg_attempt: int = 0
    launch_live: bool = False
    range_runs: list[str] = field(default_factory=list)
    reason: str = ""


def plan(f: Facts) -> Plan:
    p = Plan()
    all_ranges = ranges_between(f.start_block, max(f.node_head, f.start_block), f.blocks_per_partition)
    p.register_keys = [r.key for r in all_ranges]
    if f.halted is not None:
        # Halted for an operator (a fork below the stored window, a reorg that failed): no writer runs.
        p.reason = f"halted: {f.halted}"
        return p
    if f.active_reorg_id is not None:
        # Everything waits for the reorg: the follower pauses itself, range runs would be refused.
        if not f.reorg_run_active:
            p.launch_reorg, p.reorg_attempt = f.active_reorg_id, f.reorg_runs_before
            p.reason = f"reorg {f.active_reorg_id} is unfinished"
        return p
    if not f.live_run_active:
        p.launch_live = True
    # History: every block up to the follower's anchor must be in a range file (blocks above it come
    # from the follower), so a range is due while its file stops short of min(its end, the anchor).
    limit = f.live_anchor if f.live_anchor is not None else f.node_head
    todo: list[BlockRange] = [
        r for r in all_ranges
        if r.start <= limit and f.range_coverage.get(r.key, -1) < min(r.end, limit)
        and r.key not in f.range_keys_running
    ]
    # Compaction: once a range is below the reorg window, one range file replaces its live segments.
    if f.live_tip is not None:
        todo += [
            r for r in all_ranges
            if r.key in f.live_segment_ranges and r.end <= f.live_tip - f.reorg_window
            and r.key not in f.range_keys_running and r not in todo
        ]
    # A range whose checks failed (persist.meta) is synced again; a passing run clears it.
    todo += [
        r for r in all_ranges
        if r.key in f.failed_check_ranges and r.key not in f.range_keys_running and r not in todo
    ]
    # Contracts or events added to the config: a run supplements (or re-decodes) the stored range.
    todo += [
        r for r in all_ranges
        if r.key in f.supplement_ranges and r.key not in f.range_keys_running and r not in todo
    ]
    p.range_runs = [r.key for r in todo[: max(0, f.max_new_range_runs - len(f.range_keys_running))]]
    return p


def highest_block(blocks_file: LakePath) -> int:
    """The highest block number a range's `blocks` file holds (its Parquet footer statistics); -1 when the
    file is missing or empty."""
    high = column_span(blocks_file, "number")[2] if blocks_file.exists() else None
    return high if high is not None else -1


def range_coverage(blocks_dir: LakePath) -> dict[str, int]:
    """Range key -> the highest block number in its `blocks` file (from the Parquet footer statistics)."""
    return {p.stem: high for p in data_files(blocks_dir) if (high := highest_block(p)) >= 0}


def segment_covered(first: int, last: int, coverage: Mapping[str, int], width: int) -> bool:
    """Range files hold every block of the live segment [first, last] (`coverage`: range key -> the
    highest block of its file, as `range_coverage` gives), so it can go. A segment can straddle ranges (a catch-up or
    restore segment): it goes only once each range it touches holds its part."""
    return all(coverage.get(r.key, -1) >= min(r.end, last) for r in ranges_between(first, last, width))


def ranges_with_live_segments(
    segments: Iterable[tuple[int, int]], coverage: Mapping[str, int], width: int
) -> frozenset[str]:
    """Keys of the ranges a compaction run must sync to retire the live segments (first, last block):
    those whose file lacks a segment's blocks, and those of a segment already covered (a crash between a
    range's publish and the segment's removal left it; the range's next publish removes it)."""
    keys: set[str] = set()
    for first, last in segments:
        touched = ranges_between(first, last, width)
        if segment_covered(first, last, coverage, width):
            keys.update(r.key for r in touched)
        else:
            keys.update(r.key for r in touched if coverage.get(r.key, -1) < min(r.end, last))
    return frozenset(keys)


def history_due(blocks_dir: Path, start_block: int, blocks_per_partition: int, anchor: int) -> list[BlockRange]:
    """Ranges whose files do not yet reach the follower's anchor (what the sensor asks range runs for)."""
    cov = range_coverage(blocks_dir)
    return [
        r for r in ranges_between(start_block, anchor, blocks_per_partition)
        if cov.get(r.key, -1) < min(r.end, anchor)
    ]
