"""The PostgreSQL backend: explicit transactions (autocommit off), `SELECT ... FOR UPDATE` for
compare-and-set, and a partial unique index allowing one unfinished reorg per chain, which makes
`open_reorg` single-flight under concurrency. The writer lock is a session `pg_advisory_lock` on a
dedicated connection, released by the server when its holder dies."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from indexer_dagster.state.models import StateConnectionError
from indexer_dagster.state.store import INHERITED, StateStore
from indexer_dagster.urls import libpq_url, redact_password


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

        self._dsn = libpq_url(url)
        self.url = redact_password(url)
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
            INHERITED.append(conn)

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
