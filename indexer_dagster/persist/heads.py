"""The chain head each chain was last seen at, which decides `status` (confirmed / unconfirmed).

Status is not stored in the data files: a row is `confirmed` when its block is at or below
`confirmed_through = head - confirmations` of its chain. Moving the head is one tiny atomic file
write, so finality advances without rewriting any data (the seed's periodic confirm task).
"""

import time

import polars as pl

from indexer_dagster.persist.datasets import HEAD, HEAD_SCHEMA, META
from indexer_dagster.persist.files import LakePath, read_parquet
from indexer_dagster.persist.lake import Lake


def head_path(lake: Lake) -> LakePath:
    return lake.path(META, HEAD)


def read_head(lake: Lake) -> dict | None:
    p = head_path(lake)
    if not p.is_file():
        return None
    rows = read_parquet(p).to_dicts()
    return rows[0] if rows else None


def record_head(
    lake: Lake, chain_id: int, head_number: int, head_hash: str, confirmations: int, force: bool = False
) -> dict:
    """Store the head unless a newer one is already stored (concurrent runs may race; `force` after a
    reorg to a shorter fork); returns the stored head."""
    p = head_path(lake)
    with lake.lock(p):
        current = read_head(lake)
        if not force and current is not None and current["head_number"] > head_number:
            return current
        row = {
            "chain_id": chain_id,
            "chain": lake.chain,
            "head_number": head_number,
            "head_hash": head_hash,
            "confirmations": confirmations,
            "confirmed_through": head_number - confirmations,
            "observed_at": int(time.time() * 1_000_000),
        }
        df = pl.DataFrame([row], schema={**HEAD_SCHEMA, "observed_at": pl.Int64}).with_columns(
            pl.col("observed_at").cast(pl.Datetime("us", "UTC"))
        )
        lake.write(META, HEAD, df)
        return row
