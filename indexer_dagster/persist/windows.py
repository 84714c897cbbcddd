"""Reading lake files window by window of block numbers, so work over a partition of any size holds one
window of it, not the partition.

A range file is written in block order, in row groups of 64k rows whose footer statistics give each
group's lowest and highest block. A window reads only the row groups that overlap it, and keeps the rows
inside it. `windows` cuts a span of blocks so that each window holds about `rows` rows of every file at
most; every row of a block falls in one window, so per-block work (duplicates, joins on the block) is
whole in each. A file out of block order (a corrupt one, which the checks are there to find) still reads
correctly, only with less to skip.
"""

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import cached_property
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from indexer_dagster.persist.files import LakePath, local_copy, row_group_spans, row_groups


class BlockFile:
    """One lake file read by block window (`column`: its block-number column). Windows are read with
    polars, which skips the row groups outside them by the same statistics."""

    def __init__(self, source: Path, column: str) -> None:
        self.source, self.column = source, column

    @cached_property
    def groups(self) -> list[tuple[int | None, int | None, int]]:
        """(lowest, highest block, rows) of each row group, from the footer (None: no statistics)."""
        groups = row_group_spans(pq.read_metadata(self.source), self.column)
        if groups is None:
            raise ValueError(f"{self.column!r} is not a column of {self.source}")
        return groups

    @property
    def rows(self) -> int:
        return sum(n for _, _, n in self.groups)

    def span(self) -> tuple[int, int] | None:
        """(lowest, highest) block of the file; None when it is empty or has no statistics."""
        lows = [lo for lo, _, _ in self.groups if lo is not None]
        highs = [hi for _, hi, _ in self.groups if hi is not None]
        if not self.groups or len(lows) < len(self.groups) or len(highs) < len(self.groups):
            return None
        return min(lows), max(highs)

    def read(self, columns: Sequence[str] | None, first: int, last: int) -> pl.DataFrame:
        """The rows of blocks first..last (their `columns`, or all, in file order)."""
        return (pl.scan_parquet(self.source).filter(pl.col(self.column).is_between(first, last))
                .select(columns if columns is not None else pl.all()).collect())

    def batches(self, first: int, last: int) -> Iterator[pl.DataFrame]:
        """The rows of blocks first..last, every column, a row group at a time (a copy of a file's part)."""
        wanted = [i for i, (lo, hi, _) in enumerate(self.groups) if lo is None or hi is None or (hi >= first and lo <= last)]
        for i, df in zip(wanted, row_groups(self.source, wanted), strict=True):
            lo, hi, _ = self.groups[i]
            yield df if lo is not None and hi is not None and first <= lo and hi <= last else \
                df.filter(pl.col(self.column).is_between(first, last))

    @property
    def schema(self) -> pl.Schema:
        return pl.scan_parquet(self.source).collect_schema()


@contextmanager
def block_files(paths: Sequence[LakePath], column: str) -> Iterator[list[BlockFile]]:
    """`paths` as `BlockFile`s for the duration of the block (a remote file downloaded to a local temporary
    file, `local_copy`: read in windows like a local one)."""
    with ExitStack() as stack:
        yield [BlockFile(stack.enter_context(local_copy(p)), column) for p in paths]


def read_window(files: Sequence[BlockFile], columns: Sequence[str], first: int, last: int) -> pl.DataFrame:
    """The rows of blocks first..last of all `files`, one frame (files in the order given)."""
    return pl.concat([f.read(columns, first, last) for f in files], how="vertical")


def read_blocks(files: Sequence[BlockFile], columns: Sequence[str], numbers: Sequence[int]) -> pl.DataFrame:
    """The rows of the given blocks of all `files`."""
    return pl.concat([read_window(files, columns, n, n) for n in numbers] or [read_window(files, columns, 1, 0)])


def windows(files: Sequence[BlockFile], rows: int, low: int | None = None, high: int | None = None
            ) -> list[tuple[int, int]]:
    """Consecutive (first, last) block windows covering every file's blocks and low..high, each holding
    about `rows` rows of each file and `rows` blocks at most (a file without statistics: one window)."""
    spans = [s for f in files if (s := f.span()) is not None]
    lows = [s[0] for s in spans] + ([low] if low is not None else [])
    highs = [s[1] for s in spans] + ([high] if high is not None else [])
    if not lows or not highs:
        return []
    start, end = min(lows), max(highs)
    if any(f.span() is None and f.rows for f in files):
        return [(start, end)]
    cuts = set(range(start + rows - 1, end, rows))  # a window spans `rows` blocks at most, even where none is stored
    for f in files:
        held = 0
        for lo, hi, n in f.groups:
            if lo is not None and hi is not None and n > rows:  # a large group: cut it as if evenly spread
                cuts.update(lo + (hi - lo) * k * rows // n for k in range(1, n // rows + 1))
            held += n
            if held >= rows and hi is not None:
                cuts.add(hi)
                held = 0
    out, first = [], start
    for cut in sorted(c for c in cuts if start <= c < end):
        out.append((first, cut))
        first = cut + 1
    out.append((first, end))
    return out
