"""Durable per-chain indexer state shared by several processes: local chain window, reorg ledger, cursors, writer lock.

One API (`state.store.StateStore`), two backends (`state.sqlite`, `state.postgres`):

* SQLite (local): one database file in WAL mode with a 30 s busy timeout and `synchronous=NORMAL`, so a
  committed transaction survives the process being killed at any moment (only an OS crash or power loss
  can lose the last few commits). Every write runs in `BEGIN IMMEDIATE`, so read-check-write sequences
  (single-flight `open_reorg`, compare-and-set `set_phase`) are serialized across processes.
* PostgreSQL (production): explicit transactions (autocommit off), `SELECT ... FOR UPDATE` for
  compare-and-set, and a partial unique index allowing one unfinished reorg per chain, which makes
  `open_reorg` single-flight under concurrency.

The writer lock is held by the OS or the server, never in a table, so it is released when its holder
dies: an `fcntl.flock` on `<sqlite path>.<chain>.lock` for SQLite, a session `pg_advisory_lock` on a
dedicated connection for PostgreSQL. It is re-entrant within one thread of one store, exclusive
between threads, processes and hosts.

Tables (prefixed `indexer_` so they can share a PostgreSQL database with Dagster's own storage) are
created on open, idempotently; `indexer_schema_version` records the layout version.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from indexer_dagster.state.models import (
    ChainHalted,
    Halt,
    Header,
    Phase,
    Reorg,
    ReorgFinished,
    ReorgNotFound,
    StaleReorgPhase,
    StateConnectionError,
    StateError,
)
from indexer_dagster.state.postgres import PostgresStateStore
from indexer_dagster.state.sqlite import SqliteStateStore
from indexer_dagster.state.store import SCHEMA_VERSION, StateStore
from indexer_dagster.urls import is_postgres_url

__all__ = [
    "SCHEMA_VERSION",
    "ChainHalted",
    "Halt",
    "Header",
    "Phase",
    "PostgresStateStore",
    "Reorg",
    "ReorgFinished",
    "ReorgNotFound",
    "SqliteStateStore",
    "StaleReorgPhase",
    "StateConnectionError",
    "StateError",
    "StateStore",
    "open_state",
    "reorgs_frame",
    "store_or_open",
]


def open_state(url_or_path: str | os.PathLike[str], *, schema: str | None = None) -> StateStore:
    """Open (creating tables if needed) the state store.

    `postgresql://...`, `postgres://...` or `postgresql+psycopg2://...` -> PostgreSQL (`schema`: the
    schema to keep the tables in, created if missing); anything else is a SQLite file path (parent
    directories created; `schema` is ignored).
    """
    s = os.fspath(url_or_path)
    if is_postgres_url(s):
        return PostgresStateStore(s, schema=schema)
    return SqliteStateStore(s)


@contextmanager
def store_or_open(url_or_path: str | os.PathLike[str], store: StateStore | None) -> Iterator[StateStore]:
    """`store` as it is, or (None) one opened from `url_or_path` for the block and closed after it: a run
    passes the store it holds for all its steps, a one-off call (the CLI, a test) opens its own."""
    if store is not None:
        yield store
        return
    opened = open_state(url_or_path)
    try:
        yield opened
    finally:
        opened.close()


def reorgs_frame(store: StateStore, chain: str | None = None) -> list[dict[str, Any]]:
    """The reorg ledger as plain dicts with a fixed set of keys, ready for a Parquet ledger.

    Nested values are Parquet-friendly: `new_chain` is a list of header dicts, `rows_archived` a list of
    `{"dataset", "rows"}` dicts sorted by dataset (a dict keyed by dataset would give every row a
    different struct type), with `rows_archived_total` beside it; `phase` is the string value.
    """
    out: list[dict[str, Any]] = []
    for r in store.list_reorgs(chain):
        out.append(
            {
                "id": r.id,
                "chain": r.chain,
                "detected_at": r.detected_at,
                "common_ancestor": r.common_ancestor,
                "ancestor_hash": r.ancestor_hash,
                "depth": r.depth,
                "old_head": r.old_head,
                "old_head_hash": r.old_head_hash,
                "new_head": r.new_head,
                "new_head_hash": r.new_head_hash,
                "new_chain": [h.to_dict() for h in r.new_chain],
                "phase": r.phase.value,
                "affected_partitions": list(r.affected_partitions),
                "rows_archived": [{"dataset": k, "rows": v} for k, v in sorted(r.rows_archived.items())],
                "rows_archived_total": sum(r.rows_archived.values()),
                "touched_confirmed": r.touched_confirmed,
                "updated_at": r.updated_at,
                "finished_at": r.finished_at,
                "note": r.note,
            }
        )
    return out
