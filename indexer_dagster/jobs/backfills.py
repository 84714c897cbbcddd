"""A CLI backfill recorded as one Dagster asset backfill, so the UI's Backfills tab lists it.

`indexer backfill` executes its runs itself (it must work without a daemon, with its own worker processes
and progress bar). Before its first run it adds a `PartitionBackfill` over its range keys and the chain's
historical assets, built as the UI's launchpad builds one (`PartitionBackfill.from_asset_partitions`) but
with every target partition already marked requested: a daemon that evaluates it only follows its runs
and launches none. Every run is tagged `dagster/backfill=<id>`, so the backfill page lists the runs; the
UI's re-execute makes a new backfill of it, which the daemon runs. Without a daemon the CLI records each
run's ranges as materialized or failed as the run ends; in any case it writes the outcome at the end.
"""

import os
import socket
import time
from collections.abc import Sequence

import dagster as dg
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus, PartitionBackfill
from dagster._core.storage.tags import BACKFILL_ID_TAG, PARENT_BACKFILL_ID_TAG
from dagster._core.utils import make_new_backfill_id
from dagster._utils.error import SerializableErrorInfo

from indexer_dagster.persist.lake import _alive  # is that process still running
from indexer_dagster.state import open_state
from indexer_dagster.sync.realtime import lease_held, run_lease

LAUNCHED_BY_TAG = "indexer/launched_by"
PID_TAG = "indexer/cli_pid"
HOST_TAG = "indexer/cli_host"
UNFINISHED_RUNS = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
STOPPED = (BulkActionStatus.CANCELING, BulkActionStatus.CANCELED)
BACKFILL_DAEMON = "BACKFILL"  # the daemon type of dagster-daemon's backfill loop

__all__ = ["BACKFILL_ID_TAG", "CliBackfill", "close_abandoned", "is_stopped"]


class CliBackfill:
    """One `indexer backfill` of one chain as a Dagster backfill: created on start, updated per run."""

    def __init__(self, instance: dg.DagsterInstance, asset_graph, asset_keys: Sequence[dg.AssetKey],
                 range_keys: Sequence[str], title: str) -> None:
        self.instance = instance
        self.asset_graph = asset_graph
        self.backfill_id = make_new_backfill_id()
        backfill = PartitionBackfill.from_asset_partitions(
            backfill_id=self.backfill_id, asset_graph=asset_graph, partition_names=list(range_keys),
            asset_selection=list(asset_keys), backfill_timestamp=time.time(),
            tags={LAUNCHED_BY_TAG: "cli", PID_TAG: str(os.getpid()),
                  HOST_TAG: socket.gethostname()},
            dynamic_partitions_store=instance, all_partitions=False, title=title,
            description=None,  # a re-execution from the UI copies it, and is not run by the CLI
            run_config=None,
        )
        data = backfill.get_asset_backfill_data(asset_graph)
        # Already requested (by the CLI): a daemon evaluating this backfill follows it and launches nothing.
        data = data._replace(requested_subset=data.target_subset, requested_runs_for_target_roots=True,
                             latest_storage_id=instance.event_log_storage.get_maximum_record_id() or 0)
        self._save(backfill, data)
        self.materialized: set[str] = set()
        self.failed: set[str] = set()

    @property
    def run_tags(self) -> dict[str, str]:
        return {BACKFILL_ID_TAG: self.backfill_id}

    def record(self, range_keys: Sequence[str], success: bool) -> None:
        """One run ended: its ranges count as materialized or failed on the backfill page.

        Written at once when no daemon runs. A running daemon follows the backfill's runs itself, and would
        take a record written between two runs (none in flight, nothing new since) for a stalled backfill."""
        (self.materialized if success else self.failed).update(range_keys)
        if not _backfill_daemon_running(self.instance):
            backfill = self._load()
            self._save(backfill, self._with_outcomes(backfill))

    def finish(self) -> BulkActionStatus:
        """The CLI is done (or stopped): ranges that never ran count as failed; the status says how it ended."""
        backfill = self._load()
        data = self._with_outcomes(backfill)
        unfinished = data.target_subset - data.materialized_subset - data.failed_and_downstream_subset
        data = data._replace(failed_and_downstream_subset=data.failed_and_downstream_subset | unfinished)
        if backfill.status in STOPPED:
            status = BulkActionStatus.CANCELED
        elif data.failed_and_downstream_subset.num_partitions_and_non_partitioned_assets:
            status = BulkActionStatus.COMPLETED_FAILED
        else:
            status = BulkActionStatus.COMPLETED_SUCCESS
        self._save(backfill.with_status(status).with_end_timestamp(time.time()), data)
        return status

    def _with_outcomes(self, backfill: PartitionBackfill):
        data = backfill.get_asset_backfill_data(self.asset_graph)
        return data._replace(
            materialized_subset=data.materialized_subset | self._subset(self.materialized, data.target_subset),
            failed_and_downstream_subset=data.failed_and_downstream_subset | self._subset(self.failed, data.target_subset),
        )

    def _subset(self, range_keys: set[str], target: AssetGraphSubset) -> AssetGraphSubset:
        return AssetGraphSubset.from_asset_partition_set(
            {AssetKeyPartitionKey(k, p) for k in target.asset_keys for p in range_keys}, self.asset_graph)

    def _load(self) -> PartitionBackfill:
        backfill = self.instance.get_backfill(self.backfill_id)
        assert backfill is not None, f"backfill {self.backfill_id} vanished from the instance"
        return backfill

    def _save(self, backfill: PartitionBackfill, data) -> None:
        updated = backfill.with_asset_backfill_data(data, dynamic_partitions_store=self.instance,
                                                    asset_graph=self.asset_graph)
        if self.instance.get_backfill(self.backfill_id) is None:
            self.instance.add_backfill(updated)
        else:
            self.instance.update_backfill(updated)


