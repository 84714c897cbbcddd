"""Issue 15: `indexer backfill` is one Dagster backfill in the UI's Backfills tab, its runs grouped under it,
without a daemon; a daemon that evaluates it launches nothing of its own."""

import logging
import subprocess
import sys

import dagster as dg
import pytest
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.execution.asset_backfill import AssetBackfillStatus, execute_asset_backfill_iteration_inner
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.storage.tags import PARENT_BACKFILL_ID_TAG
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.backfill import execute_backfill_iteration_with_instigation_logger
from dagster._time import get_current_datetime

from indexer_dagster.block_range import ranges_between
from indexer_dagster.definitions import build_definitions
from indexer_dagster.jobs.backfills import BACKFILL_ID_TAG, close_abandoned
from indexer_dagster.launch import run_batch, start_cli_backfill
from tests.conftest import REPO, cfg_of, cli_env

pytestmark = pytest.mark.slow

INDEXER = [sys.executable, "-m", "indexer_dagster.cli"]


def test_a_cli_backfill_is_one_dagster_backfill(make_config, dagster_home):
    """Two worker processes, two runs: one backfill, completed, every range materialized, every run under it."""
    path = make_config(blocks_per_partition=5)
    proc = subprocess.run([*INDEXER, "backfill", "--config", str(path), "--to", "49", "--workers", "2"],
                          env=cli_env(path, dagster_home), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = cfg_of(path)
    graph = build_definitions(cfg).resolve_asset_graph()
    keys = [r.key for r in ranges_between(0, 49, 5)]
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    try:
        [backfill] = instance.get_backfills()
        assert f"Dagster backfill {backfill.backfill_id}" in proc.stdout
        assert backfill.status == BulkActionStatus.COMPLETED_SUCCESS and backfill.is_asset_backfill
        assert backfill.tags["indexer/launched_by"] == "cli" and backfill.backfill_end_timestamp is not None
        runs = instance.get_runs(dg.RunsFilter(job_name="devnet_historical_sync"))
        assert len(runs) == 2 and {r.tags.get(BACKFILL_ID_TAG) for r in runs} == {backfill.backfill_id}
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        data = backfill.get_asset_backfill_data(graph)
        logs = dg.AssetKey(["devnet", "logs"])
        assert sorted(data.target_subset.get_partitions_subset(logs).get_partition_keys()) == keys
        # What the backfill page shows per asset: every range of every historical asset materialized.
        statuses = data.get_backfill_status_per_asset_key(graph)
        assert {s.asset_key for s in statuses} == {dg.AssetKey(["devnet", s.table]) for _, s in cfg.all_specs()} | {
            logs, dg.AssetKey(["devnet", "blocks"])}
        for s in statuses:
            assert s.partitions_counts_by_status[AssetBackfillStatus.MATERIALIZED] == len(keys), s
            assert s.partitions_counts_by_status[AssetBackfillStatus.FAILED] == 0, s
    finally:
        instance.dispose()


def test_the_daemons_backfill_loop_follows_a_cli_backfill_and_launches_nothing(make_config, dagster_home, monkeypatch):
    """dagster-daemon's own per-backfill iteration, on a CLI backfill with one range run and one not yet:
    it launches no run, keeps the backfill in progress and counts the range run as materialized. The same
    target launched as a UI backfill would have the daemon request runs."""
    path = make_config()
    monkeypatch.setenv("INDEXER_CONFIG", str(path))
    cfg = cfg_of(path)
    keys = [r.key for r in ranges_between(0, 49, 25)]
    logs = dg.AssetKey(["devnet", "logs"])
    origin = InProcessCodeLocationOrigin(LoadableTargetOrigin(
        executable_path=sys.executable, module_name="indexer_dagster.definitions", working_directory=str(REPO)))
    log = logging.getLogger(__name__)
    with dg.DagsterInstance.get() as instance, WorkspaceProcessContext(
            instance, InProcessWorkspaceLoadTarget(origin)) as workspace:
        instance.add_dynamic_partitions("devnet_block_ranges", keys)
        backfill = start_cli_backfill(instance, cfg, keys)
        first = run_batch(keys[0], keys[0], instance, "devnet", backfill.backfill_id)
        assert first.success, first.error
        stored = instance.get_backfill(backfill.backfill_id)
        assert stored is not None
        list(execute_backfill_iteration_with_instigation_logger(stored, log, workspace, instance))

        assert [r.run_id for r in instance.get_runs()] == [first.run_id], "the daemon launched a run"
        followed = instance.get_backfill(backfill.backfill_id)
        assert followed is not None and followed.status == BulkActionStatus.REQUESTED
        graph = workspace.create_request_context().asset_graph
        data = followed.get_asset_backfill_data(graph)
        assert list(data.materialized_subset.get_partitions_subset(logs).get_partition_keys()) == [keys[0]]

        as_from_the_ui = data._replace(requested_subset=AssetGraphSubset(), requested_runs_for_target_roots=False,
                                       materialized_subset=AssetGraphSubset())
        view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                              instance=instance, asset_graph=graph)
        assert execute_asset_backfill_iteration_inner(
            backfill.backfill_id, as_from_the_ui, view, followed.backfill_timestamp, log, None).run_requests

        backfill.record(keys[:1], success=True)
        assert backfill.finish() == BulkActionStatus.COMPLETED_FAILED  # the second range never ran
        done = instance.get_backfill(backfill.backfill_id)
        assert done is not None
        failed = done.get_asset_backfill_data(graph).failed_and_downstream_subset
        assert list(failed.get_partitions_subset(logs).get_partition_keys()) == [keys[1]]


