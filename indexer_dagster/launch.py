"""Run the historical-sync job from the command line, through Dagster, on the configured instance.

The CLI registers the range partitions, then executes batches of ranges as real Dagster runs
(recorded in $DAGSTER_HOME, visible in the UI) in `workers` parallel processes, and streams their
progress back to one progress bar.
"""

import contextlib
import multiprocessing as mp
import os
import queue
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from indexer_dagster.assets.historical import RANGES_PER_RUN
from indexer_dagster.assets.partitions import block_ranges
from indexer_dagster.config import CHAIN_ENV_VAR, CONFIG_ENV_VAR, IndexerConfig, load_config
from indexer_dagster.partitions import BlockRange, ranges_between


DEFAULT_INSTANCE_YAML = Path(__file__).resolve().parents[1] / "deploy" / "dagster.yaml"


@dataclass
class BatchOutcome:
    first: str
    last: str
    run_id: str
    success: bool
    error: str = ""


def ensure_dagster_home(default: Path) -> Path:
    """Use $DAGSTER_HOME, else a persistent folder beside the data (never Dagster's temporary instance)."""
    home = os.environ.get("DAGSTER_HOME")
    path = Path(home) if home else default
    path.mkdir(parents=True, exist_ok=True)
    settings = path / "dagster.yaml"
    if not settings.exists():
        # SQLite storage in this folder, singleton live/reorg runs (see deploy/ for Postgres).
        settings.write_text(DEFAULT_INSTANCE_YAML.read_text())
    os.environ["DAGSTER_HOME"] = str(path.resolve())
    return path


def register_ranges(instance: dg.DagsterInstance, cfg: IndexerConfig, last_block: int) -> list[str]:
    """Add every range key from the config's start block up to `last_block`, in ascending order."""
    parts = block_ranges(cfg.chain.name)
    keys = [r.key for r in ranges_between(cfg.start_block, last_block, cfg.chain.blocks_per_partition)]
    known = set(instance.get_dynamic_partitions(parts.name))
    missing = [k for k in keys if k not in known]
    if missing:
        instance.add_dynamic_partitions(parts.name, missing)
    return keys


def plan_batches(ranges: list[BlockRange], per_run: int = RANGES_PER_RUN) -> list[list[BlockRange]]:
    return [ranges[i : i + per_run] for i in range(0, len(ranges), per_run)]


def _worker_init(q, config_path: str, chain: str, dagster_home: str) -> None:
    os.environ[CONFIG_ENV_VAR] = config_path
    os.environ[CHAIN_ENV_VAR] = chain
    os.environ["DAGSTER_HOME"] = dagster_home
    from indexer_dagster.sync.historical import set_progress_reporter

    set_progress_reporter(lambda b, n: q.put((b, n)))


def run_batch(first: str, last: str, instance: dg.DagsterInstance | None = None,
              chain: str | None = None) -> BatchOutcome:
    """Execute one run of the historical job over the ranges first..last (in this or a worker process)."""
    from indexer_dagster.definitions import build_definitions, historical_job_name

    cfg = load_config(os.environ[CONFIG_ENV_VAR], chain)
    job = build_definitions(cfg).resolve_job_def(historical_job_name(cfg.chain.name))
    with contextlib.nullcontext(instance) if instance else dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(
            instance=instance,
            tags={
                ASSET_PARTITION_RANGE_START_TAG: first,
                ASSET_PARTITION_RANGE_END_TAG: last,
                "indexer/role": "historical",
                "indexer/launched_by": "cli",
            },
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
            raise_on_error=False,
        )
    error = ""
    if not result.success:
        failures = [e for e in result.all_events if e.is_step_failure or e.is_run_failure]
        for ev in failures:
            data = ev.event_specific_data
            err = getattr(data, "error", None)
            if err is not None:
                error = (err.cause.message if err.cause else err.message).strip()
                break
        error = error or "the run failed; see its logs in the Dagster UI"
    return BatchOutcome(first, last, result.run_id, result.success, error)


def run_backfill(
    instance: dg.DagsterInstance,
    cfg: IndexerConfig,
    config_path: Path,
    ranges: list[BlockRange],
    workers: int,
    on_progress: Callable[[int, int], None],
    on_batch: Callable[[BatchOutcome], None],
) -> list[BatchOutcome]:
    """Execute all `ranges` as Dagster runs with `workers` processes; returns one outcome per run."""
    batches = plan_batches(ranges)
    if workers <= 1:
        # One worker: run in this process (no process start, no second import of Dagster).
        from indexer_dagster.sync.historical import set_progress_reporter

        os.environ[CONFIG_ENV_VAR] = str(config_path.resolve())
        set_progress_reporter(on_progress)
        try:
            outcomes = [run_batch(b[0].key, b[-1].key, instance, cfg.chain.name) for b in batches]
        finally:
            set_progress_reporter(None)
        for o in outcomes:
            on_batch(o)
        return outcomes
    ctx = mp.get_context("spawn")
    q = ctx.Manager().Queue()
    outcomes: list[BatchOutcome] = []
    with ProcessPoolExecutor(
        max_workers=max(1, workers),
        mp_context=ctx,
        initializer=_worker_init,
        initargs=(q, str(config_path.resolve()), cfg.chain.name, os.environ["DAGSTER_HOME"]),
    ) as pool:
        pending = {pool.submit(run_batch, b[0].key, b[-1].key) for b in batches}
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(q, on_progress)
            for f in done:
                outcome = f.result()
                outcomes.append(outcome)
                on_batch(outcome)
        _drain(q, on_progress)
    return outcomes


def _drain(q, on_progress: Callable[[int, int], None]) -> None:
    while True:
        try:
            b, n = q.get_nowait()
        except queue.Empty:
            return
        on_progress(b, n)