def is_stopped(instance: dg.DagsterInstance, backfill_id: str) -> bool:
    """Whether the backfill was canceled from the UI (its remaining runs are then not started)."""
    backfill = instance.get_backfill(backfill_id)
    return backfill is not None and backfill.status in STOPPED


def close_abandoned(instance: dg.DagsterInstance, state_url: str) -> list[str]:
    """Mark failed the CLI backfills still in progress whose `indexer backfill` process on this host is gone
    (killed before it could record the outcome), and the runs they left started whose run lease nobody
    holds (a range run holds it from its start to its last result; a lease dies with its process, zombie
    or not); returns the backfills' ids. Without a daemon nothing else would."""
    host = socket.gethostname()
    closed = []
    for backfill in instance.get_backfills(filters=BulkActionsFilter(
            statuses=[BulkActionStatus.REQUESTED], tags={LAUNCHED_BY_TAG: "cli", HOST_TAG: host})):
        if PARENT_BACKFILL_ID_TAG in backfill.tags:
            continue  # a re-execution launched from the UI: it copies our tags, but the daemon runs it
        pid = int(backfill.tags.get(PID_TAG, "0"))
        if pid == os.getpid() or (pid > 0 and _alive(pid)):
            continue
        error = SerializableErrorInfo(
            message=f"indexer backfill (pid {pid} on {host}) stopped before it finished; ranges it did not "
                    f"run were not indexed. Run `indexer backfill` again to index them.",
            stack=[], cls_name=None)
        instance.update_backfill(backfill.with_status(BulkActionStatus.FAILED).with_error(error)
                                 .with_end_timestamp(time.time()))
        closed.append(backfill.backfill_id)
        runs = instance.get_runs(dg.RunsFilter(tags={BACKFILL_ID_TAG: backfill.backfill_id}, statuses=UNFINISHED_RUNS))
        if not runs:
            continue
        with open_state(state_url) as store:  # only then: a full disk must still fail with its clear message
            for run in runs:
                if not lease_held(store, run_lease(run.run_id)):  # else a worker of that CLI still runs it
                    instance.report_run_failed(run, f"the process of indexer backfill (pid {pid}) that ran it is gone")
    return closed


def _backfill_daemon_running(instance: dg.DagsterInstance) -> bool:
    status = instance.get_daemon_statuses([BACKFILL_DAEMON]).get(BACKFILL_DAEMON)
    return bool(status and status.healthy)
