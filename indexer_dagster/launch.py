"""Run the historical-sync job from the command line, through Dagster, on the configured instance.

The CLI registers the range partitions, then executes batches of ranges as real Dagster runs
(recorded in $DAGSTER_HOME, visible in the UI) in `workers` parallel processes, and streams their
progress back to one progress bar.
"""

import contextlib
import math
import multiprocessing as mp
import os
import queue
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from indexer_dagster.assets.ranges import RANGES_PER_RUN, block_ranges
from indexer_dagster.block_range import BlockRange, ranges_between
from indexer_dagster.config import CHAIN_ENV_VAR, CONFIG_ENV_VAR, IndexerConfig, load_config
from indexer_dagster.jobs.names import historical_job_name

DEPLOY_DIR = Path(__file__).resolve().parents[1] / "deploy"
DEFAULT_INSTANCE_YAML = DEPLOY_DIR / "dagster.yaml"
# Instance profiles: `sqlite` (a laptop, the default) and `postgres` (production; credentials from
# DAGSTER_PG_* variables). Chosen by `--instance` or $INDEXER_DAGSTER_PROFILE.
PROFILE_ENV_VAR = "INDEXER_DAGSTER_PROFILE"
PROFILES = {"sqlite": DEFAULT_INSTANCE_YAML, "postgres": DEPLOY_DIR / "dagster-postgres.yaml"}
POSTGRES_ENV_VARS = ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_DB", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD")


class ProfileError(ValueError):
    """The requested instance profile cannot be used; the message says how to fix it."""


def profile_of(settings_text: str) -> str:
    """`postgres` if a dagster.yaml keeps its storage in PostgreSQL, else `sqlite`."""
    import yaml

    doc = yaml.safe_load(settings_text) or {}
    storage = doc.get("storage") or {}
    pg = "postgres" in storage or any("postgres" in str((doc.get(k) or {}).get("module", ""))
                                      for k in ("run_storage", "event_log_storage", "schedule_storage"))
    return "postgres" if pg else "sqlite"


@dataclass
class BatchOutcome:
    first: str
    last: str
    run_id: str
    success: bool
    error: str = ""


def ensure_dagster_home(default: Path, profile: str | None = None) -> Path:
    """Use $DAGSTER_HOME, else a persistent folder beside the data (never Dagster's temporary instance).

    A home without dagster.yaml gets the profile's settings (`profile`, else $INDEXER_DAGSTER_PROFILE,
    else sqlite). An explicitly chosen profile that contradicts an existing dagster.yaml is an error
    rather than a silent switch of the instance runs are recorded in.
    """
    explicit = profile or os.environ.get(PROFILE_ENV_VAR) or None
    name = explicit or "sqlite"
    if name not in PROFILES:
        raise ProfileError(f"unknown Dagster instance profile {name!r}; use one of {', '.join(PROFILES)}")
    home = os.environ.get("DAGSTER_HOME")
    path = Path(home) if home else default
    path.mkdir(parents=True, exist_ok=True)
    settings = path / "dagster.yaml"
    if not settings.exists():
        # sqlite: storage in this folder; postgres: storage in the DAGSTER_PG_* database. Both keep the
        # singleton live/reorg runs, run retries and monitoring.
        settings.write_text(PROFILES[name].read_text())
    elif explicit and profile_of(settings.read_text()) != name:
        raise ProfileError(
            f"{settings} is a {profile_of(settings.read_text())} instance but the {name} profile was asked for; "
            f"point DAGSTER_HOME at another folder, or remove that dagster.yaml to recreate it"
        )
    if profile_of(settings.read_text()) == "postgres":
        missing = [v for v in POSTGRES_ENV_VARS if v not in os.environ]
        if missing:
            raise ProfileError(
                f"the Postgres Dagster instance in {settings} reads its credentials from the environment; "
                f"set {', '.join(missing)} (DAGSTER_PG_PASSWORD may be empty with trust auth)"
            )
    os.environ["DAGSTER_HOME"] = str(path.resolve())
    return path


