"""The reorg job reads like a report: each phase logged with the blocks, datasets and rows it touched,
the summary as run metadata, and a fork that changes under it as an info line, not a failure."""

import dagster as dg
import pytest

from indexer_dagster.chain.fetch import ForkChanged
from indexer_dagster.definitions import build_definitions
from indexer_dagster.devnet.uniswap import reorg as anvil_reorg
from indexer_dagster.jobs.names import reorg_job_name
from tests.sync.test_reorg import assert_views_equal_node, cfg_path, chain, follow_until_synced, indexed_live

pytestmark = pytest.mark.slow
__all__ = ["chain"]  # the fixture


def test_a_reorg_run_reports_each_phase_and_its_summary(chain, monkeypatch):
    from indexer_dagster.sync import repair as repair_module

    node, dep, cfg = chain
    monkeypatch.setenv("INDEXER_CONFIG", str(cfg_path(cfg)))
    store = indexed_live(cfg, node, dep, blocks=6, txs_per_block=6, seed=11)
    expected = anvil_reorg(node.url, dep, depth=3, txs_per_block=5, seed=99)
    assert follow_until_synced(cfg, store)[-1].action == "reorg"
    r = store.active_reorg(cfg.chain.name)
    # The fork changes once under the repair (expected on a live chain): the run retries it quietly.
    real_restore, calls = repair_module.restore, []

    def fork_changes_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ForkChanged("simulated: the node changed fork during the restore")
        return real_restore(*args, **kwargs)

    monkeypatch.setattr(repair_module, "restore", fork_changes_once)
    job = build_definitions(cfg).resolve_job_def(reorg_job_name(cfg.chain.name))
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, run_config={
            "ops": {f"{cfg.chain.name}_repair_reorg": {"config": {"reorg_id": r.id}}}})
        assert result.success
        events = instance.all_logs(result.run_id)
        lines = [e.user_message for e in events if e.user_message]
        failures = [e for e in events if e.dagster_event is not None and e.dagster_event.is_step_failure]
        assert failures == []
        rolled = next(m for m in lines if "rolled back blocks" in m)
        assert f"fork point {expected['ancestor']}, depth 3" in rolled and "logs " in rolled
        assert "uniswap_v2_pair_swap" in rolled
        assert any("restored from the new fork" in m and "live blocks" in m for m in lines)
        assert any("changed fork during the restore" in m for m in lines)
        summary = next(m for m in lines if m.startswith(f"reorg {r.id} done: fork point {expected['ancestor']}"))
        assert "rows archived" in summary
        output = next(e.dagster_event.event_specific_data for e in events
                      if e.dagster_event is not None and e.dagster_event.is_successful_output)
        meta = {k: v.value for k, v in output.metadata.items()}
        assert meta["depth"] == 3 and meta["phase"] == "done"
        assert meta["rows_archived/logs"] > 0 and meta["rows_archived"] >= meta["rows_archived/logs"]
        assert {"seconds/rolling_back", "seconds/restoring"} <= set(meta)
    assert_views_equal_node(cfg, node)
