"""The chain-head sensor's judgement of runs: a run whose process died is failed (and replaced), a run
that is alive is left alone. Real Dagster instance, real state store (the leases are its locks)."""

import dagster as dg
from dagster._core.utils import make_new_run_id

from indexer_dagster.jobs.names import CHAIN_TAG, REORG_ID_TAG, REORG_ROLE, ROLE_TAG, reorg_job_name
from indexer_dagster.sensors.chain_head import fail_dead_runs
from indexer_dagster.state import open_state
from indexer_dagster.sync.realtime import run_lease


def _started_reorg_run(instance: dg.DagsterInstance, reorg_id: int) -> dg.DagsterRun:
    run = dg.DagsterRun(
        job_name=reorg_job_name("devnet"), run_id=make_new_run_id(), status=dg.DagsterRunStatus.STARTED,
        tags={CHAIN_TAG: "devnet", ROLE_TAG: REORG_ROLE, REORG_ID_TAG: str(reorg_id)},
    )
    return instance.add_run(run)


def test_a_reorg_run_whose_process_died_is_failed_and_a_live_one_is_not(tmp_path):
    """Issue 13, finding 2: a reorg run killed with the daemon stayed "started" for good, so the sensor
    never launched the next attempt and the chain's writers waited forever."""
    url = tmp_path / "state.sqlite"
    sensor_store, run_process = open_state(url), open_state(url)  # the sensor's, and a live run's
    with dg.instance_for_test() as instance:
        dead = _started_reorg_run(instance, 7)
        alive = _started_reorg_run(instance, 7)
        with run_process.writer_lock(run_lease(alive.run_id)):
            fail_dead_runs(instance, sensor_store, "devnet", "devnet_historical_sync", None, grace_s=0)
        assert instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(alive.run_id).status == dg.DagsterRunStatus.STARTED
    sensor_store.close()
    run_process.close()


def test_a_reorg_run_whose_process_died_before_it_started_is_failed(tmp_path):
    """Found by the chaos test: the follower creates its in-process reorg run (NOT_STARTED) and is killed
    before the run starts. That run stayed "not started" for good: the sensor counted it as in progress,
    never launched another attempt, and the chain stalled with the reorg in phase `detected`."""
    url = tmp_path / "state.sqlite"
    sensor_store = open_state(url)
    with dg.instance_for_test() as instance:
        orphan = instance.add_run(dg.DagsterRun(
            job_name=reorg_job_name("devnet"), run_id=make_new_run_id(), status=dg.DagsterRunStatus.NOT_STARTED,
            tags={CHAIN_TAG: "devnet", ROLE_TAG: REORG_ROLE, REORG_ID_TAG: "3"}))
        fail_dead_runs(instance, sensor_store, "devnet", "devnet_historical_sync", None, grace_s=0)
        assert instance.get_run_by_id(orphan.run_id).status == dg.DagsterRunStatus.FAILURE
    sensor_store.close()
