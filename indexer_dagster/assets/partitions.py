"""One dynamic partitions definition of block ranges per chain (keys from `indexer_dagster.partitions`)."""

import dagster as dg


def block_ranges(chain: str) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=f"{chain}_block_ranges")
