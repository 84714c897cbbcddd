"""Dagster instance profiles: the Postgres profile is a working production instance (chosen by the CLI,
credentials from the environment, queue/pool/retry settings in force), mistakes stop with a clear message,
and the example Helm values have the chart's structure and a run-queue/pool setup Dagster accepts."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from indexer_dagster.launch import PROFILES, ProfileError, ensure_dagster_home, profile_of
from tests.conftest import cli_env
from tests.support.pg_instance import dagster_pg_env, database_for_test, fresh_database

REPO = Path(__file__).resolve().parents[2]
INDEXER = [sys.executable, "-m", "indexer_dagster.cli"]
PG_YAML = REPO / "deploy" / "dagster-postgres.yaml"
HELM_VALUES = REPO / "deploy" / "helm" / "values.yaml"


@pytest.fixture
def pg_db():
    yield from database_for_test("test the Postgres instance profile")


def test_profile_files_and_detection():
    assert set(PROFILES) == {"sqlite", "postgres"} and all(p.is_file() for p in PROFILES.values())
    assert profile_of(PROFILES["sqlite"].read_text()) == "sqlite"
    assert profile_of(PG_YAML.read_text()) == "postgres"
    doc = yaml.safe_load(PG_YAML.read_text())
    db = doc["storage"]["postgres"]["postgres_db"]
    # Credentials only from the environment; the psycopg2 scheme SQLAlchemy 2.1 needs.
    assert {k: v for k, v in db.items() if k != "scheme"} == {
        "hostname": {"env": "DAGSTER_PG_HOST"}, "port": {"env": "DAGSTER_PG_PORT"}, "db_name": {"env": "DAGSTER_PG_DB"},
        "username": {"env": "DAGSTER_PG_USER"}, "password": {"env": "DAGSTER_PG_PASSWORD"},
    }
    assert db["scheme"] == "postgresql+psycopg2"


def test_unreachable_postgres_is_an_error_not_a_skip():
    """What the fixtures do when $INDEXER_TEST_POSTGRES_URL names a server that is down: fail."""
    with pytest.raises(RuntimeError, match="unreachable"):
        with fresh_database("postgresql://postgres@127.0.0.1:1/test"):
            pass


def test_profile_mistakes_are_clear(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    for v in ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_DB", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(ProfileError, match="unknown Dagster instance profile 'mysql'"):
        ensure_dagster_home(tmp_path / "x", "mysql")
    with pytest.raises(ProfileError, match="set DAGSTER_PG_HOST, DAGSTER_PG_PORT, DAGSTER_PG_DB"):
        ensure_dagster_home(tmp_path / "x", "postgres")
    assert (home / "dagster.yaml").read_text() == PG_YAML.read_text()  # written, then refused: nothing ran
    other = tmp_path / "other"
    monkeypatch.setenv("DAGSTER_HOME", str(other))
    ensure_dagster_home(tmp_path / "x")  # default: sqlite
    assert profile_of((other / "dagster.yaml").read_text()) == "sqlite"
    with pytest.raises(ProfileError, match="is a sqlite instance but the postgres profile was asked for"):
        ensure_dagster_home(tmp_path / "x", "postgres")
    monkeypatch.setenv("INDEXER_DAGSTER_PROFILE", "postgres")
    with pytest.raises(ProfileError, match="is a sqlite instance"):
        ensure_dagster_home(tmp_path / "x")


@pytest.mark.slow
def test_cli_backfill_on_the_postgres_profile(devnet, make_config, pg_db, tmp_path):
    """`indexer backfill --instance postgres` into an empty DAGSTER_HOME: runs recorded in Postgres under
    the profile's settings (queue limits, pools, run retries), the RPC pool capped at its default."""
    path = make_config(blocks_per_partition=5)
    home = tmp_path / "pg_home"
    env = {**cli_env(path, home), **dagster_pg_env(pg_db)}
    env.pop("INDEXER_DAGSTER_PROFILE", None)
    proc = subprocess.run([*INDEXER, "backfill", "--config", str(path), "--workers", "2", "--instance", "postgres"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (home / "dagster.yaml").read_text() == PG_YAML.read_text()
    assert not any(home.glob("**/*.db"))  # no SQLite storage beside it
    saved = {k: os.environ.get(k) for k in [*dagster_pg_env(pg_db), "DAGSTER_HOME"]}
    os.environ.update({**dagster_pg_env(pg_db), "DAGSTER_HOME": str(home)})
    try:
        with dg.DagsterInstance.get() as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
            assert instance.run_retries_enabled and instance.run_monitoring_enabled
            limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits
            assert {"key": "indexer/singleton", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in limits
            runs = instance.get_runs()
            # 60+ blocks in 5-block ranges, 8 ranges per run: several runs, all successful, in Postgres.
            assert len(runs) >= 2 and {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}
            # The historical steps claimed slots of pool rpc_devnet, which took the profile's default limit.
            info = instance.event_log_storage.get_concurrency_info("rpc_devnet")
            assert info.slot_count == 4 and info.claimed_slots == []
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- the Helm chart values --------------------------------------------------------------------------------

# Keys of the official chart's values (dagster-io/dagster helm/dagster, schema of the 1.x charts) that this
# file uses, by section; a typo or a key of another chart version shows up here.
CHART_KEYS = {
    "": {"global", "generatePostgresqlPasswordSecret", "postgresql", "dagster-user-deployments", "runLauncher",
         "dagsterDaemon", "concurrency", "telemetry", "dagsterWebserver", "computeLogManager", "ingress",
         "serviceAccount", "imagePullSecrets", "pythonLogs", "retention", "scheduler", "migrate",
         "additionalInstanceConfig"},
    "global": {"postgresqlSecretName", "dagsterHome", "serviceAccountName", "celeryConfigSecretName"},
    "postgresql": {"enabled", "postgresqlHost", "postgresqlUsername", "postgresqlPassword", "postgresqlDatabase",
                   "postgresqlScheme", "postgresqlParams", "service", "image"},
    "dagster-user-deployments": {"enabled", "enableSubchart", "deployments", "imagePullSecrets"},
    "deployment": {"name", "image", "port", "dagsterApiGrpcArgs", "codeServerArgs", "includeConfigInLaunchedRuns",
                   "env", "envConfigMaps", "envSecrets", "annotations", "nodeSelector", "affinity", "tolerations",
                   "podSecurityContext", "securityContext", "resources", "livenessProbe", "readinessProbe",
                   "startupProbe", "labels", "volumeMounts", "volumes", "schedulerName"},
    "runLauncher": {"type", "config"},
    "k8sRunLauncher": {"image", "imagePullPolicy", "jobNamespace", "loadInclusterConfig", "kubeconfigFile",
                       "envConfigMaps", "envSecrets", "envVars", "volumeMounts", "volumes", "labels",
                       "failPodOnRunFailure", "resources", "schedulerName", "securityContext", "runK8sConfig"},
    "runK8sConfig": {"containerConfig", "podSpecConfig", "podTemplateSpecMetadata", "jobSpecConfig", "jobMetadata"},
    "dagsterDaemon": {"enabled", "image", "runCoordinator", "heartbeatTolerance", "env", "envConfigMaps",
                      "envSecrets", "runMonitoring", "runRetries", "sensors", "schedules", "backfills", "resources",
                      "annotations", "nodeSelector", "affinity", "tolerations", "labels", "deploymentLabels"},
    "runCoordinator": {"enabled", "type", "config"},
    "queuedRunCoordinator": {"maxConcurrentRuns", "tagConcurrencyLimits", "dequeueIntervalSeconds",
                             "dequeueNumWorkers", "dequeueUseThreads", "blockOpConcurrencyLimitedRuns"},
    "runMonitoring": {"enabled", "startTimeoutSeconds", "cancelTimeoutSeconds", "maxResumeRunAttempts",
                      "pollIntervalSeconds", "freeSlotsAfterRunEndSeconds"},
    "runRetries": {"enabled", "maxRetries", "retryOnAssetOrOpFailure"},
    "concurrency": {"enabled", "pools", "runs"},
    "pools": {"defaultLimit", "granularity", "opGranularityRunBuffer"},
    "runs": {"maxConcurrentRuns", "tagConcurrencyLimits"},
}


def _keys_ok(section: str, mapping: dict) -> None:
    unknown = set(mapping) - CHART_KEYS[section]
    assert not unknown, f"{section or 'top level'}: keys the chart does not have: {sorted(unknown)}"


def test_helm_values_have_the_charts_structure():
    v = yaml.safe_load(HELM_VALUES.read_text())
    _keys_ok("", v)
    _keys_ok("global", v["global"])
    pg = v["postgresql"]
    _keys_ok("postgresql", pg)
    assert pg["enabled"] is False and pg["postgresqlHost"] and pg["postgresqlScheme"] == "postgresql+psycopg2"
    assert v["generatePostgresqlPasswordSecret"] is False and v["global"]["postgresqlSecretName"]
    ud = v["dagster-user-deployments"]
    _keys_ok("dagster-user-deployments", ud)
    assert ud["enabled"] and ud["enableSubchart"] and len(ud["deployments"]) == 1
    dep = ud["deployments"][0]
    _keys_ok("deployment", dep)
    assert dep["dagsterApiGrpcArgs"] == ["--module-name", "indexer_dagster.definitions"]
    assert dep["includeConfigInLaunchedRuns"] == {"enabled": True} and dep["env"]["INDEXER_CONFIG"]
    mounts = {m["name"]: m["mountPath"] for m in dep["volumeMounts"]}
    vols = {x["name"]: x for x in dep["volumes"]}
    assert set(mounts) == set(vols) and "persistentVolumeClaim" in vols["lake"]  # the lake on shared storage
    assert Path(dep["env"]["INDEXER_CONFIG"]).parent == Path(mounts["indexer-config"])
    rl = v["runLauncher"]
    _keys_ok("runLauncher", rl)
    assert rl["type"] == "K8sRunLauncher" and set(rl["config"]) == {"k8sRunLauncher"}
    k8s = rl["config"]["k8sRunLauncher"]
    _keys_ok("k8sRunLauncher", k8s)
    _keys_ok("runK8sConfig", k8s["runK8sConfig"])
    assert {"imagePullPolicy", "loadInclusterConfig", "envConfigMaps", "envSecrets", "envVars", "volumeMounts",
            "volumes"} <= set(k8s)  # required by the chart's schema
    d = v["dagsterDaemon"]
    _keys_ok("dagsterDaemon", d)
    _keys_ok("runCoordinator", d["runCoordinator"])
    assert d["runCoordinator"]["type"] == "QueuedRunCoordinator"
    _keys_ok("queuedRunCoordinator", d["runCoordinator"]["config"]["queuedRunCoordinator"])
    _keys_ok("runMonitoring", d["runMonitoring"])
    _keys_ok("runRetries", d["runRetries"])
    c = v["concurrency"]
    _keys_ok("concurrency", c)
    _keys_ok("pools", c["pools"])
    _keys_ok("runs", c["runs"])


def _instance_yaml_from_values(v: dict, tag_limits_in_coordinator: bool = False) -> dict:
    """The parts of dagster.yaml the chart renders from these values (its configmap-instance template)."""
    d, c = v["dagsterDaemon"], v["concurrency"]
    snake = {"dequeueUseThreads": "dequeue_use_threads", "dequeueNumWorkers": "dequeue_num_workers",
             "maxConcurrentRuns": "max_concurrent_runs", "tagConcurrencyLimits": "tag_concurrency_limits"}
    rc_config = {snake[k]: x for k, x in d["runCoordinator"]["config"]["queuedRunCoordinator"].items()}
    if tag_limits_in_coordinator:
        rc_config["tag_concurrency_limits"] = c["runs"]["tagConcurrencyLimits"]
    rm = d["runMonitoring"]
    return {
        "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "QueuedRunCoordinator",
                            "config": rc_config},
        "concurrency": {
            "runs": {"max_concurrent_runs": c["runs"]["maxConcurrentRuns"],
                     "tag_concurrency_limits": c["runs"]["tagConcurrencyLimits"]},
            "pools": {"default_limit": c["pools"]["defaultLimit"], "granularity": c["pools"]["granularity"]},
        },
        "run_monitoring": {"enabled": rm["enabled"], "start_timeout_seconds": rm["startTimeoutSeconds"],
                           "max_resume_run_attempts": rm["maxResumeRunAttempts"],
                           "poll_interval_seconds": rm["pollIntervalSeconds"],
                           "free_slots_after_run_end_seconds": rm["freeSlotsAfterRunEndSeconds"]},
        "run_retries": {"enabled": d["runRetries"]["enabled"], "max_retries": d["runRetries"]["maxRetries"],
                        "retry_on_asset_or_op_failure": d["runRetries"]["retryOnAssetOrOpFailure"]},
        "telemetry": {"enabled": False},
    }


def test_helm_concurrency_is_accepted_by_dagster_and_matches_the_profile(tmp_path):
    from dagster._config import validate_config
    from dagster._core.errors import DagsterInvalidConfigError
    from dagster._core.instance.config import dagster_instance_config
    from dagster._core.run_coordinator import QueuedRunCoordinator

    v = yaml.safe_load(HELM_VALUES.read_text())
    rendered = _instance_yaml_from_values(v)
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(rendered))
    config, _ = dagster_instance_config(str(tmp_path))  # raises on a schema or concurrency conflict
    assert validate_config(QueuedRunCoordinator.config_type(), rendered["run_coordinator"]["config"]).success
    # Why the limits sit under `concurrency`: Dagster refuses them in the run coordinator next to pools.
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(_instance_yaml_from_values(v, True)))
    with pytest.raises(DagsterInvalidConfigError, match="incompatible with the `concurrency > runs` config"):
        dagster_instance_config(str(tmp_path))
    # The cluster runs under the same limits as deploy/dagster-postgres.yaml.
    profile = yaml.safe_load(PG_YAML.read_text())
    for key in ("concurrency", "run_retries"):
        assert config[key] == profile[key], key
    assert config["run_monitoring"]["free_slots_after_run_end_seconds"] == \
        profile["run_monitoring"]["free_slots_after_run_end_seconds"]


def test_rpc_pool_is_created_before_parallel_runs_and_a_hand_set_limit_is_kept(pg_db, tmp_path, monkeypatch):
    """Two runs creating a pool at once on Postgres collide (found by bench/backfill.py --workers 4):
    `indexer backfill` creates it first, at the profile's default, and never overrides a limit set by hand."""
    from indexer_dagster.launch import ensure_rpc_pool

    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(PG_YAML.read_text())
    for k, v in dagster_pg_env(pg_db).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        storage = instance.event_log_storage
        ensure_rpc_pool(instance, "mainnet")
        assert storage.get_concurrency_info("rpc_mainnet").slot_count == 4
        storage.set_concurrency_slots("rpc_base", 7)
        ensure_rpc_pool(instance, "base")
        ensure_rpc_pool(instance, "mainnet")
        assert storage.get_concurrency_info("rpc_base").slot_count == 7
        assert storage.get_concurrency_info("rpc_mainnet").slot_count == 4
