"""How `indexer backfill --workers K` cuts its ranges into Dagster runs (issue 12: K workers must not be
slower than one)."""

import pytest

from indexer_dagster import launch
from indexer_dagster.block_range import ranges_between


def keys(batches):
    return [[r.key for r in b] for b in batches]


@pytest.mark.parametrize(("n_ranges", "workers", "sizes"), [
    (4, 2, [2, 2]),        # one run per worker, not one run of all ranges beside an idle worker
    (2, 2, [2]),           # but a worker only for two ranges or more: a tip range alone is mostly waiting
    (2, 1, [2]),
    (1, 4, [1]),           # no more runs than ranges
    (20, 2, [7, 7, 6]),    # at most RANGES_PER_RUN (8) per run, balanced
    (20, 4, [5, 5, 5, 5]),
    (9, 1, [5, 4]),
])
def test_ranges_are_cut_into_runs_for_every_worker_and_none_too_long(n_ranges, workers, sizes):
    ranges = ranges_between(0, n_ranges * 10 - 1, 10)
    batches = launch.plan_batches(ranges, workers)
    assert [len(b) for b in batches] == sizes
    assert [r for b in batches for r in b] == ranges  # consecutive, each range once, in order


def test_one_run_is_executed_in_this_process_whatever_the_worker_count(monkeypatch):
    """A spawned worker imports Dagster and the indexer again (~2 s): for a single run it is pure cost."""
    ran = []
    monkeypatch.setattr(launch, "run_batch", lambda first, last, *a, **k: ran.append((first, last)) or
                        launch.BatchOutcome(first, last, "run", True))
    monkeypatch.setattr(launch, "ProcessPoolExecutor", None)  # a spawned pool fails the test

    class Cfg:
        class chain:  # noqa: N801 - stands for the config's chain section
            name = "devnet"

    outcomes = []
    ranges = ranges_between(0, 9, 10)
    launch._run_batches(None, Cfg, launch.Path("indexer.yaml"), launch.plan_batches(ranges, 4), 4, "b1",
                        lambda b, n: None, outcomes.append)
    assert ran == [(ranges[0].key, ranges[0].key)] and outcomes[0].success
