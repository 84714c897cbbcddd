"""Durable per-chain indexer state shared by several processes: local chain window, reorg ledger, cursors, writer lock.

One API, two backends:

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

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

__all__ = [
    "Header",
    "Phase",
    "Reorg",
    "StateError",
    "StateConnectionError",
    "StaleReorgPhase",
    "ReorgNotFound",
    "ReorgFinished",
    "StateStore",
    "SqliteStateStore",
    "PostgresStateStore",
    "open_state",
    "reorgs_frame",
    "redact_url",
    "SCHEMA_VERSION",
]


# ----------------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class Header:
    """A block header as the local chain keeps it. Hashes are normalized to lower-case 0x hex."""

    number: int
    hash: str
    parent_hash: str
    timestamp: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "number", int(self.number))
        object.__setattr__(self, "timestamp", int(self.timestamp))
        object.__setattr__(self, "hash", str(self.hash).lower())
        object.__setattr__(self, "parent_hash", str(self.parent_hash).lower())

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "hash": self.hash, "parent_hash": self.parent_hash, "timestamp": self.timestamp}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Header:
        return cls(int(d["number"]), d["hash"], d["parent_hash"], int(d["timestamp"]))


def _as_header(h: Header | Mapping[str, Any]) -> Header:
    return h if isinstance(h, Header) else Header.from_dict(h)


class Phase(str, Enum):
    DETECTED = "detected"
    SUSPENDING = "suspending"
    ROLLING_BACK = "rolling_back"
    RESTORING = "restoring"
    DONE = "done"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (Phase.DONE, Phase.FAILED)


_FINISHED_SQL = "('done', 'failed')"  # must match Phase.finished; used in the partial unique index


@dataclass
class Reorg:
    """One row of the reorg ledger (a durable reorg context)."""

    id: int
    chain: str
    detected_at: datetime
    common_ancestor: int
    ancestor_hash: str
    depth: int  # old_head - common_ancestor
    old_head: int
    old_head_hash: str
    new_head: int
    new_head_hash: str
    new_chain: list[Header]  # the new fork, common_ancestor+1 .. new_head, as seen at detection
    phase: Phase
    affected_partitions: list[str]
    rows_archived: dict[str, int]
    touched_confirmed: bool
    updated_at: datetime
    finished_at: datetime | None
    note: str = ""

    @property
    def finished(self) -> bool:
        return self.phase.finished


class StateError(Exception):
    """Base class of the state store's errors."""


class StateConnectionError(StateError):
    """The state database could not be reached (the message never contains a password)."""


class ReorgNotFound(StateError, LookupError):
    def __init__(self, reorg_id: int) -> None:
        super().__init__(f"reorg {reorg_id} does not exist")
        self.reorg_id = reorg_id


class StaleReorgPhase(StateError):
    """`set_phase(..., expect=X)` found the reorg in another phase (another process moved it)."""

    def __init__(self, reorg_id: int, expected: Phase, actual: Phase) -> None:
        super().__init__(f"reorg {reorg_id} is in phase {actual.value!r}, expected {expected.value!r}")
        self.reorg_id = reorg_id
        self.expected = expected
        self.actual = actual


class ReorgFinished(StateError):
    """A finished reorg (phase done or failed) cannot change phase or be extended."""

    def __init__(self, reorg_id: int, phase: Phase, action: str) -> None:
        super().__init__(f"reorg {reorg_id} is finished (phase {phase.value!r}); cannot {action}")
        self.reorg_id = reorg_id
        self.phase = phase


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def _check_chain_range(headers: Sequence[Header], ancestor: int, new_head: int) -> None:
    for h in headers:
        if not ancestor < h.number <= new_head:
            raise ValueError(
                f"new_chain header {h.number} is outside common_ancestor+1..new_head ({ancestor + 1}..{new_head})"
            )


def _sorted_unique(headers: Sequence[Header]) -> list[Header]:
    by_number: dict[int, Header] = {}
    for h in headers:
        by_number[h.number] = h  # the last one given for a number wins
    return [by_number[n] for n in sorted(by_number)]


# ----------------------------------------------------------------------------------------------------
# URLs


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***` (in the user-info part and in a `password=` parameter)."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            if ":" in userinfo:
                userinfo = userinfo.split(":", 1)[0] + ":***"
            netloc = f"{userinfo}@{host}"
        query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except Exception:  # noqa: BLE001 - never let redaction leak the input
        return "<unparseable url>"


def _is_postgres_url(s: str) -> bool:
    scheme = s.split("://", 1)[0].lower() if "://" in s else ""
    return scheme in ("postgresql", "postgres") or scheme.startswith("postgresql+")


def _libpq_url(url: str) -> str:
    """`postgresql+psycopg2://...` (SQLAlchemy style) -> `postgresql://...` for libpq."""
    scheme, rest = url.split("://", 1)
    if scheme.lower().startswith("postgresql+"):
        scheme = "postgresql"
    return f"{scheme}://{rest}"


