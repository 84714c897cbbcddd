"""The durable reorg state (indexer_dagster.state) on both backends: SQLite and PostgreSQL.

PostgreSQL runs when INDEXER_TEST_POSTGRES_URL is set (e.g. postgresql://postgres@127.0.0.1:5432/test); it
is then required (an unreachable server fails the tests). Each PostgreSQL test gets its own schema,
dropped afterwards, so parallel runs don't collide. Multi-process behaviour (single-flight, the writer
lock, SIGKILL durability) is tested with real processes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import random
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from indexer_dagster.state import (
    SCHEMA_VERSION,
    Header,
    Phase,
    ReorgFinished,
    ReorgNotFound,
    StaleReorgPhase,
    StateConnectionError,
    open_state,
    reorgs_frame,
)
from indexer_dagster.urls import redact_password

PG_ENV = "INDEXER_TEST_POSTGRES_URL"
PG_URL = os.environ.get(PG_ENV) or None
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(120)


def h(n: int, fork: int = 0) -> str:
    return f"0x{fork:02x}{n:062x}"


def chain_of(start: int, end: int, fork: int = 0, parent_fork: int | None = None) -> list[Header]:
    """Headers start..end of `fork`; the first one's parent is on `parent_fork` (default: the same fork)."""
    out = []
    for n in range(start, end + 1):
        pf = fork if (n > start or parent_fork is None) else parent_fork
        out.append(Header(n, h(n, fork), h(n - 1, pf), 1_700_000_000 + 12 * n))
    return out


# ----------------------------------------------------------------------------------------------------
# Fixtures


@dataclass(frozen=True)
class Target:
    backend: str
    url: str
    schema: str | None

    def open(self):
        return open_state(self.url, schema=self.schema)

    def argv(self, chain: str) -> str:
        return json.dumps([self.url, self.schema, chain])


@pytest.fixture(scope="session")
def pg_admin():
    if not PG_URL:
        pytest.skip(f"{PG_ENV} is not set: PostgreSQL backend not tested")
    import psycopg2

    try:
        conn = psycopg2.connect(PG_URL, connect_timeout=5)
    except psycopg2.Error as e:
        msg = str(e).strip()
        pytest.fail(f"{PG_ENV} is set but PostgreSQL at {redact_password(PG_URL)} is unreachable: {msg}", pytrace=False)
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
def target(request, tmp_path):
    if request.param == "sqlite":
        yield Target("sqlite", str(tmp_path / "state" / "state.db"), None)
        return
    admin = request.getfixturevalue("pg_admin")
    schema = f"indexer_state_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    try:
        yield Target("postgres", PG_URL, schema)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def store(target):
    s = target.open()
    yield s
    s.close()


# ----------------------------------------------------------------------------------------------------
# Child processes


_PRELUDE = """\
import json, os, signal, sys, time
from indexer_dagster.state import Header, Phase, open_state
url, schema, chain = json.loads(sys.argv[1])
store = open_state(url, schema=schema)
def h(n, fork=0):
    return f"0x{fork:02x}{n:062x}"
"""