def test_a_killed_cli_backfill_is_closed_by_the_next(make_config, dagster_home, monkeypatch):
    """A CLI backfill whose process group died (SIGKILL: it could not record an outcome) is marked failed
    by the next `indexer backfill`, with a message saying what to do, and so is the run it left started; a
    live one is left alone."""
    path = make_config()
    monkeypatch.setenv("INDEXER_CONFIG", str(path))
    keys = [r.key for r in ranges_between(0, 24, 25)]
    script = (
        "import dagster as dg, os\n"
        "from indexer_dagster.config import load_config\n"
        "from indexer_dagster.launch import start_cli_backfill\n"
        f"instance = dg.DagsterInstance.get(); instance.add_dynamic_partitions('devnet_block_ranges', {keys!r})\n"
        f"cfg = load_config({str(path)!r}); backfill = start_cli_backfill(instance, cfg, {keys!r})\n"
        "from indexer_dagster.definitions import build_definitions\n"
        "job = build_definitions(cfg).resolve_job_def('devnet_historical_sync')\n"
        "run = instance.create_run_for_job(job, status=dg.DagsterRunStatus.STARTED, tags=backfill.run_tags)\n"
        "print(backfill.backfill_id, run.run_id, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=cli_env(path, dagster_home),
                          capture_output=True, text=True, timeout=300, start_new_session=True)
    assert proc.returncode == -9, proc.stderr
    dead, run_id = proc.stdout.split()
    with dg.DagsterInstance.get() as instance:
        alive = start_cli_backfill(instance, cfg_of(path), keys)  # this process: alive
        # The UI's re-execution of the dead one copies its tags (pid included); the daemon runs it.
        dead_record = instance.get_backfill(dead)
        assert dead_record is not None
        rerun = dead_record._replace(backfill_id="rerun", tags={**dead_record.tags, PARENT_BACKFILL_ID_TAG: dead})
        instance.add_backfill(rerun)
        assert close_abandoned(instance, cfg_of(path).state_url) == [dead]
        assert instance.get_backfill("rerun").status == BulkActionStatus.REQUESTED  # type: ignore[union-attr]
        closed = instance.get_backfill(dead)
        assert closed is not None and closed.status == BulkActionStatus.FAILED
        assert closed.error is not None and "indexer backfill" in closed.error.message
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.FAILURE
        kept = instance.get_backfill(alive.backfill_id)
        assert kept is not None and kept.status == BulkActionStatus.REQUESTED


def test_a_cli_backfill_canceled_in_the_ui_starts_no_further_run(make_config, dagster_home, monkeypatch):
    """Cancel in the UI sets the backfill CANCELING (the daemon would cancel its runs): the CLI starts no
    further run of it and, at the end, marks it canceled."""
    path = make_config()
    monkeypatch.setenv("INDEXER_CONFIG", str(path))
    keys = [r.key for r in ranges_between(0, 49, 25)]
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("devnet_block_ranges", keys)
        backfill = start_cli_backfill(instance, cfg_of(path), keys)
        assert run_batch(keys[0], keys[0], instance, "devnet", backfill.backfill_id).success
        stored = instance.get_backfill(backfill.backfill_id)
        assert stored is not None
        instance.update_backfill(stored.with_status(BulkActionStatus.CANCELING))  # what the UI's cancel does
        skipped = run_batch(keys[1], keys[1], instance, "devnet", backfill.backfill_id)
        assert not skipped.success and "canceled" in skipped.error and skipped.run_id == ""
        assert len(instance.get_runs()) == 1
        backfill.record(keys[:1], success=True)
        backfill.record(keys[1:], success=False)
        assert backfill.finish() == BulkActionStatus.CANCELED
