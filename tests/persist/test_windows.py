"""Reading lake files window by window of blocks (`persist.windows`): the windows follow each other, cover
every stored block and the span asked for, and together give every row exactly once, in block order or
not."""

from itertools import pairwise
from pathlib import Path

import polars as pl
import pytest

from indexer_dagster.persist.lake import Lake
from indexer_dagster.persist.windows import block_files, read_blocks, read_window, windows

SCHEMA = {"block_number": pl.Int64, "log_index": pl.Int64}


def _file(tmp_path: Path, df: pl.DataFrame, row_group: int, monkeypatch) -> Path:
    monkeypatch.setattr("indexer_dagster.persist.lake.ROW_GROUP_SIZE", row_group)
    lake = Lake(tmp_path / "data", "devnet")
    with lake.transaction() as tx:
        w = tx.writer("logs", "000000000000-000000009999", SCHEMA)
        for part in df.iter_slices(row_group):
            w.write(part)
    return lake.path("logs", "000000000000-000000009999")


def _logs(blocks: list[int], per_block: int = 3) -> pl.DataFrame:
    return pl.DataFrame({"block_number": [b for b in blocks for _ in range(per_block)],
                         "log_index": [i for _ in blocks for i in range(per_block)]}, schema=SCHEMA)


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_windows_cover_the_span_and_give_every_row_once(tmp_path, monkeypatch, order):
    logs = _logs([b for b in range(100, 5000) if b % 7])  # gaps: blocks without logs
    if order == "shuffled":
        logs = logs.sample(fraction=1.0, shuffle=True, seed=5)
    path = _file(tmp_path, logs, 500, monkeypatch)
    with block_files([path], "block_number") as files:
        assert files[0].span() == (100, 4999) and files[0].rows == logs.height
        cut = windows(files, 1000, low=0, high=6000)
        assert cut[0][0] == 0 and cut[-1][1] == 6000
        assert all(b[0] == a[1] + 1 and a[0] <= a[1] for a, b in pairwise(cut))
        parts = [read_window(files, ["block_number", "log_index"], *w) for w in cut]
        assert len(cut) > 5 and all(p["block_number"].is_between(*w).all() for p, w in zip(parts, cut, strict=True))
        if order == "sorted":  # a window holds about `rows` rows: a block's rows across a cut stay together
            assert max(p.height for p in parts) <= 1000 + 3
        back = pl.concat(parts)
        assert back.sort("block_number", "log_index").equals(logs.sort("block_number", "log_index"))
        assert read_blocks(files, ["log_index"], [101, 102, 7]).height == 6  # block 7 holds none (a multiple of 7)


def test_a_span_without_rows_is_cut_too(tmp_path, monkeypatch):
    """An empty file over a wide span (every block missing): each window spans `rows` blocks at most, so
    work per window stays bounded."""
    path = _file(tmp_path, pl.DataFrame(schema=SCHEMA), 500, monkeypatch)
    with block_files([path], "block_number") as files:
        assert files[0].span() is None and files[0].rows == 0
        cut = windows(files, 1000, low=0, high=9_999)
        assert len(cut) == 10 and all(b - a + 1 <= 1000 for a, b in cut)
        assert read_window(files, ["log_index"], 0, 9_999).height == 0
