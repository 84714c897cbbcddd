"""Dagster resources: typed handles on the indexer's services, built once per run.

`indexer` reads the YAML config; `state` opens the state store (SQLite or PostgreSQL) once per run, on
first use, and closes it when the run ends, so every step of a run shares one connection instead of
each function opening its own. The lake is a value built from the config (`persist.lake.open_lake`)
and RPC clients live inside one event loop each (`chain.rpc.rpc_client`), so neither is held here.
"""

from functools import cached_property

import dagster as dg
from pydantic import PrivateAttr

from indexer_dagster.config import CONFIG_ENV_VAR, IndexerConfig, load_config
from indexer_dagster.state import StateStore, open_state


class IndexerConfigResource(dg.ConfigurableResource):
    """The YAML config, read in the run's process from the path in $INDEXER_CONFIG."""

    config_path: str

    @cached_property
    def config(self) -> IndexerConfig:
        """The file's config (its first chain for a multi-chain file); definitions use `for_chain`."""
        return load_config(self.config_path)

    def for_chain(self, name: str) -> IndexerConfig:
        return self.config.for_chain(name)


class StateStoreResource(dg.ConfigurableResource):
    """The durable state store named by the config's `storage.state_url`, one per run or tick."""

    indexer: IndexerConfigResource
    _store: StateStore | None = PrivateAttr(default=None)

    @property
    def store(self) -> StateStore:
        """The run's store, opened on first use (a step that needs none opens nothing)."""
        if self._store is None:
            self._store = open_state(self.indexer.config.state_url)
        return self._store

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


def default_resources() -> dict:
    indexer = IndexerConfigResource(config_path=dg.EnvVar(CONFIG_ENV_VAR))
    return {"indexer": indexer, "state": StateStoreResource(indexer=indexer)}