class Child:
    """A Python child process running `body` after _PRELUDE; its stdout lines are collected by a thread."""

    def __init__(self, target: Target, chain: str, body: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PRELUDE + textwrap.dedent(body), target.argv(chain)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def line(self, timeout: float = 30.0) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output from child within {timeout}s") from None
        if line is None:
            self.proc.wait(5)
            raise AssertionError(f"child exited ({self.proc.returncode}): {self.proc.stderr.read()}")
        return line

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def drain(self) -> list[str]:
        """All remaining stdout lines (the child must have exited)."""
        self._reader.join(10)
        out = []
        while True:
            line = self.lines.get_nowait()
            if line is None:
                return out
            out.append(line)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.kill9()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def children():
    started: list[Child] = []

    def start(target: Target, chain: str, body: str) -> Child:
        c = Child(target, chain, body)
        started.append(c)
        return c

    yield start
    for c in started:
        c.cleanup()


# ----------------------------------------------------------------------------------------------------
# Local chain window and cursors


def test_headers_upsert_order_tip_prune_delete(store):
    assert store.tip("eth") is None and store.headers("eth") == []
    store.put_headers("eth", list(reversed(chain_of(10, 20))))
    store.put_headers("other", chain_of(1, 3, fork=9))
    assert [x.number for x in store.headers("eth")] == list(range(10, 21))
    assert store.headers("eth") == chain_of(10, 20)
    assert [x.number for x in store.headers("eth", 12, 14)] == [12, 13, 14]
    assert [x.number for x in store.headers("eth", from_number=19)] == [19, 20]
    assert [x.number for x in store.headers("eth", to_number=11)] == [10, 11]
    assert store.tip("eth") == chain_of(20, 20)[0]
    assert store.header("eth", 15) == chain_of(15, 15)[0]
    assert store.header("eth", 99) is None

    # upsert: a new fork replaces 18..22
    store.put_headers("eth", chain_of(18, 22, fork=1, parent_fork=0))
    assert store.header("eth", 18).hash == h(18, 1) and store.header("eth", 18).parent_hash == h(17, 0)
    assert store.tip("eth").number == 22 and len(store.headers("eth")) == 13
    store.put_headers("eth", [])

    assert store.delete_headers_above("eth", 19) == 3
    assert store.tip("eth").number == 19
    assert store.delete_headers_above("eth", 19) == 0
    assert store.prune_headers_below("eth", 15) == 5
    assert [x.number for x in store.headers("eth")] == [15, 16, 17, 18, 19]
    assert [x.number for x in store.headers("other")] == [1, 2, 3]  # other chains untouched


def test_header_hashes_are_lower_case(store):
    store.put_headers("eth", [Header(5, "0xABCDEF", "0xDEAD", 7)])
    assert store.header("eth", 5) == Header(5, "0xabcdef", "0xdead", 7)
    assert Header(1, "0xAA", "0xBB", 0).hash == "0xaa"


def test_a_halt_is_durable_keeps_its_first_reason_and_is_lifted_by_resume(store, target):
    assert store.halted("eth") is None
    first = store.halt("eth", "fork below the window", reorg_id=3)
    store.halt("eth", "a later reason")  # the first one explains the stop
    store.halt("other", "another chain")
    reopened = target.open()  # another process sees it
    try:
        got = reopened.halted("eth")
        assert got is not None and (got.reason, got.reorg_id) == ("fork below the window", 3)
        assert got.halted_at == first.halted_at
    finally:
        reopened.close()
    assert store.resume("eth") == first
    assert store.halted("eth") is None and store.resume("eth") is None
    assert store.halted("other") is not None


def test_cursors(store):
    assert store.get_cursor("eth", "live") is None
    store.set_cursor("eth", "live", 100, h(100))
    store.set_cursor("eth", "backfill", 5, h(5))
    store.set_cursor("other", "live", 7, h(7))
    assert store.get_cursor("eth", "live") == (100, h(100))
    store.set_cursor("eth", "live", 101, "0xABC")
    assert store.get_cursor("eth", "live") == (101, "0xabc")
    assert store.get_cursor("eth", "backfill") == (5, h(5))
    assert store.get_cursor("other", "live") == (7, h(7))


def test_reopen_is_idempotent_and_keeps_data(target):
    with target.open() as s:
        s.put_headers("eth", chain_of(1, 3))
        s.set_cursor("eth", "live", 3, h(3))
    with target.open() as s:  # schema creation again: a no-op
        assert s.tip("eth").number == 3 and s.get_cursor("eth", "live") == (3, h(3))
        with s._tx(write=False) as cur:
            cur.execute("SELECT version FROM indexer_schema_version")
            assert [r[0] for r in cur.fetchall()] == [SCHEMA_VERSION]


def test_concurrent_threads_share_one_store(store):
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(25):
                n = k * 1000 + i
                store.put_headers("eth", [Header(n, h(n), h(n - 1), n)])
                store.set_cursor("eth", f"t{k}", n, h(n))
                assert store.header("eth", n) is not None
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(store.headers("eth")) == 100
    assert all(store.get_cursor("eth", f"t{k}") == (k * 1000 + 24, h(k * 1000 + 24)) for k in range(4))


# ----------------------------------------------------------------------------------------------------
# Reorg ledger


def _open(store, chain="eth", ancestor=100, old_head=105, new_head=106, fork=1, parts=("p1",), touched=False):
    return store.open_reorg(
        chain,
        common_ancestor=ancestor,
        ancestor_hash=h(ancestor),
        old_head=old_head,
        old_head_hash=h(old_head),
        new_head=new_head,
        new_head_hash=h(new_head, fork),
        new_chain=chain_of(ancestor + 1, new_head, fork=fork, parent_fork=0),
        affected_partitions=list(parts),
        touched_confirmed=touched,
    )


def test_open_reorg_records_the_context(store):
    r = _open(store)
    assert r.id >= 1 and r.chain == "eth" and r.phase is Phase.DETECTED
    assert (r.common_ancestor, r.ancestor_hash, r.depth) == (100, h(100), 5)
    assert (r.old_head, r.old_head_hash, r.new_head, r.new_head_hash) == (105, h(105), 106, h(106, 1))
    assert r.new_chain == chain_of(101, 106, fork=1, parent_fork=0)
    assert r.affected_partitions == ["p1"] and r.rows_archived == {} and r.touched_confirmed is False
    assert r.finished_at is None and r.note == ""
    assert r.detected_at.tzinfo is not None and r.detected_at.utcoffset().total_seconds() == 0
    assert store.get_reorg(r.id) == r
    assert store.active_reorg("eth") == r
    assert store.get_reorg(r.id + 1000) is None


def test_open_reorg_is_single_flight(store):
    assert store.reorg_epoch("eth") == 0 and store.active_reorg("eth") is None
    first = _open(store)
    dup = _open(store, ancestor=102, old_head=106, new_head=108, fork=2)  # a duplicate detection
    assert dup.id == first.id and dup == first
    assert len(store.list_reorgs("eth")) == 1 and store.reorg_epoch("eth") == 1
    other = _open(store, chain="other")  # chains are independent
    assert other.id != first.id and store.active_reorg("other") == other

    store.set_phase(first.id, Phase.DONE)
    assert store.active_reorg("eth") is None
    second = _open(store, ancestor=110, old_head=112, new_head=112, fork=3)
    assert second.id > first.id and store.active_reorg("eth").id == second.id
    assert [r.id for r in store.list_reorgs("eth")] == [first.id, second.id]
    assert [r.id for r in store.list_reorgs()] == sorted([first.id, second.id, other.id])
    assert store.reorg_epoch("eth") == 2


def test_open_reorg_validates_its_input(store):
    with pytest.raises(ValueError):
        _open(store, ancestor=100, old_head=99)
    with pytest.raises(ValueError, match="outside"):
        store.open_reorg("eth", 100, h(100), 105, h(105), 103, h(103, 1), chain_of(100, 103, 1), [], False)
    assert store.list_reorgs() == [] and store.reorg_epoch("eth") == 0


def test_set_phase_compare_and_set(store):
    r = _open(store)
    moved = store.set_phase(r.id, Phase.SUSPENDING, expect=Phase.DETECTED, note="followers paused")
    assert moved.phase is Phase.SUSPENDING and moved.note == "followers paused" and moved.finished_at is None
    assert moved.updated_at >= r.updated_at

    with pytest.raises(StaleReorgPhase) as ei:
        store.set_phase(r.id, Phase.ROLLING_BACK, expect=Phase.DETECTED)
    assert ei.value.expected is Phase.DETECTED and ei.value.actual is Phase.SUSPENDING
    assert store.get_reorg(r.id).phase is Phase.SUSPENDING  # unchanged

    store.set_phase(r.id, Phase.ROLLING_BACK, expect=Phase.SUSPENDING)
    store.set_phase(r.id, Phase.RESTORING)  # no expectation: unconditional
    done = store.set_phase(r.id, Phase.DONE, expect=Phase.RESTORING)
    assert done.phase is Phase.DONE and done.finished_at is not None and done.note == "followers paused"
    again = store.set_phase(r.id, Phase.DONE, note="closed")  # same phase: idempotent, keeps finished_at
    assert again.finished_at == done.finished_at and again.note == "closed"
    with pytest.raises(ReorgFinished):
        store.set_phase(r.id, Phase.ROLLING_BACK)
    with pytest.raises(ReorgNotFound):
        store.set_phase(r.id + 1000, Phase.DONE)

    f = _open(store, ancestor=200, old_head=201, new_head=202)
    failed = store.set_phase(f.id, Phase.FAILED, expect=Phase.DETECTED, note="boom")
    assert failed.finished_at is not None and store.active_reorg("eth") is None


def test_add_rows_archived_sets_not_adds(store):
    r = _open(store)
    store.add_rows_archived(r.id, "logs", 10)
    store.add_rows_archived(r.id, "events/swap", 3)
    store.add_rows_archived(r.id, "logs", 10)  # a re-run of the step
    assert store.get_reorg(r.id).rows_archived == {"logs": 10, "events/swap": 3}
    store.add_rows_archived(r.id, "logs", 12)
    assert store.get_reorg(r.id).rows_archived == {"logs": 12, "events/swap": 3}
    with pytest.raises(ValueError):
        store.add_rows_archived(r.id, "logs", -1)
    with pytest.raises(ReorgNotFound):
        store.add_rows_archived(r.id + 1000, "logs", 1)


def test_extend_reorg_merges_a_second_reorg(store):
    r = _open(store, ancestor=100, old_head=105, new_head=106, fork=1, parts=("p1",))
    store.set_phase(r.id, Phase.ROLLING_BACK)
    epoch = store.reorg_epoch("eth")

    # Deeper second reorg: the ancestor drops to 98, fork 2 replaces everything above it.
    m = store.extend_reorg(
        r.id,
        new_head=107,
        new_head_hash=h(107, 2),
        new_chain=chain_of(99, 107, fork=2, parent_fork=0),
        common_ancestor=98,
        ancestor_hash=h(98),
        affected_partitions=["p0", "p1"],
        touched_confirmed=True,
    )
    assert m.id == r.id and m.phase is Phase.ROLLING_BACK  # the phase is the job's business
    assert (m.common_ancestor, m.ancestor_hash, m.depth) == (98, h(98), 105 - 98)
    assert (m.old_head, m.old_head_hash) == (105, h(105))
    assert (m.new_head, m.new_head_hash) == (107, h(107, 2))
    assert m.new_chain == chain_of(99, 107, fork=2, parent_fork=0)
    assert m.affected_partitions == ["p1", "p0"] and m.touched_confirmed is True
    assert store.reorg_epoch("eth") == epoch + 1

    # Shallower third reorg forking off fork 2 at 104: the ancestor stays 98, fork-2 headers up to 104 stay.
    m2 = store.extend_reorg(
        r.id,
        new_head=106,
        new_head_hash=h(106, 3),
        new_chain=chain_of(105, 106, fork=3, parent_fork=2),
        common_ancestor=104,
        ancestor_hash=h(104, 2),
        touched_confirmed=False,
    )
    assert (m2.common_ancestor, m2.depth) == (98, 7) and m2.touched_confirmed is True
    assert m2.new_chain == chain_of(99, 104, fork=2, parent_fork=0) + chain_of(105, 106, fork=3, parent_fork=2)
    assert m2.affected_partitions == ["p1", "p0"]
    assert store.get_reorg(r.id) == m2 and store.reorg_epoch("eth") == epoch + 2

    with pytest.raises(ValueError):  # a lower ancestor needs its hash
        store.extend_reorg(r.id, new_head=110, new_head_hash=h(110), new_chain=[], common_ancestor=90)
    store.set_phase(r.id, Phase.DONE)
    with pytest.raises(ReorgFinished):
        store.extend_reorg(r.id, new_head=110, new_head_hash=h(110), new_chain=[])


def test_reorg_epoch_is_monotonic(store):
    seen = [store.reorg_epoch("eth")]
    for i in range(3):
        r = _open(store, ancestor=100 + 10 * i, old_head=102 + 10 * i, new_head=103 + 10 * i)
        seen.append(store.reorg_epoch("eth"))
        _open(store, ancestor=100 + 10 * i, old_head=102 + 10 * i, new_head=103 + 10 * i)  # duplicate: no bump
        seen.append(store.reorg_epoch("eth"))
        store.set_phase(r.id, Phase.DONE)
        seen.append(store.reorg_epoch("eth"))
    assert seen == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert store.reorg_epoch("other") == 0


def test_reorgs_frame_is_parquet_ready(store, tmp_path):
    pl = pytest.importorskip("polars")
    a = _open(store)
    store.add_rows_archived(a.id, "logs", 4)
    store.set_phase(a.id, Phase.DONE)
    b = _open(store, ancestor=200, old_head=203, new_head=204)
    store.add_rows_archived(b.id, "events/swap", 2)
    store.add_rows_archived(b.id, "blocks", 1)
    rows = reorgs_frame(store)
    assert [r["id"] for r in rows] == [a.id, b.id]
    assert rows[1]["rows_archived"] == [{"dataset": "blocks", "rows": 1}, {"dataset": "events/swap", "rows": 2}]
    assert rows[1]["rows_archived_total"] == 3 and rows[0]["phase"] == "done" and rows[1]["finished_at"] is None
    assert reorgs_frame(store, chain="nope") == []
    df = pl.DataFrame(rows)
    df.write_parquet(tmp_path / "ledger.parquet")
    back = pl.read_parquet(tmp_path / "ledger.parquet")
    assert back.height == 2 and back["depth"].to_list() == [5, 3]
    assert back["new_chain"].list.len().to_list() == [6, 4]


# ----------------------------------------------------------------------------------------------------
# Several processes


def _single_flight_worker(url, schema, prefix, rounds, barrier, results):
    try:
        barrier.wait(60)  # everyone opens the (fresh) store at once, too
        store = open_state(url, schema=schema)
        ids = []
        for r in range(rounds):
            barrier.wait(60)
            chain = f"{prefix}-{r}"
            got = store.open_reorg(chain, 10, h(10), 12, h(12), 13, h(13, 1), [], ["p"], False)
            ids.append(got.id)
        store.close()
        results.put(("ok", ids))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        results.put(("error", "".join(traceback.format_exception(e))))


def test_open_reorg_single_flight_across_processes(target):
    ctx = mp.get_context("spawn")
    n, rounds = 4, 12
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_single_flight_worker, args=(target.url, target.schema, "race", rounds, barrier, results))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=90) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    errors = [o[1] for o in outcomes if o[0] != "ok"]
    assert not errors, errors[0]
    with target.open() as s:
        for r in range(rounds):
            chain = f"race-{r}"
            ids = {o[1][r] for o in outcomes}
            ledger = s.list_reorgs(chain)
            assert len(ledger) == 1 and ids == {ledger[0].id}, (chain, ids, ledger)
            assert s.reorg_epoch(chain) == 1