def open_instance() -> dg.DagsterInstance:
    """The $DAGSTER_HOME instance, its storages created under a lock in that folder: two processes
    creating a fresh instance at once (two backfills started together) would both stamp its schema
    versions ("alembic_version has more than one head") and then fail on every later open."""
    from filelock import FileLock

    with FileLock(str(Path(os.environ["DAGSTER_HOME"]) / ".indexer-instance.lock")):
        instance = dg.DagsterInstance.get()
        instance.get_runs(limit=1)  # run storage (and dynamic partitions)
        instance.event_log_storage.get_event_records(
            dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_MATERIALIZATION), limit=1)
        instance.all_instigator_state()  # schedule storage
    return instance


def failed_partitions_of(home: Path) -> Callable[[IndexerConfig], list[str]]:
    """For `indexer status`: the range keys whose last historical run failed, from the instance in `home`."""
    from indexer_dagster.sensors.freshness import failed_partitions

    instance = dg.DagsterInstance.from_config(str(home))
    return lambda cfg: failed_partitions(instance, cfg)


def register_ranges(instance: dg.DagsterInstance, cfg: IndexerConfig, last_block: int) -> list[str]:
    """Add every range key from the config's start block up to `last_block`, in ascending order."""
    parts = block_ranges(cfg.chain.name)
    assert parts.name is not None  # block_ranges names its partitions
    keys = [r.key for r in ranges_between(cfg.start_block, last_block, cfg.chain.blocks_per_partition)]
    from sqlalchemy.exc import IntegrityError

    for attempt in range(5):
        known = set(instance.get_dynamic_partitions(parts.name))
        missing = [k for k in keys if k not in known]
        if not missing:
            break
        try:
            instance.add_dynamic_partitions(parts.name, missing)
            break
        except IntegrityError:
            # Another backfill (or the sensor) added some of these keys meanwhile: read them again.
            if attempt == 4:
                raise
    return keys


def rpc_pool(chain: str) -> str:
    """The concurrency pool of the chain's historical asset (`pool=` in assets/ranges.py)."""
    return f"rpc_{chain}"


def ensure_rpc_pool(instance: dg.DagsterInstance, chain: str) -> None:
    """Create the chain's RPC pool at the instance's default limit before parallel runs claim it.

    Dagster creates a pool on its first claim; on PostgreSQL two runs doing that at once collide (the
    loser's transaction is aborted by the unique-key error and the run fails). The daemon creates pools
    before it dequeues runs; `indexer backfill` does it here, once, before its workers start. A limit
    set by hand (`dagster instance concurrency set`) is left alone.
    """
    storage = instance.event_log_storage
    default = instance.global_op_concurrency_default_limit
    if default is None or not storage.supports_global_concurrency_limits:
        return
    info = {p.name: p for p in storage.get_pool_limits()}.get(rpc_pool(chain))
    if info is None or (info.from_default and info.limit != default):
        storage.initialize_concurrency_limit_to_default(rpc_pool(chain))


