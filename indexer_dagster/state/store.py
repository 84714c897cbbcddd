"""The state store's interface and everything both backends share: the tables, the queries, the
reorg ledger's compare-and-set transitions. A backend supplies connections, transactions and the
writer lock (see `state.sqlite`, `state.postgres`)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from indexer_dagster.state.models import (
    FINISHED_SQL,
    ChainHalted,
    Halt,
    Header,
    Phase,
    Reorg,
    ReorgFinished,
    ReorgNotFound,
    StaleReorgPhase,
    StateError,
    as_header,
    as_utc,
    check_chain_range,
    sorted_unique,
    utc_now,
)

# Connections inherited through fork() from the parent process: never used, closed or garbage-collected
# in the child (closing a PostgreSQL connection sends a Terminate message down the parent's socket;
# SQLite forbids carrying a connection across fork).
INHERITED: list[Any] = []

SCHEMA_VERSION = 1


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
        ON indexer_reorgs (chain) WHERE phase NOT IN {FINISHED_SQL}""",
    "CREATE INDEX IF NOT EXISTS indexer_reorgs_by_chain ON indexer_reorgs (chain, id)",
    # A chain stopped for an operator (a fork below the stored window, a reorg that cannot be repaired).
    """CREATE TABLE IF NOT EXISTS indexer_halts (
        chain TEXT PRIMARY KEY,
        reason TEXT NOT NULL,
        reorg_id {INT},
        halted_at {TS} NOT NULL
    )""",
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

    def _ts_required(self, v: Any) -> datetime:
        """A NOT NULL timestamp column's value."""
        ts = self._ts_out(v)
        if ts is None:
            raise StateError("a NOT NULL timestamp column came back NULL")
        return ts

    def _ts_out(self, value: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return as_utc(value)

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
                (SCHEMA_VERSION, self._ts_in(utc_now())),
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
        rows = [(chain, h.number, h.hash, h.parent_hash, h.timestamp) for h in map(as_header, headers)]
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
                (chain, name, int(block), str(block_hash).lower(), self._ts_in(utc_now())),
            )

    # --- halts -----------------------------------------------------------------------------------------

    def halt(self, chain: str, reason: str, reorg_id: int | None = None) -> Halt:
        """Stop every writer of `chain` durably (the first reason is kept) until `resume`."""
        with self._tx(write=True) as cur:
            self._exec(
                cur,
                "INSERT INTO indexer_halts (chain, reason, reorg_id, halted_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (chain) DO NOTHING",
                (chain, str(reason), None if reorg_id is None else int(reorg_id), self._ts_in(utc_now())),
            )
        halt = self.halted(chain)
        assert halt is not None
        return halt

    def halted(self, chain: str) -> Halt | None:
        with self._tx(write=False) as cur:
            row = self._exec(
                cur, "SELECT chain, reason, reorg_id, halted_at FROM indexer_halts WHERE chain = ?", (chain,)
            ).fetchone()
        if row is None:
            return None
        return Halt(row[0], row[1], None if row[2] is None else int(row[2]), self._ts_required(row[3]))

    def check_not_halted(self, chain: str) -> None:
        """ChainHalted if `chain` is halted: every writer asks before it publishes."""
        halt = self.halted(chain)
        if halt is not None:
            raise ChainHalted(halt)

    def resume(self, chain: str) -> Halt | None:
        """Lift `chain`'s halt; returns the halt lifted (None: it was not halted)."""
        halt = self.halted(chain)
        with self._tx(write=True) as cur:
            self._exec(cur, "DELETE FROM indexer_halts WHERE chain = ?", (chain,))
        return halt

    # --- reorg ledger --------------------------------------------------------------------------------

    def _reorg_from_row(self, row: Sequence[Any]) -> Reorg:
        (rid, chain, detected_at, anc, anc_hash, depth, old_head, old_hash, new_head, new_hash,
         new_chain, phase, parts, archived, touched, updated_at, finished_at, note) = row  # fmt: skip
        return Reorg(
            id=int(rid),
            chain=chain,
            detected_at=self._ts_required(detected_at),
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
            updated_at=self._ts_required(updated_at),
            finished_at=self._ts_out(finished_at),
            note=note or "",
        )

    def _select_reorg(self, cur: Any, reorg_id: int, lock: bool = False) -> Reorg | None:
        sql = f"SELECT {_REORG_COLS} FROM indexer_reorgs WHERE id = ?" + (self._FOR_UPDATE if lock else "")
        row = self._exec(cur, sql, (int(reorg_id),)).fetchone()
        return self._reorg_from_row(row) if row else None

    def _select_active(self, cur: Any, chain: str, lock: bool = False) -> Reorg | None:
        sql = f"SELECT {_REORG_COLS} FROM indexer_reorgs WHERE chain = ? AND phase NOT IN {FINISHED_SQL}" + (
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
        headers = sorted_unique([as_header(h) for h in new_chain])
        check_chain_range(headers, common_ancestor, new_head)
        parts = list(dict.fromkeys(str(p) for p in affected_partitions))
        now = utc_now()
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
            now = utc_now()
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
                (self._json_in(archived), self._ts_in(utc_now()), int(reorg_id)),
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
        given = sorted_unique([as_header(h) for h in new_chain])
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
            check_chain_range(given, ancestor, new_head)
            # Stored headers above the second reorg's own ancestor belong to a fork that is gone.
            cut = int(common_ancestor) if common_ancestor is not None else (given[0].number - 1 if given else new_head)
            kept = [h for h in current.new_chain if ancestor < h.number <= min(cut, new_head)]
            merged_chain = sorted_unique(kept + given)
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
                    self._ts_in(utc_now()),
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
