"""Readers see each publish of the lake, and each reorg repair, whole or not at all.

A publish replaces several files one rename at a time, and a repair is several publishes (archive and
rollback, then the new fork's ranges and segment). A query running in between would see a range's logs
without its blocks, a row both in `logs` and `orphaned_logs`, or the chain cut at the fork point. The
gate keeps those moments from the query API without a second copy of the data:

- a writer holds a shared lock on `<gate>/lock` while it publishes, and bumps `<gate>/generation` before
  and after (the kernel drops the lock of a writer that dies);
- a repair leaves `<gate>/repair` from the start of its rollback to the end of its restore; the file
  outlives a crash (the reorg job resumes the repair and removes it);
- a reader waits until neither is there, runs its query, and runs it again if the generation moved
  meanwhile; after a few tries it holds the lock exclusively for its query (writers wait for it).

The lock is a local file: the gate covers readers and writers of one machine.
"""

import fcntl
import json
import os
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from indexer_dagster.persist.files import fsync

T = TypeVar("T")
_POLL_S = 0.02


class LakeBusy(TimeoutError):
    """The lake stayed in the middle of a change (a repair, usually) longer than a reader waits."""


class Gate:
    """The gate of one chain's lake, kept in `directory` (a hidden directory of its local data dir)."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    # -- writers -----------------------------------------------------------------------------

    @contextmanager
    def publishing(self) -> Iterator[None]:
        """Around the renames and deletes of one publish."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # several writers publish at once; readers wait for all
            self._bump()
            try:
                yield
            finally:
                self._bump()
        finally:
            os.close(fd)  # releases the lock

    def _bump(self) -> None:
        fd = os.open(self.dir / "generation", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.pwrite(fd, struct.pack("<Q", _counter(fd) + 1), 0)
        finally:
            os.close(fd)

    def begin_repair(self, reorg_id: int) -> None:
        """Readers wait from now until `end_repair` (kept across a crash: written durably, idempotent)."""
        current = self.repair()
        if current is not None and current.get("reorg") == reorg_id:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".repair.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"reorg": reorg_id, "since": datetime.now(UTC).isoformat(timespec="seconds")}))
        fsync(tmp)
        os.replace(tmp, self.dir / "repair")
        fsync(self.dir)

    def end_repair(self, reorg_id: int) -> None:
        current = self.repair()
        if current is not None and current.get("reorg") == reorg_id:
            self.clear_repair()

    def clear_repair(self) -> None:
        """Remove the mark whatever reorg it names (its owner knows no reorg is active)."""
        (self.dir / "repair").unlink(missing_ok=True)
        fsync(self.dir)

    # -- readers -----------------------------------------------------------------------------

    def repair(self) -> dict | None:
        """The repair in progress ({"reorg": id, "since": time}), if any."""
        try:
            return json.loads((self.dir / "repair").read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return {"reorg": "?", "since": "?"}  # cut short while written: still a repair

    def generation(self) -> int:
        try:
            fd = os.open(self.dir / "generation", os.O_RDONLY)
        except FileNotFoundError:
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return _counter(fd)
        finally:
            os.close(fd)

    def busy(self) -> str | None:
        """Why a reader must wait now (a repair, a publish in flight), or None."""
        if (r := self.repair()) is not None:
            return f"reorg {r.get('reorg')} is being repaired (since {r.get('since')})"
        try:
            fd = os.open(self.dir / "lock", os.O_RDONLY)
        except FileNotFoundError:
            return None  # nothing was ever published here
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "a publish is in flight"
        finally:
            os.close(fd)
        return None

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """No publish starts until the block ends (a reader's last resort). Read-only access is enough:
        a reader may not be allowed to write in the data directory."""
        try:
            fd = os.open(self.dir / "lock", os.O_RDONLY)
        except FileNotFoundError:
            yield  # nothing was ever published here
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def read_consistent(gates: Sequence[Gate], run: Callable[[], T], wait_s: float = 60.0, tries: int = 3) -> T:
    """`run()` (a query) over a state of the lakes no publish or repair was in the middle of.

    It waits while one is (up to `wait_s` each time, then LakeBusy naming it), and runs again when a
    publish happened while it ran; the last try keeps publishes out while it runs."""
    if not gates:
        return run()
    for _ in range(tries - 1):
        before = _when_idle(gates, wait_s)
        out = run()
        if _generations(gates) == before:
            return out
    while True:
        with ExitStack() as held:
            _when_idle(gates, wait_s)
            for g in gates:
                held.enter_context(g.exclusive())
            if all(g.repair() is None for g in gates):  # else a repair began meanwhile: wait for it
                return run()


def _generations(gates: Sequence[Gate]) -> tuple[int, ...]:
    return tuple(g.generation() for g in gates)


def _when_idle(gates: Sequence[Gate], wait_s: float) -> tuple[int, ...]:
    """The generations, read at a moment nothing was in flight (read first, so a publish that starts
    right after the check still changes them)."""
    deadline = time.monotonic() + wait_s
    while True:
        gens = _generations(gates)
        reasons = [b for g in gates if (b := g.busy())]
        if not reasons:
            return gens
        if time.monotonic() > deadline:
            raise LakeBusy(f"the lake is being changed: {reasons[0]}; the query waited and gave up. Retry when "
                           "it is done (`indexer status` shows a reorg in progress)")
        time.sleep(_POLL_S)


def _counter(fd: int) -> int:
    raw = os.pread(fd, 8, 0)
    return struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
