"""A requests-per-second budget per RPC endpoint, shared by every process that uses the same state store.

Providers rate-limit a key, not a process: with several runs (or hosts) backfilling at once, each
process pacing itself is not enough. The budget is a token bucket kept in one table of the state
database (the SQLite file or PostgreSQL of `storage.state_url`):

* a reservation is one atomic UPDATE: refill by elapsed time × rate (capped at `burst`), subtract the
  tokens taken, return the balance. The balance may go negative: a caller then waits -balance/rate
  seconds, so callers queue in order instead of retrying;
* a process reserves `block` tokens at a time and spends them locally, so the database sees about
  rate/block transactions per second in total. Tokens not spent within a block's time slot are
  dropped, never saved up, so no process can burst above the shared rate later;
* PostgreSQL uses its own clock (one clock for every host); SQLite, being local, the host's.

Endpoints are keyed by a hash of the URL: the URL itself (it may carry an API key) is never stored.
"""

import asyncio
import hashlib
import os
import sqlite3
import threading
import time
from pathlib import Path

from indexer_dagster.urls import is_postgres_url, libpq_url, redact_password

TABLE = "indexer_rpc_budget"


def endpoint_key(url: str) -> str:
    """A stable, non-secret name for an endpoint."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def default_block(rate: float) -> int:
    """Tokens per reservation: about 0.1 s of the budget (1 at low rates, at most 50)."""
    return max(1, min(50, int(rate / 10)))


class _Backend:
    def reserve(self, key: str, n: int, rate: float, burst: float) -> float:
        """Take n tokens; return the balance after (negative: a debt to wait for)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _Sqlite(_Backend):
    def __init__(self, path: str) -> None:
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(Path(path).expanduser()), timeout=30.0, isolation_level=None,
                                    check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout=30000")
        self.conn.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (endpoint TEXT PRIMARY KEY, tokens REAL NOT NULL, "
            "updated_at REAL NOT NULL)"
        )

    def reserve(self, key: str, n: int, rate: float, burst: float) -> float:
        now = time.time()
        row = self.conn.execute(
            f"INSERT INTO {TABLE} AS b (endpoint, tokens, updated_at) VALUES (?1, ?4 - ?5, ?2) "
            "ON CONFLICT (endpoint) DO UPDATE SET "
            "tokens = min(?4, b.tokens + max(0.0, ?2 - b.updated_at) * ?3) - ?5, "
            "updated_at = max(b.updated_at, ?2) RETURNING tokens",
            (key, now, rate, burst, n),
        ).fetchone()
        return float(row[0])

    def close(self) -> None:
        self.conn.close()


class _Postgres(_Backend):
    def __init__(self, url: str) -> None:
        import psycopg2

        try:
            self.conn = psycopg2.connect(libpq_url(url), connect_timeout=10, application_name="indexer_dagster.budget")
        except psycopg2.Error as e:
            raise ConnectionError(f"cannot connect to the state database {redact_password(url)} for the RPC budget: "
                                  f"{type(e).__name__}") from None
        self.conn.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute(
                f"CREATE TABLE IF NOT EXISTS {TABLE} (endpoint TEXT PRIMARY KEY, tokens DOUBLE PRECISION NOT NULL, "
                "updated_at DOUBLE PRECISION NOT NULL)"
            )

    def reserve(self, key: str, n: int, rate: float, burst: float) -> float:
        with self.conn.cursor() as cur:
            cur.execute(
                f"INSERT INTO {TABLE} AS b (endpoint, tokens, updated_at) "
                "VALUES (%(k)s, %(burst)s - %(n)s, extract(epoch from clock_timestamp())) "
                "ON CONFLICT (endpoint) DO UPDATE SET "
                "tokens = least(%(burst)s, b.tokens + greatest(0, extract(epoch from clock_timestamp()) - b.updated_at)"
                " * %(rate)s) - %(n)s, "
                "updated_at = greatest(b.updated_at, extract(epoch from clock_timestamp())) RETURNING tokens",
                {"k": key, "n": n, "rate": rate, "burst": burst},
            )
            return float(cur.fetchone()[0])

    def close(self) -> None:
        self.conn.close()


class RpcBudget:
    """At most `rate` requests per second per endpoint across all processes sharing `state_url`.

    `acquire(key)` (async) or `acquire_sync(key)` returns once the caller may send one request.
    `burst`: tokens a quiet endpoint accumulates (default one second's worth).
    """

    def __init__(self, state_url: str, rate: float, *, burst: float | None = None, block: int | None = None) -> None:
        if rate <= 0:
            raise ValueError("the RPC budget needs a positive rate")
        self.state_url = str(state_url)
        self.rate = float(rate)
        self.block = block or default_block(self.rate)
        self.burst = max(float(burst if burst is not None else self.rate), float(self.block))
        self._backend: _Backend | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._alock: asyncio.Lock | None = None
        # endpoint -> (tokens left, usable from, usable until) of the block reserved last
        self._local: dict[str, tuple[int, float, float]] = {}
        self.reservations = 0
        self.waited_s = 0.0

    def _db(self) -> _Backend:
        if self._backend is None or self._pid != os.getpid():  # a forked child opens its own connection
            self._pid = os.getpid()
            s = self.state_url
            self._backend = _Postgres(s) if is_postgres_url(s) else _Sqlite(s)
        return self._backend

    def _take_local(self, key: str) -> float | None:
        """Spend a local token: the seconds to wait before using it, or None if a new block is needed."""
        left, start, until = self._local.get(key, (0, 0.0, 0.0))
        now = time.monotonic()
        if left <= 0 or now > until:
            return None
        self._local[key] = (left - 1, start, until)
        return max(0.0, start - now)

    def _reserve(self, key: str) -> float:
        with self._lock:
            balance = self._db().reserve(key, self.block, self.rate, self.burst)
        self.reservations += 1
        wait = max(0.0, -balance / self.rate)
        start = time.monotonic() + wait
        # The block's tokens are usable during their own slot of block/rate seconds (plus a little slack).
        self._local[key] = (self.block - 1, start, start + self.block / self.rate + 0.05)
        return wait

    def acquire_sync(self, key: str) -> float:
        wait = self._take_local(key)
        if wait is None:
            wait = self._reserve(key)
        if wait > 0:
            time.sleep(wait)
            self.waited_s += wait
        return wait

    async def acquire(self, key: str) -> float:
        if self._alock is None:
            self._alock = asyncio.Lock()
        async with self._alock:  # one reservation at a time per process; others spend its tokens
            wait = self._take_local(key)
            if wait is None:
                wait = await asyncio.to_thread(self._reserve, key)
        if wait > 0:
            await asyncio.sleep(wait)
            self.waited_s += wait
        return wait

    def close(self) -> None:
        with self._lock:
            if self._backend is not None and self._pid == os.getpid():
                self._backend.close()
            self._backend = None
