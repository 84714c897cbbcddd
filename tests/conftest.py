"""Shared fixtures: a real anvil chain with real Uniswap V2 traffic, and configs pointing at it."""

import os
import shutil
from pathlib import Path

import pytest

from indexer_dagster.config import load_config
from indexer_dagster.devnet import Anvil, build_devnet, write_config
from tests.support.webhook import Receiver

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def devnet():
    """anvil with the Uniswap V2 factory, tokens, pairs and ~60 blocks of swaps/mints/burns/transfers."""
    node = Anvil(chain_id=31337).start()
    try:
        deployment = build_devnet(node, blocks=60, txs_per_block=15, seed=7)
        yield node, deployment
    finally:
        node.stop()


@pytest.fixture
def make_config(devnet, tmp_path):
    """Write a config for the devnet into a fresh folder; keyword arguments go to write_config."""
    node, deployment = devnet

    def make(**overrides) -> Path:
        kw = {"blocks_per_partition": 25, "confirmations": 5}
        kw.update(overrides)
        path = write_config(tmp_path / "indexer.yaml", node.url, 31337, deployment, "data", **kw)
        return path

    return make


@pytest.fixture(params=["sqlite", "postgres"])
def instance_profile(request):
    """The Dagster instance profile a test runs on: deploy/dagster.yaml or deploy/dagster-postgres.yaml."""
    return request.param


@pytest.fixture
def dagster_home(instance_profile, tmp_path, monkeypatch):
    """A fresh $DAGSTER_HOME with the profile's dagster.yaml. `postgres`: a database of its own on the
    server of $INDEXER_TEST_POSTGRES_URL (skipped when unset, failed when set but unreachable)."""
    from tests.support.pg_instance import dagster_pg_env, database_for_test

    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("INDEXER_DAGSTER_PROFILE", raising=False)
    if instance_profile == "sqlite":
        shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
        yield home
        return
    for db in database_for_test("run the Postgres instance profile (postgresql://user@host:5432/db)"):
        shutil.copy(REPO / "deploy" / "dagster-postgres.yaml", home / "dagster.yaml")
        for k, v in dagster_pg_env(db).items():
            monkeypatch.setenv(k, v)
        yield home


def cfg_of(path: Path):
    return load_config(path)


def cli_env(config_path: Path, dagster_home: Path) -> dict:
    env = dict(os.environ)
    env["INDEXER_CONFIG"] = str(config_path)
    env["DAGSTER_HOME"] = str(dagster_home)
    return env


@pytest.fixture
def receiver():
    """A webhook receiver on a local port (`.url`, `.alerts`, `.kinds()`)."""
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()
