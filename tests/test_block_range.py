import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from indexer_dagster.block_range import BlockRange, parse_key, range_for_block, ranges_between


def test_keys_are_zero_padded_and_sort_like_blocks():
    assert BlockRange(10_000, 19_999).key == "000000010000-000000019999"
    keys = [r.key for r in ranges_between(0, 123_456, 10_000)]
    assert keys == sorted(keys) and len(keys) == 13


@given(st.integers(0, 10**9), st.integers(0, 500), st.integers(1, 10**5), st.integers(0, 10**5))
def test_ranges_cover_exactly(first, n_ranges, width, offset):
    last = first + n_ranges * width + offset % width
    rs = ranges_between(first, last, width)
    assert rs[0].start <= first <= rs[0].end and rs[-1].start <= last <= rs[-1].end
    assert all(b.start == a.end + 1 for a, b in itertools.pairwise(rs))
    assert all(len(r) == width and r.start % width == 0 for r in rs)
    assert all(parse_key(r.key) == r for r in rs)


def test_bad_input():
    with pytest.raises(ValueError, match="swap them"):
        ranges_between(10, 5, 100)
    with pytest.raises(ValueError, match="negative"):
        ranges_between(-1, 5, 100)
    with pytest.raises(ValueError, match="not a block-range key"):
        parse_key("10-20")
    assert range_for_block(15, 10) == BlockRange(10, 19)
    assert BlockRange(0, 9).clip(5, 100) == BlockRange(5, 9)
    assert BlockRange(0, 9).clip(10, 100) is None