def test_writer_lock_across_processes_and_sigkill(store, target, children):
    chain = f"lock-{uuid.uuid4().hex[:6]}"
    holder = children(
        target,
        chain,
        """
        with store.writer_lock(chain, timeout_s=10):
            print("locked", flush=True)
            time.sleep(120)
        """,
    )
    assert holder.line() == "locked"

    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=re.escape(chain)):
        with store.writer_lock(chain, timeout_s=0.5):
            pytest.fail("acquired a lock another process holds")
    assert 0.4 <= time.monotonic() - t0 < 5
    with store.writer_lock(chain + "-other", timeout_s=1):  # other chains are independent
        pass

    holder.kill9()  # the OS / server releases the lock of a dead process
    t0 = time.monotonic()
    with store.writer_lock(chain, timeout_s=10):
        assert time.monotonic() - t0 < 1.0
        # ... and now we hold it: another process cannot take it
        trier = children(
            target,
            chain,
            """
            try:
                with store.writer_lock(chain, timeout_s=0.3):
                    print("acquired", flush=True)
            except TimeoutError as e:
                print("timeout", flush=True)
            """,
        )
        assert trier.line() == "timeout"
    trier2 = children(
        target,
        chain,
        """
        with store.writer_lock(chain, timeout_s=5):
            print("acquired", flush=True)
        """,
    )
    assert trier2.line() == "acquired"