# ----------------------------------------------------------------------------------------------------
# The store

# Connections inherited through fork() from the parent process: never used, closed or garbage-collected
# in the child (closing a PostgreSQL connection sends a Terminate message down the parent's socket;
# SQLite forbids carrying a connection across fork).
_INHERITED: list[Any] = []


_REORG_COLS = (
    "id, chain, detected_at, common_ancestor, ancestor_hash, depth, old_head, old_head_hash, "
    "new_head, new_head_hash, new_chain, phase, affected_partitions, rows_archived, touched_confirmed, "
    "updated_at, finished_at, note"
)

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS indexer_schema_version (
        version INTEGER PRIMARY KEY,
        applied_at {TS} NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS indexer_headers (
        chain TEXT NOT NULL,
        number {INT} NOT NULL,
        hash TEXT NOT NULL,
        parent_hash TEXT NOT NULL,
        block_time {INT} NOT NULL,
        PRIMARY KEY (chain, number)
    )""",
    """CREATE TABLE IF NOT EXISTS indexer_cursors (
        chain TEXT NOT NULL,
        name TEXT NOT NULL,
        block {INT} NOT NULL,
        block_hash TEXT NOT NULL,
        updated_at {TS} NOT NULL,
        PRIMARY KEY (chain, name)
    )""",
    """CREATE TABLE IF NOT EXISTS indexer_reorgs (
        id {ID},
        chain TEXT NOT NULL,
        detected_at {TS} NOT NULL,
        common_ancestor {INT} NOT NULL,
        ancestor_hash TEXT NOT NULL,
        depth {INT} NOT NULL,
        old_head {INT} NOT NULL,
        old_head_hash TEXT NOT NULL,
        new_head {INT} NOT NULL,
        new_head_hash TEXT NOT NULL,
        new_chain {JSON} NOT NULL,
        phase TEXT NOT NULL CHECK (phase IN ('detected', 'suspending', 'rolling_back', 'restoring', 'done', 'failed')),
        affected_partitions {JSON} NOT NULL,
        rows_archived {JSON} NOT NULL,
        touched_confirmed {BOOL} NOT NULL,
        updated_at {TS} NOT NULL,
        finished_at {TS},
        note TEXT NOT NULL DEFAULT ''
    )""",
    # Single flight: at most one unfinished reorg per chain, enforced by the database itself.
    f"""CREATE UNIQUE INDEX IF NOT EXISTS indexer_reorgs_one_active
        ON indexer_reorgs (chain) WHERE phase NOT IN {_FINISHED_SQL}""",
    "CREATE INDEX IF NOT EXISTS indexer_reorgs_by_chain ON indexer_reorgs (chain, id)",
    """CREATE TABLE IF NOT EXISTS indexer_reorg_epochs (
        chain TEXT PRIMARY KEY,
        epoch {INT} NOT NULL
    )""",
]


class StateStore:
    """The state of the indexer's chains; see the module docstring. Use one instance per process.

    Every method is its own transaction. Instances are thread-safe (calls are serialized by a lock) and
    notice a fork: a child process opens its own connection instead of sharing the parent's.
    """

    backend: str = "?"
    _TYPES: dict[str, str] = {}
    _FOR_UPDATE = ""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._tls = threading.local()
        self._closed = False

    # --- backend hooks -------------------------------------------------------------------------------

    @contextmanager
    def _tx(self, write: bool) -> Iterator[Any]:  # pragma: no cover - abstract
        raise NotImplementedError
        yield

    def _q(self, sql: str) -> str:
        """Queries are written with `?` placeholders."""
        return sql

    def _json_in(self, obj: Any) -> Any:
        return json.dumps(obj, separators=(",", ":"), sort_keys=True)

    def _json_out(self, value: Any) -> Any:
        return json.loads(value) if isinstance(value, (str, bytes)) else value

    def _ts_in(self, dt: datetime) -> Any:
        return dt

    def _ts_out(self, value: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return _utc(value)

    def _insert_returning_id(self, cur: Any, sql: str, params: Sequence[Any]) -> int | None:  # pragma: no cover
        raise NotImplementedError

    def _executemany(self, cur: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        cur.executemany(self._q(sql), rows)

    def _acquire_writer_lock(self, chain: str, timeout_s: float):  # pragma: no cover - abstract
        """Acquire the lock; return a function that releases it."""
        raise NotImplementedError

    def _close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _ddl(self) -> list[str]:
        return [s.format(**self._TYPES) for s in _SCHEMA]

    def _ensure_schema_in(self, cur: Any) -> None:
        for stmt in self._ddl():
            cur.execute(stmt)
        cur.execute("SELECT max(version) FROM indexer_schema_version")
        (version,) = cur.fetchone()
        if version is None:
            cur.execute(
                self._q("INSERT INTO indexer_schema_version (version, applied_at) VALUES (?, ?)"),
                (SCHEMA_VERSION, self._ts_in(_now())),
            )
        elif version > SCHEMA_VERSION:
            raise StateError(
                f"the state database has schema version {version}, newer than this code's {SCHEMA_VERSION}; "
                "upgrade indexer_dagster"
            )

    def _exec(self, cur: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        cur.execute(self._q(sql), tuple(params))
        return cur

    def _check_open(self) -> None:
        if self._closed:
            raise StateError("the state store is closed")

    # --- context manager -----------------------------------------------------------------------------

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._close()

    # --- local chain window --------------------------------------------------------------------------

    def put_headers(self, chain: str, headers: Sequence[Header]) -> None:
        """Insert or replace headers by (chain, number)."""
        rows = [(chain, h.number, h.hash, h.parent_hash, h.timestamp) for h in map(_as_header, headers)]
        if not rows:
            return
        with self._tx(write=True) as cur:
            self._executemany(
                cur,
                "INSERT INTO indexer_headers (chain, number, hash, parent_hash, block_time) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (chain, number) DO UPDATE SET hash = excluded.hash, "
                "parent_hash = excluded.parent_hash, block_time = excluded.block_time",
                rows,
            )

    def headers(self, chain: str, from_number: int | None = None, to_number: int | None = None) -> list[Header]:
        """Stored headers with from_number <= number <= to_number (bounds optional), ascending."""
        sql = "SELECT number, hash, parent_hash, block_time FROM indexer_headers WHERE chain = ?"
        params: list[Any] = [chain]
        if from_number is not None:
            sql += " AND number >= ?"
            params.append(int(from_number))
        if to_number is not None:
            sql += " AND number <= ?"
            params.append(int(to_number))
        sql += " ORDER BY number"
        with self._tx(write=False) as cur:
            return [Header(*r) for r in self._exec(cur, sql, params).fetchall()]

    def header(self, chain: str, number: int) -> Header | None:
        with self._tx(write=False) as cur:
            row = self._exec(
                cur,
                "SELECT number, hash, parent_hash, block_time FROM indexer_headers WHERE chain = ? AND number = ?",
                (chain, int(number)),
            ).fetchone()
        return Header(*row) if row else None

    def tip(self, chain: str) -> Header | None:
        """The highest stored header."""
        with self._tx(write=False) as cur:
            row = self._exec(
                cur,
                "SELECT number, hash, parent_hash, block_time FROM indexer_headers WHERE chain = ? "
                "ORDER BY number DESC LIMIT 1",
                (chain,),
            ).fetchone()
        return Header(*row) if row else None

    def delete_headers_above(self, chain: str, number: int) -> int:
        """Delete headers with number > `number`; return how many."""
        with self._tx(write=True) as cur:
            return self._exec(
                cur, "DELETE FROM indexer_headers WHERE chain = ? AND number > ?", (chain, int(number))
            ).rowcount

    def prune_headers_below(self, chain: str, number: int) -> int:
        """Delete headers with number < `number` (keeps the window bounded); return how many."""
        with self._tx(write=True) as cur:
            return self._exec(
                cur, "DELETE FROM indexer_headers WHERE chain = ? AND number < ?", (chain, int(number))
            ).rowcount

    # --- cursors -------------------------------------------------------------------------------------

    def get_cursor(self, chain: str, name: str) -> tuple[int, str] | None:
        with self._tx(write=False) as cur:
            row = self._exec(
                cur, "SELECT block, block_hash FROM indexer_cursors WHERE chain = ? AND name = ?", (chain, name)
            ).fetchone()
        return (int(row[0]), row[1]) if row else None

    def set_cursor(self, chain: str, name: str, block: int, block_hash: str) -> None:
        with self._tx(write=True) as cur:
            self._exec(
                cur,
                "INSERT INTO indexer_cursors (chain, name, block, block_hash, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (chain, name) DO UPDATE SET block = excluded.block, "
                "block_hash = excluded.block_hash, updated_at = excluded.updated_at",
                (chain, name, int(block), str(block_hash).lower(), self._ts_in(_now())),
            )

    # --- reorg ledger --------------------------------------------------------------------------------

    def _reorg_from_row(self, row: Sequence[Any]) -> Reorg:
        (rid, chain, detected_at, anc, anc_hash, depth, old_head, old_hash, new_head, new_hash,
         new_chain, phase, parts, archived, touched, updated_at, finished_at, note) = row  # fmt: skip
        return Reorg(
            id=int(rid),
            chain=chain,
            detected_at=self._ts_out(detected_at),
            common_ancestor=int(anc),
            ancestor_hash=anc_hash,
            depth=int(depth),
            old_head=int(old_head),
            old_head_hash=old_hash,
            new_head=int(new_head),
            new_head_hash=new_hash,
            new_chain=[Header.from_dict(d) for d in self._json_out(new_chain)],
            phase=Phase(phase),
            affected_partitions=list(self._json_out(parts)),
            rows_archived={str(k): int(v) for k, v in self._json_out(archived).items()},
            touched_confirmed=bool(touched),
            updated_at=self._ts_out(updated_at),
            finished_at=self._ts_out(finished_at),
            note=note or "",
        )

    def _select_reorg(self, cur: Any, reorg_id: int, lock: bool = False) -> Reorg | None:
        sql = f"SELECT {_REORG_COLS} FROM indexer_reorgs WHERE id = ?" + (self._FOR_UPDATE if lock else "")
        row = self._exec(cur, sql, (int(reorg_id),)).fetchone()
        return self._reorg_from_row(row) if row else None

    def _select_active(self, cur: Any, chain: str, lock: bool = False) -> Reorg | None:
        sql = f"SELECT {_REORG_COLS} FROM indexer_reorgs WHERE chain = ? AND phase NOT IN {_FINISHED_SQL}" + (
            self._FOR_UPDATE if lock else ""
        )
        row = self._exec(cur, sql, (chain,)).fetchone()
        return self._reorg_from_row(row) if row else None

    def _bump_epoch(self, cur: Any, chain: str) -> None:
        self._exec(
            cur,
            "INSERT INTO indexer_reorg_epochs (chain, epoch) VALUES (?, 1) "
            "ON CONFLICT (chain) DO UPDATE SET epoch = indexer_reorg_epochs.epoch + 1",
            (chain,),
        )

    def open_reorg(
        self,
        chain: str,
        common_ancestor: int,
        ancestor_hash: str,
        old_head: int,
        old_head_hash: str,
        new_head: int,
        new_head_hash: str,
        new_chain: Sequence[Header],
        affected_partitions: Sequence[str],
        touched_confirmed: bool,
    ) -> Reorg:
        """Record a detected reorg in phase DETECTED and return it.

        Single-flight: if the chain already has an unfinished reorg, that one is returned unchanged and
        nothing is created (merge a second reorg into it with `extend_reorg`). Safe against concurrent
        callers in several processes.
        """
        common_ancestor, old_head, new_head = int(common_ancestor), int(old_head), int(new_head)
        if old_head < common_ancestor or new_head < common_ancestor:
            raise ValueError(
                f"common_ancestor {common_ancestor} must not be above old_head {old_head} or new_head {new_head}"
            )
        headers = _sorted_unique([_as_header(h) for h in new_chain])
        _check_chain_range(headers, common_ancestor, new_head)
        parts = list(dict.fromkeys(str(p) for p in affected_partitions))
        now = _now()
        params = (
            chain,
            self._ts_in(now),
            common_ancestor,
            str(ancestor_hash).lower(),
            old_head - common_ancestor,
            old_head,
            str(old_head_hash).lower(),
            new_head,
            str(new_head_hash).lower(),
            self._json_in([h.to_dict() for h in headers]),
            Phase.DETECTED.value,
            self._json_in(parts),
            self._json_in({}),
            bool(touched_confirmed),
            self._ts_in(now),
            None,
            "",
        )
        insert = (
            f"INSERT INTO indexer_reorgs ({_REORG_COLS.split(', ', 1)[1]}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
        )
        with self._tx(write=True) as cur:
            # A concurrent opener may commit between our insert (a no-op on conflict) and our select,
            # or finish its reorg in between: a couple of rounds settle it.
            for _ in range(20):
                existing = self._select_active(cur, chain)
                if existing is not None:
                    return existing
                rid = self._insert_returning_id(cur, insert, params)
                if rid is not None:
                    self._bump_epoch(cur, chain)
                    created = self._select_reorg(cur, rid)
                    assert created is not None
                    return created
            raise StateError(f"could not open or find the active reorg of chain {chain!r}")  # pragma: no cover

    def active_reorg(self, chain: str) -> Reorg | None:
        """The chain's unfinished reorg (phase not done/failed), if any."""
        with self._tx(write=False) as cur:
            return self._select_active(cur, chain)

    def get_reorg(self, reorg_id: int) -> Reorg | None:
        with self._tx(write=False) as cur:
            return self._select_reorg(cur, reorg_id)

    def list_reorgs(self, chain: str | None = None) -> list[Reorg]:
        """All reorgs (of one chain, or of all chains), ascending id."""
        sql = f"SELECT {_REORG_COLS} FROM indexer_reorgs"
        params: tuple[Any, ...] = ()
        if chain is not None:
            sql += " WHERE chain = ?"
            params = (chain,)
        sql += " ORDER BY id"
        with self._tx(write=False) as cur:
            return [self._reorg_from_row(r) for r in self._exec(cur, sql, params).fetchall()]

    def set_phase(self, reorg_id: int, phase: Phase, *, expect: Phase | None = None, note: str | None = None) -> Reorg:
        """Move a reorg to `phase` and return it.

        With `expect`, this is a compare-and-set: StaleReorgPhase if the reorg is not in phase `expect`.
        Entering done/failed sets finished_at. A finished reorg cannot leave its phase (ReorgFinished);
        setting the phase it already has is a no-op apart from `note` and updated_at. `note`, when
        given, replaces the reorg's note.
        """
        phase = Phase(phase)
        expect = Phase(expect) if expect is not None else None
        with self._tx(write=True) as cur:
            current = self._select_reorg(cur, reorg_id, lock=True)
            if current is None:
                raise ReorgNotFound(reorg_id)
            if expect is not None and current.phase != expect:
                raise StaleReorgPhase(reorg_id, expect, current.phase)
            if current.finished and phase != current.phase:
                raise ReorgFinished(reorg_id, current.phase, f"move it to phase {phase.value!r}")
            now = _now()
            finished_at = current.finished_at
            if phase.finished and finished_at is None:
                finished_at = now
            self._exec(
                cur,
                "UPDATE indexer_reorgs SET phase = ?, updated_at = ?, finished_at = ?, note = ? WHERE id = ?",
                (
                    phase.value,
                    self._ts_in(now),
                    self._ts_in(finished_at) if finished_at is not None else None,
                    current.note if note is None else str(note),
                    int(reorg_id),
                ),
            )
            updated = self._select_reorg(cur, reorg_id)
            assert updated is not None
            return updated

    def add_rows_archived(self, reorg_id: int, dataset: str, rows: int) -> None:
        """Set (not add) the number of rows archived for `dataset`, so re-running a step is idempotent."""
        rows = int(rows)
        if rows < 0:
            raise ValueError(f"rows must be >= 0, got {rows}")
        with self._tx(write=True) as cur:
            current = self._select_reorg(cur, reorg_id, lock=True)
            if current is None:
                raise ReorgNotFound(reorg_id)
            archived = dict(current.rows_archived)
            archived[str(dataset)] = rows
            self._exec(
                cur,
                "UPDATE indexer_reorgs SET rows_archived = ?, updated_at = ? WHERE id = ?",
                (self._json_in(archived), self._ts_in(_now()), int(reorg_id)),
            )

    def extend_reorg(
        self,
        reorg_id: int,
        *,
        new_head: int,
        new_head_hash: str,
        new_chain: Sequence[Header],
        common_ancestor: int | None = None,
        ancestor_hash: str | None = None,
        affected_partitions: Sequence[str] | None = None,
        touched_confirmed: bool | None = None,
    ) -> Reorg:
        """Merge a second reorg, detected while `reorg_id` is unfinished, into it; return the merged reorg.

        The ancestor becomes the lower of the two (ancestor_hash must come with a lower common_ancestor),
        depth is recomputed against the original old head, the new head is replaced, `new_chain` is
        merged by block number: stored headers are kept from the merged ancestor up to the second
        reorg's own common_ancestor (or up to the first given header when it is not given), the given
        headers replace everything above. Partitions are unioned and touched_confirmed is OR-ed. The
        phase is unchanged. Bumps the chain's reorg epoch. ReorgFinished if the reorg is finished.
        """
        new_head = int(new_head)
        given = _sorted_unique([_as_header(h) for h in new_chain])
        with self._tx(write=True) as cur:
            current = self._select_reorg(cur, reorg_id, lock=True)
            if current is None:
                raise ReorgNotFound(reorg_id)
            if current.finished:
                raise ReorgFinished(reorg_id, current.phase, "extend it")
            ancestor, anc_hash = current.common_ancestor, current.ancestor_hash
            if common_ancestor is not None and int(common_ancestor) < ancestor:
                if ancestor_hash is None:
                    raise ValueError("a lower common_ancestor needs its ancestor_hash")
                ancestor, anc_hash = int(common_ancestor), str(ancestor_hash).lower()
            if new_head < ancestor:
                raise ValueError(f"new_head {new_head} is below the common ancestor {ancestor}")
            _check_chain_range(given, ancestor, new_head)
            # Stored headers above the second reorg's own ancestor belong to a fork that is gone.
            cut = int(common_ancestor) if common_ancestor is not None else (given[0].number - 1 if given else new_head)
            kept = [h for h in current.new_chain if ancestor < h.number <= min(cut, new_head)]
            merged_chain = _sorted_unique(kept + given)
            parts = list(current.affected_partitions)
            for p in affected_partitions or ():
                if str(p) not in parts:
                    parts.append(str(p))
            touched = current.touched_confirmed or bool(touched_confirmed)
            self._exec(
                cur,
                "UPDATE indexer_reorgs SET common_ancestor = ?, ancestor_hash = ?, depth = ?, new_head = ?, "
                "new_head_hash = ?, new_chain = ?, affected_partitions = ?, touched_confirmed = ?, updated_at = ? "
                "WHERE id = ?",
                (
                    ancestor,
                    anc_hash,
                    current.old_head - ancestor,
                    new_head,
                    str(new_head_hash).lower(),
                    self._json_in([h.to_dict() for h in merged_chain]),
                    self._json_in(parts),
                    touched,
                    self._ts_in(_now()),
                    int(reorg_id),
                ),
            )
            self._bump_epoch(cur, current.chain)
            updated = self._select_reorg(cur, reorg_id)
            assert updated is not None
            return updated

    def reorg_epoch(self, chain: str) -> int:
        """A monotonic counter of the chain's reorg events (each reorg opened and each one merged by
        extend_reorg). Writers read it before and after a fetch and drop the fetch if it changed."""
        with self._tx(write=False) as cur:
            row = self._exec(cur, "SELECT epoch FROM indexer_reorg_epochs WHERE chain = ?", (chain,)).fetchone()
        return int(row[0]) if row else 0

    # --- writer lock ---------------------------------------------------------------------------------

    @contextmanager
    def writer_lock(self, chain: str, timeout_s: float = 60.0) -> Iterator[None]:
        """Hold the chain's cross-process writer lock for the block.

        Re-entrant within one thread; exclusive between threads, processes and hosts. Released on exit
        and, by the OS or the database server, when the holding process dies. TimeoutError (naming the
        chain) if not acquired within timeout_s.
        """
        self._check_open()
        held: dict[tuple[int, str], int] = self._tls.__dict__.setdefault("held", {})
        key = (os.getpid(), chain)
        if held.get(key):
            held[key] += 1
            try:
                yield
            finally:
                held[key] -= 1
            return
        release = self._acquire_writer_lock(chain, float(timeout_s))
        held[key] = 1
        try:
            yield
        finally:
            del held[key]
            release()

    def _lock_timeout(self, chain: str, timeout_s: float) -> TimeoutError:
        return TimeoutError(f"writer lock of chain {chain!r} not acquired within {timeout_s:g} s")


# ----------------------------------------------------------------------------------------------------
# SQLite


class SqliteStateStore(StateStore):
    backend = "sqlite"
    _TYPES = {
        "TS": "TEXT",  # ISO 8601 with +00:00
        "INT": "INTEGER",
        "JSON": "TEXT",
        "BOOL": "INTEGER",
        "ID": "INTEGER PRIMARY KEY AUTOINCREMENT",  # ids are never reused
    }

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        with self._tx(write=True) as cur:
            self._ensure_schema_in(cur)

    def __repr__(self) -> str:
        return f"SqliteStateStore({str(self.path)!r})"

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout=30000")
            deadline = time.monotonic() + 30.0
            while True:  # switching a fresh file to WAL needs a moment of exclusivity
                try:
                    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            if str(mode).lower() != "wal":
                log.warning("SQLite state %s: journal_mode is %r, not WAL (unsupported filesystem?)", self.path, mode)
            conn.execute("PRAGMA synchronous=NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _connection(self) -> sqlite3.Connection:
        self._check_open()
        if self._pid != os.getpid():
            self._forget_inherited()
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _forget_inherited(self) -> None:
        # After a fork the inherited connection belongs to the parent: never touch it.
        if self._conn is not None:
            _INHERITED.append(self._conn)
        self._conn = None
        self._pid = os.getpid()

    @contextmanager
    def _tx(self, write: bool) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            conn = self._connection()
            cur = conn.cursor()
            try:
                # IMMEDIATE takes the write lock up front: read-check-write runs serialized across processes.
                cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield cur
                    cur.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        try:
                            cur.execute("ROLLBACK")
                        except sqlite3.Error:  # pragma: no cover
                            pass
                    raise
            finally:
                cur.close()

    def _insert_returning_id(self, cur: sqlite3.Cursor, sql: str, params: Sequence[Any]) -> int | None:
        cur.execute(sql, tuple(params))
        return int(cur.lastrowid) if cur.rowcount == 1 else None

    def _ts_in(self, dt: datetime) -> str:
        return _utc(dt).isoformat()

    def _close(self) -> None:
        if self._pid != os.getpid():
            self._forget_inherited()
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def lock_path(self, chain: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", chain)
        if safe != chain or not safe:
            safe = f"{safe}-{hashlib.blake2b(chain.encode(), digest_size=4).hexdigest()}"
        return self.path.with_name(f"{self.path.name}.{safe}.lock")

    def _acquire_writer_lock(self, chain: str, timeout_s: float):
        path = self.lock_path(chain)
        # os.open makes a non-inheritable descriptor: a program we exec cannot keep the lock alive.
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + max(timeout_s, 0.0)
        delay = 0.002
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._lock_timeout(chain, timeout_s)
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.05)
        except BaseException:
            os.close(fd)
            raise

        def release() -> None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

        return release


# ----------------------------------------------------------------------------------------------------
# PostgreSQL


class PostgresStateStore(StateStore):
    """PostgreSQL backend. `schema`: tables live in this schema (created if missing), else in the
    connection's current schema (normally `public`)."""

    backend = "postgres"
    _TYPES = {
        "TS": "TIMESTAMPTZ",
        "INT": "BIGINT",
        "JSON": "JSONB",
        "BOOL": "BOOLEAN",
        "ID": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    }
    _FOR_UPDATE = " FOR UPDATE"
    _SCHEMA_LOCK_KEY = int.from_bytes(
        hashlib.blake2b(b"indexer_dagster.state.schema", digest_size=8).digest(), "big", signed=True
    )

    def __init__(self, url: str, schema: str | None = None) -> None:
        super().__init__()
        import psycopg2  # noqa: F401 - fail early with ImportError if missing

        self._dsn = _libpq_url(url)
        self.url = redact_url(url)
        self.schema = schema
        self._conn: Any = None
        self._pid = os.getpid()
        with self._tx(write=True) as cur:
            # Concurrent CREATE ... IF NOT EXISTS can collide in PostgreSQL's catalogs: serialize them.
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (self._SCHEMA_LOCK_KEY,))
            if schema:
                from psycopg2 import sql

                cur.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            self._ensure_schema_in(cur)
            cur.execute("SELECT current_schema()")
            self._current_schema = cur.fetchone()[0]

    def __repr__(self) -> str:
        return f"PostgresStateStore({self.url!r}, schema={self.schema!r})"

    def _q(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _json_in(self, obj: Any) -> Any:
        from psycopg2.extras import Json

        return Json(obj, dumps=lambda o: json.dumps(o, separators=(",", ":"), sort_keys=True))

    def _new_connection(self, autocommit: bool) -> Any:
        import psycopg2
        from psycopg2 import sql
        from psycopg2.extensions import parse_dsn

        try:
            params = parse_dsn(self._dsn)
        except psycopg2.ProgrammingError:
            raise StateConnectionError(f"invalid PostgreSQL URL {self.url}") from None
        kwargs: dict[str, Any] = {"application_name": "indexer_dagster.state"}
        if "connect_timeout" not in params:
            kwargs["connect_timeout"] = 10
        try:
            conn = psycopg2.connect(self._dsn, **kwargs)
        except psycopg2.Error as e:
            msg = str(e).strip()
            password = params.get("password")
            if password:
                msg = msg.replace(password, "***")
            raise StateConnectionError(f"cannot connect to the state database {self.url}: {msg}") from None
        try:
            with conn.cursor() as cur:
                cur.execute("SET TIME ZONE 'UTC'")
                if self.schema:
                    cur.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
            conn.commit()
            conn.autocommit = autocommit
        except BaseException:
            conn.close()
            raise
        return conn

    def _connection(self) -> Any:
        self._check_open()
        if self._pid != os.getpid():
            self._forget_inherited()
        if self._conn is None or self._conn.closed:  # a broken connection is replaced
            self._conn = self._new_connection(autocommit=False)
        return self._conn

    def _forget_inherited(self) -> None:
        # After a fork the inherited connection is the parent's session. Point our copy of its socket at
        # /dev/null, so that even a close or garbage collection here cannot terminate the parent's session.
        conn, self._conn, self._pid = self._conn, None, os.getpid()
        if conn is not None and not conn.closed:
            try:
                null = os.open(os.devnull, os.O_RDWR)
                try:
                    os.dup2(null, conn.fileno())
                finally:
                    os.close(null)
            except Exception:  # noqa: BLE001
                pass
            _INHERITED.append(conn)

    @contextmanager
    def _tx(self, write: bool) -> Iterator[Any]:
        with self._lock:
            conn = self._connection()
            try:
                with conn.cursor() as cur:
                    yield cur
                conn.commit()
            except BaseException:
                if not conn.closed:
                    try:
                        conn.rollback()
                    except Exception:  # noqa: BLE001 - the connection is gone; it is replaced on next use
                        pass
                raise

    def _insert_returning_id(self, cur: Any, sql: str, params: Sequence[Any]) -> int | None:
        cur.execute(self._q(sql) + " RETURNING id", tuple(params))
        row = cur.fetchone()
        return int(row[0]) if row else None

    def _executemany(self, cur: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        from psycopg2.extras import execute_batch

        execute_batch(cur, self._q(sql), rows, page_size=500)

    def _close(self) -> None:
        if self._pid != os.getpid():
            self._forget_inherited()
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._conn = None

    def lock_key(self, chain: str) -> int:
        """The advisory lock key of the chain's writer lock (schema-qualified: schemas don't collide)."""
        raw = f"indexer_dagster.writer_lock\0{self._current_schema}\0{chain}".encode()
        return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big", signed=True)

    def _acquire_writer_lock(self, chain: str, timeout_s: float):
        import psycopg2
        import psycopg2.errors

        key = self.lock_key(chain)
        conn = self._new_connection(autocommit=True)  # a session lock on its own connection
        try:
            with conn.cursor() as cur:
                # The lock lives as long as this session: don't let idle timeouts end it, and let a
                # waiting backend notice quickly if we die.
                for setting, value in (
                    ("idle_session_timeout", "0"),
                    ("idle_in_transaction_session_timeout", "0"),
                    ("client_connection_check_interval", "1000"),
                ):
                    try:
                        cur.execute("SELECT set_config(%s, %s, false)", (setting, value))
                    except psycopg2.Error:  # older server: unknown setting
                        pass
                if timeout_s <= 0:
                    cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
                    if not cur.fetchone()[0]:
                        raise self._lock_timeout(chain, timeout_s)
                else:
                    # A blocking wait queues fairly behind other waiters (no starvation of the reorg job).
                    cur.execute("SELECT set_config('lock_timeout', %s, false)", (f"{max(1, int(timeout_s * 1000))}ms",))
                    try:
                        cur.execute("SELECT pg_advisory_lock(%s)", (key,))
                    except psycopg2.errors.LockNotAvailable:
                        raise self._lock_timeout(chain, timeout_s) from None
                    cur.execute("SELECT set_config('lock_timeout', '0', false)")
        except BaseException:
            conn.close()
            raise

        def release() -> None:
            try:
                if not conn.closed:
                    with conn.cursor() as cur:
                        cur.execute("SELECT pg_advisory_unlock(%s)", (key,))
            except psycopg2.Error:  # the session is gone, and the lock with it
                pass
            finally:
                conn.close()

        return release


# ----------------------------------------------------------------------------------------------------
# Entry points


def open_state(url_or_path: str | os.PathLike[str], *, schema: str | None = None) -> StateStore:
    """Open (creating tables if needed) the state store.

    `postgresql://...`, `postgres://...` or `postgresql+psycopg2://...` -> PostgreSQL (`schema`: the
    schema to keep the tables in, created if missing); anything else is a SQLite file path (parent
    directories created; `schema` is ignored).
    """
    s = os.fspath(url_or_path)
    if _is_postgres_url(s):
        return PostgresStateStore(s, schema=schema)
    return SqliteStateStore(s)


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
