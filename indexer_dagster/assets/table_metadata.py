"""Dagster's standard table metadata for the indexer's tables, and asset descriptions that say where from.

With `dagster/column_schema`, `dagster/table_name` and `dagster/uri` on an asset the UI shows its
columns, the DuckDB view to query and where its Parquet files are, without the README; row counts go on
each materialization as `dagster/row_count` (assets/ranges.py, dex/assets.py).
"""

from pathlib import Path

import dagster as dg

from indexer_dagster.config import ContractConfig, IndexerConfig
from indexer_dagster.parse.abi import EventSpec
from indexer_dagster.persist import datasets as ds
from indexer_dagster.persist.catalog import number_columns, token_amount, view_columns
from indexer_dagster.persist.lake import open_lake

ROW_COUNT = "dagster/row_count"
STATUS_COLUMN = dg.TableColumn(
    "status", "VARCHAR",
    description="Added by the view: 'confirmed' (behind the confirmation depth, range checks passed) or 'unconfirmed'.",
)
BLOCK_COLUMNS = {"number": "Block number.", "hash": "Block hash.", "parent_hash": "The previous block's hash."}
KEY_COLUMNS = {
    "chain_id": "EIP-155 chain id.", "block_number": "Block of the log.", "block_hash": "Hash of that block.",
    "block_timestamp": "Block timestamp (UTC).", "transaction_hash": "Transaction that emitted the log.",
    "transaction_index": "Position of the transaction in its block.", "log_index": "Position of the log in its block.",
    "address": "The emitting contract (lower-case).",
}


def column_schema(dataset: str, schema: ds.Schema, descriptions: dict[str, str], big: list[str] | None = None,
                  with_status: bool = True, amount: str | None = None) -> dg.TableSchema:
    """The columns of the view over `dataset` (files of `schema`) with DuckDB types, as the catalog
    declares them (`persist.catalog.view_columns`)."""
    columns = [dg.TableColumn(name, _spelled(dtype), description=descriptions.get(name))
               for name, dtype in view_columns(dataset, schema, big, amount)]
    return dg.TableSchema(columns=[*columns, STATUS_COLUMN] if with_status else columns)


def event_columns(spec: EventSpec) -> dg.TableSchema:
    """A decoded event table's columns from its ABI: the key columns, then one per argument."""
    described = dict(KEY_COLUMNS)
    for p in spec.inputs:
        what = f"{spec.name} argument {p.name or p.column} ({p.type}{', indexed' if p.indexed else ''})"
        described[p.column] = what + (": exact base-10 text" if p.is_big_int else "")
        if p.f64_column:
            described[p.f64_column] = f"{p.name or p.column} as a double (rounded; for sorting and charts)"
        if p.is_big_int:
            described[f"{p.column}_num"] = f"{p.name or p.column} as an exact DECIMAL(38,0) (NULL from 10^38)"
    amount = token_amount(spec)
    if amount is not None:
        described[f"{amount}_h"] = (f"{amount} / 10^decimals of the token (the emitting contract), as the `tokens` "
                                    "table read them; NULL where unknown")
    return column_schema(ds.events(spec.table), ds.Schema(spec.schema()), described, number_columns(spec),
                         amount=amount)


def table_metadata(cfg: IndexerConfig, view: str, dataset: str, file: str | None = None) -> dict[str, str]:
    """The DuckDB view (`<catalog>.main.<view>`) and the Parquet location of one of the chain's datasets:
    its directory of range files, or one `file` of it (a DEX table)."""
    lake = open_lake(cfg)
    path = lake.dir(dataset) if file is None else lake.path(dataset, file)
    uri = str(path) if lake.remote else Path(str(path)).resolve().as_uri()
    return {"dagster/table_name": f"{Path(cfg.duckdb_path).stem}.main.{view}", "dagster/uri": uri}


def emitters(cfg: IndexerConfig, contract: ContractConfig) -> str:
    """Who emits a contract's events, for a description: its addresses, or the factory that creates them."""
    if contract.factory is not None:
        f = contract.factory
        return f"every contract created by {f.contract} (its {f.event} event's `{f.parameter}`)"
    shown = ", ".join(contract.addresses[:3]) + (f" and {len(contract.addresses) - 3} more"
                                                 if len(contract.addresses) > 3 else "")
    return f"{contract.name} at {shown}"


def chain_label(cfg: IndexerConfig) -> str:
    return f"{cfg.chain.name} (chain id {cfg.chain.chain_id})"


def _spelled(name: str) -> str:
    """A catalog type as DuckDB's DESCRIBE of the view spells it."""
    return "TIMESTAMP WITH TIME ZONE" if name == "TIMESTAMPTZ" else name