def test_writer_lock_threads_and_reentrancy(store):
    chain = "eth"
    with store.writer_lock(chain, timeout_s=1):
        with store.writer_lock(chain, timeout_s=0.1):  # re-entrant in the holding thread
            pass
        other: list[str] = []

        def try_lock() -> None:
            try:
                with store.writer_lock(chain, timeout_s=0.3):
                    other.append("acquired")
            except TimeoutError:
                other.append("timeout")

        t = threading.Thread(target=try_lock)
        t.start()
        t.join()
        assert other == ["timeout"]  # exclusive between threads
    t = threading.Thread(target=try_lock)
    t.start()
    t.join()
    assert other == ["timeout", "acquired"]

    # mutual exclusion under contention: a non-atomic read-modify-write stays consistent
    counter = {"n": 0}

    def bump() -> None:
        for _ in range(20):
            with store.writer_lock(chain, timeout_s=10):
                v = counter["n"]
                time.sleep(0.0005)
                counter["n"] = v + 1

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter["n"] == 80


def test_writes_survive_sigkill_right_after(target, children):
    chain = "eth"
    child = children(
        target,
        chain,
        """
        store.put_headers(chain, [Header(n, h(n), h(n - 1), 1000 + n) for n in range(100, 110)])
        store.set_cursor(chain, "live", 109, h(109))
        r = store.open_reorg(chain, 105, h(105), 109, h(109), 110, h(110, 1),
                             [Header(n, h(n, 1), h(n - 1, 1 if n > 106 else 0), 0) for n in range(106, 111)],
                             ["p100"], True)
        store.set_phase(r.id, Phase.ROLLING_BACK, expect=Phase.DETECTED)
        store.add_rows_archived(r.id, "logs", 42)
        print(r.id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    rid = int(child.line())
    assert child.proc.wait(10) == -signal.SIGKILL
    with target.open() as s:
        assert [x.number for x in s.headers(chain)] == list(range(100, 110))
        assert s.get_cursor(chain, "live") == (109, h(109))
        r = s.active_reorg(chain)
        assert r.id == rid and r.phase is Phase.ROLLING_BACK and r.rows_archived == {"logs": 42}
        assert r.touched_confirmed and r.new_head == 110 and len(r.new_chain) == 5
        assert s.reorg_epoch(chain) == 1
        with s.writer_lock(chain, timeout_s=1):  # nothing left locked
            s.set_phase(rid, Phase.RESTORING, expect=Phase.ROLLING_BACK)


def test_sigkill_in_the_middle_of_writing(target, children):
    chain = "eth"
    child = children(
        target,
        chain,
        """
        n = 0
        while True:
            with store.writer_lock(chain, timeout_s=10):
                store.put_headers(chain, [Header(n, h(n), h(n - 1), n)])
                store.set_cursor(chain, "live", n, h(n))
            print(n, flush=True)
            n += 1
        """,
    )
    while int(child.line()) < 40:
        pass
    time.sleep(random.uniform(0, 0.02))
    child.kill9()
    acked = max(int(x) for x in child.drain() or ["40"])
    with target.open() as s:
        hs = s.headers(chain)
        assert len(hs) >= acked + 1
        assert hs == [Header(n, h(n), h(n - 1), n) for n in range(len(hs))]  # contiguous, uncorrupted
        block, bhash = s.get_cursor(chain, "live")
        assert block >= acked and block in (hs[-1].number, hs[-1].number - 1) and bhash == h(block)
        with s.writer_lock(chain, timeout_s=1):  # the dead writer's lock is gone
            s.put_headers(chain, [Header(len(hs), h(len(hs)), h(len(hs) - 1), 0)])
    if target.backend == "sqlite":
        conn = sqlite3.connect(target.url)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()


# ----------------------------------------------------------------------------------------------------
# PostgreSQL specifics


def test_postgres_errors_never_contain_the_password():
    secret = "s3cr3t-Pw"
    for url in (
        f"postgresql://someone:{secret}@127.0.0.1:1/nodb?connect_timeout=3",
        f"postgresql+psycopg2://someone:{secret}@127.0.0.1:1/nodb",
    ):
        with pytest.raises(StateConnectionError) as ei:
            open_state(url)
        text = "".join(traceback.format_exception(ei.value)) + repr(ei.value)
        assert secret not in text and "***" in text and "127.0.0.1" in text
    redacted = redact_password(f"postgresql://u:{secret}@h/db?password={secret}&x=1")
    assert redacted == "postgresql://u:***@h/db?password=***&x=1"
    assert redact_password("postgresql://u@h:5432/db") == "postgresql://u@h:5432/db"


def test_postgres_url_forms_and_schema_isolation(pg_admin):
    schema_a = f"indexer_state_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    schema_b = schema_a + "b"
    try:
        alt = re.sub(r"^postgres(ql)?://", "postgresql+psycopg2://", PG_URL)
        with open_state(alt, schema=schema_a) as a, open_state(PG_URL, schema=schema_b) as b:
            assert a.backend == b.backend == "postgres"
            assert "password" not in repr(a).lower() or "***" in repr(a)
            _open(a)
            assert b.list_reorgs() == [] and a.reorg_epoch("eth") == 1
            # writer locks are per schema: two deployments sharing a database don't block each other
            with a.writer_lock("eth", timeout_s=1), b.writer_lock("eth", timeout_s=1):
                pass
    finally:
        with pg_admin.cursor() as cur:
            cur.execute(f'DROP SCHEMA IF EXISTS "{schema_a}" CASCADE')
            cur.execute(f'DROP SCHEMA IF EXISTS "{schema_b}" CASCADE')


def test_forked_child_gets_its_own_connection(store):
    """A child forked from a process with an open store uses its own connection, and closing or
    collecting the inherited one must not break the parent's session (or SQLite file)."""
    store.put_headers("eth", chain_of(1, 2))
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            from indexer_dagster.state import store as state_mod

            store.put_headers("eth", chain_of(3, 3))
            store.close()
            for inherited in state_mod.INHERITED:  # what interpreter shutdown may do to them
                inherited.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [x.number for x in store.headers("eth")] == [1, 2, 3]  # the parent's connection still works
    store.put_headers("eth", chain_of(4, 4))
    assert store.tip("eth").number == 4
