"""What the live run says it wrote (sync.live_report.Written), without a chain."""

from indexer_dagster.block_range import BlockRange
from indexer_dagster.sync.live_report import Written


def test_written_names_every_range_a_catch_up_spans_and_starts_afresh():
    w = Written(10)
    w.add(blocks=25, logs=40, tip=34, tip_hash="0x" + "ab" * 32)  # blocks 10..34: three ranges
    assert w.summary() == "wrote 25 blocks (10..34) and 40 logs; tip 34 0xabababab…"
    ranges, tip = w.take()
    assert ranges == [BlockRange(10, 19), BlockRange(20, 29), BlockRange(30, 39)]
    assert tip == (34, "0x" + "ab" * 32)
    # Nothing since: nothing to report, and the log line says so.
    assert w.take() == ([], None) and w.summary() == "no new blocks"