def plan_batches(ranges: list[BlockRange], workers: int = 1, per_run: int = RANGES_PER_RUN) -> list[list[BlockRange]]:
    """Consecutive ranges per Dagster run, balanced: at most `per_run` in a run, and a run for every worker
    that gets two ranges or more (workers execute runs in parallel, each in a process of its own that imports
    Dagster again; with fewer ranges, one run in this process is faster: a chain's last range, at its tip,
    is often a fraction of the others, so a worker of its own would mostly wait)."""
    if not ranges:
        return []
    runs = max(math.ceil(len(ranges) / per_run), min(workers, len(ranges) // 2))
    size = math.ceil(len(ranges) / runs)
    return [ranges[i : i + size] for i in range(0, len(ranges), size)]


def _worker_init(q, config_path: str, chain: str, dagster_home: str) -> None:
    os.environ[CONFIG_ENV_VAR] = config_path
    os.environ[CHAIN_ENV_VAR] = chain
    os.environ["DAGSTER_HOME"] = dagster_home
    from indexer_dagster.sync.historical import set_progress_reporter

    set_progress_reporter(lambda b, n: q.put((b, n)))


def run_batch(first: str, last: str, instance: dg.DagsterInstance | None = None,
              chain: str | None = None, backfill_id: str | None = None) -> BatchOutcome:
    """Execute one run of the historical job over the ranges first..last (in this or a worker process),
    as a run of the Dagster backfill `backfill_id`; not started if that backfill was canceled in the UI."""
    from indexer_dagster.definitions import build_definitions
    from indexer_dagster.jobs.backfills import BACKFILL_ID_TAG, is_stopped

    cfg = load_config(os.environ[CONFIG_ENV_VAR], chain)
    job = build_definitions(cfg).resolve_job_def(historical_job_name(cfg.chain.name))
    with contextlib.nullcontext(instance) if instance else dg.DagsterInstance.get() as instance:
        if backfill_id and is_stopped(instance, backfill_id):
            return BatchOutcome(first, last, "", False, f"not run: backfill {backfill_id} was canceled in Dagster")
        result = job.execute_in_process(
            instance=instance,
            tags={
                ASSET_PARTITION_RANGE_START_TAG: first,
                ASSET_PARTITION_RANGE_END_TAG: last,
                "indexer/role": "historical",
                "indexer/launched_by": "cli",
                **({BACKFILL_ID_TAG: backfill_id} if backfill_id else {}),
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
    on_backfill: Callable[[str], None] = lambda backfill_id: None,
) -> list[BatchOutcome]:
    """Execute all `ranges` as Dagster runs with `workers` processes, recorded as one Dagster backfill
    (`jobs.backfills`: the UI's Backfills tab lists it, its id goes to `on_backfill`); returns one outcome
    per run."""
    from indexer_dagster.jobs.backfills import close_abandoned

    ensure_rpc_pool(instance, cfg.chain.name)
    close_abandoned(instance, cfg.state_url)  # a CLI backfill killed earlier would otherwise stay "in progress"
    batches = plan_batches(ranges, workers)
    keys_of = {b[0].key: [r.key for r in b] for b in batches}
    backfill = start_cli_backfill(instance, cfg, [r.key for r in ranges])
    on_backfill(backfill.backfill_id)
    outcomes: list[BatchOutcome] = []

    def ended(outcome: BatchOutcome) -> None:
        backfill.record(keys_of[outcome.first], outcome.success)
        outcomes.append(outcome)
        on_batch(outcome)

    try:
        _run_batches(instance, cfg, config_path, batches, workers, backfill.backfill_id, on_progress, ended)
    finally:
        backfill.finish()
    return outcomes


def start_cli_backfill(instance: dg.DagsterInstance, cfg: IndexerConfig, range_keys: list[str]):
    """The Dagster backfill record of a CLI backfill over `range_keys` of the chain's historical assets."""
    from indexer_dagster.assets.ranges import historical_asset_keys
    from indexer_dagster.definitions import build_definitions
    from indexer_dagster.jobs.backfills import CliBackfill

    graph = build_definitions(cfg).resolve_asset_graph()
    title = f"indexer backfill {cfg.chain.name} {range_keys[0]}..{range_keys[-1]}"
    return CliBackfill(instance, graph, historical_asset_keys(cfg), range_keys, title)


def _run_batches(instance: dg.DagsterInstance, cfg: IndexerConfig, config_path: Path, batches: list[list[BlockRange]],
                 workers: int, backfill_id: str, on_progress: Callable[[int, int], None],
                 on_batch: Callable[[BatchOutcome], None]) -> None:
    if workers <= 1 or len(batches) <= 1:
        # One worker, or one run: in this process (no process start, no second import of Dagster).
        from indexer_dagster.sync.historical import set_progress_reporter

        os.environ[CONFIG_ENV_VAR] = str(config_path.resolve())
        set_progress_reporter(on_progress)
        try:
            for b in batches:
                on_batch(run_batch(b[0].key, b[-1].key, instance, cfg.chain.name, backfill_id))
        finally:
            set_progress_reporter(None)
        return
    ctx = mp.get_context("spawn")
    q = ctx.Manager().Queue()
    with ProcessPoolExecutor(
        max_workers=min(workers, len(batches)),
        mp_context=ctx,
        initializer=_worker_init,
        initargs=(q, str(config_path.resolve()), cfg.chain.name, os.environ["DAGSTER_HOME"]),
    ) as pool:
        pending = {pool.submit(run_batch, b[0].key, b[-1].key, None, None, backfill_id) for b in batches}
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(q, on_progress)
            for f in done:
                on_batch(f.result())
        _drain(q, on_progress)


def _drain(q, on_progress: Callable[[int, int], None]) -> None:
    while True:
        try:
            b, n = q.get_nowait()
        except queue.Empty:
            return
        on_progress(b, n)
