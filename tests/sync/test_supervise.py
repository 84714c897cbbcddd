"""What the chain-head sensor launches, decided from plain facts."""

from indexer_dagster.sync.supervise import Facts, plan


def _facts(**kw) -> Facts:
    base = dict(node_head=95, start_block=0, blocks_per_partition=10, live_anchor=60, live_tip=90,
                active_reorg_id=None, reorg_run_active=False, reorg_runs_before=0, live_run_active=False,
                range_coverage={}, range_keys_running=frozenset(), reorg_window=20)
    return Facts(**{**base, **kw})


def test_a_halted_chain_launches_nothing():
    """Issue 13, finding 6: halted for an operator, nothing writes the chain: no follower, no range run
    (history, compaction, re-sync), no reorg run."""
    busy = dict(active_reorg_id=4, failed_check_ranges=frozenset({"000000000000-000000000009"}),
                live_segment_ranges=frozenset({"000000000060-000000000069"}))
    p = plan(_facts(halted="fork below the window", **busy))
    assert (p.launch_live, p.launch_reorg, p.range_runs) == (False, None, [])
    assert "halted" in p.reason
    resumed = plan(_facts(**busy))
    assert resumed.launch_reorg == 4  # the same facts, not halted: the reorg is repaired first
    assert plan(_facts()).launch_live and plan(_facts()).range_runs


def test_a_segment_across_a_boundary_asks_for_each_range_until_range_files_hold_it():
    from indexer_dagster.sync.supervise import ranges_with_live_segments, segment_covered

    k = lambda a: f"{a:012d}-{a + 9:012d}"  # noqa: E731 - a 10-block range's key
    segment = [(27, 33)]
    assert ranges_with_live_segments(segment, {k(20): 26}, 10) == {k(20), k(30)}
    # The first range synced: only the second is still due (not the first again, tick after tick).
    assert ranges_with_live_segments(segment, {k(20): 29}, 10) == {k(30)}
    assert not segment_covered(27, 33, {k(20): 29}, 10)
    # Both hold it: the segment can go; if it is still there (a crash before its removal), the
    # ranges it touches are synced once more, which removes it.
    assert segment_covered(27, 33, {k(20): 29, k(30): 33}, 10)
    assert ranges_with_live_segments(segment, {k(20): 29, k(30): 33}, 10) == {k(20), k(30)}
    assert ranges_with_live_segments([], {}, 10) == frozenset()
