"""Dagster resources: typed handles on the indexer's plain modules."""

from functools import cached_property

import dagster as dg

from indexer_dagster.config import CONFIG_ENV_VAR, IndexerConfig, load_config


class IndexerConfigResource(dg.ConfigurableResource):
    """The YAML config, read in the run's process from the path in $INDEXER_CONFIG."""

    config_path: str

    @cached_property
    def config(self) -> IndexerConfig:
        """The file's config (its first chain for a multi-chain file); definitions use `for_chain`."""
        return load_config(self.config_path)

    def for_chain(self, name: str) -> IndexerConfig:
        return self.config.for_chain(name)


def default_resources() -> dict:
    return {"indexer": IndexerConfigResource(config_path=dg.EnvVar(CONFIG_ENV_VAR))}
