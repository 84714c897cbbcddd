"""The SQLite backend: one database file in WAL mode with a 30 s busy timeout and `synchronous=NORMAL`,
so a committed transaction survives the process being killed at any moment. Every write runs in
`BEGIN IMMEDIATE`, so read-check-write sequences (single-flight `open_reorg`, compare-and-set
`set_phase`) are serialized across processes. The writer lock is an `fcntl.flock` on
`<sqlite path>.<chain>.lock`, released by the OS when its holder dies."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from indexer_dagster.state.models import as_utc
from indexer_dagster.state.store import INHERITED, StateStore

log = logging.getLogger(__name__)


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
                    if ("locked" not in str(e) and "busy" not in str(e)) or time.monotonic() > deadline:
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
            INHERITED.append(self._conn)
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
        return cur.lastrowid if cur.rowcount == 1 else None

    def _ts_in(self, dt: datetime) -> str:
        return as_utc(dt).isoformat()

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
