"""RangeSizer behaviour and split_range properties."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from indexer_dagster.chain.errors import RpcErrorInfo, RpcErrorKind, classify_rpc_error
from indexer_dagster.chain.spans import RangeSizer, split_range

R = RpcErrorKind.RANGE_TOO_LARGE


def range_error(**hints) -> RpcErrorInfo:
    return RpcErrorInfo(kind=R, message="range too large", **hints)


# --- split_range -------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    start=st.integers(min_value=0, max_value=10**9),
    length=st.integers(min_value=1, max_value=5000),
    span=st.integers(min_value=1, max_value=6000),
)
def test_split_range_covers_exactly_in_order_without_overlap(start, length, span):
    end = start + length - 1
    parts = split_range(start, end, span)
    assert parts[0][0] == start and parts[-1][1] == end
    for a, b in parts:
        assert a <= b and b - a + 1 <= span
    for (_, b1), (a2, _) in itertools.pairwise(parts):
        assert a2 == b1 + 1  # contiguous: no gap, no overlap, ordered
    assert sum(b - a + 1 for a, b in parts) == length
    assert all(b - a + 1 == span for a, b in parts[:-1])  # only the last piece is short
    assert len(parts) == -(-length // span)


def test_split_range_edges():
    assert split_range(5, 5, 1) == [(5, 5)]
    assert split_range(5, 4, 10) == []
    assert split_range(0, 9, 3) == [(0, 2), (3, 5), (6, 8), (9, 9)]
    with pytest.raises(ValueError):
        split_range(0, 10, 0)
    with pytest.raises(ValueError):
        split_range(-1, 10, 5)
    with pytest.raises(TypeError):
        split_range(0, 10, 2.5)


# --- RangeSizer: construction ----------------------------------------------------------------------


def test_initial_is_clamped_and_arguments_checked():
    assert RangeSizer(initial=10, minimum=50, maximum=100).span == 50
    assert RangeSizer(initial=10**9, maximum=5000).span == 5000
    assert RangeSizer().span == 1000
    for bad in ({"minimum": 0}, {"minimum": 10, "maximum": 5}, {"target_logs": 0}, {"grow_factor": 1.0}):
        with pytest.raises(ValueError):
            RangeSizer(**bad)


# --- shrinking ---------------------------------------------------------------------------------------


def test_range_error_without_hint_halves():
    s = RangeSizer(initial=1000)
    assert s.on_range_error(range_error(), 0, 999) == 500
    assert s.span == 500
    assert s.on_range_error(range_error(), 0, 499) == 250
    assert s.span == 250


def test_suggested_range_is_honoured():
    # Alchemy / Infura suggest a range starting at our fromBlock: retry with exactly its length.
    s = RangeSizer(initial=5000)
    info = classify_rpc_error({"code": -32602, "message": "Log response size exceeded. ... this block range should "
                                                         "work: [0x3e8, 0x7cf]"})
    assert info.suggested_range == (1000, 1999)
    assert s.on_range_error(info, 1000, 5999) == 1000
    assert s.span == 1000
    # reth/dRPC style decimal range
    s2 = RangeSizer(initial=2000)
    info2 = classify_rpc_error({"code": -32602, "message": "query exceeds max results 20000, retry with the range "
                                                          "22382105-22382515"})
    assert s2.on_range_error(info2, 22382105, 22384104) == 411
    assert s2.span == 411


def test_suggested_range_not_starting_at_from_block_gives_its_length():
    s = RangeSizer(initial=5000)
    assert s.on_range_error(range_error(suggested_range=(100, 199)), 1000, 5999) == 100


def test_provider_maximum_is_honoured_and_caps_growth_forever():
    s = RangeSizer(initial=20_000, maximum=100_000, target_logs=2000)
    info = classify_rpc_error({"code": -32614, "message": "eth_getLogs is limited to a 10,000 range"})
    assert s.on_range_error(info, 0, 19_999) == 10_000
    assert s.span == 10_000 and s.provider_max_span == 10_000
    for _ in range(500):
        s.on_success(s.span, 0)
    assert s.span == 10_000


def test_hint_that_does_not_shrink_the_request_halves_instead():
    s = RangeSizer(initial=4000)
    # The provider says 10000 but refused 4000 blocks: something else is too big.
    assert s.on_range_error(range_error(max_block_span=10_000), 0, 3999) == 2000
    assert s.span == 2000


def test_never_below_minimum_unless_the_provider_demands_it():
    s = RangeSizer(initial=100, minimum=50)
    for _ in range(10):
        s.on_range_error(range_error(), 0, s.span - 1)
        assert s.span >= 50
    assert s.span == 50
    # A provider that allows only 5 blocks wins over minimum: larger requests can never succeed.
    assert s.on_range_error(range_error(max_block_span=5), 0, 49) == 5
    assert s.span == 5 and s.floor == 5


def test_single_block_cannot_shrink():
    s = RangeSizer(initial=1)
    assert s.on_range_error(range_error(), 7, 7) == 1
    assert s.span == 1


def test_range_error_rejects_inverted_bounds():
    with pytest.raises(ValueError):
        RangeSizer().on_range_error(range_error(), 10, 9)


def test_ambiguous_limit_error_halves_when_treated_as_a_range_error():
    info = classify_rpc_error({"code": -32005, "message": "limit exceeded"})
    assert info.ambiguous
    s = RangeSizer(initial=800)
    assert s.on_range_error(info, 0, 799) == 400


def test_dense_response_shrinks_towards_target():
    s = RangeSizer(initial=1000, target_logs=2000)
    s.on_success(1000, 20_000)  # ten times the target
    assert s.span == 100
    s.on_success(100, 3000)  # above target but within shrink_above: unchanged
    assert s.span == 100


def test_timeouts_shrink_only_when_repeated():
    s = RangeSizer(initial=1000)
    s.on_timeout(1000)
    assert s.span == 1000
    s.on_success(1000, 2000)  # a success in between resets the streak
    s.on_timeout(1000)
    assert s.span == 1000
    s.on_timeout(1000)
    assert s.span == 500


# --- growing ---------------------------------------------------------------------------------------


def test_sparse_successes_grow_by_a_quarter_up_to_maximum():
    s = RangeSizer(initial=1000, maximum=3000, target_logs=2000)
    s.on_success(1000, 10)
    assert s.span == 1250
    s.on_success(1250, 0)
    assert s.span == 1563
    for _ in range(50):
        s.on_success(s.span, 0)
    assert s.span == 3000


def test_growth_needs_a_result_well_under_target():
    s = RangeSizer(initial=1000, target_logs=2000)
    s.on_success(1000, 1500)  # 75% of target: keep
    assert s.span == 1000
    s.on_success(1000, 1000)  # 50%: grow
    assert s.span == 1250


def test_concurrent_successes_at_one_span_grow_once():
    s = RangeSizer(initial=1000)
    for _ in range(4):  # four tasks were in flight with span 1000
        s.on_success(1000, 0)
    assert s.span == 1250


def test_stale_successes_do_not_grow_after_a_shrink():
    s = RangeSizer(initial=1000)
    s.on_range_error(range_error(), 0, 999)  # -> 500
    s.on_success(300, 0)  # a sub-range or a short tail: smaller than the current span
    assert s.span == 500


def test_growth_stays_below_a_failed_span_until_relaxed():
    s = RangeSizer(initial=1000, maximum=100_000, relax_after=20)
    s.on_range_error(range_error(max_results=10_000), 0, 999)  # results too many at 1000 blocks
    assert s.span == 500
    for _ in range(19):
        s.on_success(s.span, 0)
        assert s.span <= 999
    assert s.span == 999
    s.on_success(s.span, 0)  # the 20th success forgets the failed size
    s.on_success(s.span, 0)
    assert s.span > 999


def test_tiny_spans_still_grow():
    s = RangeSizer(initial=1)
    s.on_success(1, 0)
    assert s.span == 2
    s.on_success(2, 0)
    assert s.span == 3


# --- invariants under any sequence of events ------------------------------------------------------

events = st.lists(
    st.one_of(
        st.tuples(st.just("ok"), st.integers(1, 200_000), st.integers(0, 100_000)),
        st.tuples(
            st.just("err"),
            st.integers(0, 10**7),
            st.integers(1, 200_000),
            st.one_of(
                st.none(),
                st.integers(1, 50_000).map(lambda n: ("span", n)),
                st.tuples(st.integers(-100, 100), st.integers(0, 50_000)).map(lambda t: ("suggest", *t)),
                st.integers(1, 50_000).map(lambda n: ("results", n)),
            ),
        ),
        st.tuples(st.just("timeout"), st.integers(1, 200_000)),
    ),
    max_size=60,
)


def _apply(s: RangeSizer, ev) -> int | None:
    if ev[0] == "ok":
        s.on_success(ev[1], ev[2])
        return None
    if ev[0] == "timeout":
        s.on_timeout(ev[1])
        return None
    _, start, length, hint = ev
    end = start + length - 1
    kw = {}
    if hint is not None and hint[0] == "span":
        kw["max_block_span"] = hint[1]
    elif hint is not None and hint[0] == "suggest":
        a = max(0, start + hint[1])
        kw["suggested_range"] = (a, a + hint[2])
    elif hint is not None:
        kw["max_results"] = hint[1]
    return s.on_range_error(range_error(**kw), start, end)


@settings(max_examples=120, deadline=None)
@given(
    minimum=st.integers(1, 100),
    extra=st.integers(0, 100_000),
    initial=st.integers(1, 200_000),
    evs=events,
)
def test_span_always_within_bounds(minimum, extra, initial, evs):
    maximum = minimum + extra
    s = RangeSizer(initial=initial, minimum=minimum, maximum=maximum)
    smallest_provider_cap = None
    for ev in evs:
        retry = _apply(s, ev)
        if ev[0] == "err" and ev[3] is not None and ev[3][0] == "span":
            cap = ev[3][1]
            smallest_provider_cap = cap if smallest_provider_cap is None else min(smallest_provider_cap, cap)
        floor = minimum if smallest_provider_cap is None else min(minimum, smallest_provider_cap)
        assert floor <= s.span <= maximum
        if smallest_provider_cap is not None:
            assert s.span <= max(smallest_provider_cap, floor)
        if retry is not None:
            failed = ev[2]
            assert 1 <= retry <= failed
            assert retry < failed or failed <= s.floor  # progress unless it cannot shrink
            assert retry >= s.floor or retry == failed


@settings(max_examples=50, deadline=None)
@given(evs=events)
def test_deterministic(evs):
    a, b = RangeSizer(), RangeSizer()
    ra = [_apply(a, ev) for ev in evs]
    rb = [_apply(b, ev) for ev in evs]
    assert ra == rb and a.span == b.span and repr(a) == repr(b)


def test_next_range():
    s = RangeSizer(initial=100)
    assert s.next_range(0, 1000) == (0, 99)
    assert s.next_range(950, 1000) == (950, 1000)
